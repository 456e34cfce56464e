"""Time checkpointing at the bench/step.py dims: save wall time, the stall a save causes, restore time.

Student d256/4L/4H/ffn768, teacher d512/8L/8H/ffn1536, vocab 8192, batch 8, seq 256, float32 (bench/step.py's
BENCH_OVERRIDES). Each figure is one JSON line:
  step_s           median step time without a save
  save_blocking_s  what `Checkpointer.save` takes on the training thread (async mode)
  save_total_s     a save on an idle loop, from the call until the checkpoint is committed on disk
  stall_s          what a save adds to training: each trial times the window from a save call through the
                   WINDOW steps that follow it and the save's commit, against the WINDOW plain steps just before
                   it (pairing cancels the machine's drift); median over trials.
                   stall_fraction = stall_s / step_s (goal: <= 0.10)
  stall_without_checksums_s
                   the same, with the checksums of each step's files (runtime/checksums.py) not recorded: trials
                   alternate with stall_s's, so the machine's drift falls on both alike; the difference is their cost
  checksum_s       recording one step's checksums (hashing its files), on the writer thread
  verify_s         verifying one step against them, as a resume does before restoring
  restore_s        restoring the latest checkpoint onto the abstract sharded state, arrays ready on device

    python bench/checkpoint.py [--trials 25] [--dir /tmp/ckpt-bench] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import BENCH_OVERRIDES, synthetic_batch  # noqa: E402  (bench/step.py: same model, same batch, same XLA flags)

WINDOW = 2  # steps after a save in which its cost is looked for: the background write ends within them here


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(trials: int, directory: Path, overrides: list[str]) -> list[dict]:
    import jax

    from analogjax import checkpoint as ckpt_lib
    from analogjax.config import load_config
    from analogjax.runtime import checksums
    from analogjax.setup import build

    config = load_config(None, BENCH_OVERRIDES + overrides)
    run = build(config)
    batch = jax.device_put(
        synthetic_batch(config.data.global_batch, config.data.seq_len, config.model.vocab_size), run.batch_sharding
    )
    meta = {"config": {}, "identity": {}}
    common = {"bench": "checkpoint", "backend": jax.default_backend(), "devices": len(jax.devices())}

    def step(state):
        t0 = time.perf_counter()
        state, metrics = run.step_fn(state, run.teacher_params, batch)
        jax.block_until_ready((state, metrics))
        return state, time.perf_counter() - t0

    state = run.state
    checkpointer = ckpt_lib.Checkpointer(directory, keep=2, async_save=True, compression=config.checkpoint.compression)
    with jax.set_mesh(run.mesh):
        for _ in range(3):  # compile + warm-up
            state, _ = step(state)
        # A first save outside the figures: Orbax sets up its thread pools and directory on the first one.
        checkpointer.save(0, state, None, meta)
        checkpointer.wait()
        plain = []
        for _ in range(max(10, 2 * trials)):
            state, dt = step(state)
            plain.append(dt)
        step_s = statistics.median(plain)
        blocking, stalls, unchecked_stalls = [], [], []
        record_checksums = checksums.write_manifest
        for trial in range(1, 2 * trials + 1):
            with_checksums = trial % 2 == 1
            # The bench's one switch: the checkpointer looks the function up on the module at each save.
            checksums.write_manifest = record_checksums if with_checksums else (lambda *args: None)  # type: ignore
            t0 = time.perf_counter()
            for _ in range(WINDOW):
                state, _ = step(state)
            reference = time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpointer.save(trial, state, None, meta)
            if with_checksums:
                blocking.append(time.perf_counter() - t0)
            # What the loop does next: donate `state` into the next steps while the files are being written.
            for _ in range(WINDOW):
                state, _ = step(state)
            checkpointer.wait()  # a save still unfinished after the window counts in full
            (stalls if with_checksums else unchecked_stalls).append(time.perf_counter() - t0 - reference)
        checksums.write_manifest = record_checksums
        total = []
        for trial in range(2 * trials + 1, 3 * trials + 1):
            state, _ = step(state)  # a fresh state each time, as in training
            t0 = time.perf_counter()
            checkpointer.save(trial, state, None, meta)
            checkpointer.wait()
            total.append(time.perf_counter() - t0)
        checkpointer.close()

    last = 3 * trials
    size = _dir_bytes(directory / str(last))
    hashing, verifying = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        checksums.write_manifest(directory / str(last))
        hashing.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert checksums.verify_directory(directory / str(last)).intact
        verifying.append(time.perf_counter() - t0)
    abstract = run.abstract_state
    restores = []
    for _ in range(3):
        reader = ckpt_lib.Checkpointer(directory, keep=2)
        t0 = time.perf_counter()
        restored = reader.restore(last, abstract, None)
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - t0)
        reader.close()
    stall_s = statistics.median(stalls)
    quartiles = statistics.quantiles(stalls, n=4)
    unchecked_s = statistics.median(unchecked_stalls)
    unchecked_quartiles = statistics.quantiles(unchecked_stalls, n=4)
    return [
        dict(common, figure="step_s", value=round(step_s, 4)),
        dict(common, figure="save_blocking_s", value=round(statistics.median(blocking), 4), bytes=size),
        dict(common, figure="save_total_s", value=round(statistics.median(total), 4), bytes=size),
        dict(
            common,
            figure="stall_s",
            value=round(stall_s, 4),
            stall_fraction=round(stall_s / step_s, 3),
            stall_p25=round(quartiles[0], 4),
            stall_p75=round(quartiles[2], 4),
            trials=trials,
            window_steps=WINDOW,
        ),
        dict(
            common,
            figure="stall_without_checksums_s",
            value=round(unchecked_s, 4),
            stall_fraction=round(unchecked_s / step_s, 3),
            stall_p25=round(unchecked_quartiles[0], 4),
            stall_p75=round(unchecked_quartiles[2], 4),
            trials=trials,
        ),
        dict(common, figure="checksum_s", value=round(statistics.median(hashing), 4), bytes=size),
        dict(common, figure="verify_s", value=round(statistics.median(verifying), 4), bytes=size),
        dict(common, figure="restore_s", value=round(statistics.median(restores), 4), bytes=size),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a fresh temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    shutil.rmtree(directory, ignore_errors=True)
    try:
        for line in measure(args.trials, directory, args.overrides):
            print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
