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
