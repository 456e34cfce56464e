"""The CLI as a user runs it: a real subprocess, and every mistake a single `error:` line with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def analogjax(*args, cwd=None, devices=8, timeout=300):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "analogjax", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_tiny_config_distills_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    proc = analogjax("distill", "--config", str(ROOT / "configs/tiny.yaml"), "--workdir", str(workdir),
                     "--set", "train.steps=10", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    for key in ("loss", "kl", "ce", "teacher_ce", "agreement", "tokens_per_s", "grad_norm", "mfu"):
        assert key in train[-1], key
    assert any("eval_kl" in r for r in records)
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["step"] == 10 and "heldout_kl" in final
    # Asking for more steps in the same workdir resumes from the checkpoint at step 10.
    more = analogjax("distill", "--config", str(ROOT / "configs/tiny.yaml"), "--workdir", str(workdir),
                     "--set", "train.steps=15", "--no-progress")
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
    assert_user_error(analogjax(*args, "--workdir", str(tmp_path / "w")) if args[0] == "distill" and len(args) > 1
                      else analogjax(*args), *fragments)


def test_corpus_too_small_for_one_batch(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text('{"text": "hello"}\n{"text": "world"}\n')
    proc = analogjax("distill", "--config", str(ROOT / "configs/tiny.yaml"), "--workdir", str(tmp_path / "w"),
                     "--set", f"data.sources=[{{path: {corpus}}}]", "--set", "data.heldout_fraction=0")
    assert_user_error(proc, str(corpus.name))
    assert not (tmp_path / "w" / "run.json").exists()  # a refused run does not claim the workdir


def test_workdir_of_another_config_is_refused_and_kept(tmp_path):
    workdir = tmp_path / "run"
    first = analogjax("distill", "--config", str(ROOT / "configs/tiny.yaml"), "--workdir", str(workdir),
                      "--set", "train.steps=2", "--no-progress")
    assert first.returncode == 0, first.stderr
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    other = analogjax("distill", "--config", str(ROOT / "configs/tiny.yaml"), "--workdir", str(workdir),
                      "--set", "model.d_model=32", "--set", "train.steps=2")
    assert_user_error(other, "different model config")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
