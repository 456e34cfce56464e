"""The attention core: a pure function of queries, keys, values and where each one sits.

Kept apart from the projections so that a KV-cache decoder (queries from the new tokens, keys from the cache) and
fused kernels can call the same definition. Everything that decides which key a query may see is given as data:
positions (causality and the sliding window count positions, not array indices, so cached keys work) and segment
ids (packed documents never see each other; segment 0 is padding and sees nothing).

Kernels (`self_attention`, chosen per backend by `choose_kernel`; the dispatcher's note below gives the memory of
each): xla (`attend`, CPU), splash (TPU), pallas_gpu (GPU: models/flash_gpu.py, segment ids in the kernel, so packed
batches never hold an [s, t] array; `auto`'s first choice there) and cudnn (GPU: its documents are a dense mask).

Shapes: b batch, s query length, t key length, h query heads, k kv heads, g = h / k queries per kv head, e head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from analogjax.errors import UserError
from analogjax.mesh import BATCH_AXES
from analogjax.models import flash_gpu
from analogjax.models.config import KERNELS


def allowed(q_pos_bs, k_pos_bt, q_seg_bs, k_seg_bt, window=None, chunk=None) -> jax.Array:
    """[b, s, t] boolean: key t is visible from query s.

    Causal by position, same document, never from or onto padding; with `window` (a Python int or a traced scalar;
    None = unlimited) a query at position i sees keys at positions (i - window, i], as transformers' sliding
    window counts (the query itself is one of the `window` keys); with `chunk` (Llama 4's chunked layers; int or
    traced, None = off) only keys of its own chunk, position // chunk equal, as transformers' chunked mask.
    """
    delta = q_pos_bs[:, :, None] - k_pos_bt[:, None, :]
    ok = (delta >= 0) & (q_seg_bs[:, :, None] == k_seg_bt[:, None, :]) & (q_seg_bs != 0)[:, :, None]
    if window is not None:
        ok = ok & (delta < window)
    if chunk is not None:
        ok = ok & (q_pos_bs[:, :, None] // chunk == k_pos_bt[:, None, :] // chunk)
    return ok


def chunk_segments(positions_bs, segment_ids_bs, chunk) -> jax.Array:
    """Segment ids that also cut every document at its chunk boundaries (position // chunk changes): causal
    attention within these segments IS chunked attention, since a (document, chunk) pair is one contiguous run of a
    packed row. This is how the fused kernels, which know segment ids but not positions, do Llama 4's chunked
    layers exactly, packed documents included (chunks count from each document's start, as positions do). They
    skip only the blocks the causal mask rules out, not those other chunks do: memory stays O(seq), FLOPs are those
    of full causal attention. Padding (segment 0) stays 0."""
    block = positions_bs // chunk
    starts = (segment_ids_bs[:, 1:] != segment_ids_bs[:, :-1]) | (block[:, 1:] != block[:, :-1])
    first = jnp.ones_like(starts[:, :1])
    ids = jnp.cumsum(jnp.concatenate([first, starts], axis=1), axis=1, dtype=jnp.int32)
    return jnp.where(segment_ids_bs != 0, ids, 0)


def attend(
    q_bshe,
    k_btke,
    v_btke,
    q_pos_bs,
    k_pos_bt,
    q_seg_bs,
    k_seg_bt,
    *,
    scale: float,
    window=None,
    softcap: float = 0.0,
    chunk=None,
    sinks_h=None,
    kv_heads_first: bool = False,
) -> jax.Array:
    """softmax(mask(softcap(q·k · scale))) · v, grouped-query, scores and softmax in float32 → [b, s, h, e].

    Keys and values are [b, t, k, e], or [b, k, t, e] with `kv_heads_first` (the decode cache's layout: its batch
    axes b, k already lead, so the two products read the cache as it lies, with no transposed copy per step).

    `softcap` > 0 maps scores to softcap·tanh(scores / softcap) before masking (Gemma 2). `sinks_h` (gpt-oss): one
    learned logit per query head that joins every row's softmax denominator and attends to nothing (the
    probabilities of a row then sum to less than 1). Keys are never repeated for grouped-query attention: the g
    query heads of one kv head are a separate axis of the einsum.
    """
    b, s, h, e = q_bshe.shape
    kv = "bkte" if kv_heads_first else "btke"
    k = k_btke.shape[kv.index("k")]
    q = q_bshe.reshape(b, s, k, h // k, e)
    scores = jnp.einsum(f"bskge,{kv}->bkgst", q, k_btke, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    mask = allowed(q_pos_bs, k_pos_bt, q_seg_bs, k_seg_bt, window, chunk)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if sinks_h is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_btke.dtype)
    else:
        sink = sinks_h.astype(jnp.float32).reshape(1, k, h // k, 1, 1)
        log_total = jnp.logaddexp(jax.nn.logsumexp(scores, axis=-1, keepdims=True), sink)
        probs = jnp.exp(scores - log_total).astype(v_btke.dtype)
    return jnp.einsum(f"bkgst,{kv}->bskge", probs, v_btke).reshape(b, s, h, v_btke.shape[-1])


# --- the kernel dispatcher -------------------------------------------------------------------------------------------
# `attend` above is the definition; the fused kernels below compute the same thing without ever holding the
# [s, t] scores (`cudnn` holds a [s, t] mask, see below). They are self-attention kernels over one packed sequence:
# they mask by ARRAY INDEX (causal and window) plus segment ids, where `attend` masks by POSITION. The two agree
# exactly when, inside every document, positions count up by one from the document's first token (data/packing.py
# restarts them at 0 per document, and an unpacked row is 0..s-1) — `index_masking_agrees` checks that on concrete
# batches. A KV-cache decoder (queries and keys at different positions) calls `attend` directly. Padding (segment 0)
# differs too: `attend` lets a padding query see nothing, the kernels let it see earlier padding; both outputs at
# padding are never read by a loss.

#
# Per backend, and what each holds in memory besides O(seq) activations:
# - tpu: splash (Pallas, block-sparse): segment ids, causal/window, soft-cap and attention sinks in the kernel;
#   nothing [s, t].
# - gpu: pallas_gpu (models/flash_gpu.py, Pallas on Triton): segment ids, causal/window, soft-cap and grouped-query
#   heads in the kernel; nothing [s, t]. `auto`'s first choice on GPUs, measured on one H200 (BENCHMARKS.md,
#   2026-12-04, bfloat16, 4 documents a row): forward + gradient at 1.26-1.36x cuDNN's speed from 4k to 32k tokens
#   with 0.39-0.83x its compiled temporaries, outputs and d q / d k / d v within bfloat16 rounding of XLA's exactly as
#   cuDNN's are (largest differences 0.0156 and 0.25 against gradients of ~65); an 8B-teacher / 1B-student step at
#   4 x 2,048 single-document rows ran within 1.5% of cuDNN's (one run each).
# - gpu: cudnn, jax.nn.dot_product_attention (JAX's own maintained kernel), whose API has no segment ids: packed
#   documents need a dense boolean [b, 1, s, t] mask that jax turns into a bias of the query dtype (2 bytes per
#   score: 32 MiB per row at 4k tokens, 2 GiB at 32k), and it has no soft-cap, no attention sinks and no float32.
#   `auto` falls back to it where pallas_gpu cannot run (a length that is neither a multiple of 64 nor a power of two).
# - cpu: xla (`attend`), [b, k, g, s, t] float32 scores: the reference, fastest on CPU at the lengths CPUs run.
# Llama 4's chunked layers run on every kernel as finer segment ids (`chunk_segments`), exactly, packed or not.
# What `auto` tries on each platform, in order, before xla (jax's platform names; the abstract mesh says "cuda"
# where a backend says "gpu").
AUTO_KERNEL = {"tpu": ("splash",), "gpu": ("pallas_gpu", "cudnn"), "cuda": ("pallas_gpu", "cudnn")}
_KERNEL_PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda"), "pallas_gpu": ("gpu", "cuda")}
# Splash tiles: queries and keys in blocks of at most this many tokens (the sequence must divide into them).
SPLASH_BLOCK = 512


def trace_platform() -> str:
    """The platform the traced program will run on: the current mesh's devices (compile-check sets a TPU topology's
    mesh on a CPU host), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def unsupported(
    kernel: str,
    *,
    window,
    softcap: float,
    dtype,
    seq_len: int,
    sinks: bool = False,
    head_dims: tuple[int, int] = (0, 0),
) -> str:
    """Why `kernel` cannot compute this attention ('' when it can); `sinks`: the model has attention sinks;
    head_dims: (query/key, value) head dims."""
    static_window = window is None or isinstance(window, int)
    if kernel != "xla" and head_dims[0] != head_dims[1]:
        return (
            f"{kernel} needs the value head dim to equal the query/key head dim, but this model's are "
            f"{head_dims[1]} and {head_dims[0]} (multi-head latent attention); use model.attention=xla or auto"
        )
    if kernel == "splash":
        if not static_window:
            return (
                "splash needs one window per compiled kernel, but this model's windows differ per layer "
                "(layer_pattern); use model.attention=xla"
            )
        block = min(SPLASH_BLOCK, seq_len)
        if seq_len % 128 or seq_len % block:
            return (
                f"splash needs a sequence length (per context shard) that is a multiple of 128, and of "
                f"{SPLASH_BLOCK} above it, got {seq_len}"
            )
    if kernel == "pallas_gpu":
        if not static_window:
            return (
                "pallas_gpu needs one window per compiled kernel, but this model's windows differ per layer "
                "(layer_pattern); use model.attention=xla"
            )
        if not flash_gpu.block_for(seq_len):
            return (
                f"pallas_gpu needs a sequence length (per context shard) that is a multiple of {flash_gpu.BLOCK}, "
                f"or a power of two from 16 below it, got {seq_len}"
            )
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
            return f"pallas_gpu runs bfloat16/float16/float32, the model computes in {jnp.dtype(dtype).name}"
    if kernel == "cudnn":
        if sinks:
            return "cuDNN flash attention (jax.nn.dot_product_attention) has no attention sinks (gpt-oss)"
        if softcap:
            return "cuDNN flash attention (jax.nn.dot_product_attention) has no attention-logit soft-cap"
        if not static_window:
            return "cudnn needs one window per compiled kernel, but this model's windows differ per layer"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention runs bfloat16/float16 only, the model computes in {jnp.dtype(dtype).name}"
    return ""


def choose_kernel(
    requested: str,
    platform: str,
    *,
    window=None,
    softcap: float = 0.0,
    dtype=jnp.bfloat16,
    seq_len: int = 128,
    key: str = "model.attention",
    sinks: bool = False,
    head_dims: tuple[int, int] = (0, 0),
) -> str:
    """Resolve `requested` (one of KERNELS) for `platform`. `auto` takes the platform's fused kernel when it can do
    this attention, else xla (correct everywhere); an explicit kernel the platform lacks, or one that cannot do the
    window / soft-cap / sinks / dtype asked for, is a UserError (never a silent fallback)."""
    if requested not in KERNELS:
        raise UserError(f"{key} must be one of {', '.join(KERNELS)}, got {requested!r}")
    if requested == "auto":
        for kernel in AUTO_KERNEL.get(platform, ()):
            if not unsupported(
                kernel,
                window=window,
                softcap=softcap,
                dtype=dtype,
                seq_len=seq_len,
                sinks=sinks,
                head_dims=head_dims,
            ):
                return kernel
        return "xla"
    if requested != "xla" and platform not in _KERNEL_PLATFORMS[requested]:
        raise UserError(
            f"{key}={requested} needs a {' or '.join(_KERNEL_PLATFORMS[requested])} backend, but this "
            f"program runs on {platform}; use auto or xla"
        )
    why = unsupported(
        requested, window=window, softcap=softcap, dtype=dtype, seq_len=seq_len, sinks=sinks, head_dims=head_dims
    )
    if why:
        raise UserError(f"{key}={requested}: {why}")
    return requested


def self_attention(
    q_bshe,
    k_bske,
    v_bske,
    positions_bs,
    segment_ids_bs,
    *,
    scale: float,
    window=None,
    softcap: float = 0.0,
    kernel: str = "auto",
    interpret: bool = False,
    block: int = SPLASH_BLOCK,
    chunk=None,
    sinks_h=None,
) -> jax.Array:
    """Causal self-attention of one packed sequence with the chosen kernel → [b, s, h, e] (see the note above on
    positions vs indices; `sinks_h`: `attend`'s attention sinks). `interpret` runs a Pallas kernel (splash,
    pallas_gpu) in interpret mode (tests on CPU; it skips the platform check). Under a mesh with a `context` axis the
    queries stay split over the sequence and the keys and values are all-gathered (mesh.py says why). `chunk` (Llama
    4's chunked layers): every kernel takes it as finer segment ids (`chunk_segments`); xla masks by position
    directly."""
    mesh = jax.sharding.get_abstract_mesh()
    context = 1 if mesh.empty else mesh.shape.get("context", 1)
    pallas = {"splash": "tpu", "pallas_gpu": "gpu"}
    platform = pallas[kernel] if interpret and kernel in pallas else trace_platform()
    # Splash tiles each context shard's queries: the length that must divide into tiles is the shard's.
    kernel = choose_kernel(
        kernel,
        platform,
        window=window,
        softcap=softcap,
        dtype=q_bshe.dtype,
        seq_len=q_bshe.shape[1] // context,
        sinks=sinks_h is not None,
        head_dims=(q_bshe.shape[-1], v_bske.shape[-1]),
    )
    k_bske, v_bske = gather_context(k_bske), gather_context(v_bske)
    if kernel == "xla":
        return attend(
            q_bshe,
            k_bske,
            v_bske,
            positions_bs,
            positions_bs,
            segment_ids_bs,
            segment_ids_bs,
            scale=scale,
            window=window,
            softcap=softcap,
            chunk=chunk,
            sinks_h=sinks_h,
        )
    if chunk is not None:
        segment_ids_bs = chunk_segments(positions_bs, segment_ids_bs, chunk)
    if kernel == "cudnn":
        return cudnn_attention(q_bshe, k_bske, v_bske, segment_ids_bs, scale=scale, window=window)
    if kernel == "pallas_gpu":
        return pallas_gpu_attention(
            q_bshe,
            k_bske,
            v_bske,
            segment_ids_bs,
            scale=scale,
            window=window,
            softcap=softcap,
            interpret=interpret,
            block=min(block, flash_gpu.BLOCK),
            sinks_h=sinks_h,
        )
    return splash_attention(
        q_bshe,
        k_bske,
        v_bske,
        segment_ids_bs,
        scale=scale,
        window=window,
        softcap=softcap,
        interpret=interpret,
        block=block,
        sinks_h=sinks_h,
    )


def gather_context(x_bske: jax.Array) -> jax.Array:
    """Keys/values whole along the sequence (all-gathered over the `context` mesh axis, a no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("context", 1) == 1:
        return x_bske
    spec = P(_batch_axes(mesh, x_bske.shape[0]), None, P.UNCONSTRAINED, P.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x_bske, spec)


def _context_shards() -> int:
    """How many pieces the current mesh's `context` axis cuts the queries into (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape.get("context", 1) if not mesh.empty and mesh.size > 1 else 1


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """The batch mesh axes that divide `batch` (as mesh.fit_to_shape keeps them)."""
    axes: list[str] = []
    for axis in BATCH_AXES:
        if batch % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
            axes.append(axis)
    return tuple(axes)


def cudnn_attention(
    q_bshe,
    k_bske,
    v_bske,
    segment_ids_bs,
    *,
    scale: float,
    window: int | None = None,
    implementation: Literal["cudnn", "xla"] = "cudnn",
) -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention`: causal and the window inside the kernel,
    grouped-query natively. jax's API has no segment ids, so documents are separated by a boolean [b, 1, s, t]
    mask, which jax turns into a bias of the query dtype before cuDNN reads it: s·t scores' worth of bytes per row
    (never float32 scores or softmax, but O(seq²): set model.attention: pallas_gpu for long context).
    `implementation="xla"` runs the same call on any backend (what the CPU tests check against `attend`)."""
    mask = (segment_ids_bs[:, :, None] == segment_ids_bs[:, None, :])[:, None]
    local = None if window is None else (window - 1, 0)  # the query itself is one of the `window` keys
    return jax.nn.dot_product_attention(
        q_bshe,
        k_bske,
        v_bske,
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=local,
        implementation=implementation,
    )


def splash_attention(
    q_bshe,
    k_bske,
    v_bske,
    segment_ids_bs,
    *,
    scale: float,
    window=None,
    softcap: float = 0.0,
    interpret: bool = False,
    block: int = SPLASH_BLOCK,
    sinks_h=None,
) -> jax.Array:
    """Pallas splash attention (TPU): block-sparse over the causal / local mask, segment ids in the kernel, soft-cap
    and attention sinks (`sinks_h`, one logit per query head) in the kernel, grouped-query as one MQA kernel per kv
    head (keys never repeated). Under a mesh it runs inside shard_map over batch, kv heads and the `context` axis (a
    Pallas call is not partitioned by GSPMD): each context shard computes its own queries' rows against all keys,
    with a mask offset by where its queries start."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    s, h = q_bshe.shape[1], q_bshe.shape[2]
    g = h // k_bske.shape[2]
    q_len = s // _context_shards()
    bq, bkv = min(block, q_len), min(block, s)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )

    def kernel_at(offset):
        # Rows are this shard's queries (global index offset + i), columns every key.
        if window is None:
            one = splash.CausalMask((q_len, s), offset=offset)
        else:
            one = splash.LocalMask((q_len, s), (window - 1, 0), offset=offset)
        return splash.make_splash_mqa(
            splash.MultiHeadMask([one] * g),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            attn_logits_soft_cap=softcap or None,
            interpret=interpret,
        )

    local = functools.partial(_splash_local, scale=scale, g=g)
    return _on_shards(kernel_at, q_bshe, k_bske, v_bske, segment_ids_bs, local, sinks_h)


def _splash_local(kernel, q, kk, v, q_seg, kv_seg, sinks_h=None, *, scale: float, g: int):
    """One shard of splash: [b, s, h, e] → [b, k, g, s, e], one MQA kernel per (row, kv head); the scale goes into
    the queries (splash scores plain q·k; a sink is a plain logit, compared with the scaled scores)."""
    bl, sl, _, e = q.shape

    def one_row(q_kgse, k_kse, v_kse, q_seg_s, kv_seg_s):
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        ids = splash.SegmentIds(q=q_seg_s, kv=kv_seg_s)
        if sinks_h is None:
            return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_kgse, k_kse, v_kse, ids)
        sinks_kg = sinks_h.astype(jnp.float32).reshape(-1, g)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None, 0))(q_kgse, k_kse, v_kse, ids, sinks_kg)

    q_bkgse = (q * jnp.asarray(scale, q.dtype)).reshape(bl, sl, -1, g, e).transpose(0, 2, 3, 1, 4)
    out = jax.vmap(one_row)(q_bkgse, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_seg, kv_seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(bl, sl, -1, e).astype(q.dtype)


def pallas_gpu_attention(
    q_bshe,
    k_bske,
    v_bske,
    segment_ids_bs,
    *,
    scale: float,
    window=None,
    softcap: float = 0.0,
    interpret: bool = False,
    block: int = flash_gpu.BLOCK,
    sinks_h=None,
) -> jax.Array:
    """models/flash_gpu.py's kernel (GPU; `interpret` on CPU): segment ids, causal/window, soft-cap and grouped-query
    heads in the kernel, O(seq) memory. Under a mesh it runs inside shard_map like splash, each context shard's
    queries offset by where they start.

    Attention sinks (`sinks_h`) act on the kernel's output: a sink adds exp(sink) to a row's softmax denominator
    Z = exp(lse), so the row's output is the kernel's times Z / (Z + exp(sink)) = sigmoid(lse - sink); the kernel
    returns lse with its gradient (flash_gpu.flash_attention_lse), so the sinks and the keys train through it."""

    def kernel_at(offset):
        def run(q, kk, v, q_seg, kv_seg, sinks=None):
            args = (q, kk, v, q_seg, kv_seg, scale, window, softcap, offset, block, interpret)
            if sinks is None:
                return flash_gpu.flash_attention(*args)
            out_bshe, lse_bhs = flash_gpu.flash_attention_lse(*args)
            keep_bsh = jax.nn.sigmoid(lse_bhs - sinks.astype(jnp.float32)[None, :, None]).transpose(0, 2, 1)
            return (out_bshe.astype(jnp.float32) * keep_bsh[..., None]).astype(out_bshe.dtype)

        return run

    return _on_shards(kernel_at, q_bshe, k_bske, v_bske, segment_ids_bs, lambda run, *args: run(*args), sinks_h)


def _on_shards(kernel_at, q_bshe, k_bske, v_bske, segment_ids_bs, local, sinks_h=None):
    """Run `local(kernel_at(q_offset), q, k, v, q_seg, kv_seg[, sinks])` on every shard. A Pallas call is not
    partitioned by GSPMD, so under a mesh this is a shard_map over batch, kv heads and the `context` axis: each
    context shard computes its own queries' rows against all keys, with the kernel built for where its queries
    start. Attention sinks [h] are split over heads as the queries are."""
    b, s = q_bshe.shape[:2]
    k = k_bske.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    sharded = not mesh.empty and mesh.size > 1
    context = _context_shards()
    kernels = [kernel_at(i * (s // context)) for i in range(context)]

    def per_shard(*args):
        if context == 1:
            return local(kernels[0], *args)
        branches = [functools.partial(local, kernel) for kernel in kernels]
        return jax.lax.switch(jax.lax.axis_index("context"), branches, *args)

    sinks = () if sinks_h is None else (sinks_h,)
    if not sharded:
        return per_shard(q_bshe, k_bske, v_bske, segment_ids_bs, segment_ids_bs, *sinks)
    batch_axes = _batch_axes(mesh, b)
    head_axis = "tensor" if k % mesh.shape["tensor"] == 0 else None
    length_axis = "context" if context > 1 else None
    q_spec, kv_spec = P(tuple(batch_axes), length_axis, head_axis, None), P(tuple(batch_axes), None, head_axis, None)
    seg_q, seg_kv = P(tuple(batch_axes), length_axis), P(tuple(batch_axes), None)
    sinks_spec = () if sinks_h is None else (P(head_axis),)
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_q, seg_kv, *sinks_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q_bshe, k_bske, v_bske, segment_ids_bs, segment_ids_bs, *sinks)


def index_masking_agrees(positions_bs, segment_ids_bs) -> bool:
    """True when masking by array index (the fused kernels) equals masking by position (`attend`) for this concrete
    batch: inside every document positions step by one. Padding (segment 0) is exempt."""
    import numpy as np

    pos, seg = np.asarray(positions_bs), np.asarray(segment_ids_bs)
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return bool(np.all(np.where(same_doc, pos[:, 1:] - pos[:, :-1] == 1, True)))
