"""Decode throughput of the sampler at bench/step.py's teacher and student shapes, against the memory roofline.

A decode step reads every weight once (the LM head included; of an untied embedding table only b rows) and the
KV cache. Two rooflines: `bytes_per_step` counts the whole cache (p + N slots: what a step read before decode
read only the filled part; kept for comparison), `filled_bytes_per_step` counts only the slots filled at that step
(p + s at step s, averaged over the steps): the least a step must read. `span_bytes_per_step` is what the sampler's
length blocks actually read (sampling.decode_blocks: each block reads up to its last slot). Roofline time is bytes
over the memory bandwidth measured in the same process (a large array copy: read + write bytes over the time).
Decode time per step is (time of prefill + N decode steps - time of the prefill alone, same cache) / (N - 1),
medians of repeats. Prints one JSON line per model: decode_tokens_per_s (batch x steps / s), decode_step_s,
bytes_per_step, filled_bytes_per_step, span_bytes_per_step, bandwidth_bytes_per_s, roofline_fraction,
filled_roofline_fraction. Then one line comparing, at bench/step.py's teacher and student with rows of
prompt-len + on-policy-new-tokens, the off-policy distill step with the on-policy step (sampling plus the same step on
the samples): both medians, their ratio and sampling's share of the on-policy step.

    python bench/generate.py [--batch 8] [--prompt-len 128] [--new-tokens 128] [--repeats 5] [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
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


def measured_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of an elementwise pass over a large float32 array (each byte read once and written once)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((megabytes * (1 << 20) // 4,), jnp.float32)
    nbytes = x.nbytes
    # In place (donated): a fresh output buffer each time would time page faults, not memory traffic.
    add = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = add(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = add(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def _timed(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, dtype: str) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from analogjax import mesh as mesh_lib
    from analogjax.models import sampling
    from analogjax.models.config import PRESETS
    from analogjax.models.transformer import Transformer

    cfg = dataclasses.replace(PRESETS[preset], dtype=dtype)
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    rules = mesh_lib.TEACHER_RULES
    params, _ = mesh_lib.init_sharded(Transformer(cfg).init_boxed, jax.random.key(0), mesh, rules)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    lengths = np.full((batch,), prompt_len, np.int32)
    total = prompt_len + new_tokens
    model = Transformer(cfg)

    run = jax.jit(lambda p, t, n, key: sampling.sample(cfg, p, t, n, key, max_new_tokens=new_tokens))

    def prefill_only(p, t, n):
        segments = (np.arange(prompt_len)[None] < n[:, None]).astype(np.int32)
        positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), t.shape)
        hidden, cache = model.decode(p, t, segments, positions, sampling.init_cache(cfg, batch, total))
        return hidden[:, -1], cache["k"][0, :, 0]

    prefill = jax.jit(prefill_only)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    tokens, lens = jax.device_put(prompt, batch_sharding), jax.device_put(lengths, batch_sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        _, count = run(params, tokens, lens, jax.random.key(0))
        assert int(np.min(np.asarray(count))) == new_tokens  # no EOS given: every row ran every step
        whole_s = _timed(lambda: run(params, tokens, lens, jax.random.key(0)), repeats)
        prefill_s = _timed(lambda: prefill(params, tokens, lens), repeats)
    step_s = (whole_s - prefill_s) / (new_tokens - 1)
    # On an accelerator a pass over 512 MB lasts ~0.25 ms, where a dispatch's tens of µs would under-read the
    # bandwidth by 10-20%; 4 GB (~2 ms) reads it steadily.
    bandwidth = measured_bandwidth(512 if jax.default_backend() == "cpu" else 4096)

    leaves = jax.tree.leaves(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    if not cfg.tie_embeddings:  # a decode step reads b rows of the embedding table, not all of it
        table = params["params"]["embedding"]
        weight_bytes -= table.size * table.dtype.itemsize - batch * cfg.d_model * table.dtype.itemsize
    cache = sampling.init_cache(cfg, batch, total)
    kv_bytes = sum(cache[name].nbytes for name in ("k", "v", "latent", "k_rope") if name in cache)
    bytes_per_step = weight_bytes + kv_bytes
    per_slot = kv_bytes / total
    steps = range(1, new_tokens)  # step s feeds token s - 1 and attends over p + s slots
    filled_bytes = weight_bytes + per_slot * statistics.mean(prompt_len + s for s in steps)
    spans = [prompt_len + last - 1 for first, last in sampling.decode_blocks(new_tokens) for _ in range(first, last)]
    span_bytes = weight_bytes + per_slot * statistics.mean(spans)
    return {
        "bench": "generate",
        "model": preset,
        "dtype": dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_tokens_per_s": round(batch / step_s, 1),
        "decode_step_s": round(step_s, 6),
        "prefill_s": round(prefill_s, 4),
        "weight_bytes": int(weight_bytes),
        "kv_cache_bytes": int(kv_bytes),
        "bytes_per_step": int(bytes_per_step),
        "bandwidth_bytes_per_s": round(bandwidth),
        "roofline_step_s": round(bytes_per_step / bandwidth, 6),
        "roofline_fraction": round(bytes_per_step / bandwidth / step_s, 3),
        "filled_bytes_per_step": int(filled_bytes),
        "span_bytes_per_step": int(span_bytes),
        "filled_roofline_step_s": round(filled_bytes / bandwidth, 6),
        "filled_roofline_fraction": round(filled_bytes / bandwidth / step_s, 3),
        "repeats": repeats,
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
    }


class _RandomPrompts:
    """Full-length random prompts and a tokenizer without EOS: every row samples every new token (fixed shapes)."""

    def __init__(self, prompt_len: int, vocab: int):
        import types

        self.prompt_len, self.vocab = prompt_len, vocab
        self.tokenizer = types.SimpleNamespace(eos_id=None, pad_id=0, vocab_size=vocab)

    def batch(self, k: int, rows: int, process_index: int = 0, process_count: int = 1):
        import numpy as np

        rng = np.random.default_rng(k)
        local = rows // process_count
        return {
            "prompts": rng.integers(3, self.vocab, (local, self.prompt_len)).astype(np.int32),
            "prompt_lengths": np.full((local,), self.prompt_len, np.int32),
            "source_ids": np.zeros((local,), np.int32),
        }


def measure_on_policy(batch: int, prompt_len: int, new_tokens: int, repeats: int, dtype: str) -> dict:
    """bench/step.py's teacher and student at rows of prompt_len + new_tokens: the off-policy step against the
    on-policy step (the student samples new_tokens per row, then the same distill step on the samples)."""
    import jax

    from analogjax.config import load_config
    from analogjax.on_policy import OnPolicy
    from bench.step import BENCH_OVERRIDES, synthetic_batch

    width = prompt_len + new_tokens
    config = load_config(
        None,
        BENCH_OVERRIDES
        + [
            f"data.global_batch={batch}",
            f"data.seq_len={width}",
            f"model.dtype={dtype}",
            f"teacher.model.dtype={dtype}",
            "distill.on_policy.fraction=1.0",
            f"distill.on_policy.prompt_len={prompt_len}",
            f"distill.on_policy.max_new_tokens={new_tokens}",
        ],
    )
    from analogjax.setup import build

    run = build(config)
    on_policy = OnPolicy(run, prompts=_RandomPrompts(prompt_len, config.model.vocab_size))
    off_batch = jax.device_put(synthetic_batch(batch, width, config.model.vocab_size), run.batch_sharding)
    state = run.state
    off_times, on_times, sampling_times = [], [], []
    with jax.set_mesh(run.mesh):
        for i in range(repeats + 1):  # the first round compiles
            t0 = time.perf_counter()
            state, metrics = run.step_fn(state, run.teacher_params, off_batch)
            jax.block_until_ready(metrics)
            t1 = time.perf_counter()
            on_batch, sampling_s, sampled = on_policy.batch(state, i)
            state, metrics = on_policy.step_fn(state, run.teacher_params, on_batch)
            jax.block_until_ready(metrics)
            t2 = time.perf_counter()
            if i:
                off_times.append(t1 - t0)
                on_times.append(t2 - t1)
                sampling_times.append(sampling_s)
            assert sampled == batch * new_tokens  # no EOS: every row sampled every token
    off_s, on_s, sampling_s = (statistics.median(t) for t in (off_times, on_times, sampling_times))
    return {
        "bench": "on_policy_step",
        "dtype": dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "off_policy_step_s": round(off_s, 4),
        "on_policy_step_s": round(on_s, 4),
        "sampling_s": round(sampling_s, 4),
        "on_over_off": round(on_s / off_s, 2),
        "sampling_share": round(sampling_s / on_s, 3),
        "rollout_tokens_per_s": round(batch * new_tokens / sampling_s, 1),
        "repeats": repeats,
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--models", default="bench-teacher,bench-student")
    parser.add_argument(
        "--on-policy-new-tokens",
        type=int,
        default=128,
        help="also time an on-policy step (sampling this many tokens per row) against the off-policy step at the "
        "same shapes (0 = skip)",
    )
    args = parser.parse_args()
    for preset in args.models.split(","):
        print(
            json.dumps(measure(preset, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.dtype)),
            flush=True,
        )
    if args.on_policy_new_tokens:
        figures = measure_on_policy(args.batch, args.prompt_len, args.on_policy_new_tokens, args.repeats, args.dtype)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
