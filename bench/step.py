"""Time the distill step at fixed dims and report MFU against the matmul peak measured in the same process.

Teacher d_model 512, 8 layers, 8 heads, ffn 1536; student 256, 4, 4, 768; vocab 8192; batch 8; seq 256; float32.
Prints one JSON line: tokens_per_s, step_s (median after warm-up), flops_per_step, mfu (median over steps of
model FLOPs / step time / a matmul peak in the step's compute dtype measured right after that step),
matmul_peak_flops (median); on a known accelerator also mfu_vs_vendor_bf16 (against the chip's datasheet dense-bf16
peak, analogjax.runtime.flops.PEAK_FLOPS).

    python bench/step.py [--repeats 10] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analogjax.runtime.huge_pages import reexec_with_huge_pages  # noqa: E402
from analogjax.runtime.xla_flags import add_cpu_flags  # noqa: E402

reexec_with_huge_pages()  # the host allocator the CLI runs with (a re-execution where it is not yet set)
add_cpu_flags()  # the XLA settings the CLI runs with, before JAX starts a backend

BENCH_OVERRIDES = [
    "model.preset=bench-student",
    "teacher.model.preset=bench-teacher",
    "data.global_batch=8",
    "data.seq_len=256",
    "train.steps=1000",
    "mesh.data=-1",
]


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """Full rows of one document each (the packed steady state); ids drawn uniformly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    mask = np.ones((batch, seq), np.float32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": mask,
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


def measure_step(repeats: int = 10, overrides: list[str] | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from analogjax.config import load_config
    from analogjax.runtime.flops import distill_flops_per_step, measured_matmul_peak, vendor_peak_flops
    from analogjax.setup import build
    from analogjax.teacher import runs_live

    config = load_config(None, BENCH_OVERRIDES + list(overrides or []))
    run = build(config)
    batch = jax.device_put(
        synthetic_batch(config.data.global_batch, config.data.seq_len, config.model.vocab_size), run.batch_sharding
    )
    tokens = config.data.global_batch * config.data.seq_len
    # The teacher's forward counts only when the step runs it: a CE-only objective builds no teacher, and a cached
    # one reads its rows (counting it there would inflate the MFU by the teacher's share).
    flops = distill_flops_per_step(
        config.model, config.teacher.model if runs_live(run.teacher) else None, tokens, config.data.seq_len
    )
    # Each timed step is paired with a matmul-peak measurement taken right after it: on a shared machine the load
    # drifts, and the ratio of two figures measured moments apart is far steadier than either figure alone. The peak
    # is measured in the step's compute dtype. On a CPU 2048² is steady; on an H200 a 2048² product lasts ~25 µs, the
    # order of one dispatch, so an accelerator measures 8192² (~1.4 ms).
    peak_dtype = jnp.dtype(config.model.dtype)
    peak_n = 2048 if jax.default_backend() == "cpu" else 8192
    times, peaks = time_steps(
        run, batch, repeats, after_each=lambda: measured_matmul_peak(peak_dtype, n=peak_n, repeats=3)
    )
    mfus = [flops / t / p for t, p in zip(times, peaks)]
    step_s = statistics.median(times)
    line = {
        "bench": "step",
        "dtype": config.model.dtype,
        "batch": config.data.global_batch,
        "seq_len": config.data.seq_len,
        "tokens_per_s": round(tokens / step_s, 1),
        "step_s": round(step_s, 4),
        "flops_per_step": flops,
        "mfu": round(statistics.median(mfus), 3),
        "matmul_peak_flops": round(statistics.median(peaks)),
        "matmul_peak_dtype": peak_dtype.name,
        "repeats": repeats,
        "fused_loss": config.distill.fused,
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
    }
    vendor = vendor_peak_flops()
    if vendor is not None:  # the accelerator's datasheet dense-bf16 peak, the figure MFU is usually quoted against
        line |= {"vendor_bf16_peak_flops": vendor, "mfu_vs_vendor_bf16": round(flops / step_s / vendor, 4)}
    return line


def time_steps(run, batch, repeats: int, after_each=None) -> tuple[list[float], list]:
    """Wall time of `repeats` steps after compilation and one warm step; `after_each()` runs after each timed step
    (outside the timing) and its results are returned alongside."""
    import jax

    state, times, extras = run.state, [], []
    with jax.set_mesh(run.mesh):
        for _ in range(2):  # compile + one warm step
            state, metrics = run.step_fn(state, run.teacher_params, batch)
        jax.block_until_ready(metrics)
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, metrics = run.step_fn(state, run.teacher_params, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
            if after_each is not None:
                extras.append(after_each())
    return times, extras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(json.dumps(measure_step(args.repeats, args.overrides)))


if __name__ == "__main__":
    main()
