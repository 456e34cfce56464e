"""The release path end to end on a tiny demo run: export, eval and the bundle, and their error lines."""

import getpass
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import analogjax
from test_demo import TOY_SETS

from analogjax import cli
from analogjax.errors import UserError

# The toy self-teacher demo's settings, run once for this file: a held-out split and samples on.
DEMO = [
    *TOY_SETS,
    "run.data.heldout_fraction=0.2",
    # Held-out documents cut to one row's worth: the eval batch's 8 rows come from 8 documents, enough for intervals,
    # which resample documents.
    "run.data.heldout_document_tokens=32",
    "run.teacher.pretraining_flops=1e12",
    "samples=2",
    "sample_prompt_tokens=4",
    "sample_new_tokens=4",
]
TASKS = Path(__file__).parent / "tasks"  # local lm-eval tasks


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "def",
        "return",
        "import",
        "class",
        "self",
        "value",
        "None",
        "True",
        "False",
        "for",
        "in",
        "range",
    ]
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 80)))}) + "\n" for _ in range(300))
    )
    run = root / "run"
    # As a killed prune leaves it: the recipe prunes again instead of reading it.
    (run / "analog" / "pruned_init.partial").mkdir(parents=True)
    (run / "analog" / "pruned_init.partial" / "half-written").write_text("")
    sets = [arg for item in DEMO + [f"run.data.sources=[{{path: {corpus}}}]"] for arg in ("--set", item)]
    proc = analogjax("demo", "--teacher", "self", "--workdir", str(run), "--no-progress", *sets, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "stdout.txt").write_text(proc.stdout)
    (root / "stderr.txt").write_text(proc.stderr)
    return run


def test_toy_demo_writes_summary_and_table(demo_run):
    """`analogjax demo --teacher self` end to end at toy size, as the fixture ran it (a subprocess, as users run it)."""
    tmp_path = demo_run
    stdout, stderr = ((demo_run.parent / f"{name}.txt").read_text() for name in ("stdout", "stderr"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = ["analog", "analog_distill", "analog_random", "baseline"]
    assert summary["rows"] == rows and summary["released"] == "analog"
    assert summary["teacher"]["params"] > 0 and summary["teacher"]["heldout_ce"] > 0
    for name in rows:
        s = summary[name]
        assert s["params"] < summary["teacher"]["params"] and s["heldout_ce"] > 0
        assert s["kl_teacher"] >= 0 and 0 <= s["agreement"] <= 1
        for key in ("heldout_ce", "kl_teacher", "agreement"):  # each figure inside its own 95% interval
            lo, hi = s[f"{key}_ci95"]
            assert lo <= s[key] + 1e-9 and s[key] <= hi + 1e-9, (name, key)
    assert summary["wall_seconds"] > 0
    # the self demo's models compute in float32 (its config names no dtype); `auto` is the real-teacher demo's
    assert summary["compute_dtype"] == {"analog": "float32", "teacher": "float32"}
    assert "compute: float32 for every model" in stdout
    assert set(summary["phase_seconds"]) == set(
        "teacher pruned_init teacher_cache distill on_policy analog_random baseline"
        " evaluate transfer samples release".split()
    )
    # The recipe ran as phases in the analog's workdir; the release holds its final phase.
    recipe = json.loads((tmp_path / "analog" / "recipe.json").read_text())
    assert recipe["phases"] == ["pruned_init", "teacher_cache", "distill", "on_policy"]
    assert recipe["final"] == "on_policy" and recipe["distinct_steps"] == recipe["steps"]["distill"]  # no epochs
    assert not (tmp_path / "analog" / "pruned_init.partial").exists() and "pruning again" in stderr
    # The comparison: every measure judged, with both intervals; the controls likewise.
    measures = {e["measure"] for e in summary["comparison"]}
    assert {"forward_kl", "top1_agreement"} <= measures, measures
    for entry in summary["comparison"] + [e for c in summary["controls"].values() for e in c]:
        assert entry["better"] in ("analog", "baseline", "not distinguishable")
        # an interval, or none where nothing can be judged (a transfer measure without a judgeable concept)
        assert all(ci is None or len(ci) == 2 for ci in (entry["analog_ci95"], entry["baseline_ci95"]))
    assert set(summary["controls"]) == {"analog_distill", "analog_random"}
    assert "wall time" in stdout and "release bundle" in stdout.splitlines()[-1]
    assert "better proxy" in stdout and "released: analog" in stdout
    # Transfer checks for analog and baseline: in summary.json and in the card.
    for name in ("analog", "baseline"):
        assert {"layer_pairs", "stitch", "probes", "steering"} <= set(summary[name]["transfer"])
    card = (tmp_path / "release" / "README.md").read_text()
    assert "Do findings on this analog hold on the teacher?" in card and "Against a same-size baseline" in card
    assert "pruned to this shape" in card  # the recipe's phases
    for phase in ("teacher", "analog/distill", "analog/on_policy", "analog_random", "baseline"):
        assert (tmp_path / phase / "metrics.jsonl").exists()
    # The demo ends with the release bundle: a HF folder, its model card and the fidelity report.
    bundle = tmp_path / "release"
    for name in (
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "fidelity/fidelity.json",
        "fidelity/fidelity.md",
        "fidelity/cka.png",
    ):
        assert (bundle / name).exists(), name
    fidelity = json.loads((bundle / "fidelity" / "fidelity.json").read_text())
    assert fidelity["overall"]["forward_kl"] == summary["analog"]["kl_teacher"]  # measured once, not again
    assert fidelity["comparison"] == summary["comparison"]


def test_release_bundle(demo_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "release"
    # The release gate: the size cap (the demo's own override dropped), a ceiling on a local lm-eval task that any
    # model crosses (tests/tasks/tiny_choice.yaml), and two gates that pass.
    gated = [
        "release",
        "--checkpoint",
        str(demo_run / "analog"),
        "--out",
        str(out),
        "--set",
        f"release.tasks=[{TASKS / 'tiny_choice.yaml'}]",
        "--set",
        "release.gates=[{task: tiny_choice, max_accuracy: 0.1}, {task: tiny_choice, min_agreement: 0},"
        " {measure: overall.forward_kl, max: 1000}]",
        "--set",
        "release.overrides=[]",
    ]
    capsys.readouterr()
    assert cli.main([*gated, "--no-transfer"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[3] for line in err] == ["size_cap", "tiny_choice.max_accuracy"], err
    assert all(line.startswith("error: release gate") and "bound" in line for line in err)
    assert "% of the teacher's parameters, bound 0.50% – 5.00%" in err[0] and "bound ≤ 0.1" in err[1]
    assert not out.exists()  # refused: nothing written
    overrides = ["--override-gate", "size_cap", "--reason", "a toy analog"]
    overrides += ["--override-gate", "tiny_choice.max_accuracy", "--reason", "the ceiling is a test's"]
    assert cli.main([*gated, *overrides]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    card = (out / "README.md").read_text()
    for heading in ("## Provenance", "## Recipe", "## Compute", "## Fidelity to the teacher"):
        assert heading in card
    assert "forward_kl × 0.7" in card and "distillation / teacher pretraining" in card
    # The release of a recipe's workdir is its final phase, and the card counts every training phase.
    assert "256 tokens seen in its last phase; 1,024 over the recipe" in card, card
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
    # Task fidelity (both models on the same 7 examples) and the release statement, the card's first section.
    task = report["tasks"]["tiny_choice"]
    assert task["n"] == 7 and task["analog_accuracy"] >= 1 / 7 and 0 <= task["teacher_accuracy"] <= 1
    low, high = task["agreement_ci95"]
    assert 1 / 7 <= task["agreement"] <= 1 and low <= task["agreement"] <= high
    gates = {g["name"]: g for g in report["release_gate"]["gates"]}
    assert not gates["size_cap"]["passed"] and gates["size_cap"]["override"] == "a toy analog"
    assert gates["tiny_choice.min_agreement"]["passed"] and gates["overall.forward_kl.max"]["passed"]
    statement = card.split("## Release statement", 1)[1].split("\n## ", 1)[0]
    assert card.index("## Release statement") < card.index("## How to load")
    assert (
        "| size_cap |" in statement and "released by override" in statement and "the ceiling is a test's" in statement
    )
    assert "by task, least agreement first: tiny_choice" in statement and "by data source" in statement
    assert "| tiny_choice |" in card.split("## Fidelity to the teacher")[1]
    # Never overwrite: one error line, exit 2.
    capsys.readouterr()
    assert cli.main(["release", "--checkpoint", str(demo_run / "analog"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not empty" in err and err.count("\n") == 1


def test_bad_release_gates_are_refused_before_any_model_is_loaded(demo_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from analogjax.release import bundle

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(bundle, "load_student", no_load)
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: broken\ndataset_path: json\ndataset_kwargs: {data_files: {test: missing.jsonl}}\n")
    tiny = f"release.tasks=[{TASKS / 'tiny_choice.yaml'}]"
    cases = [
        (["--set", "release.size_cap=[0.05, 0.005]"], "release.size_cap: [low, high] is reversed"),
        (["--set", "release.size_cap=[0, 0.05]"], "release.size_cap: fractions of the teacher in (0, 1]"),
        (
            ["--set", "release.gates=[{task: tiny_choice, max_acc: 0.5}]"],
            "unknown config key: release.gates[0].max_acc",
        ),
        (["--set", "release.gates=[{task: tiny_choice, max_accuracy: 0.5}]"], "release.gates[0].task: 'tiny_choice'"),
        (["--set", tiny, "--set", "release.gates=[{task: mmlu, max_accuracy: 0.5}]"], "release.gates[0].task: 'mmlu'"),
        (["--set", "release.gates=[{measure: overal.kl, max: 1}]"], "release.gates[0].measure: 'overal.kl'"),
        (["--set", f"release.tasks=[{broken}]"], f"release.tasks: cannot build task file {str(broken)!r}"),
        (["--override-gate", "size", "--reason", "r"], "--override-gate size: no such gate"),
    ]
    for extra, message in cases:
        args = ["release", "--checkpoint", str(demo_run / "analog"), "--out", str(tmp_path / "o"), *extra]
        capsys.readouterr()
        assert cli.main(args) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (extra, err)


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

    final = demo_run / "analog" / "on_policy"  # the recipe's last phase
    config.write_text(yaml.safe_dump(json.loads((final / "run.json").read_text())["config"]))
    capsys.readouterr()
    assert (
        cli.main(
            [
                "eval",
                "--config",
                str(config),
                "--checkpoint",
                str(demo_run / "baseline"),
                "--out",
                str(tmp_path / "fid"),
            ]
        )
        == 0
    )
    got = capsys.readouterr()
    line = json.loads(got.out.strip().splitlines()[-1])
    assert line["tokens"] > 0 and (tmp_path / "fid" / "fidelity.md").is_file()
    assert line["documents"] >= 5 and "warning" not in got.err  # held-out documents cut to one row each
    # Whole toy documents: the eval batch's rows come from too few documents for an interval, and the user is told.
    whole = ["--set", "data.heldout_document_tokens=0", "--set", "data.heldout_shuffle_rows=0", "--no-transfer"]
    args = ["eval", "--config", str(config), "--checkpoint", str(demo_run / "baseline"), "--out", str(tmp_path / "f2")]
    assert cli.main(args + whole) == 0
    got = capsys.readouterr()
    assert json.loads(got.out.strip().splitlines()[-1])["documents"] < 5
    assert "too few for 95% intervals" in got.err and "data.heldout_shuffle_rows" in got.err


def test_bad_checkpoint_paths_are_one_error_line(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["release", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_generate_from_a_run_checkpoint(demo_run, capsys):
    """`analogjax generate --checkpoint`: the run's student, its tokenizer and add_bos, greedy as the library."""
    from analogjax import mesh as mesh_lib
    from analogjax.data.tokenize import load_tokenizer, resolve_tokenizer
    from analogjax.models.model import Model
    from analogjax.models.sampling import generate
    from analogjax.run_dir import load_student

    capsys.readouterr()
    assert (
        cli.main(
            [
                "generate",
                "--checkpoint",
                str(demo_run / "analog"),
                "--prompt",
                "def value",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out.strip())
    config, _, _, mesh, params = load_student(demo_run / "analog")
    tok = load_tokenizer(resolve_tokenizer(config.data))
    ids = ([tok.bos_id] if config.data.add_bos else []) + list(tok.encode("def value"))
    want = generate(
        Model(config.model, params, mesh=mesh, rules=mesh_lib.STUDENT_RULES),
        [ids],
        max_new_tokens=5,
        eos_ids=[tok.eos_id],
        max_positions=config.data.seq_len,
    )[0]
    assert row["prompt"] == "def value" and row["tokens"] == want and 1 <= len(want) <= 5
    assert row["completion"] == tok.decode([t for t in want if t != tok.eos_id])


# ----------------------------------------------------------------------------------------------------------------
# prepare → distill (data.tokenizer none, HF teacher) → release, through the CLI as a user runs it

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "kappa",
    "sigma",
    "omega",
    "lambda",
    "theta",
    "zeta",
    "the",
    "a",
    "of",
    "and",
    "in",
    "on",
    "at",
]
CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "analogjax", *map(str, args)],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64)
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
    _cli(
        "prepare",
        "--input",
        root / "corpus.jsonl",
        "--tokenizer",
        teacher / "tokenizer.json",
        "--output",
        root / "shards",
        "--workers",
        1,
        cwd=root,
    )
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    import yaml

    (root / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"vocab_size": vocab, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32},
                "teacher": {"hf_path": str(teacher), "pretraining_flops": 1e12},
                "data": {
                    "sources": [{"path": str(root / "shards")}],
                    "tokenizer": "none",
                    "global_batch": 8,
                    "seq_len": 32,
                    "heldout_fraction": 0.2,
                },
                "train": {"steps": 3, "eval_batches": 1, "log_every": 1},
            }
        )
    )
    _cli("distill", "--config", root / "run.yaml", "--workdir", root / "run", "--no-progress", cwd=root)
    _cli(
        "release",
        "--checkpoint",
        root / "run",
        "--out",
        root / "bundle",
        "--set",
        "release.lab=Tiny Lab",
        "--set",
        "release.data_description=a synthetic corpus of Greek letter names",
        "--override-gate",
        "size_cap",
        "--reason",
        "a toy analog for the tests",
        cwd=root,
    )
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
            data = data[8 : 8 + int.from_bytes(data[:8], "little")]  # the JSON header: names, shapes, metadata
        elif file.suffix == ".png":
            continue
        text = data.decode("utf-8", errors="replace")
        found += [
            f"{file.relative_to(folder)}: {w}" for w in words if re.search(rf"(?<![\w.-]){re.escape(w)}(?![\w-])", text)
        ]
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
    hub = pytest.importorskip("huggingface_hub")
    assert hub.ModelCard(card).data.to_dict() == meta  # the Hub's own parser reads the same metadata
    assert meta == {
        "license": "mit",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["analogjax", "distillation", "analog"],
        "language": ["en"],
    }
    assert "# Analog of tiny-org/tiny-teacher" in card and "Released by Tiny Lab." in card
    assert "- data: a synthetic corpus of Greek letter names" in card
    assert "teacher signal: the teacher's full-vocabulary logits, computed live in each step" in card
    assert "| teacher forward passes in training |" in card
    # Per-source columns under public names: the default ones come from the lab's directory names.
    assert set(json.loads((bundle / "fidelity" / "fidelity.json").read_text())["by_source"]) == {"source 1"}
    # No local path, host or user name anywhere in the bundle.
    paths = [str(prepared_release), str(tmp_path.parent), str(Path.home()), str(ROOT)]
    assert _leaks(bundle, paths, [socket.gethostname(), getpass.getuser()]) == []
    # The card's "How to load" snippet, run as printed from the bundle's folder.
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(bundle)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102  the card's own snippet is what is under test
    printed = capsys.readouterr().out.strip()
    print(f"snippet output: {printed!r}")
    assert printed.startswith("The")
    # Greedy generation in transformers' pipeline equals analogjax's own greedy decoding of the bundle.
    from analogjax import hf

    ours = hf.load(bundle)
    ids = tok("The")["input_ids"]
    buffer = np.zeros((1, len(ids) + 8), np.int32)  # one shape, one compile: causal logits ignore what follows
    for _ in range(8):
        buffer[0, : len(ids)] = ids
        ids.append(int(np.argmax(np.asarray(ours(buffer))[0, len(ids) - 1])))
        if ids[-1] == tok.eos_token_id:
            break
    model = transformers.AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    generate = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    theirs = generate("The", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert theirs == printed == tok.decode(ids, skip_special_tokens=True)


def test_export_refuses_a_wrong_or_missing_tokenizer_and_publishes_weights_only(
    prepared_release, tmp_path, capsys, monkeypatch
):
    import shutil

    transformers = pytest.importorskip("transformers")
    run = prepared_release / "run"
    # Another tokenizer than the one the shards were prepared with: one error line.
    other = tmp_path / "other.json"
    from analogjax.data.tokenize import train_bpe_tokenizer

    train_bpe_tokenizer(["zzz yyy xxx"] * 20, 280, str(other))
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "a"), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not the tokenizer the run was trained with" in err and err.count("\n") == 1
    # Shards whose recorded tokenizer no longer matches (the file changed since prepare): refused, named.
    shards = tmp_path / "shards"
    shutil.copytree(prepared_release / "shards", shards)
    meta = json.loads((shards / "analogjax_data.json").read_text())
    (shards / "analogjax_data.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "0" * 32}))
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    record = json.loads((moved / "run.json").read_text())
    record["config"]["data"]["sources"][0]["path"] = str(shards)
    (moved / "run.json").write_text(json.dumps(record))
    assert cli.main(["export", "--checkpoint", str(moved), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "analogjax_data.json" in err and "fingerprint" in err
    assert not (tmp_path / "b").exists()
    # --weights-only: the weights alone, which transformers loads.
    assert cli.main(["export", "--checkpoint", str(moved), "--out", str(tmp_path / "w"), "--weights-only"]) == 0
    assert not (tmp_path / "w" / "tokenizer.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert model.config.vocab_size == json.loads((run / "run.json").read_text())["config"]["model"]["vocab_size"]
    # The card's snippet for weights alone runs as printed, too.
    from analogjax.release.model_card import how_to_load

    monkeypatch.chdir(tmp_path / "w")
    capsys.readouterr()
    exec(compile(how_to_load(False, "unused"), "README.md", "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.strip() == f"torch.Size([1, 3, {model.config.vocab_size}])"


def _prepared_dir(root: Path, tokenizer: str, fingerprint: str) -> Path:
    """A prepared directory as far as tokenizer resolution reads it: its metadata file."""
    root.mkdir()
    (root / "analogjax_data.json").write_text(
        json.dumps(
            {
                "format": "arrayrecord",
                "dtype": "uint16",
                "shards": [],
                "vocab_size": 300,
                "tokenizer": tokenizer,
                "tokenizer_fingerprint": fingerprint,
            }
        )
    )
    return root


def test_tokenizer_travels_with_prepared_data(tmp_path, monkeypatch):
    from analogjax.data.spec import DataConfig, SourceConfig
    from analogjax.data.tokenize import (
        load_tokenizer,
        resolve_tokenizer,
        train_bpe_tokenizer,
    )

    tok = train_bpe_tokenizer(["alpha beta gamma"] * 20, 280, str(tmp_path / "tok" / "tokenizer.json"))
    fp = load_tokenizer(tok).fingerprint

    def resolve(*dirs, tokenizer="none"):
        return resolve_tokenizer(
            DataConfig(sources=tuple(SourceConfig(path=str(d)) for d in dirs), tokenizer=tokenizer)
        )

    good = _prepared_dir(tmp_path / "good", tok, fp)
    assert resolve(good) == tok
    assert resolve(good, tokenizer="bytes") == "bytes"  # a named tokenizer wins
    assert resolve(_prepared_dir(tmp_path / "b", "bytes", "bytes-v1")) == "bytes"
    assert resolve(tmp_path / "tok") == "none"  # not a prepared directory: nothing recorded
    # A relative recorded path is found from the working directory, else from the prepared directory.
    monkeypatch.chdir(tmp_path)
    assert resolve(_prepared_dir(tmp_path / "rel", "tok/tokenizer.json", fp)) == "tok/tokenizer.json"
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "tokenizer.json").write_bytes(Path(tok).read_bytes())
    monkeypatch.chdir(tmp_path / "tok")
    assert resolve(_prepared_dir(tmp_path / "inside" / "p", "../tokenizer.json", fp)) == str(
        tmp_path / "inside" / "p" / "../tokenizer.json"
    )
    with pytest.raises(UserError, match=r"data.sources\[0\].*missing\.json, which is missing"):
        resolve(_prepared_dir(tmp_path / "gone", str(tmp_path / "missing.json"), fp))
    with pytest.raises(UserError, match=r"has fingerprint .* prepared with fingerprint f+"):
        resolve(_prepared_dir(tmp_path / "changed", tok, "f" * 32))
    from analogjax.data.pipeline import (
        open_sources,  # a run on those shards stops before its first batch
    )

    with pytest.raises(UserError, match=r"changed.*fingerprint"):
        open_sources(
            DataConfig(sources=(SourceConfig(path=str(tmp_path / "changed")),), tokenizer="none"), vocab_size=300
        )
    with pytest.raises(UserError, match=r"data.sources\[0\].*data.sources\[1\].*different tokenizers"):
        resolve(good, tmp_path / "b")


def test_release_refuses_to_guess_a_tokenizer(tmp_path):
    from analogjax.config import Config
    from analogjax.data.spec import DataConfig, SourceConfig
    from analogjax.release import bundle_tokenizer

    config = Config(data=DataConfig(sources=(SourceConfig(path=str(tmp_path / "ids.jsonl")),), tokenizer="none"))
    with pytest.raises(UserError, match="no tokenizer to ship.*--weights-only"):
        bundle_tokenizer(config)
    assert bundle_tokenizer(config, weights_only=True) is None
    assert bundle_tokenizer(config, tokenizer="bytes") == "bytes"
    with pytest.raises(UserError, match="contradict"):
        bundle_tokenizer(config, tokenizer="bytes", weights_only=True)


def _fake_report():
    from analogjax.fidelity import metrics

    return {"overall": {key: 0.5 for key, _, _ in metrics._TABLE} | {"tokens": 64}, "by_source": {}}


def test_card_recipe_line_names_the_cache_and_the_epochs_over_it():
    from analogjax.release.model_card import recipe_phases

    phases = ["pruned_init", "teacher_cache", "distill"]
    sampled = {"phases": phases, "recipe": {"prune_batches": 4, "cache_k": 256, "cache_kind": "sampled"}}
    line = recipe_phases({**sampled, "steps": {"distill": 120}, "distinct_steps": 60})
    assert "→ 256 ids per token sampled from the teacher (importance-weighted) cached once →" in line
    assert line.endswith("distilled 120 steps from the cache (epochs over its first 60 batches)"), line
    # a recipe.json written before cache kinds and epochs: top-k, every batch once
    line = recipe_phases({"phases": phases, "recipe": {"prune_batches": 4, "cache_k": 64}, "steps": {"distill": 80}})
    assert "the teacher's top-64 logits cached once" in line and line.endswith("distilled 80 steps from the cache")


def test_card_says_what_teacher_signal_the_run_used_and_counts_only_teacher_work_done(tmp_path):
    import dataclasses

    from analogjax.config import Config, LossTerm, TeacherConfig, fingerprint
    from analogjax.release import model_card, with_release_overrides
    from analogjax.runtime.flops import forward_flops_per_token

    base = Config(teacher=TeacherConfig(pretraining_flops=1e15))
    tokens = 10 * base.data.global_batch * base.data.seq_len
    teacher_fwd = forward_flops_per_token(base.teacher.model, base.data.seq_len)

    live = model_card.compute_ledger(base, 10)
    assert live["teacher_flops"] == teacher_fwd * tokens and live["cache_flops"] is None
    ce_only = dataclasses.replace(base, distill=dataclasses.replace(base.distill, terms=(LossTerm("ce"),)))
    ledger = model_card.compute_ledger(ce_only, 10)
    assert ledger["teacher_flops"] == 0 and ledger["total_flops"] == ledger["student_flops"]
    card = model_card.model_card(ce_only, 10, _fake_report(), disclosed=model_card.disclosure(ce_only))
    assert "teacher signal: none: labels only" in card and "0 (labels only: the teacher never ran)" in card

    cached = dataclasses.replace(base, teacher=dataclasses.replace(base.teacher, cache=str(tmp_path / "cache")))
    provenance = {
        "layout": {"kind": "topk", "k": 8},
        "steps": 20,
        "global_batch": base.data.global_batch,
        "seq_len": base.data.seq_len,
        "teacher": {"model": fingerprint(base.teacher.model)},
    }
    ledger = model_card.compute_ledger(cached, 10, provenance)
    assert ledger["teacher_flops"] == 0 and ledger["cache_flops"] == teacher_fwd * 2 * tokens  # the cache's 20 steps
    assert ledger["total_flops"] == ledger["student_flops"] + ledger["cache_flops"]
    card = model_card.model_card(
        cached, 10, _fake_report(), disclosed=model_card.disclosure(cached), cache_provenance=provenance
    )
    assert "the teacher's top-8 logits per position, cached (treatment: tail_bucket)" in card
    assert "| teacher forward passes in training | 0 (the teacher's outputs came from a cache) |" in card
    assert f"| teacher cache, written once ({2 * tokens:,} tokens) |" in card
    sampled = {**provenance, "layout": {"kind": "sampled", "k": 4}}
    assert "4 tokens per position sampled" in model_card.model_card(
        cached, 10, _fake_report(), disclosed=model_card.disclosure(cached), cache_provenance=sampled
    )
    card = model_card.model_card(cached, 10, _fake_report(), disclosed=model_card.disclosure(cached))
    assert "not counted (no provenance of this teacher's cache found)" in card
    other_teacher = {**provenance, "teacher": {"model": "0123456789abcdef"}}
    assert model_card.compute_ledger(cached, 10, other_teacher)["cache_flops"] is None
    assert str(tmp_path) not in card and "An analog distilled with analogjax" in card
    # Local paths only where the lab opts in.
    opted = with_release_overrides(cached, ["allow_local_paths=true"])
    card = model_card.model_card(opted, 10, _fake_report(), disclosed=model_card.disclosure(opted))
    assert f"`{tmp_path / 'cache'}`" in card


def test_disclosure_comes_from_the_artefacts_and_the_release_section_never_from_paths(tmp_path):
    import types

    import yaml

    from analogjax.config import Config, TeacherConfig
    from analogjax.release import model_card, with_release_overrides

    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(folder)}))  # what a local load writes
    (folder / "README.md").write_text("---\nlicense: llama3.1\nlanguage: [en, de]\n---\n")
    found = model_card.teacher_metadata(TeacherConfig(hf_path=str(folder)))
    assert found == {"license": "llama3.1", "language": ("en", "de")}
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.1-8B"}))
    config = Config(teacher=TeacherConfig(hf_path=str(folder)))
    d = model_card.disclosure(config)
    assert (d.teacher_name, d.base_model, d.license, d.language) == (
        "meta-llama/Llama-3.1-8B",
        None,
        "llama3.1",
        ("en", "de"),
    )
    d = model_card.disclosure(with_release_overrides(config, ["release.base_model_public=true", "license=other"]))
    meta = yaml.safe_load(model_card.metadata_block(d).strip("-\n"))
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B" and meta["license"] == "other"
    # A private name cannot be published as base_model; unknown or malformed release settings are refused.
    private = with_release_overrides(config, ["teacher_name=our frontier model", "base_model_public=true"])
    with pytest.raises(UserError, match="not a Hub id"):
        model_card.disclosure(private)
    with pytest.raises(UserError, match="unknown config key: release.colour"):
        with_release_overrides(config, ["release.colour=blue"])
    with pytest.raises(UserError, match="release.language"):
        with_release_overrides(config, ["release.language=[en us]"])
    # No license anywhere: "other", and the card says nobody chose one.
    assert model_card.disclosure(Config()).license == "other" and not model_card.disclosure(Config()).license_chosen
    # A GGUF teacher's general.name.
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    writer.add_name("Tiny GGUF Teacher")
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    found = model_card.teacher_metadata(types.SimpleNamespace(hf_path=None, gguf_path=str(tmp_path / "t.gguf")))
    assert found == {"name": "Tiny GGUF Teacher", "license": "apache-2.0"}


def test_local_strings_are_found_in_every_file_the_release_writes(tmp_path):
    from analogjax.release import model_card

    (tmp_path / "fidelity").mkdir()
    (tmp_path / "README.md").write_text(f"teacher: {tmp_path}/teacher; Alice wrote it on a buildbox\n")
    (tmp_path / "fidelity" / "fidelity.json").write_text('{"source": "alice@buildbox-7:/data"}')
    (tmp_path / "tokenizer.json").write_text(f'{{"vocab": {{"/alice": 5, "{tmp_path}": 6}}}}')  # the lab's own file
    found = model_card.find_local_strings(tmp_path, [str(tmp_path)], ["buildbox-7", "alice"])
    assert found == [
        ("README.md", str(tmp_path)),
        ("fidelity/fidelity.json", "buildbox-7"),
        ("fidelity/fidelity.json", "alice"),
    ]
