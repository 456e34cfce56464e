"""Damage never strands a run: checksummed checkpoints, teacher caches and prepared shards; one writer per workdir.

Each kind of damage a cluster leaves (a file cut short, zero-filled, one byte flipped) in a checkpoint's array file and
in its Orbax metadata is detected; the newest intact step is used (a resumed run's losses equal an uninterrupted
run's); damage in every step is refused. A damaged prepared shard is refused naming the document (a damaged
teacher-cache chunk: tests/test_teacher_cache.py, beside the cache it damages). A second writer on a workdir is
refused; a killed one's lock is taken over.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analogjax import checkpoint as ckpt_lib
from analogjax import cli
from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.runtime.workdir_lock import LOCK_FILE, WorkdirLock
from analogjax.step import TrainState
from analogjax.train import run_training

ROOT = Path(__file__).resolve().parent.parent


def _damage(path: Path, how: str) -> None:
    """What a dying disk or a broken copy leaves: the file cut in half, zero-filled, or one byte flipped."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "zero":
        data = bytearray(len(data))
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _array_file(step_dir: Path) -> Path:
    return sorted((step_dir / "params" / "ocdbt.process_0" / "d").iterdir())[0]


def _metadata_file(step_dir: Path) -> Path:
    return step_dir / "train" / "_METADATA"


def _state(value: float) -> TrainState:
    return TrainState(
        step=jnp.int32(int(value)),
        params={"model": {"w": jnp.full((4, 8), value)}},
        opt_state={"mu": jnp.full((4, 8), -value)},
        rng=jnp.zeros(2, jnp.uint32),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A checkpoint directory with intact steps 1 and 2 (copied by each test that damages it)."""
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    checkpointer = ckpt_lib.Checkpointer(directory, async_save=True)
    for step in (1, 2):
        checkpointer.save(step, _state(step), None, {"identity": {}})
    checkpointer.close()
    return directory


@pytest.mark.parametrize("target", [_array_file, _metadata_file], ids=["array", "metadata"])
@pytest.mark.parametrize("how", ["truncate", "zero", "flip"])
def test_damaged_newest_step_is_skipped_set_aside_and_the_previous_restored(saved, tmp_path, capsys, target, how):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    damaged = target(directory / "2")
    _damage(damaged, how)

    # `check` says what is wrong and what a resume would use, changing nothing.
    assert cli.main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step 2: damaged" in out and str(damaged.relative_to(directory / "2")) in out, out
    assert "step 1: intact" in out and "a resume would use: step 1" in out
    assert (directory / "2").is_dir()

    checkpointer = ckpt_lib.Checkpointer(directory)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"skipping damaged checkpoint {directory / '2'}" in warnings[0], warnings
    assert str(damaged.relative_to(directory / "2")) in warnings[0]
    assert checkpointer.latest_step() == 1
    # Kept aside for inspection, never deleted; out of Orbax's sight.
    assert (directory / ckpt_lib.DAMAGED_DIR / "2").is_dir() and not (directory / "2").exists()
    assert checkpointer.all_steps() == [1]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _state(0))
    restored = jax.device_get(checkpointer.restore(1, abstract, None))
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(_state(1)))
    checkpointer.close()


def test_damage_in_every_checkpoint_is_refused(saved, tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    _damage(_array_file(directory / "1"), "flip")
    _damage(directory / "2" / "params" / "_METADATA", "truncate")
    with pytest.raises(UserError, match=f"{directory}: every checkpoint .* is damaged"):
        ckpt_lib.Checkpointer(directory)
    assert cli.main(["check", str(tmp_path)]) == 1
    assert "a resume would be refused" in capsys.readouterr().out
    with pytest.raises(UserError, match="every checkpoint"):  # nor does a teacher load or init_path read their params
        ckpt_lib.restore_params(directory, None)


# tests/test_checkpoint.py's tiny run (cross-entropy alone), so the programs it compiled serve here from the session's
# compilation cache: what is tested is the checkpoint, not the step.
TINY = [
    "model.preset=tiny",
    "teacher.model.preset=tiny-teacher",
    "data.global_batch=8",
    "data.seq_len=32",
    "train.steps=10",
    "optim.warmup_steps=0",
    "distill.chunk_size=64",
]
RESUMABLE = TINY + ["distill.terms=[{kind: ce}]", "data.heldout_fraction=0", "train.log_every=1", "checkpoint.every=3"]


def _losses(workdir: Path) -> dict[int, dict]:
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if "loss" in r}


def test_resume_after_damage_equals_the_uninterrupted_run(tmp_path, capsys):
    """A finished run's two newest steps (10 and 9) are damaged (an array file cut short, a metadata byte flipped):
    relaunched, the run resumes from step 6 and computes steps 7 to 10 again, bitwise as before."""
    config = load_config(None, RESUMABLE + ["checkpoint.keep=4"])
    workdir = tmp_path / "run"
    first = run_training(config, workdir, progress=False)
    before = _losses(workdir)
    checkpoints = workdir / "checkpoints"
    assert ckpt_lib.committed_steps(checkpoints) == [3, 6, 9, 10]
    _damage(_array_file(checkpoints / "10"), "truncate")
    _damage(_metadata_file(checkpoints / "9"), "flip")
    capsys.readouterr()

    again = run_training(config, workdir, progress=False)
    err = capsys.readouterr().err
    assert err.count("skipping damaged checkpoint") == 2 and "using checkpoint 6" in err, err
    assert sorted(p.name for p in (checkpoints / ckpt_lib.DAMAGED_DIR).iterdir()) == ["10", "9"]
    after = _losses(workdir)
    assert sorted(after) == sorted(before) == list(range(1, 11))
    for step in range(7, 11):
        for key in ("loss", "ce", "grad_norm"):
            assert after[step][key] == before[step][key], (step, key)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again["state"]), jax.device_get(first["state"]))
    assert not (workdir / LOCK_FILE).exists()  # released on exit
    assert cli.main(["check", str(workdir)]) == 0


def _hold_lock(workdir: Path) -> subprocess.Popen:
    """Another run holding the workdir: a real process that takes the lock (importing nothing heavy) and waits."""
    code = (
        "import sys; from analogjax.runtime.workdir_lock import WorkdirLock; "
        "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refused_and_a_killed_writers_lock_taken_over(tmp_path, capsys):
    workdir = tmp_path / "run"
    holder = _hold_lock(workdir)
    try:
        (tmp_path / "run.yaml").write_text("model: {preset: tiny}\n")
        assert (
            cli.main(["distill", "--config", str(tmp_path / "run.yaml"), "--workdir", str(workdir), "--no-progress"])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        assert f"{workdir} is in use by another run" in err and f"process {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (workdir / LOCK_FILE).exists()  # a kill -9 leaves the file, not the lock

    lock = WorkdirLock(workdir)
    lock.acquire()
    err = capsys.readouterr().err
    assert "taking over the lock left by a run that ended without releasing it" in err and str(holder.pid) in err
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (workdir / LOCK_FILE).exists()


def test_damaged_prepared_shard_refused_naming_the_document(tmp_path, capsys):
    from analogjax.data import SourceConfig
    from analogjax.data.sources import open_source

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(12)))
    out = tmp_path / "prepared"
    argv = ["prepare", "--input", str(corpus), "--tokenizer", "bytes", "--output", str(out), "--format", "zarr"]
    assert cli.main([*argv, "--workers", "1", "--shards", "2"]) == 0
    assert cli.main(["check", str(out)]) == 0
    capsys.readouterr()
    chunk = next(p for p in (out / "shard-00001-of-00002.zarr" / "tokens").rglob("*") if p.is_file() and "c" in p.parts)
    _damage(chunk, "flip")  # a raw chunk: nothing but the checksum notices
    source = open_source(SourceConfig(path=str(out)), key="data.sources[0]", name="prepared")
    with pytest.raises(UserError, match=r"shard-00001-of-00002\.zarr \(record \d+\): damaged: .*analogjax prepare"):
        for index in range(len(source)):
            source[index]
    assert cli.main(["check", str(out)]) == 1
    assert "shard-00001-of-00002.zarr: damaged" in capsys.readouterr().out
    assert cli.main(["check", str(tmp_path / "corpus.jsonl")]) == 2  # none of the four things check knows
    assert "is neither a run's workdir" in capsys.readouterr().err
