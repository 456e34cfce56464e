"""A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, packed-sequence causal mask.

Written with Flax linen rather than NNX, for one reason that runs through the library: everything downstream
(the jitted step, Orbax restore targets, Hugging Face import tensor by tensor, bring-your-own-teacher functions)
works on parameters as a plain pytree with a parallel tree of logical axis names. Linen's `init` returns exactly
that, and `nn.with_logical_partitioning` is the stable, MaxText-proven way to name axes; NNX would be split and
merged around every call, and its sharding metadata changed meaning in flax 0.12 (eager sharding).

Layers are stacked with `nn.scan` (a leading `layers` axis on every block parameter): compile time stays flat in depth,
which matters when `compile-check` plans an 80-layer teacher.

Shapes in names: b batch, s sequence, d model width, h query heads, k kv heads, g queries per kv head, e head dim,
f ffn width, v vocabulary, l layers.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from analogjax.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)


def _dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


class Features(NamedTuple):
    """What the fused loss and fidelity need instead of logits: final normed hidden states and the LM head."""

    hidden_bsd: jax.Array  # after the final norm, float32
    layers_lbsd: jax.Array | None  # residual stream after each block (when asked for)


class RMSNorm(nn.Module):
    eps: float
    offset: float = 0.0
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(1.0 - self.offset), (self.axis_name,)),
            (x.shape[-1],),
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + scale)).astype(x.dtype)


def rope(x_bshe: jax.Array, positions_bs: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (as in the Hugging Face Llama code), computed in float32."""
    half = x_bshe.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions_bs.astype(jnp.float32)[:, :, None, None] * inv_freq  # b s 1 half
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x = x_bshe.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bshe.dtype)


def attention_mask(segment_ids_bs: jax.Array) -> jax.Array:
    """[b, 1, 1, s, t] boolean: causal, within one document, never onto padding (segment 0)."""
    s = segment_ids_bs.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    same_doc = segment_ids_bs[:, :, None] == segment_ids_bs[:, None, :]
    real = (segment_ids_bs != 0)[:, :, None]
    return (causal & same_doc & real)[:, None, None]


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd, segment_ids_bs, positions_bs):
        cfg = self.cfg
        h, k, e, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
        dtype = _dtype(cfg)

        def proj(name, heads, axis):
            w = self.param(name, nn.with_logical_partitioning(_init, ("embed", axis, "head_dim")), (d, heads, e))
            y = jnp.einsum("bsd,dhe->bshe", x_bsd, w.astype(dtype))
            if cfg.qkv_bias:
                bias = self.param(
                    name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros, (axis, "head_dim")), (heads, e)
                )
                y = y + bias.astype(dtype)
            return y

        q, kk, v = proj("wq", h, "heads"), proj("wk", k, "kv_heads"), proj("wv", k, "kv_heads")
        if cfg.qk_norm:
            q = RMSNorm(cfg.norm_eps, cfg.norm_offset, "head_dim", name="q_norm")(q)
            kk = RMSNorm(cfg.norm_eps, cfg.norm_offset, "head_dim", name="k_norm")(kk)
        q = rope(q, positions_bs, cfg.rope_theta)
        kk = rope(kk, positions_bs, cfg.rope_theta)

        # Grouped-query attention: g query heads share each kv head; never materialise repeated keys.
        b, s = q.shape[:2]
        q = q.reshape(b, s, k, h // k, e)
        scores = jnp.einsum("bskge,btke->bkgst", q, kk, preferred_element_type=jnp.float32) * (e**-0.5)
        scores = jnp.where(attention_mask(segment_ids_bs), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgst,btke->bskge", probs, v).reshape(b, s, h, e)
        wo = self.param("wo", nn.with_logical_partitioning(_init, ("heads", "head_dim", "embed")), (h, e, d))
        return jnp.einsum("bshe,hed->bsd", out, wo.astype(dtype))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd):
        cfg = self.cfg
        dtype = _dtype(cfg)
        shape_in, shape_out = (cfg.d_model, cfg.d_ff), (cfg.d_ff, cfg.d_model)
        w_gate = self.param("w_gate", nn.with_logical_partitioning(_init, ("embed", "mlp")), shape_in)
        w_up = self.param("w_up", nn.with_logical_partitioning(_init, ("embed", "mlp")), shape_in)
        w_down = self.param("w_down", nn.with_logical_partitioning(_init, ("mlp", "embed")), shape_out)
        gate = x_bsd @ w_gate.astype(dtype)
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        hidden_bsf = nn.with_logical_constraint(act * (x_bsd @ w_up.astype(dtype)), ("batch", "length", "act_mlp"))
        return hidden_bsf @ w_down.astype(dtype)


class Block(nn.Module):
    """Pre-norm residual block; scanned over layers, so it takes (carry, broadcast args) and returns (carry, out)."""

    cfg: ModelConfig
    collect_layers: bool = False

    @nn.compact
    def __call__(self, x_bsd, segment_ids_bs, positions_bs):
        cfg = self.cfg
        x_bsd = nn.with_logical_constraint(x_bsd, ("batch", "length", "act_embed"))
        normed = RMSNorm(cfg.norm_eps, cfg.norm_offset, name="attn_norm")(x_bsd)
        x_bsd = x_bsd + Attention(cfg, name="attn")(normed, segment_ids_bs, positions_bs)
        normed = RMSNorm(cfg.norm_eps, cfg.norm_offset, name="mlp_norm")(x_bsd)
        x_bsd = x_bsd + MLP(cfg, name="mlp")(normed)
        return x_bsd, (x_bsd if self.collect_layers else None)


class Decoder(nn.Module):
    """tokens → final normed hidden states (and, on request, every block's output). Logits: `logits(...)` below."""

    cfg: ModelConfig
    collect_layers: bool = False

    @nn.compact
    def __call__(self, tokens_bs, segment_ids_bs, positions_bs) -> Features:
        cfg = self.cfg
        embedding = self.param(
            "embedding", nn.with_logical_partitioning(_init, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model)
        )
        x_bsd = embed_tokens(cfg, embedding, tokens_bs)
        block = Block
        if cfg.remat == "block":
            # Keep only each block's input; recompute the rest in the backward pass.
            block = nn.remat(Block, prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_bsd, layers = stack(cfg, self.collect_layers, name="layers")(x_bsd, segment_ids_bs, positions_bs)
        hidden = RMSNorm(cfg.norm_eps, cfg.norm_offset, name="final_norm")(x_bsd).astype(jnp.float32)
        if not cfg.tie_embeddings:
            self.param("lm_head", nn.with_logical_partitioning(_init, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size))
        return Features(nn.with_logical_constraint(hidden, ("batch", "length", "act_embed")), layers)


def embed_tokens(cfg: ModelConfig, embedding_vd: jax.Array, tokens_bs: jax.Array) -> jax.Array:
    """The residual stream's start: embedding rows of `tokens_bs` (scaled for Gemma), in the compute dtype."""
    dtype = _dtype(cfg)
    # FSDP-gather the table's width before the lookup (as for any weight); gathering from the fsdp-sharded
    # table instead leaves the rows split over fsdp, which GSPMD can only undo by full rematerialisation.
    table = nn.with_logical_constraint(embedding_vd, ("vocab", None))
    x_bsd = nn.with_logical_constraint(jnp.take(table, tokens_bs, axis=0).astype(dtype), ("batch", "length", "act_embed"))
    if cfg.embed_scale:
        x_bsd = x_bsd * jnp.asarray(cfg.d_model**0.5, dtype)
    return x_bsd


def lm_head(params: dict, cfg: ModelConfig) -> jax.Array:
    """The [d, v] output projection (the embedding, transposed, when tied)."""
    p = _tree(params)
    return p["embedding"].T if cfg.tie_embeddings else p["lm_head"]


def logits(params: dict, cfg: ModelConfig, hidden_bsd: jax.Array) -> jax.Array:
    """Float32 logits from final hidden states (materialises [b, s, v]: for eval and small models)."""
    head = lm_head(params, cfg)
    out = jnp.einsum("bsd,dv->bsv", hidden_bsd.astype(_dtype(cfg)), head.astype(_dtype(cfg)),
                     preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))


class Transformer:
    """The decoder as pure functions of a params pytree: what the step, checkpoints and HF interop use."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def init_boxed(self, rng: jax.Array):
        """Params boxed with logical axis names (feed to `mesh.init_sharded` / `mesh.abstract_sharded`)."""
        tokens = jnp.zeros((1, 8), jnp.int32)
        return Decoder(self.cfg).init(rng, tokens, jnp.ones_like(tokens), jnp.zeros_like(tokens))

    def features(self, params, tokens_bs, segment_ids_bs=None, positions_bs=None, collect_layers=False) -> Features:
        segment_ids_bs, positions_bs = _default_packing(tokens_bs, segment_ids_bs, positions_bs)
        return Decoder(self.cfg, collect_layers).apply(params, tokens_bs, segment_ids_bs, positions_bs)

    def head(self, params) -> jax.Array:
        return lm_head(params, self.cfg)

    # The forward in pieces, for analyses that read or replace the residual stream between blocks (stitching,
    # steering, pruning importance): embed → block(0) → … → block(n-1) → finish equals `features`. Each block runs
    # unscanned on its slice of the stacked params; fine for analysis, the training forward stays scanned.
    def embed(self, params, tokens_bs) -> jax.Array:
        """Token ids → the residual stream entering block 0."""
        return embed_tokens(self.cfg, _tree(params)["embedding"], tokens_bs)

    def block(self, params, layer: int, x_bsd, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        """Block `layer` (0-based) applied to the residual stream `x_bsd`."""
        segment_ids_bs, positions_bs = _default_packing(x_bsd[..., 0], segment_ids_bs, positions_bs)
        layer_params = jax.tree.map(lambda a: a[layer], _tree(params)["layers"])
        out, _ = Block(self.cfg).apply({"params": layer_params}, x_bsd, segment_ids_bs, positions_bs)
        return out

    def finish(self, params, x_bsd) -> jax.Array:
        """The residual stream after the last block → final normed hidden states (float32; `head` gives logits)."""
        norm = RMSNorm(self.cfg.norm_eps, self.cfg.norm_offset)
        return norm.apply({"params": _tree(params)["final_norm"]}, x_bsd).astype(jnp.float32)

    def __call__(self, params, tokens_bs, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        """int32 tokens [b, s] → float32 logits [b, s, v]."""
        return logits(params, self.cfg, self.features(params, tokens_bs, segment_ids_bs, positions_bs).hidden_bsd)


def _tree(params: dict) -> dict:
    return params["params"] if "params" in params else params


def _default_packing(tokens_bs, segment_ids_bs, positions_bs):
    # One unpacked document per row when the caller gives no packing.
    if segment_ids_bs is None:
        segment_ids_bs = jnp.ones_like(tokens_bs)
    if positions_bs is None:
        positions_bs = jnp.broadcast_to(jnp.arange(tokens_bs.shape[1], dtype=jnp.int32), tokens_bs.shape)
    return segment_ids_bs, positions_bs
