"""A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, packed-sequence causal mask; with the
options of newer families (sliding windows, soft-caps, sandwich and post norms, scaled RoPE; models/config.py).

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

import dataclasses
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from analogjax.errors import UserError
from analogjax.models import rope as rope_lib
from analogjax.models.attention import allowed, attend, self_attention
from analogjax.models.config import CHUNKED, SLIDING, ModelConfig, RopeScaling
from analogjax.models.mla import LatentAttention
from analogjax.models.moe import MoE, RouterStats, glu
from analogjax.models.projection import project
from analogjax.runtime import compute_dtype

_init = nn.initializers.normal(stddev=0.02)


class Features(NamedTuple):
    """What the fused loss and fidelity need instead of logits: final normed hidden states and the LM head."""

    hidden_bsd: jax.Array  # after the final norm, float32
    layers_lbsd: jax.Array | None  # residual stream after each block (when asked for)
    router: RouterStats | None = None  # MoE models: each MoE layer's router summaries ([moe layers, ...])


class RMSNorm(nn.Module):
    """RMS norm over the trailing axes named in `axis_name` (one axis, or several: OLMo 2 norms all heads at once)."""

    eps: float
    offset: float = 0.0
    axis_name: str | tuple[str, ...] = "norm"

    @nn.compact
    def __call__(self, x):
        names = (self.axis_name,) if isinstance(self.axis_name, str) else tuple(self.axis_name)
        axes = tuple(range(-len(names), 0))
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(1.0 - self.offset), names),
            x.shape[-len(names) :],
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
        return (normed * (self.offset + scale)).astype(x.dtype)


def rope(x_bshe: jax.Array, positions_bs: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding with plain frequencies (rotate-half convention, float32); models/rope.py has the rest."""
    return rope_lib.apply(x_bshe, positions_bs, rope_lib.inverse_frequencies(x_bshe.shape[-1], theta, RopeScaling()))


def attention_mask(segment_ids_bs: jax.Array) -> jax.Array:
    """[b, 1, 1, s, t] boolean: causal, within one document, never onto padding (segment 0)."""
    positions = jnp.broadcast_to(jnp.arange(segment_ids_bs.shape[1]), segment_ids_bs.shape)
    return allowed(positions, positions, segment_ids_bs, segment_ids_bs)[:, None, None]


# Window of a full-attention layer when windows are per-layer data: longer than any sequence.
_NO_WINDOW = 2**30


def layer_data(cfg: ModelConfig) -> dict[str, np.ndarray] | None:
    """Per-layer attention data for the scan ([layers, ...] arrays), or None when every layer attends alike (then
    each block reads the one window and RoPE from the config as constants, and the scan carries nothing extra).
    "window" and "chunk" are there only when some layer slides or is chunked (a kernel can then keep its one
    static mask); "nope" (Llama 4's layers without RoPE) only when some layer has none."""
    if cfg.uniform_layers:
        return None
    inv_freq, factor = rope_lib.per_layer(cfg)
    kinds = cfg.layer_kinds
    data = {"inv_freq": inv_freq, "rope_factor": factor}
    if SLIDING in kinds:
        data["window"] = np.asarray([cfg.sliding_window if k == SLIDING else _NO_WINDOW for k in kinds], np.int32)
    if CHUNKED in kinds:
        data["chunk"] = np.asarray([cfg.attention_chunk if k == CHUNKED else _NO_WINDOW for k in kinds], np.int32)
    if any(cfg.layer_nope):
        data["nope"] = np.asarray(cfg.layer_nope, bool)
    return data


def _static_layer(cfg: ModelConfig) -> dict:
    """The one layer kind of a model whose layers all attend alike, as compile-time constants."""
    kind = cfg.layer_kinds[0]
    inv_freq, factor = rope_lib.layer_rope(cfg, kind)
    return {
        "inv_freq": None if cfg.layer_nope[0] else inv_freq,
        "rope_factor": factor,
        "window": cfg.sliding_window if kind == SLIDING else None,
        "chunk": cfg.attention_chunk if kind == CHUNKED else None,
        "nope": cfg.layer_nope[0],
    }


def llama4_scales(cfg: ModelConfig, q_bshe, k_bske, positions_bs, nope):
    """Llama 4's query/key scaling after RoPE: on RoPE layers (`nope` false) the parameter-free L2 norm
    (x / RMS(x) over the head dim, float32, when qk_l2_norm); on NoPE layers the attention temperature
    1 + scale · log1p(floor((position + 1) / floor)) on the queries (when attn_temperature_scale). `nope` is a Python
    bool (every layer alike) or a traced one (this layer's row of the scanned data): then both are computed and one
    is kept per layer."""

    def l2(x):  # None: no factor
        if not cfg.qk_l2_norm:
            return None
        x32 = x.astype(jnp.float32)
        return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)

    def temperature():
        if not cfg.attn_temperature_scale:
            return None
        floor = jnp.floor((positions_bs.astype(jnp.float32) + 1.0) / cfg.attn_temperature_floor)
        return (jnp.log1p(floor) * cfg.attn_temperature_scale + 1.0)[:, :, None, None]

    def pick(on_nope, on_rope):  # this layer's factor (None: leave as is)
        if isinstance(nope, bool):
            return on_nope if nope else on_rope
        if on_nope is None and on_rope is None:
            return None
        one = jnp.ones((), jnp.float32)
        return jnp.where(nope, one if on_nope is None else on_nope, one if on_rope is None else on_rope)

    def scaled(x, factor):
        return x if factor is None else (x.astype(jnp.float32) * factor).astype(x.dtype)

    return scaled(q_bshe, pick(temperature(), l2(q_bshe))), scaled(k_bske, pick(None, l2(k_bske)))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd, segment_ids_bs, positions_bs, layer=None, cache=None):
        """With `cache` (decoding): every layer's "k", "v" [layers, b, k, t, e], this layer's row "layer", the
        decoder's "positions", "segment_ids" [b, span] (the first `span` slots, already holding the new tokens)
        and "index" [b] (the slot where each row's new tokens go): the queries attend to this layer's first span
        slots with the new keys and values in them, which are also written into the stacks (in place); returns
        (out, {"k", "v"} stacks)."""
        cfg = self.cfg
        h, k, e, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
        dtype = compute_dtype.of(cfg.dtype)

        def proj(name, heads, axis):
            w = self.param(name, nn.with_logical_partitioning(_init, ("embed", axis, "head_dim")), (d, heads, e))
            y = project(x_bsd, w.astype(dtype))
            if cfg.qkv_bias:
                bias = self.param(
                    name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros, (axis, "head_dim")), (heads, e)
                )
                y = y + bias.astype(dtype)
            return y

        q, kk, v = proj("wq", h, "heads"), proj("wk", k, "kv_heads"), proj("wv", k, "kv_heads")
        if cfg.qk_norm:
            per_head = cfg.qk_norm_scope == "head"
            q_axes = "head_dim" if per_head else ("heads", "head_dim")
            k_axes = "head_dim" if per_head else ("kv_heads", "head_dim")
            q = RMSNorm(cfg.norm_eps, cfg.norm_offset, q_axes, name="q_norm")(q)
            kk = RMSNorm(cfg.norm_eps, cfg.norm_offset, k_axes, name="k_norm")(kk)
        # every layer alike: window, chunk and frequencies are compile-time constants; else this layer's row of the
        # scanned per-layer data (a key absent there is None on every layer)
        this = _static_layer(cfg) if layer is None else layer
        inv_freq, factor, window, chunk = this["inv_freq"], this["rope_factor"], this.get("window"), this.get("chunk")
        if inv_freq is not None:  # None: a NoPE model's layers (per-layer NoPE rows have zero frequencies)
            q = rope_lib.apply(q, positions_bs, inv_freq, factor)
            kk = rope_lib.apply(kk, positions_bs, inv_freq, factor)
        if cfg.qk_l2_norm or cfg.attn_temperature_scale:
            q, kk = llama4_scales(cfg, q, kk, positions_bs, this.get("nope", False))
        scale = (cfg.query_scalar or e) ** -0.5
        sinks = self.param("sinks", nn.with_logical_partitioning(_init, ("heads",)), (h,)) if cfg.attn_sinks else None
        if cache is None:
            out = self_attention(
                q,
                kk,
                v,
                positions_bs,
                segment_ids_bs,
                scale=scale,
                window=window,
                softcap=cfg.attn_softcap,
                kernel=cfg.attention,
                chunk=chunk,
                sinks_h=sinks,
            )
        else:  # decoding: a few new queries against the cache, on the XLA core (scores are [new, cache] only)
            index, row = cache["index"], cache["layer"]
            span = cache["positions"].shape[1]
            written = {name: write_layer(cache[name], new, row, index, 3) for name, new in (("k", kk), ("v", v))}
            out = attend(
                q,
                layer_slots(written["k"], row, span, 3),
                layer_slots(written["v"], row, span, 3),
                positions_bs,
                cache["positions"],
                segment_ids_bs,
                cache["segment_ids"],
                scale=scale,
                window=window,
                softcap=cfg.attn_softcap,
                chunk=chunk,
                sinks_h=sinks,
                kv_heads_first=True,
            )
        wo = self.param("wo", nn.with_logical_partitioning(_init, ("heads", "head_dim", "embed")), (h, e, d))
        self.sow("intermediates", "heads_out", out)  # per-head outputs, read only by prune.py (else a no-op)
        y = project(out, wo.astype(dtype), 2)
        if cfg.attn_out_bias:
            y = y + self.param("wo_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,)).astype(
                dtype
            )
        return y if cache is None else (y, written)


def layer_slots(stack, row, span: int, slot_axis: int = 2) -> jax.Array:
    """Layer `row`'s first `span` slots of a decode cache stack [layers, b, ...] whose slots lie on `slot_axis`
    (keys and values [layers, b, k, t, e]: 3; latents [layers, b, t, c]: 2), without the layer axis: a static-size
    slice of the stack (the empty tail past `span` is never read)."""
    sizes = (1,) + stack.shape[1:slot_axis] + (span,) + stack.shape[slot_axis + 1 :]
    return jax.lax.dynamic_slice(stack, (row,) + (0,) * (stack.ndim - 1), sizes)[0]


def write_layer(stack, new_bs, row, index_b, slot_axis: int = 2):
    """Row i of `new_bs` [b, s, ...] written into layer `row`'s batch row i at slots index_b[i], ... of a decode
    cache stack [layers, b, ...] whose slots lie on `slot_axis` (2 or 3, as `layer_slots`): a scatter of the new
    slots only, in place when the stack is a loop carry."""
    b, s = new_bs.shape[:2]
    slots_bs = index_b[:, None] + jnp.arange(s)[None, :]
    between = (slice(None),) * (slot_axis - 2)  # (numpy indexing: the [b, s] index axes lead what is written)
    return stack.at[(row, jnp.arange(b)[:, None], *between, slots_bs)].set(
        new_bs.astype(stack.dtype), indices_are_sorted=True, unique_indices=True
    )


def write_slots(cache_bt, new_bs, index_b):
    """Row i of `new_bs` written into row i of `cache_bt` at slots index_b[i], index_b[i] + 1, ..."""
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, 0))(
        cache_bt, new_bs, index_b
    )


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd):
        cfg = self.cfg
        dtype = compute_dtype.of(cfg.dtype)
        shape_in, shape_out = (cfg.d_model, cfg.d_ff), (cfg.d_ff, cfg.d_model)
        w_gate = self.param("w_gate", nn.with_logical_partitioning(_init, ("embed", "mlp")), shape_in)
        w_up = self.param("w_up", nn.with_logical_partitioning(_init, ("embed", "mlp")), shape_in)
        w_down = self.param("w_down", nn.with_logical_partitioning(_init, ("mlp", "embed")), shape_out)
        gate, up = project(x_bsd, w_gate.astype(dtype)), project(x_bsd, w_up.astype(dtype))  # models/projection.py
        hidden_bsf = nn.with_logical_constraint(glu(cfg, gate, up), ("batch", "length", "act_mlp"))
        self.sow("intermediates", "hidden", hidden_bsf)  # FFN activations, read only by prune.py (else a no-op)
        return project(hidden_bsf, w_down.astype(dtype))


class Block(nn.Module):
    """Residual block; scanned over layers, so it takes (carry, broadcast args[, this layer's data]) and returns
    (carry, out). Norm placement: pre (Llama) x + f(norm(x)); sandwich (Gemma 2/3) x + post_norm(f(norm(x)));
    post (OLMo 2) x + post_norm(f(x))."""

    cfg: ModelConfig
    collect_layers: bool = False
    moe: bool = False  # the feed-forward is the mixture of experts; then out is (layer output, RouterStats)

    @nn.compact
    def __call__(self, x_bsd, segment_ids_bs, positions_bs, layer=None, kv=None, cache_meta=None):
        # Decoding with a KV cache (cache_meta: positions, segment ids [b, span], write index): the carry is
        # (x, every layer's cache stacks) and kv is this layer's row in them; the block writes its new keys and
        # values into the stacks and returns ((x, stacks), None).
        cfg = self.cfg
        stacks = None
        if cache_meta is not None:
            x_bsd, stacks = x_bsd
        x_bsd = nn.with_logical_constraint(x_bsd, ("batch", "length", "act_embed"))

        def residual(name, sublayer, x):
            y = sublayer(
                x if cfg.norm_placement == "post" else RMSNorm(cfg.norm_eps, cfg.norm_offset, name=f"{name}_norm")(x)
            )
            if cfg.norm_placement != "pre":
                y = RMSNorm(cfg.norm_eps, cfg.norm_offset, name=f"{name}_post_norm")(y)
            return x + y

        attn = (LatentAttention if cfg.mla.enabled else Attention)(cfg, name="attn")
        written = {}

        def attention(y):
            if kv is None:
                return attn(y, segment_ids_bs, positions_bs, layer)
            out, new_kv = attn(y, segment_ids_bs, positions_bs, layer, {**stacks, **cache_meta, "layer": kv})
            written.update(new_kv)
            return out

        x_bsd = residual("attn", attention, x_bsd)
        if self.moe:
            # Routing is per token and dropless, so a few decode tokens route exactly as in the full forward;
            # padding (segment 0) stays out of the router stats, which decoding does not return.
            moe, stats = MoE(cfg, name="mlp"), []
            x_bsd = residual("mlp", lambda y: _keep(stats, moe(y, segment_ids_bs > 0)), x_bsd)
            if kv is not None:
                return (x_bsd, written), None
            return x_bsd, ((x_bsd if self.collect_layers else None), stats[0])
        x_bsd = residual("mlp", MLP(cfg, name="mlp"), x_bsd)
        if kv is not None:
            return (x_bsd, written), None
        return x_bsd, (x_bsd if self.collect_layers else None)


def _keep(sink: list, output_and_stats):
    # The residual wrapper takes a sublayer returning one array; the MoE's router stats leave through `sink`.
    output, stats = output_and_stats
    sink.append(stats)
    return output


class MoEGroup(nn.Module):
    """`moe.every` consecutive layers of an MoE model: every-1 dense blocks, then one MoE block (scanned as one)."""

    cfg: ModelConfig
    collect_layers: bool = False

    @nn.compact
    def __call__(self, x_bsd, segment_ids_bs, positions_bs, kv=None, cache_meta=None, layer=None):
        # kv (this group's layers' rows [every] in the cache stacks) and cache_meta: decoding, as Block (the carry
        # is (x, stacks); returns ((x, stacks), None)). layer: the group's rows of the per-layer data ([every, ...];
        # None when every layer attends alike).
        cfg, every = self.cfg, self.cfg.moe.every

        def row(j):
            return None if layer is None else jax.tree.map(lambda a: a[j], layer)

        if kv is not None:
            for j in range(every):
                name, is_moe = ("moe", True) if j == every - 1 else (f"dense_{j}", False)
                x_bsd, _ = Block(cfg, moe=is_moe, name=name)(
                    x_bsd, segment_ids_bs, positions_bs, row(j), kv[j], cache_meta
                )
            return x_bsd, None
        block = _block_class(cfg)
        outs = []
        for j in range(every - 1):
            x_bsd, out = block(cfg, self.collect_layers, name=f"dense_{j}")(x_bsd, segment_ids_bs, positions_bs, row(j))
            outs.append(out)
        x_bsd, (out, stats) = block(cfg, self.collect_layers, True, name="moe")(
            x_bsd, segment_ids_bs, positions_bs, row(every - 1)
        )
        return x_bsd, ((jnp.stack(outs + [out]) if self.collect_layers else None), stats)


def _block_class(cfg: ModelConfig):
    # remat "block": keep only each block's input; recompute the rest in the backward pass.
    return nn.remat(Block, prevent_cse=False) if cfg.remat == "block" else Block


def moe_layout(cfg: ModelConfig) -> tuple[int, int]:
    """An MoE model's scanned stacks: (dense prefix layers under `layers`, groups under `moe_layers`)."""
    prefix = cfg.moe.first_dense_layers
    return prefix, (cfg.n_layers - prefix) // cfg.moe.every


def layer_location(cfg: ModelConfig, layer: int) -> tuple[tuple[str, ...], int, bool]:
    """Where layer `layer`'s params live: (path in the param tree, index on its stacked axis, is it MoE)."""
    if not cfg.moe.enabled:
        return ("layers",), layer, False
    prefix, _ = moe_layout(cfg)
    if layer < prefix:
        return ("layers",), layer, False
    group, j = divmod(layer - prefix, cfg.moe.every)
    if cfg.moe.every == 1:
        return ("moe_layers",), group, True
    is_moe = j == cfg.moe.every - 1
    return ("moe_layers", "moe" if is_moe else f"dense_{j}"), group, is_moe


def _scan(module, cfg: ModelConfig, length: int, name: str, *args, in_axes=(nn.broadcast, nn.broadcast)):
    # in_axes: of the inputs after the carry (segment ids, positions, then any per-layer data or cache).
    return nn.scan(
        module,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, *args, name=name)


def _split_layers(cfg: ModelConfig, per_layer: dict | None):
    """Per-layer data ([n_layers, ...]) as the MoE stacks scan it: (the dense prefix's rows, the groups' rows
    ([groups, every, ...] when every > 1)); (None, None) when every layer attends alike."""
    if per_layer is None:
        return None, None
    prefix, groups = moe_layout(cfg)
    every = cfg.moe.every
    rest = jax.tree.map(lambda a: a[prefix:], per_layer)
    if every > 1:
        rest = jax.tree.map(lambda a: a.reshape((groups, every) + a.shape[1:]), rest)
    return jax.tree.map(lambda a: a[:prefix], per_layer), rest


def _moe_stacks(cfg: ModelConfig, collect_layers: bool, x_bsd, segment_ids_bs, positions_bs, per_layer=None):
    """An MoE model's blocks: a scanned dense prefix (`layers`, as a dense model's), then the scanned MoE groups
    (`moe_layers`), each scanning its rows of the per-layer data when layers differ (Llama 4). Returns (x, every
    block's output or None, RouterStats stacked over the MoE layers)."""
    prefix, groups = moe_layout(cfg)
    prefix_rows, group_rows = _split_layers(cfg, per_layer)
    rows = () if per_layer is None else (prefix_rows,)
    axes = (nn.broadcast, nn.broadcast) + (() if per_layer is None else (0,))
    collected = []
    if prefix:
        x_bsd, out = _scan(_block_class(cfg), cfg, prefix, "layers", collect_layers, in_axes=axes)(
            x_bsd, segment_ids_bs, positions_bs, *rows
        )
        collected.append(out)
    if cfg.moe.every == 1:
        rows = () if per_layer is None else (group_rows,)
        x_bsd, (out, stats) = _scan(_block_class(cfg), cfg, groups, "moe_layers", collect_layers, True, in_axes=axes)(
            x_bsd, segment_ids_bs, positions_bs, *rows
        )
    else:
        # MoEGroup takes (kv, cache_meta) before its per-layer rows: both None here, broadcast.
        group_args: tuple = () if per_layer is None else (None, None, group_rows)
        group_axes = axes if per_layer is None else (nn.broadcast,) * 4 + (0,)
        x_bsd, (out, stats) = _scan(MoEGroup, cfg, groups, "moe_layers", collect_layers, in_axes=group_axes)(
            x_bsd, segment_ids_bs, positions_bs, *group_args
        )
        out = None if out is None else out.reshape((-1,) + out.shape[2:])
    collected.append(out)
    layers = jnp.concatenate(collected, axis=0) if collect_layers else None
    return x_bsd, layers, stats


def _moe_stacks_cached(cfg: ModelConfig, x_bsd, segment_ids_bs, positions_bs, kv, meta, per_layer=None):
    """`_moe_stacks` with a KV cache: the cache's [n_layers, ...] stacks (sampling.init_cache's layout, in layer
    order) ride in the scans' carry; the dense prefix scans its layer rows, the MoE groups theirs ([groups, every]),
    each with its rows of the per-layer data. Returns (x, written stacks)."""
    prefix, groups = moe_layout(cfg)
    every = cfg.moe.every
    prefix_rows, group_rows = _split_layers(cfg, per_layer)
    # Inputs after the carry of a cached scan over Blocks: segment ids, positions, per-layer data (scanned when
    # layers differ), this layer's row in the stacks (scanned), the cache's positions/segment ids/index.
    rows_axis = nn.broadcast if per_layer is None else 0
    block_axes = (nn.broadcast, nn.broadcast, rows_axis, 0, nn.broadcast)
    carry = (x_bsd, kv)
    if prefix:
        carry, _ = _scan(Block, cfg, prefix, "layers", in_axes=block_axes)(
            carry, segment_ids_bs, positions_bs, prefix_rows, jnp.arange(prefix), meta
        )
    rows = jnp.arange(prefix, cfg.n_layers)
    if every == 1:
        carry, _ = _scan(Block, cfg, groups, "moe_layers", False, True, in_axes=block_axes)(
            carry, segment_ids_bs, positions_bs, group_rows, rows, meta
        )
    else:
        carry, _ = _scan(
            MoEGroup, cfg, groups, "moe_layers", in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, rows_axis)
        )(carry, segment_ids_bs, positions_bs, rows.reshape(groups, every), meta, group_rows)
    return carry


class Decoder(nn.Module):
    """tokens → final normed hidden states (and, on request, every block's output). Logits: `logits(...)` below."""

    cfg: ModelConfig
    collect_layers: bool = False

    @nn.compact
    def __call__(self, tokens_bs, segment_ids_bs, positions_bs, cache=None, span=None):
        """-> Features; with a KV cache (sampling.init_cache) -> (Features, the cache with these tokens written).
        `span` (a Python int, decoding only; None = the whole cache): attention reads only the cache's first `span`
        slots, which must hold every slot written so far and the new tokens' (models/sampling.py)."""
        cfg = self.cfg
        embedding = self.param(
            "embedding", nn.with_logical_partitioning(_init, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model)
        )
        x_bsd = embed_tokens(cfg, embedding, tokens_bs)
        per_layer = layer_data(cfg)
        extra = () if per_layer is None else (jax.tree.map(jnp.asarray, per_layer),)
        if cache is None:
            if cfg.moe.enabled:
                x_bsd, layers, stats = _moe_stacks(
                    cfg, self.collect_layers, x_bsd, segment_ids_bs, positions_bs, *extra
                )
                return self._finish(x_bsd, layers, stats)
            # Layers that differ (window, RoPE base) get their own row of `per_layer` as a scanned input.
            in_axes = (nn.broadcast, nn.broadcast) + (() if per_layer is None else (0,))
            x_bsd, layers = _scan(_block_class(cfg), cfg, cfg.n_layers, "layers", self.collect_layers, in_axes=in_axes)(
                x_bsd, segment_ids_bs, positions_bs, *extra
            )
            return self._finish(x_bsd, layers, None)
        # Decoding: the same scanned stacks; the whole cache rides in the scan's carry and each layer writes its
        # new keys and values into its row in place (no per-step copy of the cache), reading its first `span` slots.
        index = cache["index"]
        meta = {
            "positions": write_slots(cache["positions"], positions_bs, index),
            "segment_ids": write_slots(cache["segment_ids"], segment_ids_bs, index),
            "index": index,
        }
        span = cache["positions"].shape[1] if span is None else span
        seen = {**meta, "positions": meta["positions"][:, :span], "segment_ids": meta["segment_ids"][:, :span]}
        kv = {name: cache[name] for name in cache if name not in meta}  # k, v (MLA: latent, k_rope)
        if cfg.moe.enabled:
            x_bsd, kv = _moe_stacks_cached(cfg, x_bsd, segment_ids_bs, positions_bs, kv, seen, *extra)
        else:
            in_axes = (nn.broadcast, nn.broadcast, nn.broadcast if per_layer is None else 0, 0, nn.broadcast)
            (x_bsd, kv), _ = _scan(Block, cfg, cfg.n_layers, "layers", in_axes=in_axes)(
                (x_bsd, kv), segment_ids_bs, positions_bs, extra[0] if extra else None, jnp.arange(cfg.n_layers), seen
            )
        return self._finish(x_bsd, None, None), {**meta, **kv}

    def _finish(self, x_bsd, layers, router_stats):
        cfg = self.cfg
        hidden = RMSNorm(cfg.norm_eps, cfg.norm_offset, name="final_norm")(x_bsd).astype(jnp.float32)
        if not cfg.tie_embeddings:
            self.param(
                "lm_head", nn.with_logical_partitioning(_init, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size)
            )
        return Features(nn.with_logical_constraint(hidden, ("batch", "length", "act_embed")), layers, router_stats)


def embed_tokens(cfg: ModelConfig, embedding_vd: jax.Array, tokens_bs: jax.Array) -> jax.Array:
    """The residual stream's start: embedding rows of `tokens_bs` (scaled for Gemma), in the compute dtype."""
    dtype = compute_dtype.of(cfg.dtype)
    # FSDP-gather the table's width before the lookup (as for any weight); gathering from the fsdp-sharded
    # table instead leaves the rows split over fsdp, which GSPMD can only undo by full rematerialisation.
    table = nn.with_logical_constraint(embedding_vd, ("vocab", None))
    x_bsd = nn.with_logical_constraint(
        jnp.take(table, tokens_bs, axis=0).astype(dtype), ("batch", "length", "act_embed")
    )
    if cfg.embed_scale:
        x_bsd = x_bsd * jnp.asarray(cfg.d_model**0.5, dtype)
    return x_bsd


def lm_head(params: dict, cfg: ModelConfig) -> jax.Array:
    """The [d, v] output projection (the embedding, transposed, when tied)."""
    p = _tree(params)
    return p["embedding"].T if cfg.tie_embeddings else p["lm_head"]


def logits(params: dict, cfg: ModelConfig, hidden_bsd: jax.Array) -> jax.Array:
    """Float32 logits from final hidden states (materialises [b, s, v]: for eval and small models), soft-capped
    where the family caps them (Gemma 2)."""
    head = lm_head(params, cfg)
    dtype = compute_dtype.of(cfg.dtype)
    out = jnp.einsum("bsd,dv->bsv", hidden_bsd.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(softcap_logits(out, cfg.final_softcap), ("batch", "length", "act_vocab"))


def softcap_logits(logits_v: jax.Array, cap: float) -> jax.Array:
    """cap·tanh(logits / cap), the final soft-cap (identity for cap 0). Anyone building logits from hidden states and
    the LM head themselves must apply it with the model's `cfg.final_softcap`."""
    return jnp.tanh(logits_v / cap) * cap if cap else logits_v


class Transformer:
    """The decoder as pure functions of a params pytree: what the step, checkpoints and HF interop use."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def init_boxed(self, rng: jax.Array):
        """Params boxed with logical axis names (feed to `mesh.init_sharded` / `mesh.abstract_sharded`)."""
        tokens = jnp.zeros((1, 8), jnp.int32)
        # Parameters do not depend on the attention kernel; init traces on whatever host builds them (a CPU
        # planning a TPU slice), so it runs the XLA core whatever model.attention asks of the real forward.
        cfg = dataclasses.replace(self.cfg, attention="xla")
        return Decoder(cfg).init(rng, tokens, jnp.ones_like(tokens), jnp.zeros_like(tokens))

    def features(
        self,
        params,
        tokens_bs,
        segment_ids_bs=None,
        positions_bs=None,
        collect_layers=False,
        applies_final_softcap=False,
    ) -> Features:
        """Final normed hidden states (and every block's output). Logits are hidden · `head(params)`, then
        `softcap_logits(·, cfg.final_softcap)`: a caller that builds logits so must say it applies the soft-cap
        (`applies_final_softcap=True`); for a soft-capped model (Gemma 2) an unaware caller is refused, not fed
        hidden states whose plain logits would be silently wrong."""
        if self.cfg.final_softcap and not applies_final_softcap:
            raise UserError(
                f"a model with final_softcap={self.cfg.final_softcap} (Gemma 2's final logit soft-cap) "
                "is used where logits are built from hidden states without the soft-cap (the fused "
                "distillation loss, hidden-state teachers); that path does not support it yet"
            )
        return self._features(params, tokens_bs, segment_ids_bs, positions_bs, collect_layers)

    def _features(self, params, tokens_bs, segment_ids_bs, positions_bs, collect_layers=False) -> Features:
        segment_ids_bs, positions_bs = _default_packing(tokens_bs, segment_ids_bs, positions_bs)
        # flax types apply() as "output, or (output, mutated variables)"; no collection is mutable here.
        return cast(Features, Decoder(self.cfg, collect_layers).apply(params, tokens_bs, segment_ids_bs, positions_bs))

    def head(self, params) -> jax.Array:
        return lm_head(params, self.cfg)

    def decode(self, params, tokens_bs, segment_ids_bs, positions_bs, cache, span=None) -> tuple[jax.Array, dict]:
        """KV-cached forward (prefill or one decode step; analogjax/models/sampling.py): (final normed hidden states,
        float32 [b, s, d], the cache with these tokens written at cache["index"]). Logits: `logits(...)`. `span`:
        attend over the cache's first `span` slots only (a Python int; Decoder)."""
        features, cache = Decoder(self.cfg).apply(params, tokens_bs, segment_ids_bs, positions_bs, cache, span)
        return features.hidden_bsd, cache

    # The forward in pieces, for analyses that read or replace the residual stream between blocks (stitching,
    # steering, pruning importance): embed → block(0) → … → block(n-1) → finish equals `features`. `block` runs
    # one layer unscanned on its slice of the stacked params; `blocks` runs the rest of the stack scanned.
    def embed(self, params, tokens_bs) -> jax.Array:
        """Token ids → the residual stream entering block 0."""
        return embed_tokens(self.cfg, _tree(params)["embedding"], tokens_bs)

    def block(self, params, layer: int, x_bsd, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        """Block `layer` (0-based) applied to the residual stream `x_bsd`, with that layer's own attention kind."""
        segment_ids_bs, positions_bs = _default_packing(x_bsd[..., 0], segment_ids_bs, positions_bs)
        path, index, is_moe = layer_location(self.cfg, layer)
        return self._run(params, path, is_moe, (index, layer, 1), x_bsd, segment_ids_bs, positions_bs)

    def blocks(self, params, first: int, x_bsd, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        """Blocks `first`.. to the last applied to the residual stream: the same as calling `block` for each, but
        consecutive layers of one stack run as a scan over their slice of it, so compile time does not grow with the
        depth (a 61-layer teacher compiles one block, not 61)."""
        segment_ids_bs, positions_bs = _default_packing(x_bsd[..., 0], segment_ids_bs, positions_bs)
        layer = first
        while layer < self.cfg.n_layers:
            path, start, is_moe = layer_location(self.cfg, layer)
            end = layer + 1  # this stack's run: the next layers stored at the next indices of the same stack
            while end < self.cfg.n_layers and layer_location(self.cfg, end) == (path, start + end - layer, is_moe):
                end += 1
            x_bsd = self._run(params, path, is_moe, (start, layer, end - layer), x_bsd, segment_ids_bs, positions_bs)
            layer = end
        return x_bsd

    def _run(self, params, path, is_moe: bool, run: tuple[int, int, int], x_bsd, segment_ids_bs, positions_bs):
        """`count` layers from model layer `layer`, stored at `start`.. of the stack at `path`: one unscanned, more
        as a scan over their slices of the stacked params and of the per-layer attention data."""
        start, layer, count = run
        stacked = _tree(params)
        for key in path:
            stacked = stacked[key]
        per_layer = layer_data(self.cfg)
        rows = (
            jax.tree.map(lambda a: a[start : start + count], stacked),
            None if per_layer is None else {k: jnp.asarray(v[layer : layer + count]) for k, v in per_layer.items()},
        )
        block = Block(self.cfg, moe=is_moe)

        def body(x, inputs):
            out, _ = block.apply({"params": inputs[0]}, x, segment_ids_bs, positions_bs, inputs[1])
            return out, None

        if count == 1:
            return body(x_bsd, jax.tree.map(lambda a: a[0], rows))[0]
        return jax.lax.scan(body, x_bsd, rows)[0]

    def finish(self, params, x_bsd) -> jax.Array:
        """The residual stream after the last block → final normed hidden states (float32; `head` gives logits)."""
        norm = RMSNorm(self.cfg.norm_eps, self.cfg.norm_offset)
        return norm.apply({"params": _tree(params)["final_norm"]}, x_bsd).astype(jnp.float32)

    def __call__(self, params, tokens_bs, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        """int32 tokens [b, s] → float32 logits [b, s, v] (soft-capped where the family caps them)."""
        return logits(params, self.cfg, self._features(params, tokens_bs, segment_ids_bs, positions_bs).hidden_bsd)


def _tree(params: dict) -> dict:
    return params["params"] if "params" in params else params


def _default_packing(tokens_bs, segment_ids_bs, positions_bs):
    # One unpacked document per row when the caller gives no packing.
    if segment_ids_bs is None:
        segment_ids_bs = jnp.ones_like(tokens_bs)
    if positions_bs is None:
        positions_bs = jnp.broadcast_to(jnp.arange(tokens_bs.shape[1], dtype=jnp.int32), tokens_bs.shape)
    return segment_ids_bs, positions_bs
