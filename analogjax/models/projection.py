"""The models' dense projections as products XLA's CPU backend runs fast (weight gradient layout, float32 results).

`project(x, w, n_in)` contracts x's last `n_in` axes with w's first `n_in` (x [..., d] · w [d, f], or [b, s, h, e] ·
[h, e, d] with n_in 2). Its forward is the product autodiff would see. Its backward differs in how the weight gradient
is laid out, not in what it computes:

- Autodiff writes d w = Σ_tokens x ⊗ g as one dot that contracts the token rows of both operands. XLA's CPU dots
  (YNNPACK) take no dot contracting its left operand's rows, so XLA wrote g out transposed, fused into the
  elementwise pass that produces it (the SiLU gate's backward: 49 and 38 ms a step at bench/step.py's student, with
  strided writes), and ran the product on its slower fallback.
- Here the tokens are flattened to one axis and x carries a unit axis, [n, 1, d]: XLA then writes xᵀ out once (the
  smaller operand, a plain transpose) and the product runs in YNNPACK (BENCHMARKS.md, Teacher cache: the
  feed-forward's weight gradient).

On CPU every product here (the forward, d x and d w) takes a float32 result, returned in the operands' dtype. For
bf16 operands that is what XLA's CPU backend runs fast: YNNPACK's bf16 products with float32 results ran 2-2.5x its
float32 rate on an AVX512-BF16 CPU (EPYC, 2 cores: 350-400 against 157-190 GFLOP/s), while a bf16 result took a
slower path (135-180). Its fallback dot has no bf16 x bf16 -> float32 at all, so only products YNNPACK takes (these
plain contractions) ask for one: tests/test_sampling.py runs bf16 decoding for that reason.

The feed-forward (transformer.MLP) and the attention's q, k, v and output projections go through it (in float32 the
attention's weight gradients were YNNPACK products already and measured no faster; in bf16 the float32 results
are what counts). The weight gradient accumulates in float32 and is returned in w's dtype (bf16 compute: as accurate
as autodiff's bf16 product or more). Accelerators sum in float32 inside a product whatever its result type and lay
operands out themselves: there the forward and d x ask for the operands' dtype (no float32 result to write and
convert), and the reshapes and the unit axis cost nothing. Only reverse mode is defined (a `custom_vjp`): nothing
in analogjax takes forward-mode derivatives of a model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from analogjax.runtime import compute_dtype


def outer_sum(a_ni: jax.Array, b_no: jax.Array) -> jax.Array:
    """Σ_n a_n ⊗ b_n → [i, o] in float32: the weight gradient's product (and the fused loss's head gradient), with
    a unit axis on `a` so that XLA's CPU backend writes aᵀ out once and runs a product YNNPACK takes (module doc)."""
    a_n1i = a_ni.reshape(a_ni.shape[0], 1, a_ni.shape[1])
    out_1io = jnp.einsum("nbi,no->bio", a_n1i, b_no, preferred_element_type=jnp.float32)
    return out_1io.reshape(out_1io.shape[1:])


def _contract(x, w, n_in: int):
    # on CPU a float32 result, then the operands' dtype: XLA's CPU backend runs bf16 products fast only so
    axes_x = tuple(range(x.ndim - n_in, x.ndim))
    out = jax.lax.dot_general(
        x, w, ((axes_x, tuple(range(n_in))), ((), ())), preferred_element_type=compute_dtype.product_result()
    )
    return out.astype(jnp.result_type(x, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x's last n_in axes · w's first n_in axes → x.shape[:-n_in] + w.shape[n_in:], in the operands' dtype."""
    return _contract(x, w, n_in)


def _forward(x, w, n_in):
    return _contract(x, w, n_in), (x, w)


def _backward(n_in, residuals, g):
    x, w = residuals
    n_out = w.ndim - n_in
    # d x: g's output axes against w's output axes (w's minor axes: a row-major product)
    g_axes = tuple(range(g.ndim - n_out, g.ndim))
    dx = jax.lax.dot_general(
        g, w, ((g_axes, tuple(range(n_in, w.ndim))), ((), ())), preferred_element_type=compute_dtype.product_result()
    )
    # d w: tokens flattened, x with a unit axis (see the module docstring)
    dw = outer_sum(x.reshape(-1, math.prod(w.shape[:n_in])), g.reshape(-1, math.prod(w.shape[n_in:])))
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


project.defvjp(_forward, _backward)
