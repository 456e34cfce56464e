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


def test_generate_from_a_run_checkpoint(demo_run, capsys):
    """`analogjax generate --checkpoint`: the run's student, its tokenizer and add_bos, greedy as the library."""
    from analogjax import mesh as mesh_lib
    from analogjax.data.tokenize import load_tokenizer
    from analogjax.models.model import Model
    from analogjax.release import _load_student
    from analogjax.sampling import generate

    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(demo_run / "analog"), "--prompt", "def value",
                     "--max-new-tokens", "5", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    config, _, _, mesh, params = _load_student(demo_run / "analog")
    tok = load_tokenizer(config.data.tokenizer)
    ids = ([tok.bos_id] if config.data.add_bos else []) + list(tok.encode("def value"))
    want = generate(Model(config.model, params, mesh=mesh, rules=mesh_lib.STUDENT_RULES), [ids], max_new_tokens=5,
                    eos_ids=[tok.eos_id], max_positions=config.data.seq_len)[0]
    assert row["prompt"] == "def value" and row["tokens"] == want and 1 <= len(want) <= 5
    assert row["completion"] == tok.decode([t for t in want if t != tok.eos_id])
