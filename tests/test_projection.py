"""models/projection.project: values and gradients against float64 NumPy, and the layout of its weight gradient."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analogjax.models.config import ModelConfig
from analogjax.models.projection import project
from analogjax.models.transformer import Transformer


def _float64_reference(x, w, g, n_in):
    """y = x · w over x's last n_in and w's first n_in axes; the gradients of <y, g>."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    d_in = int(np.prod(w.shape[:n_in]))
    x2, w2, g2 = x.reshape(-1, d_in), w.reshape(d_in, -1), g.reshape(-1, w.size // d_in)
    y = (x2 @ w2).reshape(x.shape[: x.ndim - n_in] + w.shape[n_in:])
    return y, (g2 @ w2.T).reshape(x.shape), (x2.T @ g2).reshape(w.shape)


@pytest.mark.parametrize(
    "x_shape, w_shape, n_in",
    [((3, 5, 8), (8, 6), 1), ((2, 4, 8), (8, 3, 4), 1), ((2, 4, 3, 4), (3, 4, 8), 2), ((7, 8), (8, 5), 1)],
)
def test_values_and_gradients_match_float64(x_shape, w_shape, n_in):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    y = project(x, w, n_in)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(project(x, w, n_in) * g), argnums=(0, 1))(x, w)
    ref_y, ref_dx, ref_dw = _float64_reference(x, w, g, n_in)
    for got, want in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_dtypes_and_accumulate_in_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 64, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((4, 64, 24)), jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: jnp.sum((project(x, w) * g).astype(jnp.float32)), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    _, ref_dx, ref_dw = _float64_reference(x, w, g, 1)
    # one bf16 rounding of the float32-accumulated sum over 256 tokens: within bf16's half ulp (2^-9) of the value
    np.testing.assert_allclose(np.asarray(dw, np.float64), ref_dw, rtol=2**-8, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref_dx, rtol=2**-6, atol=5e-2)


def test_bfloat16_products_take_float32_results_on_cpu(monkeypatch):
    # XLA's CPU backend runs a bf16 product fast (YNNPACK) only with a float32 result: the forward, d x and d w
    # must each be such a product, and return in the operands' dtype.
    x = jnp.ones((2, 8, 16), jnp.bfloat16)
    w = jnp.ones((16, 4, 8), jnp.bfloat16)

    def loss(x, w):
        y = project(x, w)
        assert y.dtype == jnp.bfloat16
        return jnp.sum(y.astype(jnp.float32) ** 2)

    def products():
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
        found = [line.rsplit("->", 1) for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert len(found) == 3 and all(operands.count("bf16") == 2 for operands, _ in found), found
        return [result for _, result in found]

    assert all("xf32>" in result for result in products())
    # Accelerators sum in float32 inside any product: the forward and d x ask for bf16 there, d w stays float32
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert sorted("xf32>" in result for result in products()) == [False, False, True]


def test_the_models_feed_forward_weight_gradients_contract_no_left_operand_rows():
    # XLA's CPU dots (YNNPACK) take no dot that contracts its left operand's rows; autodiff's weight gradient of
    # x @ w was such a dot, with its other operand written out transposed (models/projection.py). The compiled
    # backward of the scanned decoder must hold none for the feed-forward's weights.
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
    model = Transformer(cfg)
    params = jax.jit(lambda rng: nn.unbox(model.init_boxed(rng)))(jax.random.key(0))
    tokens = jnp.zeros((2, 16), jnp.int32)

    def loss(params):
        return jnp.sum(model.features(params, tokens).hidden_bsd.astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    dots = [line for line in hlo.splitlines() if re.search(r"=\s*\S+\s+dot\(", line) or "dot_general" in line]
    mlp_dots = [line for line in dots if "/mlp/" in line]
    assert mlp_dots, "no feed-forward products found in the compiled backward"
    assert not [line for line in mlp_dots if "lhs_contracting_dims={0}" in line], mlp_dots
