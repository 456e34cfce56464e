"""The fused attention kernels against the definition (`attend`): splash's and pallas_gpu's Pallas kernels in
interpret mode on CPU, the cuDNN call's mask/window/GQA plumbing through jax.nn.dot_product_attention(
implementation="xla") (everything but the GPU kernel itself), which kernel each backend gets, and which kernels hold
[s, t] arrays."""

import re

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


# gpt-oss's attention sinks, one logit per query head (h = 4): the cases below that pass them check the sinks'
# gradient too. `attend`'s sinks are checked against transformers' eager gpt-oss attention in test_hf_gpt_oss.py.
SINKS = jnp.asarray([0.5, -1.0, 2.0, 0.0])


def _compare(kernel_fn, window, softcap, atol, sinks=None):
    """Forward and gradient of `kernel_fn` equal attend's on every real (non-padding) query (and, with `sinks`,
    the sinks' gradient)."""
    pos, seg = _packed()
    q, k, v = _qkv()
    assert att.index_masking_agrees(pos, seg)
    real = (seg != 0)[:, :, None, None].astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(1), q.shape) * real
    scale = E**-0.5
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    argnums = tuple(range(len(inputs)))

    def reference(q, k, v, sinks=None):
        return att.attend(q, k, v, pos, pos, seg, seg, scale=scale, window=window, softcap=softcap, sinks_h=sinks)

    def kernel(q, k, v, sinks=None):
        if sinks is None:
            return kernel_fn(q, k, v, pos, seg, scale, window, softcap)
        return kernel_fn(q, k, v, pos, seg, scale, window, softcap, sinks)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * weights)

    # Each side compiled whole (op by op, compiling each op was much of these tests' time).
    want, got = jax.jit(reference)(*inputs), jax.jit(kernel)(*inputs)
    np.testing.assert_allclose(np.asarray(got * real), np.asarray(want * real), atol=atol, rtol=atol)
    grads_want = jax.jit(jax.grad(loss(reference), argnums=argnums))(*inputs)
    grads_got = jax.jit(jax.grad(loss(kernel), argnums=argnums))(*inputs)
    for name, g_got, g_want in zip(("q", "k", "v", "sinks"), grads_got, grads_want):
        np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=atol, rtol=atol, err_msg=name)


def _splash(q, k, v, pos, seg, scale, window, softcap, sinks=None):
    return att.self_attention(
        q,
        k,
        v,
        pos,
        seg,
        scale=scale,
        window=window,
        softcap=softcap,
        kernel="splash",
        interpret=True,
        block=128,
        sinks_h=sinks,
    )


@pytest.mark.parametrize(
    "window,softcap,sinks", [(None, 0.0, None), (48, 20.0, SINKS)], ids=["causal-packed-gqa", "window-softcap-sinks"]
)
def test_splash_interpret_equals_xla_forward_and_gradient(window, softcap, sinks):
    _compare(jax.jit(_splash, static_argnums=(5, 6, 7)), window, softcap, atol=2e-4, sinks=sinks)


def _pallas_gpu(q, k, v, pos, seg, scale, window, softcap, sinks=None):
    return att.self_attention(
        q,
        k,
        v,
        pos,
        seg,
        scale=scale,
        window=window,
        softcap=softcap,
        kernel="pallas_gpu",
        interpret=True,
        block=64,
        sinks_h=sinks,
    )


def test_pallas_gpu_interpret_equals_xla_forward_and_gradient():
    # Causal, packed documents and padding, grouped-query heads (h=4 over k=2); 4 key blocks, so the causal block
    # bounds of the forward, dK/dV and dQ loops are exercised.
    _compare(jax.jit(_pallas_gpu, static_argnums=(5, 6, 7)), None, 0.0, atol=2e-4)


def test_pallas_gpu_under_a_context_mesh_with_window_softcap_and_sinks_equals_xla():
    # A window (48) shorter than a block, a soft-cap and sinks (applied through the kernel's log-sum-exp), under
    # data x context x tensor: each context shard's queries start at an offset (the kernels' q_offset), kv heads
    # and their query heads' sinks split over tensor.
    from analogjax import mesh as mesh_lib

    with jax.set_mesh(mesh_lib.make_mesh(2, 1, 2, context=2)):
        _compare(jax.jit(_pallas_gpu, static_argnums=(5, 6, 7)), 48, 20.0, atol=2e-4, sinks=SINKS)


def _square_arrays(kernel):
    """Shapes in the traced forward + gradient program (kernel bodies included) with two axes of the sequence
    length: what would hold [s, t] scores or masks."""
    pos, seg = _packed()
    q, k, v = _qkv()

    def loss(q, k, v):
        out = att.self_attention(q, k, v, pos, seg, scale=0.125, window=48, kernel=kernel, interpret=True, block=64)
        return jnp.sum(out.astype(jnp.float32))

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\[(\d+(?:,\d+)+)\]", text)}
    return {shape for shape in shapes if sum(d == S for d in shape) >= 2}


def test_pallas_gpu_never_holds_seq_by_seq():
    assert _square_arrays("xla"), "the check must see the XLA path's [s, t] scores, else it checks nothing"
    assert not _square_arrays("pallas_gpu")


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
    # GPUs get the segment-aware Pallas kernel (measured faster than cuDNN on an H200), cuDNN where it cannot run.
    assert choose("auto", "gpu") == "pallas_gpu" and choose("auto", "cuda") == "pallas_gpu"
    assert choose("auto", "gpu", window=4096, softcap=50.0, dtype=jnp.float32, seq_len=8192) == "pallas_gpu"
    assert choose("auto", "gpu", softcap=50.0, seq_len=8192) == "pallas_gpu"
    assert choose("pallas_gpu", "gpu", window=4096, seq_len=8192) == "pallas_gpu"
    assert choose("auto", "cpu") == "xla"
    # auto never picks a kernel that cannot do the layer: pallas_gpu, then cuDNN, then XLA.
    assert choose("auto", "gpu", seq_len=100) == "cudnn"
    assert choose("auto", "gpu", seq_len=100, dtype=jnp.float32) == "xla"
    assert choose("auto", "gpu", window=jnp.asarray(4096)) == "xla"  # per-layer (traced) windows
    assert choose("auto", "tpu", window=jnp.asarray(4096)) == "xla"
    assert choose("auto", "tpu", seq_len=100) == "xla"
    assert choose("splash", "tpu", window=4096, softcap=50.0, seq_len=8192) == "splash"
    assert choose("cudnn", "gpu", window=4096) == "cudnn"  # still there when asked for
    assert choose("xla", "tpu") == "xla" and choose("xla", "gpu") == "xla"
    # Attention sinks (gpt-oss): splash and pallas_gpu take them, cuDNN cannot, so auto passes it by.
    assert choose("auto", "tpu", sinks=True, seq_len=8192) == "splash"
    assert choose("auto", "gpu", sinks=True, seq_len=8192) == "pallas_gpu"
    # Inside a trace without a mesh the platform is the default backend's (cpu here).
    assert att.trace_platform() == "cpu"


@pytest.mark.parametrize(
    "requested,platform,kwargs,message",
    [
        ("splash", "cpu", {}, "needs a tpu backend"),
        ("cudnn", "cpu", {}, "needs a gpu or cuda backend"),
        ("pallas_gpu", "tpu", {}, "needs a gpu or cuda backend"),
        ("pallas_gpu", "gpu", {"window": jnp.asarray(8)}, "pallas_gpu needs one window per compiled kernel"),
        ("pallas_gpu", "gpu", {"seq_len": 200}, "multiple of 64"),
        ("pallas_gpu", "gpu", {"dtype": jnp.int8}, "float32"),
        ("cudnn", "gpu", {"softcap": 50.0}, "soft-cap"),
        ("cudnn", "gpu", {"dtype": jnp.float32}, "bfloat16"),
        ("splash", "tpu", {"window": jnp.asarray(8)}, "windows differ per layer"),
        ("splash", "tpu", {"seq_len": 200}, "multiple of 128"),
        ("flash", "tpu", {}, "must be one of"),
        ("cudnn", "gpu", {"sinks": True}, "no attention sinks"),
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
    # Shapes suffice: the refusal comes while tracing the forward (nothing is initialised, compiled or run).
    params = jax.eval_shape(Transformer(PRESETS["tiny"]).init_boxed, jax.random.key(0))
    with pytest.raises(UserError, match="model.attention=splash needs a tpu backend"):
        jax.eval_shape(
            model,
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
        _compare(jax.jit(_splash, static_argnums=(5, 6, 7)), 48, 20.0, atol=2e-4, sinks=SINKS)


def test_pallas_gpu_bfloat16_multi_query_matches_float32_reference():
    # What GPUs run: bfloat16 inputs (tiles multiplied in bfloat16, softmax in float32), one kv head for 4 query
    # heads, window and soft-cap; against attend in float32 on the same (rounded) inputs, to bfloat16's precision.
    from analogjax.models import flash_gpu

    b, s, e = 1, 128, 64
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (b, s, 4, e), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, s, 1, e), jnp.bfloat16) for key in keys[1:])
    seg = jnp.ones((b, s), jnp.int32).at[:, 40:].set(2)
    pos = jnp.concatenate([jnp.arange(40), jnp.arange(s - 40)])[None].astype(jnp.int32)

    def kernel(q, k, v):
        return flash_gpu.flash_attention(q, k, v, seg, seg, e**-0.5, 30, 10.0, 0, 64, True).astype(jnp.float32)

    def reference(q, k, v):
        return att.attend(q, k, v, pos, pos, seg, seg, scale=e**-0.5, window=30, softcap=10.0)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(jax.jit(kernel)(q, k, v)), np.asarray(jax.jit(reference)(*f32)), atol=2e-2)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a)), argnums=(0, 1, 2)))(q, k, v)
    grads_want = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a)), argnums=(0, 1, 2)))(*f32)
    for name, got, want in zip("qkv", grads, grads_want):
        assert got.dtype == jnp.bfloat16, name
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2 * scale, err_msg=name)
