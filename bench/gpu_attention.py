"""Packed-batch attention on one GPU: forward + gradient time and working memory of each kernel (pallas_gpu,
cudnn, xla) at several sequence lengths, and its largest difference from the XLA path where XLA fits. One JSON line
per (seq_len, kernel): `temp_bytes` are the compiled program's temporaries (the kernel's own), `process_peak_bytes`
the allocator's peak so far (every earlier case included); `max_abs_diff_vs_xla` and `max_abs_grad_diff_vs_xla`
compare the output and d q, d k, d v with XLA's (`max_abs_grad_xla`: the gradients' own size). Rows hold several
documents (segment ids), as the data pipeline packs them, so cudnn pays its dense [b, 1, s, s] document mask and
pallas_gpu does not.

  python bench/gpu_attention.py                                  # 4096, 8192, 32768; heads 32 over 8 kv heads
  python bench/gpu_attention.py --seq 8192 --kernels pallas_gpu --window 4096
  python bench/gpu_attention.py --seq 256 --kernels pallas_gpu xla --interpret   # a CPU smoke run (slow)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from analogjax.models import attention as att


def packed(seq_len: int, docs: int):
    """One row of `docs` equal documents, positions restarting at each."""
    length = seq_len // docs
    seg = np.repeat(np.arange(1, docs + 1, dtype=np.int32), length)
    seg = np.concatenate([seg, np.zeros(seq_len - seg.size, np.int32)])
    pos = np.concatenate([np.arange(length, dtype=np.int32)] * docs + [np.zeros(seq_len - docs * length, np.int32)])
    return jnp.asarray(pos[None]), jnp.asarray(seg[None])


def step_fn(kernel: str, pos, seg, args):
    def loss(q, k, v):
        out = att.self_attention(
            q,
            k,
            v,
            pos,
            seg,
            scale=args.head_dim**-0.5,
            window=args.window,
            softcap=args.softcap,
            kernel=kernel,
            interpret=args.interpret,
        )
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def case(seq_len: int, kernel: str, args, reference) -> dict:
    pos, seg = packed(seq_len, args.docs)
    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(keys[0], (1, seq_len, args.heads, args.head_dim), dtype)
    k, v = (jax.random.normal(key, (1, seq_len, args.kv_heads, args.head_dim), dtype) for key in keys[1:])
    line = {"bench": "gpu_attention", "device": jax.devices()[0].device_kind, "seq_len": seq_len, "kernel": kernel}
    line |= {"heads": args.heads, "kv_heads": args.kv_heads, "window": args.window, "softcap": args.softcap}
    line["dtype"] = args.dtype
    try:
        fn = step_fn(kernel, pos, seg, args)
        # This kernel's own working memory: the compiled program's temporaries. The allocator's peak is the
        # process's so far (every earlier case included), so it is reported under that name.
        temp_bytes = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        (_, out), grads = jax.block_until_ready(fn(q, k, v))
        start = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(fn(q, k, v))
        seconds = (time.perf_counter() - start) / args.repeats
    except Exception as error:  # noqa: BLE001 — out of memory or a refused kernel is a result
        return {**line, "ran": False, "error": str(error).splitlines()[0][:300]}
    stats = jax.devices()[0].memory_stats() or {}
    line |= {"ran": True, "fwd_bwd_ms": round(seconds * 1e3, 3), "temp_bytes": temp_bytes}
    line["process_peak_bytes"] = stats.get("peak_bytes_in_use")
    if kernel == "xla":
        reference[seq_len] = (out, grads)
    elif seq_len in reference:
        ref_out, ref_grads = reference[seq_len]
        line["max_abs_diff_vs_xla"] = _max_abs(_diff(out, ref_out), seg)
        # The backward kernels are separate programs: d q, d k and d v against XLA's autodiff, and the size of XLA's
        # own gradients to read the difference against.
        line["max_abs_grad_diff_vs_xla"] = max(_max_abs(_diff(g, r), seg) for g, r in zip(grads, ref_grads))
        line["max_abs_grad_xla"] = max(_max_abs(r, seg) for r in ref_grads)
    return line


def _diff(x, y):
    return x.astype(jnp.float32) - y.astype(jnp.float32)


def _max_abs(x, seg) -> float:
    """Largest |x| over the rows of real tokens (padding rows are never read by a loss)."""
    real = (seg != 0)[:, :, None, None]
    return float(jnp.max(jnp.where(real, jnp.abs(x.astype(jnp.float32)), 0.0)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--kernels", nargs="+", default=["xla", "pallas_gpu", "cudnn"], choices=att.KERNELS)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--docs", type=int, default=4, help="documents packed into the row")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--softcap", type=float, default=0.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke runs)")
    args = parser.parse_args(argv)
    reference: dict = {}
    for seq_len in args.seq:
        for kernel in args.kernels:  # xla first (the default order) so the others are compared against it
            print(json.dumps(case(seq_len, kernel, args, reference)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
