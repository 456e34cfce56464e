"""Flash attention for GPUs in Pallas (Triton backend), aware of packed documents: segment ids, causal and sliding
window masks, attention-logit soft-cap and grouped-query heads inside the kernel, scores never held beyond one
[block_q, block_k] tile.

Why our own kernel: cuDNN through `jax.nn.dot_product_attention` has no segment ids (documents need a dense
[b, 1, s, t] mask, bytes per score) and no soft-cap; jax's Pallas GPU `mha` (pallas/ops/gpu/attention.py) has
segment ids and causal masking but no window, no soft-cap and no grouped-query heads; the Mosaic GPU kernels have
none of the masks. This file follows jax's `mha` (FlashAttention-2: an online softmax over key blocks in the forward,
log-sum-exp kept for the backward, dK/dV and dQ recomputing the probabilities tile by tile) and adds what analogjax's
models need. `interpret=True` runs the same kernels on CPU (what the tests check against `attention.attend`).

Masks are by ARRAY INDEX, as splash's (attention.py says when that equals masking by position). `q_offset` is the
global index of the first query, so a context shard's queries can run against all keys. Grouped-query attention
reads kv head `j // g` for query head `j` (keys are never repeated); dK/dV come out per query head (float32,
[b, t, h, e]: O(seq), not O(seq²)) and are summed over each kv head's g queries outside the kernel.

Memory: O(b·s·h·e) for inputs, outputs, dK/dV partials and the [b, h, s] log-sum-exp; nothing [s, t].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked tile never makes inf - inf
BLOCK = 64  # tile edge for queries and keys (Triton wants powers of two; 64 fits a tile of scores in registers)


def block_for(seq_len: int, block: int = BLOCK) -> int:
    """The tile edge used for `seq_len` tokens (0 when the kernel cannot tile it)."""
    edge = min(block, seq_len)
    if edge < 16 or edge & (edge - 1) or seq_len % edge:
        return 0
    return edge


def _logits(qk, scale: float, softcap: float):
    """Scaled (and soft-capped) scores of one tile, float32."""
    scores = qk.astype(jnp.float32) * scale
    return jnp.tanh(scores / softcap) * softcap if softcap else scores


def _visible(q_idx, k_idx, q_seg, k_seg, window):
    """[block_q, block_k] boolean: causal by index, same segment, inside the window."""
    delta = q_idx[:, None] - k_idx[None, :]
    ok = (delta >= 0) & (q_seg[:, None] == k_seg[None, :])
    if window is not None:
        ok = ok & (delta < window)
    return ok


def _key_blocks(q_first, block_q: int, block_k: int, n_k: int, window):
    """Key blocks a query block starting at global index `q_first` can see: [lo, hi)."""
    hi = jnp.minimum(lax.div(q_first + block_q + block_k - 1, block_k), n_k)
    lo = 0 if window is None else lax.div(jnp.maximum(q_first - window + 1, 0), block_k)
    return lo, hi


def _query_blocks(k_first, block_q: int, block_k: int, n_q: int, q_offset: int, window):
    """Query blocks (local to this shard) that can see a key block starting at global index `k_first`: [lo, hi)."""
    lo = lax.div(jnp.maximum(k_first - q_offset, 0), block_q)
    if window is None:
        return jnp.minimum(lo, n_q), n_q
    last = k_first + block_k - 1 + window - 1 - q_offset  # the last local query that sees the block's last key
    hi = jnp.minimum(lax.div(jnp.maximum(last, -1) + block_q, block_q), n_q)
    return jnp.minimum(lo, hi), hi


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, cfg):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    block_q, block_k, n_k = cfg["block_q"], cfg["block_k"], cfg["n_k"]
    head = (jnp.arange(q_ref.shape[-1]) < cfg["head_dim"])[None, :]
    q_first = cfg["q_offset"] + pl.program_id(0) * block_q
    q_idx = q_first + jnp.arange(block_q)
    q = plgpu.load(q_ref, mask=head, other=0.0)
    q_seg = q_seg_ref[...]

    def body(j, carry):
        o, m, total = carry
        keys = pl.ds(j * block_k, block_k)
        k = plgpu.load(k_ref.at[keys, :], mask=head, other=0.0)
        s = _logits(plgpu.dot(q, k.T), cfg["scale"], cfg["softcap"])
        ok = _visible(q_idx, j * block_k + jnp.arange(block_k), q_seg, k_seg_ref[keys], cfg["window"])
        s = jnp.where(ok, s, MASKED)
        m_next = jnp.maximum(m, jnp.max(s, axis=-1))
        correction = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = plgpu.load(v_ref.at[keys, :], mask=head, other=0.0)
        o = correction[:, None] * o + plgpu.dot(p.astype(v.dtype), v)
        return o, m_next, correction * total + jnp.sum(p, axis=-1)

    lo, hi = _key_blocks(q_first, block_q, block_k, n_k, cfg["window"])
    init = (
        jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    o, m, total = lax.fori_loop(lo, hi, body, init)
    # Every query sees itself (causal includes the diagonal, a window holds at least the query), so total > 0.
    plgpu.store(o_ref.at[:, : o.shape[-1]], (o / total[:, None]).astype(o_ref.dtype), mask=head)
    lse_ref[...] = m + jnp.log(total)


def _tile_grads(q, k, v, do, lse, delta, q_idx, k_idx, q_seg, k_seg, cfg):
    """One tile's probabilities and d(scores before scaling): p [bq, bk] and ds [bq, bk], float32."""
    from jax.experimental.pallas import triton as plgpu

    s = _logits(plgpu.dot(q, k.T), cfg["scale"], cfg["softcap"])
    ok = _visible(q_idx, k_idx, q_seg, k_seg, cfg["window"])
    p = jnp.exp(jnp.where(ok, s, MASKED) - lse[:, None])
    ds = p * (plgpu.dot(do, v.T).astype(jnp.float32) - delta[:, None])
    if cfg["softcap"]:
        ds = ds * (1.0 - (s / cfg["softcap"]) ** 2)  # d(cap·tanh(x/cap))/dx
    return p, ds * cfg["scale"]


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref, dk_ref, dv_ref, *, cfg):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    block_q, block_k, n_q = cfg["block_q"], cfg["block_k"], cfg["n_q"]
    head = (jnp.arange(q_ref.shape[-1]) < cfg["head_dim"])[None, :]
    k_first = pl.program_id(0) * block_k
    k_idx = k_first + jnp.arange(block_k)
    k = plgpu.load(k_ref, mask=head, other=0.0)
    v = plgpu.load(v_ref, mask=head, other=0.0)
    k_seg = k_seg_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q = plgpu.load(q_ref.at[rows, :], mask=head, other=0.0)
        do = plgpu.load(do_ref.at[rows, :], mask=head, other=0.0)
        q_idx = cfg["q_offset"] + i * block_q + jnp.arange(block_q)
        p, ds = _tile_grads(q, k, v, do, lse_ref[rows], delta_ref[rows], q_idx, k_idx, q_seg_ref[rows], k_seg, cfg)
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
        dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
        return dk, dv

    lo, hi = _query_blocks(k_first, block_q, block_k, n_q, cfg["q_offset"], cfg["window"])
    zeros = jnp.zeros((block_k, k_ref.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    plgpu.store(dk_ref.at[:, : dk.shape[-1]], dk.astype(dk_ref.dtype), mask=head)
    plgpu.store(dv_ref.at[:, : dv.shape[-1]], dv.astype(dv_ref.dtype), mask=head)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k_seg_ref, dq_ref, *, cfg):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    block_q, block_k = cfg["block_q"], cfg["block_k"]
    head = (jnp.arange(q_ref.shape[-1]) < cfg["head_dim"])[None, :]
    q_first = cfg["q_offset"] + pl.program_id(0) * block_q
    q_idx = q_first + jnp.arange(block_q)
    q = plgpu.load(q_ref, mask=head, other=0.0)
    do = plgpu.load(do_ref, mask=head, other=0.0)
    lse, delta, q_seg = lse_ref[...], delta_ref[...], q_seg_ref[...]

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = plgpu.load(k_ref.at[keys, :], mask=head, other=0.0)
        v = plgpu.load(v_ref.at[keys, :], mask=head, other=0.0)
        k_idx = j * block_k + jnp.arange(block_k)
        _, ds = _tile_grads(q, k, v, do, lse, delta, q_idx, k_idx, q_seg, k_seg_ref[keys], cfg)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    lo, hi = _key_blocks(q_first, block_q, block_k, cfg["n_k"], cfg["window"])
    dq = lax.fori_loop(lo, hi, body, jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32))
    plgpu.store(dq_ref.at[:, : dq.shape[-1]], dq.astype(dq_ref.dtype), mask=head)


def _specs(b, s, t, h, g, e_pad, block_q, block_k):
    """BlockSpecs over a (block, batch, query head) grid: whole rows for the looped-over side, one tile for the other.
    Keys and values of query head j are kv head j // g (grouped-query attention without repeating keys)."""
    from jax.experimental import pallas as pl

    return {
        "q_tile": pl.BlockSpec((None, block_q, None, e_pad), lambda i, bb, hh: (bb, i, hh, 0)),
        "q_all": pl.BlockSpec((None, s, None, e_pad), lambda i, bb, hh: (bb, 0, hh, 0)),
        "kv_tile": pl.BlockSpec((None, block_k, None, e_pad), lambda j, bb, hh: (bb, j, hh // g, 0)),
        "kv_all": pl.BlockSpec((None, t, None, e_pad), lambda i, bb, hh: (bb, 0, hh // g, 0)),
        "kv_tile_per_q_head": pl.BlockSpec((None, block_k, None, e_pad), lambda j, bb, hh: (bb, j, hh, 0)),
        "row_tile": pl.BlockSpec((None, None, block_q), lambda i, bb, hh: (bb, hh, i)),
        "row_all": pl.BlockSpec((None, None, s), lambda i, bb, hh: (bb, hh, 0)),
        "q_seg_tile": pl.BlockSpec((None, block_q), lambda i, bb, hh: (bb, i)),
        "q_seg_all": pl.BlockSpec((None, s), lambda i, bb, hh: (bb, 0)),
        "k_seg_tile": pl.BlockSpec((None, block_k), lambda j, bb, hh: (bb, j)),
        "k_seg_all": pl.BlockSpec((None, t), lambda i, bb, hh: (bb, 0)),
    }


def _setup(q, k, scale, window, softcap, q_offset, block):
    b, s, h, e = q.shape
    t, kv_heads = k.shape[1], k.shape[2]
    block_q, block_k = block_for(s, block), block_for(t, block)
    if not block_q or not block_k:
        raise ValueError(f"flash_gpu tiles {block}: query length {s} and key length {t} must divide into them")
    cfg = dict(
        scale=scale,
        window=window,
        softcap=softcap,
        q_offset=q_offset,
        block_q=block_q,
        block_k=block_k,
        n_q=s // block_q,
        n_k=t // block_k,
        head_dim=e,
    )
    e_pad = 1 << max(e - 1, 0).bit_length()  # Triton tiles want a power-of-two head dim; loads mask the rest
    return cfg, _specs(b, s, t, h, h // kv_heads, e_pad, block_q, block_k)


def _params(num_warps: int = 4):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _forward(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret):
    from jax.experimental import pallas as pl

    b, s, h, _ = q.shape
    cfg, sp = _setup(q, k, scale, window, softcap, q_offset, block)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(cfg["n_q"], b, h),
        in_specs=[sp["q_tile"], sp["kv_all"], sp["kv_all"], sp["q_seg_tile"], sp["k_seg_all"]],
        out_specs=[sp["q_tile"], sp["row_tile"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
        name="analogjax_flash_forward",
    )(q, k, v, q_seg, k_seg)


def flash_attention(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret):
    """Causal attention of queries q [b, s, h, e] (global indices q_offset..q_offset+s-1) against keys/values
    [b, t, k, e] (indices 0..t-1), packed documents by segment ids q_seg [b, s] / k_seg [b, t], keys within `window`
    (a Python int or None), scores soft-capped at `softcap` (0 = off) → [b, s, h, e]. s and t must divide into
    tiles of `block` (see `block_for`)."""
    return flash_attention_lse(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def flash_attention_lse(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret):
    """`flash_attention` and each row's log-sum-exp of its scores (float32 [b, h, s]), both differentiable: what
    attention sinks need (attention.pallas_gpu_attention). A cotangent on lse adds dlse·p to each row's score
    gradients, which the backward kernels take by shifting their D_i = Σ dO·O by -dlse."""
    return _forward(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret)


def _fwd(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret):
    out, lse = _forward(q, k, v, q_seg, k_seg, scale, window, softcap, q_offset, block, interpret)
    return (out, lse), (q, k, v, q_seg, k_seg, out, lse)


def _bwd(scale, window, softcap, q_offset, block, interpret, residuals, cotangents):
    from jax.experimental import pallas as pl

    q, k, v, q_seg, k_seg, out, lse = residuals
    d_out, d_lse = cotangents
    b, s, h, e = q.shape
    t, kv_heads = k.shape[1], k.shape[2]
    cfg, sp = _setup(q, k, scale, window, softcap, q_offset, block)
    # D_i = Σ_e dO·O per query row (the softmax's Jacobian term), [b, h, s] float32: plain XLA, O(seq); minus the
    # lse cotangent (d lse / d score = p, so it enters ds = p·(dO·v - D) with the opposite sign of D).
    delta = jnp.einsum("bshe,bshe->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    inputs = (q, k, v, d_out, lse, delta, q_seg, k_seg)
    per_q_head = jax.ShapeDtypeStruct((b, t, h, e), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(cfg["n_k"], b, h),
        in_specs=[
            sp["q_all"],
            sp["kv_tile"],
            sp["kv_tile"],
            sp["q_all"],
            sp["row_all"],
            sp["row_all"],
            sp["q_seg_all"],
            sp["k_seg_tile"],
        ],
        out_specs=[sp["kv_tile_per_q_head"], sp["kv_tile_per_q_head"]],
        out_shape=[per_q_head, per_q_head],
        compiler_params=_params(),
        interpret=interpret,
        name="analogjax_flash_dkdv",
    )(*inputs)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(cfg["n_q"], b, h),
        in_specs=[
            sp["q_tile"],
            sp["kv_all"],
            sp["kv_all"],
            sp["q_tile"],
            sp["row_tile"],
            sp["row_tile"],
            sp["q_seg_tile"],
            sp["k_seg_all"],
        ],
        out_specs=sp["q_tile"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(),
        interpret=interpret,
        name="analogjax_flash_dq",
    )(*inputs)
    g = h // kv_heads

    def per_kv_head(x):  # the g query heads of one kv head are adjacent: sum them
        return x.reshape(b, t, kv_heads, g, e).sum(axis=3).astype(k.dtype)

    return dq, per_kv_head(dk), per_kv_head(dv), None, None


flash_attention_lse.defvjp(_fwd, _bwd)
