"""The fused attention kernels against the definition (`attend`): splash's Pallas kernel in interpret mode on CPU,
the cuDNN call's mask/window/GQA plumbing through jax.nn.dot_product_attention(implementation="xla") (everything
but the GPU kernel itself), and which kernel each backend gets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analogjax.errors import UserError
from analogjax.models import attention as att

S, H, K, E = 256, 4, 2, 64  # splash tiles are 128 wide at least: the smallest sequence it takes is 128


def _packed(b=2, s=S):
    """Two documents in row 0 (positions restart at 0) then padding; one full document in row 1."""
    seg = np.ones((b, s), np.int32)
    pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    seg[0, 100:220], pos[0, 100:220] = 2, np.arange(120)
    seg[0, 220:], pos[0, 220:] = 0, 0
    return jnp.asarray(pos), jnp.asarray(seg)


def _qkv(b=2, s=S, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, s, H, E), dtype)
    k = jax.random.normal(keys[1], (b, s, K, E), dtype)
    v = jax.random.normal(keys[2], (b, s, K, E), dtype)
    return q, k, v


def _compare(kernel_fn, window, softcap, atol):
    """Forward and gradient of `kernel_fn` equal attend's on every real (non-padding) query."""
    pos, seg = _packed()
    q, k, v = _qkv()
    assert att.index_masking_agrees(pos, seg)
    real = (seg != 0)[:, :, None, None].astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(1), q.shape) * real
    scale = E**-0.5

    def reference(q, k, v):
        return att.attend(q, k, v, pos, pos, seg, seg, scale=scale, window=window, softcap=softcap)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    want, got = reference(q, k, v), kernel_fn(q, k, v, pos, seg, scale, window, softcap)
    np.testing.assert_allclose(np.asarray(got * real), np.asarray(want * real), atol=atol, rtol=atol)
    grads_want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    grads_got = jax.grad(loss(lambda q, k, v: kernel_fn(q, k, v, pos, seg, scale, window, softcap)), argnums=(0, 1, 2))(
        q, k, v
    )
    for name, g_got, g_want in zip("qkv", grads_got, grads_want):
        np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=atol, rtol=atol, err_msg=name)


def _splash(q, k, v, pos, seg, scale, window, softcap):
    return att.self_attention(
        q, k, v, pos, seg, scale=scale, window=window, softcap=softcap, kernel="splash", interpret=True, block=128
    )


@pytest.mark.parametrize("window,softcap", [(None, 0.0), (48, 20.0)], ids=["causal-packed-gqa", "window-softcap"])
def test_splash_interpret_equals_xla_forward_and_gradient(window, softcap):
    _compare(jax.jit(_splash, static_argnums=(5, 6, 7)), window, softcap, atol=2e-4)


def _cudnn_call_on_xla(q, k, v, pos, seg, scale, window, softcap):
    assert softcap == 0.0
    return att.cudnn_attention(q, k, v, seg, scale=scale, window=window, implementation="xla")


@pytest.mark.parametrize("window", [None, 48])
def test_cudnn_call_plumbing_equals_xla_path(window):
    # The exact jax.nn.dot_product_attention call the cudnn path makes, with the XLA implementation: masks, window
    # convention, GQA layout and scale are checked; only the GPU kernel is not (no GPU here).
    _compare(jax.jit(_cudnn_call_on_xla, static_argnums=(5, 6, 7)), window, 0.0, atol=2e-5)


def test_kernel_choice_per_backend():
    choose = att.choose_kernel
    assert choose("auto", "tpu") == "splash"
    assert choose("auto", "gpu") == "cudnn" and choose("auto", "cuda") == "cudnn"
    assert choose("auto", "cpu") == "xla"
    # auto never picks a kernel that cannot do the layer: it falls back to the exact XLA path.
    assert choose("auto", "gpu", softcap=50.0) == "xla"
    assert choose("auto", "gpu", dtype=jnp.float32) == "xla"
    assert choose("auto", "tpu", window=jnp.asarray(4096)) == "xla"  # per-layer (traced) windows
    assert choose("auto", "tpu", seq_len=100) == "xla"
    assert choose("splash", "tpu", window=4096, softcap=50.0, seq_len=8192) == "splash"
    assert choose("xla", "tpu") == "xla"
    # Inside a trace without a mesh the platform is the default backend's (cpu here).
    assert att.trace_platform() == "cpu"


@pytest.mark.parametrize(
    "requested,platform,kwargs,message",
    [
        ("splash", "cpu", {}, "needs a tpu backend"),
        ("cudnn", "cpu", {}, "needs a gpu or cuda backend"),
        ("cudnn", "gpu", {"softcap": 50.0}, "soft-cap"),
        ("cudnn", "gpu", {"dtype": jnp.float32}, "bfloat16"),
        ("splash", "tpu", {"window": jnp.asarray(8)}, "windows differ per layer"),
        ("splash", "tpu", {"seq_len": 200}, "multiple of 128"),
        ("flash", "tpu", {}, "must be one of"),
    ],
)
def test_kernel_refusals(requested, platform, kwargs, message):
    with pytest.raises(UserError, match=message):
        att.choose_kernel(requested, platform, **kwargs)


def test_explicit_splash_on_cpu_model_is_refused():
    import dataclasses

    from analogjax.models.config import PRESETS
    from analogjax.models.transformer import Transformer

    model = Transformer(dataclasses.replace(PRESETS["tiny"], attention="splash"))
    params = Transformer(PRESETS["tiny"]).init_boxed(jax.random.key(0))
    with pytest.raises(UserError, match="model.attention=splash needs a tpu backend"):
        model(
            jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")),
            jnp.zeros((1, 128), jnp.int32),
        )


def test_index_masking_agreement_check():
    pos, seg = _packed()
    assert att.index_masking_agrees(pos, seg)
    shifted = pos.at[0, 100:220].add(5)  # positions that do not restart at a document boundary still step by one
    assert att.index_masking_agrees(shifted, seg)
    assert not att.index_masking_agrees(pos.at[1, 10].set(0), seg)  # a gap inside a document


def test_splash_under_a_context_mesh_equals_xla():
    # shard_map over data x context x tensor: each context shard runs its own queries' rows (a mask offset per
    # shard) against the all-gathered keys; batch and kv heads split too.
    from analogjax import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(2, 1, 2, context=2)
    with jax.set_mesh(mesh):
        _compare(jax.jit(_splash, static_argnums=(5, 6, 7)), 48, 20.0, atol=2e-4)
