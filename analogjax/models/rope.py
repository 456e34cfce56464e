"""Rotary position embeddings: inverse frequencies per layer (with long-context scaling) and their application.

Frequencies are computed on the host in float32, in the same operation order as transformers'
modeling_rope_utils, so that positions in the hundreds of thousands rotate by the same float32 angles as there.
Sequence-length-dependent variants (dynamic NTK, LongRoPE) are not implemented; hf.py refuses them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from analogjax.models.config import CHUNKED, FULL, SLIDING, ModelConfig, RopeScaling


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[np.ndarray, float]:
    """([head_dim // 2] float32 inverse frequencies, attention factor multiplying cos and sin)."""
    inv_freq = _base_inv_freq(head_dim, theta)
    kind, factor = scaling.kind, scaling.factor
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        old_len = scaling.original_max_positions
        low_wavelen, high_wavelen = old_len / scaling.low_freq_factor, old_len / scaling.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):  # equal factors: no medium band, smooth unused
            smooth = (
                (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
            ).astype(np.float32)
            smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    raise ValueError(f"unknown rope scaling {kind!r}")  # ModelConfig.check refuses it first


def _yarn(dim: int, base: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    factor = s.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(s.original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), attention_factor


def layer_rope(cfg: ModelConfig, kind: str) -> tuple[np.ndarray, float]:
    """The (inverse frequencies, attention factor) of a layer of attention kind FULL, SLIDING or CHUNKED."""
    if kind == SLIDING and cfg.local_rope_theta:
        return _base_inv_freq(cfg.rope_dim, cfg.local_rope_theta), 1.0
    return inverse_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)


def per_layer(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """([layers, head_dim // 2] inverse frequencies, [layers] attention factors), one row per layer. A NoPE layer
    (Llama 4) gets zero frequencies and factor 1: every angle 0, so `apply` leaves its queries and keys exactly as
    they are."""
    by_kind = {kind: layer_rope(cfg, kind) for kind in (FULL, SLIDING, CHUNKED)}
    nope = (np.zeros(cfg.rope_dim // 2, np.float32), 1.0)
    rows = [nope if no_rope else by_kind[k] for k, no_rope in zip(cfg.layer_kinds, cfg.layer_nope)]
    return (np.stack([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.float32))


def apply(
    x_bshe: jax.Array, positions_bs: jax.Array, inv_freq, attention_factor=1.0, interleaved: bool = False
) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face Llama convention), in float32; cos and sin carry the attention factor.

    Only the first 2·len(inv_freq) dims rotate; the rest pass through (partial rotary, GLM-4.5). `interleaved`
    rotates pairs (x0, x1), (x2, x3), ... instead of halves and returns them de-interleaved (all first members, then
    all second ones), as transformers' apply_rotary_pos_emb_interleave does (DeepSeek's rope_interleave): queries and
    keys both come out so, so their dot products are the interleaved rotation's."""
    half = jnp.shape(inv_freq)[-1]
    if 2 * half < x_bshe.shape[-1]:
        rotated = apply(x_bshe[..., : 2 * half], positions_bs, inv_freq, attention_factor, interleaved)
        return jnp.concatenate([rotated, x_bshe[..., 2 * half :]], axis=-1)
    angles = positions_bs.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq, jnp.float32)  # b s 1 half
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if not (isinstance(attention_factor, float) and attention_factor == 1.0):
        sin, cos = sin * attention_factor, cos * attention_factor
    x = x_bshe.astype(jnp.float32)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bshe.dtype)
