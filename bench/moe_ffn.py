"""One MoE FFN layer on its own, at bench/moe.py's teacher shape: why the grouped matmul has a CPU form.

2048 tokens, d_model 512, 8 experts of width 768, top-2, float32. Times (median ms, the variants interleaved in one
process so load drift hits all alike) the routed layer with the grouped matmul as `jax.lax.ragged_dot` (jax lowers
it on CPU as every row times every expert under a mask) and as the blocked form models/moe.py uses on CPU, against
the dense SwiGLU of equal active FLOPs (ffn 1536). Prints two JSON lines: forward only (a teacher) and forward +
backward with weight gradients (a trained MoE).

    JAX_PLATFORMS=cpu python bench/moe_ffn.py [--repeats 7]
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

TOKENS, D, F, EXPERTS, TOP_K = 2048, 512, 768, 8, 2


def _swiglu(gate, up):
    import jax

    return jax.nn.silu(gate) * up


def main() -> None:
    import jax
    import jax.numpy as jnp

    from analogjax.models import moe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (TOKENS, D))
    _, chosen = jax.lax.top_k(jax.random.normal(keys[1], (TOKENS, EXPERTS)), TOP_K)
    weights = jnp.full((TOKENS, TOP_K), 1.0 / TOP_K)
    w_gate, w_up = (jax.random.normal(k, (EXPERTS, D, F)) * 0.02 for k in keys[2:4])
    w_down = jax.random.normal(keys[4], (EXPERTS, F, D)) * 0.02

    def routed(grouped):
        def layer(x, wg, wu, wd):
            flat = chosen.reshape(-1)
            order = jnp.argsort(flat, stable=True)
            sizes = jnp.bincount(flat, length=EXPERTS).astype(jnp.int32)
            ys = grouped(jnp.take(x, order // TOP_K, axis=0), sizes, wg, wu, wd, _swiglu)
            y = jnp.take(ys, jnp.argsort(order), axis=0).reshape(TOKENS, TOP_K, -1)
            return jnp.einsum("tkd,tk->td", y, weights)

        return layer

    def dense(x, wg, wu, wd):  # the first top_k experts side by side: one SwiGLU of width top_k * F
        def side_by_side(w):
            return jnp.concatenate(list(w[:TOP_K]), axis=-1)

        return (jax.nn.silu(x @ side_by_side(wg)) * (x @ side_by_side(wu))) @ jnp.concatenate(list(wd[:TOP_K]), 0)

    layers = {
        "dense_mlp_1536": dense,
        "ragged_dot": routed(moe._ragged_swiglu),
        f"blocked_{moe.block_rows(TOKENS * TOP_K, EXPERTS)}_rows": routed(moe._blocked_swiglu),
    }
    operands = (x, w_gate, w_up, w_down)
    for measure, wrap in (
        ("forward", lambda f: f),
        ("forward_backward", lambda f: jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))),
    ):
        steps = {name: jax.jit(wrap(f)) for name, f in layers.items()}
        for step in steps.values():
            jax.block_until_ready(step(*operands))
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                jax.block_until_ready(step(*operands))
                times[name].append(time.perf_counter() - t0)
        ms = {name: round(statistics.median(t) * 1000, 1) for name, t in times.items()}
        print(json.dumps({"bench": "moe_ffn", "measure": measure, "backend": jax.default_backend(), "ms": ms}))


if __name__ == "__main__":
    main()
