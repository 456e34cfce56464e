"""Multi-host runs for real: 2 CPU processes x 4 devices form one JAX job (gloo collectives).

One long-running 2-process distill job is (1) compared step by step with a 1-process x 8-device run fed the same
global batches, (2) has one process killed after a checkpoint, which must bring the other down (non-zero) within
2 minutes, and (3) is relaunched, resumes from the checkpoint both processes wrote, and again matches the reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.runtime import distributed

REPO = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 15
STEP_KEYS = ("loss", "kl", "ce", "teacher_ce", "grad_norm")

# train.steps is far beyond what the test runs: the job is always stopped from outside, and the LR schedule
# (which depends on train.steps) is the same for the reference run.
TINY = {
    "model": {"preset": "tiny"},
    "teacher": {"model": {"preset": "tiny-teacher"}},
    "data": {"global_batch": 8, "seq_len": 32},
    "optim": {"warmup_steps": 0},
    "train": {"steps": 100000, "log_every": 1},
    "checkpoint": {"every": 2},  # async saves (the default): the writer thread joins the cross-process barriers
}


def _local_launcher():
    spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Flags and environment


def test_single_process_without_flags_or_cluster(monkeypatch):
    monkeypatch.setattr(distributed, "detected_platform", lambda environ=None: None)
    assert distributed.cluster_from(None, {}) is None


def test_environment_gives_the_place_and_flags_win():
    env = {
        "ANALOGJAX_COORDINATOR": "10.0.0.1:1234",
        "ANALOGJAX_NUM_PROCESSES": "4",
        "ANALOGJAX_PROCESS_ID": "3",
        "ANALOGJAX_HEARTBEAT_TIMEOUT": "30",
    }
    cluster = distributed.cluster_from(None, env)
    assert cluster == distributed.Cluster("10.0.0.1:1234", 4, 3, 30)
    args = type("Args", (), {"coordinator": None, "num_processes": None, "process_id": 1, "heartbeat_timeout": None})
    assert distributed.cluster_from(args, env).process_id == 1


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ANALOGJAX_COORDINATOR": "h:1", "ANALOGJAX_NUM_PROCESSES": "2"}, "--process-id is required"),
        ({"ANALOGJAX_COORDINATOR": "h:1", "ANALOGJAX_NUM_PROCESSES": "2", "ANALOGJAX_PROCESS_ID": "2"}, r"\[0, 2\)"),
        ({"ANALOGJAX_COORDINATOR": "nohost", "ANALOGJAX_NUM_PROCESSES": "2", "ANALOGJAX_PROCESS_ID": "0"}, "HOST:PORT"),
        ({"ANALOGJAX_COORDINATOR": "h:1", "ANALOGJAX_NUM_PROCESSES": "two", "ANALOGJAX_PROCESS_ID": "0"}, "integer"),
    ],
)
def test_incomplete_or_wrong_places_are_user_errors(env, message):
    with pytest.raises(UserError, match=message):
        distributed.cluster_from(None, env)


def test_slurm_allocation_is_detected():
    assert distributed.detected_platform({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    cluster = distributed.cluster_from(None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert cluster is not None and cluster.detected


def test_launcher_returns_the_first_failure():
    launcher = _local_launcher()
    code = launcher.launch(
        [sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['ANALOGJAX_PROCESS_ID'] == '1' else 0)"],
        processes=2,
        devices=1,
    )
    assert code == 3


# ----------------------------------------------------------------------------------------------------------------
# The real thing


def _start_job(workdir: Path, config_path: Path, logs: Path, tag: str) -> list[subprocess.Popen]:
    launcher = _local_launcher()
    port = launcher.free_port()
    env = dict(os.environ)  # the launcher sets the device count, and keeps the session's other XLA flags
    procs = []
    for pid in range(2):
        penv = launcher.process_env(env, process_id=pid, processes=2, devices=4, port=port, heartbeat=HEARTBEAT_S)
        log = open(logs / f"{tag}-{pid}.log", "w")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "analogjax",
                    "distill",
                    "--config",
                    str(config_path),
                    "--workdir",
                    str(workdir),
                    "--no-progress",
                ],
                env=penv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def _records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r]


def _wait_for(condition, procs, logs: Path, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited while waiting for {what}:\n{_tails(logs)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{_tails(logs)}")
        time.sleep(0.5)


def _tails(logs: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-15:]) for p in sorted(logs.glob("*.log"))
    )


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _reference_losses(config, steps: int) -> dict[int, dict[str, float]]:
    """The same run on one process x 8 devices, fed what 2 processes feed: their rows concatenated in order."""
    from analogjax.data import make_batch_iterator
    from analogjax.runtime.metrics_log import means
    from analogjax.setup import build

    run = build(config)
    iterators = [
        make_batch_iterator(
            config.data,
            split="train",
            seed=config.train.seed,
            vocab_size=config.model.vocab_size,
            process_index=i,
            process_count=2,
        )
        for i in range(2)
    ]
    state, out = run.state, {}
    with jax.set_mesh(run.mesh):
        for step in range(1, steps + 1):
            parts = [next(it) for it in iterators]
            batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
            state, metrics = run.step_fn(state, run.teacher_params, jax.device_put(batch, run.batch_sharding))
            out[step] = means(jax.device_get(metrics))
    return out


def _assert_matches(records: list[dict], reference: dict[int, dict[str, float]]) -> None:
    for record in records:
        want = reference[record["step"]]
        for key in STEP_KEYS:
            np.testing.assert_allclose(record[key], want[key], rtol=2e-5, err_msg=f"step {record['step']} {key}")


def test_two_processes_match_one_die_together_and_resume(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    config = load_config(config_path)
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    checkpoints = workdir / "checkpoints"

    # The reference first: it also fills the tokenized-corpus cache the two processes then only read.
    reference = _reference_losses(config, 12)

    # 1. Run until both processes have written checkpoint 4, then kill process 1.
    procs = _start_job(workdir, config_path, logs, "first")
    try:
        _wait_for(
            lambda: (checkpoints / "4" / "commit_success.txt").exists() and len(_records(workdir)) >= 4,
            procs,
            logs,
            "checkpoint 4",
        )
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = procs[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process 0 still running 2 minutes after process 1 died:\n{_tails(logs)}") from None
        assert code != 0, "process 0 must fail when its peer dies"
        assert time.monotonic() - killed_at < 120
    finally:
        _kill_all(procs)
    first = [r for r in _records(workdir) if r["step"] <= 4]
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    _assert_matches(first, reference)

    # 2. Relaunch: both processes restore the latest complete checkpoint (params, optimizer, data position).
    # Process 0 may have logged a step past the checkpoint before it noticed its peer died; the resume trims such
    # lines, so the file then holds each step once, in order.
    resumed_from = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    wanted = list(range(1, resumed_from + 3))
    procs = _start_job(workdir, config_path, logs, "resumed")
    try:
        _wait_for(
            lambda: [r["step"] for r in _records(workdir)][: len(wanted)] == wanted,
            procs,
            logs,
            "two steps after resuming",
        )
    finally:
        _kill_all(procs)
    resumed = _records(workdir)[resumed_from : resumed_from + 2]
    assert [r["step"] for r in resumed] == [resumed_from + 1, resumed_from + 2]
    assert resumed_from + 2 <= max(reference), "raise the reference's step count"
    _assert_matches(resumed, reference)


HELDOUT_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from analogjax.data import DataConfig, SourceConfig, heldout_batches
from analogjax.runtime import distributed

distributed.initialize(distributed.cluster_from())
fields = json.loads(sys.argv[1])
data = DataConfig(sources=tuple(SourceConfig(**s) for s in fields.pop("sources")), **fields)
sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
got = []
for batch, documents in heldout_batches(data, seed=0, vocab_size=4096, sharding=sharding, batches=5, documents=True):
    got.append(documents.tolist())
print("DOCUMENTS " + json.dumps(got), flush=True)
"""


def test_heldout_documents_of_a_global_batch_are_every_process_rows_in_order(tmp_path):
    """heldout_batches(documents=True) on two processes: each process gets the labels of the whole global batch, its
    rows being the processes' rows in process order (to_global_batch), as one process packing each share finds."""
    from analogjax.data import DataConfig, SourceConfig, make_batch_dataset

    corpus = tmp_path / "c.bin"
    lengths = [20 + (d * 7) % 60 for d in range(300)]
    np.concatenate([np.full(n, d % 4000 + 1) for d, n in enumerate(lengths)]).astype(np.uint16).tofile(corpus)
    np.save(tmp_path / "c.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    fields = dict(
        sources=[{"path": str(corpus), "dtype": "uint16"}],
        tokenizer="none",
        global_batch=8,
        seq_len=16,
        heldout_fraction=0.3,
        heldout_shuffle_rows=16,
        read_threads=0,
    )
    launcher = _local_launcher()
    port = launcher.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HELDOUT_SCRIPT, json.dumps(fields)],
            env=launcher.process_env(dict(os.environ), process_id=pid, processes=2, devices=4, port=port, heartbeat=15),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    got = [json.loads(next(line for line in o.splitlines() if line.startswith("DOCUMENTS "))[10:]) for o in outputs]
    data = DataConfig(
        sources=(SourceConfig(path=str(corpus), dtype="uint16"),), **{k: v for k, v in fields.items() if k != "sources"}
    )
    shares = [
        iter(
            make_batch_dataset(
                data,
                split="heldout",
                seed=0,
                vocab_size=4096,
                process_index=i,
                process_count=2,
                num_epochs=1,
                documents=True,
            )
        )
        for i in range(2)
    ]
    want = [np.concatenate([next(s)["documents"] for s in shares]).tolist() for _ in range(5)]
    assert got[0] == got[1] == want
    assert len({d for batch in want for d in batch}) > 8  # rows of many documents, not one after another
