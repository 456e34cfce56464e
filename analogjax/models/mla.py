"""Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi K2), as transformers' DeepseekV3Attention computes it.

Keys and values come from one compressed latent per token, c = RMSNorm(x·W_dkv) (kv_lora_rank dims), expanded per
head by W_ukv into [k_nope | v]; each head's key is [k_nope | k_rope], where k_rope is one rotary key x·W_kr shared by
all heads. Queries are x·W_q, or RMSNorm(x·W_dq)·W_uq with a query latent (q_lora_rank). Only the last
qk_rope_head_dim dims of queries and keys rotate, so the query/key head dim (nope + rope) differs from the value
head dim: the fused kernels that need equal dims step aside (models/attention.py), the XLA core takes it.

Training and prefill-free forwards expand the latent into per-head keys and values (the cheaper form when every query
attends to every key once). Decoding caches only c and k_rope, kv_lora_rank + qk_rope_head_dim numbers per token and
layer rather than heads x (nope + rope + v), and attends in the "absorbed" form: W_uk is folded into the queries
(q_nope·W_ukᵀ lives in latent space) and W_uv applied after the attention-weighted latent, which is the same
arithmetic reordered (equal up to float rounding, tests/test_hf_frontier_deepseek.py checks it against the full
forward).

The softmax scale is (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)² under YaRN scaling with
mscale_all_dim set (transformers' yarn_apply_mscale); the latents' RMSNorms use eps 1e-6 whatever rms_norm_eps says,
as DeepseekV3RMSNorm's default does there.

Shapes in names: b batch, s queries, t keys, h heads, c kv latent (kv_lora_rank), q query latent, n nope dims,
r rope dims, v value dims, d model width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from analogjax.models import rope as rope_lib
from analogjax.models.attention import attend, self_attention
from analogjax.models.config import FULL, ModelConfig
from analogjax.runtime import compute_dtype

_init = nn.initializers.normal(stddev=0.02)
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for q_a_layernorm and kv_a_layernorm


def softmax_scale(cfg: ModelConfig) -> float:
    """(nope + rope)^-0.5, times YaRN's mscale(factor, mscale_all_dim)² where the RoPE scaling sets mscale_all_dim."""
    scale = cfg.mla.qk_head_dim**-0.5
    scaling = cfg.rope_scaling
    if scaling.kind != "none" and scaling.mscale_all_dim and scaling.factor > 1:
        mscale = 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0
        scale *= mscale * mscale
    return scale


def cache_shapes(cfg: ModelConfig, batch: int, length: int) -> dict[str, tuple[int, ...]]:
    """The decode cache of an MLA model per layer stack: the normed latent and the rotated shared key."""
    return {
        "latent": (cfg.n_layers, batch, length, cfg.mla.kv_lora_rank),
        "k_rope": (cfg.n_layers, batch, length, cfg.mla.qk_rope_head_dim),
    }


class LatentAttention(nn.Module):
    """Drop-in for transformer.Attention on MLA models: same call, same cache protocol (with "latent" and "k_rope"
    [b, t, ·] in the cache instead of "k" and "v")."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd, segment_ids_bs, positions_bs, layer=None, cache=None):
        from analogjax.models.transformer import RMSNorm, layer_slots, write_layer  # transformer imports this

        cfg, mla = self.cfg, self.cfg.mla
        h, d = cfg.n_heads, cfg.d_model
        n, r, v, c = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        dtype = compute_dtype.of(cfg.dtype)

        def weight(name, names, shape):
            return self.param(name, nn.with_logical_partitioning(_init, names), shape).astype(dtype)

        if mla.q_lora_rank:
            q_latent = x_bsd @ weight("wq_a", ("embed", "latent"), (d, mla.q_lora_rank))
            q_latent = RMSNorm(LATENT_NORM_EPS, axis_name="latent_norm", name="q_a_norm")(q_latent)
            w_uq = weight("wq_b", ("latent", "heads", "head_dim"), (mla.q_lora_rank, h, n + r))
            q_bshe = jnp.einsum("bsq,qhe->bshe", q_latent, w_uq)
        else:
            q_bshe = jnp.einsum("bsd,dhe->bshe", x_bsd, weight("wq", ("embed", "heads", "head_dim"), (d, h, n + r)))
        latent_bsc = x_bsd @ weight("wkv_a", ("embed", "latent"), (d, c))
        latent_bsc = RMSNorm(LATENT_NORM_EPS, axis_name="latent_norm", name="kv_a_norm")(latent_bsc)
        k_rope_bsr = x_bsd @ weight("wk_rope", ("embed", None), (d, r))

        inv_freq, factor = rope_lib.layer_rope(cfg, FULL)
        q_rope = rope_lib.apply(q_bshe[..., n:], positions_bs, inv_freq, factor, mla.rope_interleave)
        k_rope_bsr = rope_lib.apply(k_rope_bsr[:, :, None], positions_bs, inv_freq, factor, mla.rope_interleave)[
            :, :, 0
        ]
        q_bshe = jnp.concatenate([q_bshe[..., :n], q_rope], axis=-1)
        w_ukv = weight("wkv_b", ("latent", "heads", "head_dim"), (c, h, n + v))
        scale = softmax_scale(cfg)

        if cache is None:
            kv_bshe = jnp.einsum("bsc,che->bshe", latent_bsc, w_ukv)
            b, s = x_bsd.shape[:2]
            k_bshe = jnp.concatenate([kv_bshe[..., :n], jnp.broadcast_to(k_rope_bsr[:, :, None], (b, s, h, r))], -1)
            out_bshv = self_attention(
                q_bshe, k_bshe, kv_bshe[..., n:], positions_bs, segment_ids_bs, scale=scale, kernel=cfg.attention
            )
        else:  # decoding: the cache holds latents; attend in latent space (one shared "kv head" of c + r dims)
            index, row, span = cache["index"], cache["layer"], cache["positions"].shape[1]
            written = {
                "latent": write_layer(cache["latent"], latent_bsc, row, index),
                "k_rope": write_layer(cache["k_rope"], k_rope_bsr, row, index),
            }
            latent_btc = layer_slots(written["latent"], row, span)
            q_latent_bshc = jnp.einsum("bshn,chn->bshc", q_bshe[..., :n], w_ukv[..., :n])
            q_abs = jnp.concatenate([q_latent_bshc, q_rope.astype(q_latent_bshc.dtype)], axis=-1)
            keys = jnp.concatenate([latent_btc, layer_slots(written["k_rope"], row, span)], axis=-1)[:, :, None]
            out_latent = attend(
                q_abs,
                keys,
                latent_btc[:, :, None],
                positions_bs,
                cache["positions"],
                segment_ids_bs,
                cache["segment_ids"],
                scale=scale,
            )
            out_bshv = jnp.einsum("bshc,chv->bshv", out_latent, w_ukv[..., n:])
        wo = weight("wo", ("heads", "head_dim", "embed"), (h, v, d))
        self.sow("intermediates", "heads_out", out_bshv)
        y = jnp.einsum("bshv,hvd->bsd", out_bshv, wo)
        return y if cache is None else (y, written)


def attention_params(cfg: ModelConfig) -> int:
    """One MLA layer's attention parameters (projections and latent norms)."""
    mla, d, h = cfg.mla, cfg.d_model, cfg.n_heads
    if mla.q_lora_rank:
        q = d * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * h * mla.qk_head_dim
    else:
        q = d * h * mla.qk_head_dim
    kv = d * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank
    kv += mla.kv_lora_rank * h * (mla.qk_nope_head_dim + mla.v_head_dim)
    return q + kv + h * mla.v_head_dim * d


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """One MLA layer's forward FLOPs per token in the expanded (training) form: projections and attention."""
    mla, h = cfg.mla, cfg.n_heads
    projections = 2 * (attention_params(cfg) - mla.kv_lora_rank - mla.q_lora_rank)
    scores = 2 * seq_len * h * (mla.qk_head_dim + mla.v_head_dim)
    return float(projections + scores)
