"""Live teacher vs cached teacher: distill step time and memory, cache write/read speed, bytes per token per layout.

Dimensions of bench/step.py: teacher bench-teacher (d 512, 8 layers, ffn 1536), student bench-student (d 256, 4 layers,
ffn 768), vocab 8192, batch 8, seq 256, float32; the teacher's forward costs ~5.6x the student's per token.
One JSON line per measurement:
- step (teacher=live | cache layout): median step time, tokens/s, and the compiled step's memory per device
  (arguments + temporaries + outputs from XLA's memory analysis; the device's peak_bytes_in_use where it reports one).
- write (per layout): teacher forward + zarr write tokens/s, nominal and on-disk bytes per token.
- read (per layout): seconds to read one step's rows back and add them to the batch (CacheReader.add_to).
- split (per cached layout): the cached step's time split by timing jitted pieces alone at the same shapes and
  state: `student_fwd_bwd_s` (the student's body forward + backward, to its final normed hidden states),
  `loss_fwd_bwd_s` (the objective on those hidden states and the head: CE plus the sparse KD over the k cached
  entries, fused over token chunks, forward + backward), `optimizer_s` (the optimizer update), `rest_s` (the step
  minus the three: the step's own glue, metrics, and whatever the pieces share when fused); `*_share` of the step.

    python bench/cache.py [--repeats 5] [--steps 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# bench/step.py: the same model, the same batch, the same timing (importing it adds the CLI's XLA settings)
from step import BENCH_OVERRIDES, synthetic_batch, time_steps  # noqa: E402

# name → (layout kwargs, treatment the cached step uses)
LAYOUTS = {
    "topk64_bf16": (dict(kind="topk", k=64), "tail_bucket"),
    "topk64_bf16_zstd": (dict(kind="topk", k=64, codec="zstd"), "tail_bucket"),
    "topk64_bf16_gathered": (dict(kind="topk", k=64), "gathered"),
    "sampled64": (dict(kind="sampled", k=64), None),
    "sampled64_zstd": (dict(kind="sampled", k=64, codec="zstd"), None),
    "dense_f32": (dict(kind="topk", k=-1, values_dtype="float32"), "tail_bucket"),  # k = vocab
}


def _time_steps(run, batch, repeats: int) -> tuple[float, dict]:
    import jax

    with jax.set_mesh(run.mesh):
        analysis = run.step_fn.lower(run.state, run.teacher_params, batch).compile().memory_analysis()
    times, _ = time_steps(run, batch, repeats)
    memory = {}
    if analysis is not None:
        memory = {
            "argument_bytes": analysis.argument_size_in_bytes,
            "temp_bytes": analysis.temp_size_in_bytes,
            "output_bytes": analysis.output_size_in_bytes,
        }
        memory["total_bytes"] = sum(memory.values()) - analysis.alias_size_in_bytes
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory["device_peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    return statistics.median(times), memory


def _median_time(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def split_step(run, batch, repeats: int, step_s: float) -> dict:
    """The cached step's time in pieces (see the module docstring), each piece jitted alone at the step's shapes."""
    import jax
    import jax.numpy as jnp
    import optax

    from analogjax import mesh as mesh_lib
    from analogjax.step import forward_outputs

    state = run.fresh_state()  # the timed steps donated run.state
    params = state.params
    valid = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)

    def body(p):
        s_out, _ = forward_outputs(run.student, mesh_lib.STUDENT_RULES, None, p, None, batch, False)
        return s_out

    with jax.set_mesh(run.mesh):
        s_out, signal = jax.jit(
            lambda p, tp, bt: forward_outputs(run.student, mesh_lib.STUDENT_RULES, run.teacher, p, tp, bt, False)
        )(params, run.teacher_params, batch)
        probe = jax.random.normal(jax.random.key(1), s_out.hidden_nd.shape, s_out.hidden_nd.dtype)
        # the body's backward from a fixed cotangent on the hidden states (the head's gradient is the loss piece's)
        body_grad = jax.jit(jax.grad(lambda p: jnp.vdot(body(p).hidden_nd, probe)))
        body_s = _median_time(lambda: body_grad(params), repeats)

        def loss(hidden, head):
            outputs = s_out._replace(hidden_nd=hidden, head_dv=head)
            return run.objective.loss(state.step, outputs, signal, batch, valid, params.get("hidden_proj"))[0]

        loss_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        loss_s = _median_time(lambda: loss_grad(s_out.hidden_nd, s_out.head_dv), repeats)
        grads = jax.tree.map(jnp.ones_like, params)

        def update(g, opt_state, p):
            updates, opt_state = run.tx.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        update_jit = jax.jit(update)
        optimizer_s = _median_time(lambda: update_jit(grads, state.opt_state, params), repeats)
    rest_s = step_s - body_s - loss_s - optimizer_s
    pieces = {"student_fwd_bwd": body_s, "loss_fwd_bwd": loss_s, "optimizer": optimizer_s, "rest": rest_s}
    return {
        **{f"{name}_s": round(value, 4) for name, value in pieces.items()},
        **{f"{name}_share": round(value / step_s, 3) for name, value in pieces.items()},
    }


def measure(repeats: int, steps: int, overrides: list[str], layouts: list[str]) -> list[dict]:
    import jax

    from analogjax import mesh as mesh_lib
    from analogjax.config import load_config
    from analogjax.runtime.flops import forward_flops_per_token
    from analogjax.setup import build
    from analogjax.teacher import Teacher
    from analogjax.teacher_cache import (
        CacheLayout,
        CacheReader,
        data_bytes_per_token,
        sparse_teacher_from_batch,
        write_cache,
    )

    config = load_config(None, BENCH_OVERRIDES + [f"train.steps={steps}"] + list(overrides))
    seq, vocab = config.data.seq_len, config.model.vocab_size
    tokens = config.data.global_batch * seq
    ratio = forward_flops_per_token(config.teacher.model, seq) / forward_flops_per_token(config.model, seq)
    host_batch = synthetic_batch(config.data.global_batch, seq, vocab)
    common = {
        "bench": "cache",
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
        "teacher_student_flop_ratio": round(ratio, 2),
    }
    lines = []

    live = build(config)
    step_s, memory = _time_steps(live, jax.device_put(host_batch, live.batch_sharding), repeats)
    lines.append(
        {
            **common,
            "measure": "step",
            "teacher": "live",
            "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s, 1),
            **memory,
        }
    )
    print(json.dumps(lines[-1]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in layouts:
            kwargs, treatment = LAYOUTS[name]
            layout = CacheLayout(**{**kwargs, "k": vocab if kwargs["k"] == -1 else kwargs["k"]})
            path = Path(tmp) / name
            t0 = time.perf_counter()
            summary = write_cache(
                config,
                path,
                layout,
                (host_batch for _ in range(steps)),
                teacher=live.teacher,
                teacher_params=live.teacher_params,
                mesh=live.mesh,
                process_index=0,
                process_count=1,
                progress=False,
            )
            write_s = time.perf_counter() - t0  # includes compiling the teacher's output function
            lines.append(
                {
                    **common,
                    "measure": "write",
                    "layout": name,
                    "k": layout.k,
                    "tokens_per_s_steady": summary["tokens_per_s"] and round(summary["tokens_per_s"], 1),
                    "tokens_per_s_with_compile": round(steps * tokens / write_s, 1),
                    "bytes_per_token_nominal": layout.bytes_per_token(),
                    "bytes_per_token_on_disk": round(data_bytes_per_token(path), 2),
                }
            )
            print(json.dumps(lines[-1]), flush=True)

            cached_config = dataclasses.replace(
                config,
                teacher=dataclasses.replace(config.teacher, cache=str(path)),
                distill=dataclasses.replace(config.distill, topk_treatment=treatment or "tail_bucket"),
            )
            reader = CacheReader(cached_config)
            read_times = []
            for step in range(steps):
                t0 = time.perf_counter()
                batch = reader.add_to(step, host_batch)
                read_times.append(time.perf_counter() - t0)
            lines.append(
                {
                    **common,
                    "measure": "read",
                    "layout": name,
                    "read_s_per_step": round(max(read_times), 4),
                    "steps": steps,
                }
            )
            print(json.dumps(lines[-1]), flush=True)

            teacher = Teacher(
                from_batch=sparse_teacher_from_batch,
                rules=mesh_lib.TEACHER_RULES,
                vocab_size=vocab,
                cache_layout=layout,
            )
            cached = build(cached_config, teacher=teacher, teacher_params=None, mesh=live.mesh)
            step_s, memory = _time_steps(cached, jax.device_put(batch, cached.batch_sharding), repeats)
            lines.append(
                {
                    **common,
                    "measure": "step",
                    "teacher": "cache",
                    "layout": name,
                    "treatment": treatment or "sampled_kd",
                    "step_s": round(step_s, 4),
                    "tokens_per_s": round(tokens / step_s, 1),
                    **memory,
                }
            )
            print(json.dumps(lines[-1]), flush=True)
            device_batch = jax.device_put(batch, cached.batch_sharding)
            lines.append(
                {
                    **common,
                    "measure": "split",
                    "layout": name,
                    "treatment": treatment or "sampled_kd",
                    "step_s": round(step_s, 4),
                    "live_over_cached": round(lines[0]["step_s"] / step_s, 2),
                    **split_step(cached, device_batch, repeats, step_s),
                }
            )
            print(json.dumps(lines[-1]), flush=True)
            del cached, batch, device_batch
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="cache steps written per layout")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {list(LAYOUTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    measure(args.repeats, args.steps, args.overrides, [n for n in args.layouts.split(",") if n])


if __name__ == "__main__":
    main()
