"""The mixture-of-experts feed-forward block: a router, E routed SwiGLU experts, optional shared experts.

Routing is dropless: every token goes to its top-k experts, whatever the load. The (token, expert) assignments are
sorted by expert so each expert's tokens are contiguous, each expert's SwiGLU runs as one group of a grouped matmul
(`jax.lax.ragged_dot`: one [tokens, d] x [E, d, f] product with per-expert group sizes, no padding to a capacity),
and the outputs are unsorted and combined with the routing weights.

Sharding. Expert weights carry the logical axis `expert` (mesh.py maps it onto a physical axis: they are stored
spread over devices). The routed compute runs per device on its own tokens (a shard_map over the batch axes):
sorting and the grouped matmul see only local tokens, so no device sorts the global batch, and the expert weights
are gathered layer by layer as an FSDP weight is (each expert's ffn width stays split over `tensor`, summed after
the down projection). That is the simple correct form of expert parallelism under GSPMD: storage is expert-sharded,
compute is token-sharded. Exchanging tokens instead of weights (all-to-all to the experts' owners) pays off when
tokens per step are few next to expert weights; it is not implemented here.

Shapes in names: t tokens, k chosen experts per token, x experts, d model width, f expert ffn width.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from analogjax.models.config import ModelConfig

_init = nn.initializers.normal(stddev=0.02)
_BATCH_AXES = ("data", "fsdp")  # mesh.BATCH_AXES (not imported: models stay free of the mesh module)


class RouterStats(NamedTuple):
    """What the objective needs from one MoE layer's router (stacked [layers, ...] over the scanned layers).

    load_x: share of the (token, expert) assignments each expert received (sums to 1; no gradient).
    prob_x: each expert's mean routing probability over tokens (differentiable: the load-balancing term's path).
    z: mean over tokens of logsumexp(router logits)² (the router z-loss).
    """

    load_x: jax.Array
    prob_x: jax.Array
    z: jax.Array


def _dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def _act(cfg: ModelConfig, gate):
    return jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)


def route(cfg: ModelConfig, logits_tx: jax.Array, bias_x: jax.Array | None):
    """Router logits (float32) → (chosen experts [t, k], their weights [t, k], probabilities [t, x]).

    Selection takes the top_k of the scores (plus the expert bias when given: selection only, as DeepSeek-V3);
    ties go to the lower expert index (lax.top_k, as torch.topk does on CPU). The weights are the unbiased scores,
    renormalised to sum 1 when norm_topk, times routed_scale. `probabilities` are what the load-balancing term
    averages: the softmax, or the sigmoid scores normalised per token."""
    moe = cfg.moe
    if moe.router == "softmax":
        scores = jax.nn.softmax(logits_tx, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits_tx)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    select = scores if bias_x is None else scores + jax.lax.stop_gradient(bias_x)
    _, chosen_tk = jax.lax.top_k(jax.lax.stop_gradient(select), moe.top_k)
    weights_tk = jnp.take_along_axis(scores, chosen_tk, axis=-1)
    if moe.norm_topk:
        weights_tk = weights_tk / (
            jnp.sum(weights_tk, axis=-1, keepdims=True) + (1e-20 if moe.router == "sigmoid" else 0.0)
        )
    return chosen_tk, weights_tk * moe.routed_scale, probs


def routed_experts(x_td, chosen_tk, weights_tk, w_gate_xdf, w_up_xdf, w_down_xfd, activation):
    """Dropless routed SwiGLU experts on a flat token list: sort by expert, grouped matmuls, unsort, combine.

    Pure and local (no collectives): the shard_map below calls it on each device's tokens."""
    n_tokens, k = chosen_tk.shape
    n_experts = w_gate_xdf.shape[0]
    flat = chosen_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # an expert with no token is an empty group
    xs = jnp.take(x_td, order // k, axis=0)
    hidden = activation(jax.lax.ragged_dot(xs, w_gate_xdf, sizes)) * jax.lax.ragged_dot(xs, w_up_xdf, sizes)
    ys = jax.lax.ragged_dot(hidden, w_down_xfd, sizes)
    y_tkd = jnp.take(ys, jnp.argsort(order), axis=0).reshape(n_tokens, k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights_tk.astype(jnp.float32))


def _sharded_experts(cfg: ModelConfig, x_bsd, chosen_bsk, weights_bsk, w_gate, w_up, w_down):
    """`routed_experts` per device on its batch rows when a mesh with the batch axes is in context, else on all."""
    act = lambda g: _act(cfg, g)

    def local(x, chosen, weights, wg, wu, wd):
        b, s, d = x.shape
        y = routed_experts(x.reshape(b * s, d), chosen.reshape(b * s, -1), weights.reshape(b * s, -1), wg, wu, wd, act)
        return y.reshape(b, s, d)

    mesh = jax.sharding.get_abstract_mesh()
    names = () if mesh.empty else tuple(mesh.axis_names)
    batch_axes = tuple(a for a in _BATCH_AXES if a in names)
    ways = 1
    for a in batch_axes:
        ways *= mesh.shape[a]
    if not batch_axes or x_bsd.shape[0] % ways:
        return local(x_bsd, chosen_bsk, weights_bsk, w_gate, w_up, w_down)
    # Each expert's ffn width split over `tensor` (as the dense MLP's), partial outputs summed after the down
    # projection; replicated when tensor does not divide it.
    tensor = "tensor" if "tensor" in names and cfg.expert_d_ff % mesh.shape["tensor"] == 0 else None

    def body(x, chosen, weights, wg, wu, wd):
        y = local(x, chosen, weights, wg, wu, wd)
        return jax.lax.psum(y, tensor) if tensor else y

    rows = P(batch_axes)
    return jax.shard_map(
        body,
        in_specs=(rows, rows, rows, P(None, None, tensor), P(None, None, tensor), P(None, tensor, None)),
        out_specs=rows,
        check_vma=False,
    )(x_bsd, chosen_bsk, weights_bsk, w_gate, w_up, w_down)


class MoE(nn.Module):
    """x [b, s, d] (and a mask of real tokens) → (y [b, s, d], RouterStats)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd, mask_bs=None):
        cfg, moe = self.cfg, self.cfg.moe
        dtype = _dtype(cfg)
        n, d, f = moe.experts, cfg.d_model, cfg.expert_d_ff
        router = self.param("router", nn.with_logical_partitioning(_init, ("embed", None)), (d, n))
        bias = (
            self.param("expert_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (n,))
            if moe.expert_bias
            else None
        )
        w_gate = self.param("w_gate", nn.with_logical_partitioning(_init, ("expert", "embed", "mlp")), (n, d, f))
        w_up = self.param("w_up", nn.with_logical_partitioning(_init, ("expert", "embed", "mlp")), (n, d, f))
        w_down = self.param("w_down", nn.with_logical_partitioning(_init, ("expert", "mlp", "embed")), (n, f, d))

        # The router in float32: top-k decisions should not flip with the compute dtype.
        logits_bsx = jnp.einsum("bsd,dx->bsx", x_bsd.astype(jnp.float32), router)
        chosen, weights, probs = route(cfg, logits_bsx, bias)
        y = _sharded_experts(
            cfg, x_bsd.astype(dtype), chosen, weights, w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype)
        )
        if moe.shared_d_ff:
            shared = SharedExpert(cfg, name="shared")(x_bsd)
            if moe.shared_gate:
                gate_w = self.param("shared_gate", nn.with_logical_partitioning(_init, ("embed", None)), (d, 1))
                shared = shared * jax.nn.sigmoid(x_bsd.astype(jnp.float32) @ gate_w)
            y = y + shared.astype(jnp.float32)
        return y.astype(x_bsd.dtype), router_stats(logits_bsx, chosen, probs, n, mask_bs)


class SharedExpert(nn.Module):
    """The always-on expert: a SwiGLU of width moe.shared_d_ff (named as the dense MLP's weights)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_bsd):
        cfg = self.cfg
        dtype = _dtype(cfg)
        d, f = cfg.d_model, cfg.moe.shared_d_ff
        w_gate = self.param("w_gate", nn.with_logical_partitioning(_init, ("embed", "mlp")), (d, f))
        w_up = self.param("w_up", nn.with_logical_partitioning(_init, ("embed", "mlp")), (d, f))
        w_down = self.param("w_down", nn.with_logical_partitioning(_init, ("mlp", "embed")), (f, d))
        x = x_bsd.astype(dtype)
        hidden = nn.with_logical_constraint(
            _act(cfg, x @ w_gate.astype(dtype)) * (x @ w_up.astype(dtype)), ("batch", "length", "act_mlp")
        )
        return hidden @ w_down.astype(dtype)


def router_stats(logits_bsx, chosen_bsk, probs_bsx, n_experts: int, mask_bs=None) -> RouterStats:
    """Per-layer router summaries over the real tokens (mask_bs true; all tokens when None)."""
    mask = jnp.ones(logits_bsx.shape[:2], jnp.float32) if mask_bs is None else mask_bs.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    counts = jnp.einsum("bskx,bs->x", jax.nn.one_hot(chosen_bsk, n_experts, dtype=jnp.float32), mask)
    load = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts), 1.0))
    prob = jnp.einsum("bsx,bs->x", probs_bsx, mask) / tokens
    z = jnp.sum(jax.nn.logsumexp(logits_bsx, axis=-1) ** 2 * mask) / tokens
    return RouterStats(load, prob, z)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """Switch/GShard α-free term E·Σᵢ fᵢ·Pᵢ, averaged over the stacked layers: 1 when perfectly balanced."""
    n_experts = stats.load_x.shape[-1]
    return jnp.mean(n_experts * jnp.sum(stats.load_x * stats.prob_x, axis=-1))


def z_loss(stats: RouterStats) -> jax.Array:
    return jnp.mean(stats.z)


def load_metrics(stats: RouterStats) -> dict[str, jax.Array]:
    """Expert load over all MoE layers: the largest and smallest expert's share times E (1 = balanced), and the
    entropy of the load divided by log E (1 = uniform)."""
    load = stats.load_x.reshape(-1, stats.load_x.shape[-1])
    n_experts = load.shape[-1]
    entropy = -jnp.sum(jnp.where(load > 0, load * jnp.log(jnp.where(load > 0, load, 1.0)), 0.0), axis=-1)
    return {
        "moe_load_max": jnp.max(load) * n_experts,
        "moe_load_min": jnp.min(load) * n_experts,
        "moe_load_entropy": jnp.mean(entropy) / jnp.log(n_experts),
    }
