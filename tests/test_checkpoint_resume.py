"""Fault tolerance end to end, through the CLI as a user runs it, in real processes so the signals are real.

One workdir is interrupted twice — SIGTERM (graceful: save at the next step boundary, exit 0), then `kill -9` (no
chance to save; async saves may be cut mid-write) — and relaunched each time with the same command. Its per-step
losses in metrics.jsonl and its final params and optimizer state must be bitwise those of an uninterrupted run.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from subprocess_env import cpu_env

from analogjax import checkpoint as ckpt_lib
from analogjax import mesh as mesh_lib
from analogjax.config import load_config
from analogjax.setup import build

STEPS = 24
TIMEOUT_S = 400


def _write_run(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo crates".split()
    with (tmp_path / "corpus.jsonl").open("w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 60)))}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model: {{preset: tiny}}
teacher: {{model: {{preset: tiny-teacher}}}}
data: {{sources: [{{path: {tmp_path / "corpus.jsonl"}}}], global_batch: 8, seq_len: 32, heldout_fraction: 0.0,
        read_threads: 1}}
distill: {{chunk_size: 64}}
optim: {{warmup_steps: 2}}
train: {{steps: {STEPS}, log_every: 1}}
checkpoint: {{every: 2, keep: 2}}
""")
    return config


def _launch(config: Path, workdir: Path, *extra: str) -> subprocess.Popen:
    env = cpu_env()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / f"{workdir.name}.{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "analogjax",
            "distill",
            "--config",
            str(config),
            "--workdir",
            str(workdir),
            "--no-progress",
            *extra,
        ],
        stdout=open(f"{log}.out", "w"),
        stderr=open(f"{log}.err", "w"),
        env=env,
    )
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    rc = proc.wait(timeout=TIMEOUT_S)
    return rc, Path(f"{proc.log}.out").read_text(), Path(f"{proc.log}.err").read_text()


def _committed_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _signal_once_saved(proc: subprocess.Popen, workdir: Path, step: int, sig: int) -> None:
    """Send `sig` as soon as a checkpoint at or after `step` is committed (the run is then mid-training)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be interrupted: {_finish(proc)}"
        if any(s >= step for s in _committed_steps(workdir)):
            proc.send_signal(sig)
            return
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def _step_records(workdir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return {r["step"]: r for r in train}


def test_sigterm_then_kill9_then_resume_equals_uninterrupted(tmp_path):
    config = _write_run(tmp_path)
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    # The uninterrupted run first, alone: the three runs of the interrupted workdir then find its compiled programs
    # and tokenized corpus in the session's caches instead of making their own at the same time.
    rc, _, err = _finish(_launch(config, reference_dir))
    assert rc == 0, err

    first = _launch(config, run_dir)
    _signal_once_saved(first, run_dir, 4, signal.SIGTERM)
    rc, out, err = _finish(first)
    assert rc == 0, err
    preempted_at = json.loads(out.strip().splitlines()[-1])["step"]
    assert 4 <= preempted_at < STEPS and "preempted (SIGTERM)" in err
    assert _committed_steps(run_dir)[-1] == preempted_at  # saved exactly where it stopped

    second = _launch(config, run_dir)
    _signal_once_saved(second, run_dir, preempted_at + 2, signal.SIGKILL)
    rc, _, _ = _finish(second)
    assert rc == -signal.SIGKILL
    killed_at = _committed_steps(run_dir)[-1]
    assert killed_at < STEPS, "the run finished before kill -9 landed"

    rc, out, err = _finish(_launch(config, run_dir))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == STEPS

    want, got = _step_records(reference_dir), _step_records(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert got[step][key] == want[step][key], (step, key)

    # Final params and optimizer state, bitwise.
    cfg = load_config(config)
    abstract = build(cfg, mesh=mesh_lib.make_mesh(8, 1, 1), init=False).abstract_state  # the restore target only
    states = []
    for workdir in (reference_dir, run_dir):
        checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
        assert checkpointer.latest_step() == STEPS
        states.append(jax.device_get(checkpointer.restore(STEPS, abstract, None)))
        checkpointer.close()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), states[0], states[1])

    # The same workdir under another model config is refused (one `error:` line, exit 2) unless asked for.
    rc, _, err = _finish(_launch(config, run_dir, "--set", "model.d_ff=128"))
    assert rc == 2 and "allow_config_change" in err and err.strip().startswith("error:")
