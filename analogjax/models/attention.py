"""The attention core: a pure function of queries, keys, values and where each one sits.

Kept apart from the projections so that a KV-cache decoder (queries from the new tokens, keys from the cache) and
fused kernels can call the same definition. Everything that decides which key a query may see is given as data:
positions (causality and the sliding window count positions, not array indices, so cached keys work) and segment
ids (packed documents never see each other; segment 0 is padding and sees nothing).

Shapes: b batch, s query length, t key length, h query heads, k kv heads, g = h / k queries per kv head, e head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from analogjax.errors import UserError
from analogjax.mesh import BATCH_AXES


def allowed(q_pos_bs, k_pos_bt, q_seg_bs, k_seg_bt, window=None) -> jax.Array:
    """[b, s, t] boolean: key t is visible from query s.

    Causal by position, same document, never from or onto padding; with `window` (a Python int or a traced scalar;
    None = unlimited) a query at position i sees keys at positions (i - window, i], as transformers' sliding
    window counts (the query itself is one of the `window` keys).
    """
    delta = q_pos_bs[:, :, None] - k_pos_bt[:, None, :]
    ok = (delta >= 0) & (q_seg_bs[:, :, None] == k_seg_bt[:, None, :]) & (q_seg_bs != 0)[:, :, None]
    if window is not None:
        ok = ok & (delta < window)
    return ok


def attend(q_bshe, k_btke, v_btke, q_pos_bs, k_pos_bt, q_seg_bs, k_seg_bt, *, scale: float, window=None,
           softcap: float = 0.0) -> jax.Array:
    """softmax(mask(softcap(q·k · scale))) · v, grouped-query, scores and softmax in float32 → [b, s, h, e].

    `softcap` > 0 maps scores to softcap·tanh(scores / softcap) before masking (Gemma 2). Keys are never repeated
    for grouped-query attention: the g query heads of one kv head are a separate axis of the einsum.
    """
    b, s, h, e = q_bshe.shape
    k = k_btke.shape[2]
    q = q_bshe.reshape(b, s, k, h // k, e)
    scores = jnp.einsum("bskge,btke->bkgst", q, k_btke, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    mask = allowed(q_pos_bs, k_pos_bt, q_seg_bs, k_seg_bt, window)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_btke.dtype)
    return jnp.einsum("bkgst,btke->bskge", probs, v_btke).reshape(b, s, h, e)


# --- the kernel dispatcher -------------------------------------------------------------------------------------------
# `attend` above is the definition; the fused kernels below compute the same thing without ever holding the
# [s, t] scores. They are self-attention kernels over one packed sequence: they mask by ARRAY INDEX (causal and
# window) plus segment ids, where `attend` masks by POSITION. The two agree exactly when, inside every document,
# positions count up by one from the document's first token (data/packing.py restarts them at 0 per document, and an
# unpacked row is 0..s-1) — `index_masking_agrees` checks that on concrete batches. A KV-cache decoder (queries and
# keys at different positions) calls `attend` directly. Padding (segment 0) differs too: `attend` lets a padding
# query see nothing, the kernels let it see earlier padding; both outputs at padding are never read by a loss.

KERNELS = ("auto", "xla", "splash", "cudnn")
# What `auto` picks on each platform (jax's platform names; the abstract mesh says "cuda" where a backend says "gpu").
AUTO_KERNEL = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
_KERNEL_PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}
# Splash tiles: queries and keys in blocks of at most this many tokens (the sequence must divide into them).
SPLASH_BLOCK = 512


def trace_platform() -> str:
    """The platform the traced program will run on: the current mesh's devices (compile-check sets a TPU topology's
    mesh on a CPU host), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def unsupported(kernel: str, *, window, softcap: float, dtype, seq_len: int) -> str:
    """Why `kernel` cannot compute this attention ('' when it can)."""
    static_window = window is None or isinstance(window, int)
    if kernel == "splash":
        if not static_window:
            return ("splash needs one window per compiled kernel, but this model's windows differ per layer "
                    "(layer_pattern); use model.attention=xla")
        block = min(SPLASH_BLOCK, seq_len)
        if seq_len % 128 or seq_len % block:
            return f"splash needs a sequence length that is a multiple of 128 (and of {SPLASH_BLOCK} above it), got {seq_len}"
    if kernel == "cudnn":
        if softcap:
            return "cuDNN flash attention (jax.nn.dot_product_attention) has no attention-logit soft-cap"
        if not static_window:
            return "cudnn needs one window per compiled kernel, but this model's windows differ per layer"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention runs bfloat16/float16 only, the model computes in {jnp.dtype(dtype).name}"
    return ""


def choose_kernel(requested: str, platform: str, *, window=None, softcap: float = 0.0, dtype=jnp.bfloat16,
                  seq_len: int = 128, key: str = "model.attention") -> str:
    """Resolve `requested` (one of KERNELS) for `platform`. `auto` takes the platform's fused kernel when it can do
    this attention, else xla (correct everywhere); an explicit kernel the platform lacks, or one that cannot do the
    window / soft-cap / dtype asked for, is a UserError (never a silent fallback)."""
    if requested not in KERNELS:
        raise UserError(f"{key} must be one of {', '.join(KERNELS)}, got {requested!r}")
    if requested == "auto":
        kernel = AUTO_KERNEL.get(platform, "xla")
        why = unsupported(kernel, window=window, softcap=softcap, dtype=dtype, seq_len=seq_len)
        return "xla" if why else kernel
    if requested != "xla" and platform not in _KERNEL_PLATFORMS[requested]:
        raise UserError(f"{key}={requested} needs a {' or '.join(_KERNEL_PLATFORMS[requested])} backend, but this "
                        f"program runs on {platform}; use auto or xla")
    why = unsupported(requested, window=window, softcap=softcap, dtype=dtype, seq_len=seq_len)
    if why:
        raise UserError(f"{key}={requested}: {why}")
    return requested


def self_attention(q_bshe, k_bske, v_bske, positions_bs, segment_ids_bs, *, scale: float, window=None,
                   softcap: float = 0.0, kernel: str = "auto", interpret: bool = False,
                   block: int = SPLASH_BLOCK) -> jax.Array:
    """Causal self-attention of one packed sequence with the chosen kernel → [b, s, h, e] (see the note above on
    positions vs indices). `interpret` runs splash's Pallas kernel in interpret mode (tests on CPU; it skips the
    platform check). Under a mesh with a `context` axis the queries stay split over the sequence and the keys and
    values are all-gathered (mesh.py says why)."""
    s = q_bshe.shape[1]
    platform = "tpu" if interpret else trace_platform()
    kernel = choose_kernel(kernel, platform, window=window, softcap=softcap, dtype=q_bshe.dtype, seq_len=s)
    k_bske, v_bske = gather_context(k_bske), gather_context(v_bske)
    if kernel == "xla":
        return attend(q_bshe, k_bske, v_bske, positions_bs, positions_bs, segment_ids_bs, segment_ids_bs,
                      scale=scale, window=window, softcap=softcap)
    if kernel == "cudnn":
        return cudnn_attention(q_bshe, k_bske, v_bske, segment_ids_bs, scale=scale, window=window)
    return splash_attention(q_bshe, k_bske, v_bske, segment_ids_bs, scale=scale, window=window, softcap=softcap,
                            interpret=interpret, block=block)


def gather_context(x_bske: jax.Array) -> jax.Array:
    """Keys/values whole along the sequence (all-gathered over the `context` mesh axis, a no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("context", 1) == 1:
        return x_bske
    spec = P(BATCH_AXES, None, P.UNCONSTRAINED, P.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x_bske, spec)


def cudnn_attention(q_bshe, k_bske, v_bske, segment_ids_bs, *, scale: float, window=None,
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention`: causal and the window inside the kernel,
    grouped-query natively. jax's API has no segment ids, so documents are separated by a boolean [b, 1, s, t]
    mask (cuDNN reads it as a bias: one byte per score at long context, never float32 scores or softmax).
    `implementation="xla"` runs the same call on any backend (what the CPU tests check against `attend`)."""
    mask = (segment_ids_bs[:, :, None] == segment_ids_bs[:, None, :])[:, None]
    local = None if window is None else (window - 1, 0)  # the query itself is one of the `window` keys
    return jax.nn.dot_product_attention(q_bshe, k_bske, v_bske, mask=mask, scale=scale, is_causal=True,
                                        local_window_size=local, implementation=implementation)


def splash_attention(q_bshe, k_bske, v_bske, segment_ids_bs, *, scale: float, window=None, softcap: float = 0.0,
                     interpret: bool = False, block: int = SPLASH_BLOCK) -> jax.Array:
    """Pallas splash attention (TPU): block-sparse over the causal / local mask, segment ids in the kernel, soft-cap
    in the kernel, grouped-query as one MQA kernel per kv head (keys never repeated). Under a mesh it runs inside
    shard_map over batch and heads (a Pallas call is not partitioned by GSPMD)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, s, h, e = q_bshe.shape
    k = k_bske.shape[2]
    g = h // k
    block = min(block, s)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    one = splash.CausalMask((s, s)) if window is None else splash.LocalMask((s, s), (window - 1, 0), offset=0)
    kernel = splash.make_splash_mqa(splash.MultiHeadMask([one] * g), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, attn_logits_soft_cap=softcap or None, interpret=interpret)

    def one_row(q_kgse, k_kse, v_kse, seg_s):
        ids = splash.SegmentIds(q=seg_s, kv=seg_s)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_kgse, k_kse, v_kse, ids)

    def local(q, kk, v, seg):
        # [b, s, h, e] → [b, k, g, s, e]; the scale goes into the queries (splash scores plain q·k).
        bl, sl = q.shape[0], q.shape[1]
        q_bkgse = (q * jnp.asarray(scale, q.dtype)).reshape(bl, sl, -1, g, e).transpose(0, 2, 3, 1, 4)
        out = jax.vmap(one_row)(q_bkgse, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg)
        return out.transpose(0, 3, 1, 2, 4).reshape(bl, sl, -1, e).astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_bshe, k_bske, v_bske, segment_ids_bs)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape and b % mesh.shape[a] == 0)
    head_axis = "tensor" if "tensor" in mesh.shape and k % mesh.shape["tensor"] == 0 else None
    spec = P(batch_axes, None, head_axis, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch_axes, None)), out_specs=spec,
                         check_vma=False)(q_bshe, k_bske, v_bske, segment_ids_bs)


def index_masking_agrees(positions_bs, segment_ids_bs) -> bool:
    """True when masking by array index (the fused kernels) equals masking by position (`attend`) for this concrete
    batch: inside every document positions step by one. Padding (segment 0) is exempt."""
    import numpy as np

    pos, seg = np.asarray(positions_bs), np.asarray(segment_ids_bs)
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return bool(np.all(np.where(same_doc, pos[:, 1:] - pos[:, :-1] == 1, True)))
