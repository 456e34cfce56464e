"""The CLI as a user runs it: a real subprocess, and every mistake a single `error:` line with exit status 2."""

import json
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from subprocess_env import cpu_env

from analogjax import cli
from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.recipes.demo import load_demo_config

ROOT = Path(__file__).resolve().parent.parent


def analogjax(*args, cwd=None, devices=8, timeout=300):
    env = cpu_env(devices)
    return subprocess.run(
        [sys.executable, "-m", "analogjax", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_tiny_config_distills_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    proc = analogjax(
        "distill",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--workdir",
        str(workdir),
        "--set",
        "train.steps=10",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    for key in ("loss", "kl", "ce", "teacher_ce", "agreement", "tokens_per_s", "grad_norm", "mfu"):
        assert key in train[-1], key
    assert any("eval_kl" in r for r in records)
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["step"] == 10 and "heldout_kl" in final
    # The config that ran, resolved, is in the workdir, and the start of the run named what differs from the defaults.
    assert load_config(workdir / "config.yaml") == load_config(ROOT / "configs/tiny.yaml", ["train.steps=10"])
    assert "differs from the defaults in:" in proc.stderr and "train.steps=10" in proc.stderr
    # Asking for more steps in the same workdir resumes from the checkpoint at step 10.
    more = analogjax(
        "distill",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--workdir",
        str(workdir),
        "--set",
        "train.steps=15",
        "--no-progress",
    )
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout.strip().splitlines()[-1])["step"] == 15


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["distill", "--config", "no/such.yaml"], ["config file not found"]),
        (["distill", "--config", "{tiny}", "--set", "train.stepz=3"], ["train.stepz"]),
        (["distill", "--config", "{tiny}", "--set", "train.steps=many"], ["train.steps"]),
        (["distill", "--config", "{tiny}", "--set", "model.n_heads=3"], ["model.n_heads"]),
        (["distill", "--config", "{tiny}", "--set", "mesh.data=16"], ["16 devices", "8 exist"]),
        (["distill", "--config", "{tiny}", "--set", "data.global_batch=12"], ["data.global_batch"]),
        (["distill", "--config", "{bad_yaml}"], ["malformed YAML"]),
        (["distill"], ["--config"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, fragments):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny\n")
    args = [a.replace("{tiny}", str(ROOT / "configs/tiny.yaml")).replace("{bad_yaml}", str(bad)) for a in args]
    assert_user_error(
        analogjax(*args, "--workdir", str(tmp_path / "w"))
        if args[0] == "distill" and len(args) > 1
        else analogjax(*args),
        *fragments,
    )


def test_corpus_too_small_for_one_batch(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text('{"text": "hello"}\n{"text": "world"}\n')
    proc = analogjax(
        "distill",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--workdir",
        str(tmp_path / "w"),
        "--set",
        f"data.sources=[{{path: {corpus}}}]",
        "--set",
        "data.heldout_fraction=0",
    )
    assert_user_error(proc, str(corpus.name))
    assert not (tmp_path / "w" / "run.json").exists()  # a refused run does not claim the workdir


def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
    workdir = tmp_path / "run"
    first = analogjax(
        "distill",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--workdir",
        str(workdir),
        "--set",
        "train.steps=2",
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    other = analogjax(
        "distill",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--workdir",
        str(workdir),
        "--set",
        "model.d_model=32",
        "--set",
        "train.steps=2",
    )
    assert_user_error(other, "different model config")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_config_prints_the_resolved_config_and_where_each_value_came_from(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # main() quiets worker threads' user errors
    tiny, overrides = str(ROOT / "configs/tiny.yaml"), ["train.steps=7", "teacher.model.n_heads=2"]
    expected = load_config(tiny, overrides)
    for explain in ([], ["--explain"]):
        assert cli.main(["config", "--config", tiny, *(a for o in overrides for a in ("--set", o)), *explain]) == 0
        printed = tmp_path / f"resolved{len(explain)}.yaml"
        printed.write_text(capsys.readouterr().out)
        assert load_config(printed) == expected  # loadable back, equal to what a run would use
    lines = printed.read_text().splitlines()
    for line in (
        "  steps: 7  # --set",
        "    n_heads: 2  # --set",
        "    n_kv_heads: 2  # preset tiny-teacher",
        "  tokenizer: bytes  # file",
        "  add_bos: true  # default",
        "  preset: tiny  # file",
    ):
        assert line in lines, line
    # A model section left out is the default preset, and says so.
    assert cli.main(["config", "--explain"]) == 0
    assert "  n_kv_heads: 2  # default (preset tiny)" in capsys.readouterr().out.splitlines()
    # The demo's config has its own shape.
    assert cli.main(["config", "--demo", "--config", str(ROOT / "configs/demo.yaml")]) == 0
    demo = tmp_path / "demo.yaml"
    demo.write_text(capsys.readouterr().out)
    assert load_demo_config(str(demo), []) == load_demo_config(str(ROOT / "configs/demo.yaml"), [])


def test_partly_given_model_section_starts_from_model_defaults_not_a_preset():
    # The example: without `preset`, nothing comes from the tiny-teacher preset (n_kv_heads 2, vocab 512).
    teacher = load_config(None, ["teacher.model={d_model: 192, n_layers: 4, n_heads: 4, d_ff: 512}"]).teacher.model
    assert (teacher.preset, teacher.n_kv_heads, teacher.vocab_size, teacher.d_model) == ("", 0, 256, 192)
    # Naming the preset starts from it; a section left out is the default preset whole.
    named = load_config(None, ["teacher.model={preset: tiny-teacher, n_heads: 2}"]).teacher.model
    assert (named.n_kv_heads, named.vocab_size, named.n_heads) == (2, 512, 2)
    assert load_config(None, ["teacher.checkpoint=x"]).teacher.model.preset == "tiny-teacher"


def test_a_bug_keeps_its_traceback_and_a_thread_s_user_error_stays_quiet(monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    bug = types.ModuleType("analogjax_test_bug")
    bug.add_arguments = lambda parser: None

    def run(args):
        raise RuntimeError("a bug, not a user error")

    bug.run = run
    monkeypatch.setitem(sys.modules, bug.__name__, bug)
    monkeypatch.setitem(cli.COMMANDS, "bug", (bug.__name__, "raises a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["bug"])  # not turned into an error line: its traceback is what a developer needs
    # A worker thread stopping on a UserError prints nothing (the main thread reports it); a bug in one still does.
    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    cli.quiet_libraries()
    for exc in (UserError("bad input"), ValueError("a bug in a thread")):
        threading.excepthook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, thread=None))
    assert [type(e) for e in reported] == [ValueError]
