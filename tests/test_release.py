"""The release path end to end on a tiny demo run: export, eval and the bundle, and their error lines."""

import json

import numpy as np
import pytest

from analogjax import cli

DEMO = ["teacher_steps=3", "run.train.steps=3", "tokenizer_vocab=0", "run.model.vocab_size=259",
        "run.teacher.model.vocab_size=259", "run.teacher.model.d_model=32", "run.teacher.model.d_ff=64",
        "run.model.d_model=16", "run.model.d_ff=32", "run.data.global_batch=8", "run.data.seq_len=32",
        "run.train.eval_batches=1", "run.train.log_every=1", "run.data.heldout_fraction=0.2",
        "run.teacher.pretraining_flops=1e12"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    words = "alpha beta gamma delta def return import class self value None True False for in range".split()
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 80)))}) + "\n"
                              for _ in range(300)))
    args = ["demo", "--workdir", str(root / "run"), "--no-progress"]
    for item in DEMO + [f"run.data.sources=[{{path: {corpus}}}]"]:
        args += ["--set", item]
    assert cli.main(args) == 0
    return root / "run"


def test_release_bundle(demo_run, tmp_path, capsys):
    out = tmp_path / "release"
    assert cli.main(["release", "--checkpoint", str(demo_run / "analog"), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    card = (out / "README.md").read_text()
    for heading in ("## Provenance", "## Recipe", "## Compute", "## Fidelity to the teacher"):
        assert heading in card
    assert "forward_kl × 0.7" in card and "768 tokens seen" in card and "distillation / teacher pretraining" in card
    report = json.loads((out / "fidelity" / "fidelity.json").read_text())
    overall = report["overall"]
    assert overall["tokens"] > 0 and overall["forward_kl"] > 0 and 0 <= overall["top1_agreement"] <= 1
    assert [c["teacher_layer"] for c in report["cka"]] == [1, 3]  # 2 student ↔ 4 teacher layers
    for png in ("kl_by_position", "agreement_by_source", "cka", "training_curves"):
        assert (out / "fidelity" / f"{png}.png").stat().st_size > 0
        assert f"fidelity/{png}.png" in card
    # The same held-out KL as the demo's own measurement of the analog (same batches, same teacher).
    summary = json.loads((demo_run / "summary.json").read_text())
    assert overall["forward_kl"] == pytest.approx(summary["analog"]["kl_teacher"], rel=1e-4)
    # Never overwrite: one error line, exit 2.
    capsys.readouterr()
    assert cli.main(["release", "--checkpoint", str(demo_run / "analog"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not empty" in err and err.count("\n") == 1


def test_export_from_checkpoints_dir_and_eval_of_baseline(demo_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    out = tmp_path / "hf"
    # The checkpoints directory alone (config read from run.json next to it, or the meta item).
    assert cli.main(["export", "--checkpoint", str(demo_run / "baseline" / "checkpoints"), "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode("def value", add_special_tokens=False)
    assert ids == list(b"def value")
    from analogjax import hf

    ours = np.asarray(hf.load(out)(np.asarray([ids], np.int32)))
    with torch.no_grad():
        theirs = model(torch.as_tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # eval of the CE baseline against the analog's teacher, from the analog's config file
    config = tmp_path / "analog.yaml"
    import yaml

    config.write_text(yaml.safe_dump(json.loads((demo_run / "analog" / "run.json").read_text())["config"]))
    capsys.readouterr()
    assert cli.main(["eval", "--config", str(config), "--checkpoint", str(demo_run / "baseline"),
                     "--out", str(tmp_path / "fid")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["tokens"] > 0 and (tmp_path / "fid" / "fidelity.md").is_file()


def test_bad_checkpoint_paths_are_one_error_line(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["release", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# prepare → distill (data.tokenizer none, HF teacher) → release, through the CLI as a user runs it

import getpass  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from analogjax.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta kappa sigma omega lambda theta zeta the a of and in on at".split()
CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "analogjax", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _hf_teacher(root: Path, corpus_texts) -> Path:
    """A HF teacher folder as a lab has one: weights, config.json naming its Hub id, a tokenizers JSON with a chat
    template, a README whose metadata states license and language."""
    import flax
    import jax

    from analogjax.data.tokenize import load_tokenizer, train_bpe_tokenizer
    from analogjax.models import hf
    from analogjax.models.config import ModelConfig
    from analogjax.models.transformer import Transformer

    tok_file = train_bpe_tokenizer(corpus_texts, 300, str(root / "tok" / "tokenizer.json"))
    vocab = load_tokenizer(tok_file).vocab_size
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    params = jax.device_get(flax.linen.unbox(Transformer(cfg).init_boxed(jax.random.key(1))))
    folder = root / "teacher"
    hf.save_params(params, cfg, folder, tokenizer=tok_file)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "tiny-org/tiny-teacher"}))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": CHAT_TEMPLATE}))
    (folder / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny teacher\n")
    return folder


@pytest.fixture(scope="module")
def prepared_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, rng.integers(20, 60))) for _ in range(200)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    teacher = _hf_teacher(root, texts)
    _cli("prepare", "--input", root / "corpus.jsonl", "--tokenizer", teacher / "tokenizer.json",
         "--output", root / "shards", "--workers", 1, cwd=root)
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    import yaml

    (root / "run.yaml").write_text(yaml.safe_dump({
        "model": {"vocab_size": vocab, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32},
        "teacher": {"hf_path": str(teacher), "pretraining_flops": 1e12},
        "data": {"sources": [{"path": str(root / "shards")}], "tokenizer": "none", "global_batch": 8,
                 "seq_len": 32, "heldout_fraction": 0.2},
        "train": {"steps": 3, "eval_batches": 1, "log_every": 1},
    }))
    _cli("distill", "--config", root / "run.yaml", "--workdir", root / "run", "--no-progress", cwd=root)
    _cli("release", "--checkpoint", root / "run", "--out", root / "bundle", "--set", "release.lab=Tiny Lab",
         "--set", "release.data_description=a synthetic corpus of Greek letter names", cwd=root)
    return root


def _leaks(folder: Path, paths: list[str], words: list[str]) -> list[str]:
    """Every file of `folder`: the local paths found anywhere in its bytes, and host/user names found as whole words
    in its text (text files, safetensors headers; a PNG's compressed pixels hold short words by chance)."""
    found = []
    for file in folder.rglob("*"):
        if not file.is_file():
            continue
        data = file.read_bytes()
        found += [f"{file.relative_to(folder)}: {p}" for p in paths if p.encode() in data]
        if file.suffix == ".safetensors":
            data = data[8:8 + int.from_bytes(data[:8], "little")]  # the JSON header: names, shapes, metadata
        elif file.suffix == ".png":
            continue
        text = data.decode("utf-8", errors="replace")
        found += [f"{file.relative_to(folder)}: {w}" for w in words
                  if re.search(rf"(?<![\w.-]){re.escape(w)}(?![\w-])", text)]
    return found


def test_prepared_run_releases_a_bundle_that_loads_and_generates(prepared_release, tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    bundle = prepared_release / "bundle"
    names = {p.name for p in bundle.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    # The tokenizer is the shards' (the teacher's file, by fingerprint), with its specials and the chat template.
    assert (bundle / "tokenizer.json").read_bytes() == (prepared_release / "teacher" / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(bundle)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.apply_chat_template([{"role": "user", "content": "alpha"}], tokenize=False) == "<bos>alpha<eos>"
    # A proper HF model card: metadata from the teacher's own files and the release section, no base_model
    # (the teacher is not declared public), the chosen data description, the teacher named by its Hub id.
    card = (bundle / "README.md").read_text()
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    assert meta == {"license": "mit", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["analogjax", "distillation", "analog"], "language": ["en"]}
    assert "# Analog of tiny-org/tiny-teacher" in card and "Released by Tiny Lab." in card
    assert "- data: a synthetic corpus of Greek letter names" in card
    assert "teacher signal: the teacher's full-vocabulary logits, computed live in each step" in card
    assert "| teacher forward passes in training |" in card
    # No local path, host or user name anywhere in the bundle.
    paths = [str(prepared_release), str(tmp_path.parent), str(Path.home()), str(ROOT)]
    assert _leaks(bundle, paths, [socket.gethostname(), getpass.getuser()]) == []
    # The card's "How to load" snippet, run as printed from the bundle's folder.
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(bundle)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    print(f"snippet output: {printed!r}")
    assert printed.startswith("The")
    # Greedy generation in transformers' pipeline equals analogjax's own greedy decoding of the bundle.
    from analogjax import hf

    ours = hf.load(bundle)
    ids = tok("The")["input_ids"]
    for _ in range(8):
        ids.append(int(np.argmax(np.asarray(ours(np.asarray([ids], np.int32)))[0, -1])))
        if ids[-1] == tok.eos_token_id:
            break
    model = transformers.AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    generate = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    theirs = generate("The", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert theirs == printed == tok.decode(ids, skip_special_tokens=True)
