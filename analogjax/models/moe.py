"""The mixture-of-experts feed-forward block: a router, E routed SwiGLU experts, optional shared experts.

Routing is dropless: every token goes to its top-k experts, whatever the load. The (token, expert) assignments are
sorted by expert so each expert's tokens are contiguous, each expert's SwiGLU runs as one group of a grouped matmul,
and the outputs are unsorted and combined with the routing weights. The grouped matmul is `jax.lax.ragged_dot` on
TPU and GPU (native grouped kernels). XLA's CPU backend has none: jax lowers ragged_dot there as a dense product of
every row with every expert under a mask (E x the FLOPs and an [E, rows, d] copy), so on CPU the sorted rows are
laid out in fixed-size blocks, each block holding one expert's rows, and a loop over the blocks runs each against
its expert's weights (`_blocked_swiglu`: the FLOPs of the real rows plus at most one partly filled block per
expert). Both forms are exact; `lax.platform_dependent` picks one when the step is lowered for its backend.

Expert parallelism (`model.moe.dispatch`). Expert weights carry the logical axis `expert`, which mesh.py maps onto
`fsdp`: each device of an fsdp group stores E/fsdp whole experts. Tokens are split over the batch axes (data, fsdp).

- `exchange_tokens` (the default): inside a shard_map over the mesh, each device all-gathers its fsdp group's tokens
  (and their routing choices), runs its own E/fsdp experts on the assignments routed to them, and a reduce-scatter
  (psum_scatter) over fsdp returns each token's summed expert outputs to the device that owns it. No expert weight
  ever leaves its device. Per MoE layer and device, forward: an all-gather of (fsdp-1) * T * d activations in and a
  reduce-scatter of the same out (T = the device's tokens), float32 outputs; a trained model's backward pass moves
  the same again, plus the recomputed forward's.
  An all-to-all that sent each assignment only to its expert's owner would move (fsdp-1)/fsdp * T * k * d each way:
  the all-gather form moves fsdp/k times that, no more than the all-to-all when fsdp <= top_k (Qwen3: k = 8;
  Mixtral: k = 2), and it is dropless with no worst-case buffer to size and exact (each output is one sum). A fixed-
  size `all_to_all` must size every buffer for the worst case (all T * k assignments to one device) to stay
  dropless, and `ragged_all_to_all` does not run on the CPU backend this project's CI runs on (jax 0.10.2:
  "UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"). The gathered
  tokens are processed one source device at a time (a checkpointed lax.map over the fsdp group), so the sorted
  buffers stay T * k rows as in the non-parallel form; a device runs each source's full T * k rows through its
  local experts, rows not routed to them lying past every group: a grouped kernel whose tiles follow the group
  sizes (megablox gmm) leaves them out, but whether XLA's TPU ragged_dot does is not measured here; on CPU the
  blocked form computes all its blocks, filled or not, fsdp x the real rows (CPU runs this only in tests).
- `gather_weights`: each device runs all E experts on its own tokens and GSPMD all-gathers the expert weights layer
  by layer, as an FSDP weight: per layer and device (fsdp-1)/fsdp * 3 * E * d * f weights (and a reduce-scatter of
  their gradients for a trained model). Cheaper only when the fsdp group's tokens per step are fewer than about
  1.5 * E * f (small batches, few experts); kept for that case and as the reference the tests compare against.

With fsdp = 1 the two are the same computation. Each expert's ffn width stays split over `tensor` in both (as the
dense MLP's), the partial outputs summed after the down projection. A teacher's expert weights also split their
`embed` dim over `data` (mesh.TEACHER_RULES: memory first); the shard_map gathers that dim over `data` layer by
layer, so under exchange_tokens a device gathers slices of its own E/fsdp experts only, never other experts.

Shapes in names: t tokens, k chosen experts per token, x experts, d model width, f expert ffn width, n blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from analogjax.models.config import ModelConfig
from analogjax.runtime import compute_dtype

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
    return compute_dtype.of(cfg.dtype)


def glu(cfg: ModelConfig, gate, up):
    """The gated hidden activation of a SwiGLU-style feed-forward: act(gate) · up (silu, gelu_tanh), or gpt-oss's
    clamped form (up + 1) · g · sigmoid(alpha · g) with g = min(gate, limit) and up clipped to ±limit."""
    if cfg.activation == "clamped_swiglu":
        limit = cfg.swiglu_limit
        g = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1) * (g * jax.nn.sigmoid(g * cfg.swiglu_alpha))
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return act * up


def route(cfg: ModelConfig, logits_tx: jax.Array, bias_x: jax.Array | None):
    """Router logits (float32) → (chosen experts [t, k], their weights [t, k], probabilities [t, x]).

    Selection takes the top_k of the scores (plus the expert bias when given: selection only, as DeepSeek-V3;
    among the topk_group best of n_group groups when moe.n_group > 1, `limit_to_groups`);
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
    select = jax.lax.stop_gradient(select)
    if moe.n_group > 1:
        select = limit_to_groups(select, moe.n_group, moe.topk_group)
    _, chosen_tk = jax.lax.top_k(select, moe.top_k)
    weights_tk = jnp.take_along_axis(scores, chosen_tk, axis=-1)
    if moe.norm_topk:
        weights_tk = weights_tk / (
            jnp.sum(weights_tk, axis=-1, keepdims=True) + (1e-20 if moe.router == "sigmoid" else 0.0)
        )
    return chosen_tk, weights_tk * moe.routed_scale, probs


def limit_to_groups(select_tx: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """Selection scores with every expert outside the topk_group best groups set to -inf (DeepSeek-V3's group-
    limited routing): the experts split into n_group contiguous groups, each ranked by the sum of its two best
    scores (ties to the lower group, as lax.top_k)."""
    *lead, n = select_tx.shape
    grouped = select_tx.reshape(*lead, n_group, n // n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [..., groups]
    _, best = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.sum(jax.nn.one_hot(best, n_group, dtype=jnp.int32), axis=-2) > 0  # [..., groups]
    return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(select_tx.shape)


def routed_experts(
    x_td,
    chosen_tk,
    weights_tk,
    w_gate_xdf,
    w_up_xdf,
    w_down_xfd,
    gated,
    first_expert=0,
    b_gate_xf=None,
    b_up_xf=None,
    weights_on_input=False,
):
    """Dropless routed SwiGLU experts on a flat token list: sort by expert, grouped matmuls, unsort, combine.

    `gated(gate, up)` is the hidden activation (`glu`); b_gate_xf, b_up_xf: per-expert biases of the gate and up
    projections (gpt-oss; the down projection's bias is added by the caller, once per token, not per device). The
    weights hold experts first_expert .. first_expert + x - 1 (all of them unless expert-parallel); assignments
    to other experts sort last, outside every group, and add nothing: the result is this device's share of each
    token's output. Pure and local (no collectives): the shard_maps below call it per device. `weights_on_input`
    (Llama 4): each routing weight scales the token entering its expert instead of the expert's output."""
    n_tokens, k = chosen_tk.shape
    n_local = w_gate_xdf.shape[0]
    local = chosen_tk.reshape(-1) - first_expert
    mine = (local >= 0) & (local < n_local)
    key = jnp.where(mine, local, n_local)  # other devices' experts: one key past the local ones, sorted last
    order = jnp.argsort(key, stable=True)  # assignments grouped by expert
    sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)  # no token: an empty group
    xs = jnp.take(x_td, order // k, axis=0)
    if weights_on_input:  # as transformers' Llama 4: (x · weight) in the compute dtype, then the expert
        xs = (xs * jnp.take(weights_tk.reshape(-1), order).astype(xs.dtype)[:, None]).astype(xs.dtype)
        weights_tk = jnp.ones_like(weights_tk)
    biases = None if b_gate_xf is None else (b_gate_xf, b_up_xf)
    ys = _grouped_swiglu(xs, sizes, w_gate_xdf, w_up_xdf, w_down_xfd, gated, biases)
    y_tkd = jnp.take(ys, jnp.argsort(order), axis=0).reshape(n_tokens, k, -1)
    weights = jnp.where(mine.reshape(n_tokens, k), weights_tk.astype(jnp.float32), 0.0)
    return jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights)


def _grouped_swiglu(xs_rd, sizes_x, w_gate_xdf, w_up_xdf, w_down_xfd, gated, biases=None):
    """Rows sorted by expert (group sizes `sizes_x`; rows past their sum belong to no group and give 0) → each row
    through its expert's SwiGLU. ragged_dot where the backend has a grouped kernel, blocks on CPU (module doc).
    `biases`: (gate [x, f], up [x, f]) per-expert biases, or None."""
    operands = (xs_rd, sizes_x, w_gate_xdf, w_up_xdf, w_down_xfd)
    return jax.lax.platform_dependent(
        *operands,
        cpu=lambda *a: _blocked_swiglu(*a, gated, biases),
        default=lambda *a: _ragged_swiglu(*a, gated, biases),
    )


def _ragged_swiglu(xs_rd, sizes_x, w_gate_xdf, w_up_xdf, w_down_xfd, gated, biases=None):
    gate, up = jax.lax.ragged_dot(xs_rd, w_gate_xdf, sizes_x), jax.lax.ragged_dot(xs_rd, w_up_xdf, sizes_x)
    if biases is not None:  # each row's expert's bias (rows in no group take the last one's; their output is unused)
        expert_r = jnp.searchsorted(jnp.cumsum(sizes_x), jnp.arange(xs_rd.shape[0]), side="right")
        expert_r = jnp.minimum(expert_r, sizes_x.shape[0] - 1)
        gate, up = gate + biases[0][expert_r].astype(gate.dtype), up + biases[1][expert_r].astype(up.dtype)
    return jax.lax.ragged_dot(gated(gate, up), w_down_xfd, sizes_x)


def block_rows(rows: int, n_experts: int) -> int:
    """Rows per block of `_blocked_swiglu`: about half an evenly loaded expert's rows, a power of two between 8 and
    256. Each expert's partly filled last block wastes half a block on average (~1/4 of the work), but on CPU larger
    blocks won: at bench/moe.py's shape (4096 rows, 8 experts) 256 rows ran a layer's forward in 0.73x the time of
    128 and 0.75x that of 64, measured interleaved in one process."""
    target = max(rows // (2 * n_experts), 1)
    return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def _blocked_swiglu(xs_rd, sizes_x, w_gate_xdf, w_up_xdf, w_down_xfd, gated, biases=None):
    """`_ragged_swiglu` as fixed-size blocks: each expert's rows start at a block boundary, every block belongs to
    one expert, and a loop over the blocks (lax.map) runs each through its expert's weights, read in place.

    Static shapes, dropless: the blocks number ceil((rows + x * (block - 1)) / block), enough for any group sizes;
    blocks past the last group are skipped (lax.cond: XLA's CPU backend runs only the branch taken), so the bound
    costs nothing. Measured on CPU at bench/moe.py's shape, a loop reading the weights in place ran ~2x faster than
    one batched matmul against weights gathered per block (the gather copies x * d * f per block)."""
    rows, d = xs_rd.shape
    n_experts = sizes_x.shape[0]
    block = block_rows(rows, n_experts)
    n_blocks = -(-(rows + n_experts * (block - 1)) // block)
    ends = jnp.cumsum(sizes_x)
    padded = (sizes_x + block - 1) // block * block
    padded_ends = jnp.cumsum(padded)
    row = jnp.arange(rows, dtype=jnp.int32)
    expert_r = jnp.searchsorted(ends, row, side="right")  # n_experts for rows in no group
    clipped = jnp.minimum(expert_r, n_experts - 1)
    dest_r = jnp.where(
        expert_r < n_experts, (padded_ends - padded)[clipped] + row - (ends - sizes_x)[clipped], n_blocks * block
    )
    xb = jnp.zeros((n_blocks * block, d), xs_rd.dtype).at[dest_r].set(xs_rd, mode="drop").reshape(n_blocks, block, d)
    starts_n = jnp.arange(n_blocks, dtype=jnp.int32) * block
    expert_n = jnp.minimum(jnp.searchsorted(padded_ends, starts_n, side="right"), n_experts - 1)
    out_dtype = jnp.result_type(xs_rd, w_down_xfd)

    def one_block(args):
        x_bd, expert, used = args

        def swiglu(x_bd):
            gate, up = x_bd @ w_gate_xdf[expert], x_bd @ w_up_xdf[expert]
            if biases is not None:
                gate, up = gate + biases[0][expert].astype(gate.dtype), up + biases[1][expert].astype(up.dtype)
            return (gated(gate, up) @ w_down_xfd[expert]).astype(out_dtype)

        empty = lambda x_bd: jnp.zeros((block, w_down_xfd.shape[-1]), out_dtype)
        return jax.lax.cond(used, swiglu, empty, x_bd)

    yb = jax.lax.map(one_block, (xb, expert_n, starts_n < padded_ends[-1]))
    return jnp.take(yb.reshape(n_blocks * block, -1), dest_r, axis=0, mode="fill", fill_value=0)


def _sharded_experts(cfg: ModelConfig, x_bsd, chosen_bsk, weights_bsk, w_gate, w_up, w_down, b_gate=None, b_up=None):
    """The routed experts per device when a mesh with the batch axes is in context (module doc), else on all tokens.
    b_gate, b_up: the experts' gate and up biases [x, f] (gpt-oss), else None. Returns float32 [b, s, d]."""
    gated = lambda gate, up: glu(cfg, gate, up)
    on_input = cfg.moe.weights_on_input
    has_bias = b_gate is not None
    biases = (b_gate, b_up) if has_bias else ()

    def flat(x, chosen, weights):
        b, s, d = x.shape
        return x.reshape(b * s, d), chosen.reshape(b * s, -1), weights.reshape(b * s, -1)

    def local(x, chosen, weights, wg, wu, wd, *bias):
        out = routed_experts(*flat(x, chosen, weights), wg, wu, wd, gated, 0, *bias, weights_on_input=on_input)
        return out.reshape(x.shape)

    mesh = jax.sharding.get_abstract_mesh()
    names = () if mesh.empty else tuple(mesh.axis_names)
    batch_axes = tuple(a for a in _BATCH_AXES if a in names)
    ways = 1
    for a in batch_axes:
        ways *= mesh.shape[a]
    if not batch_axes or x_bsd.shape[0] % ways:
        return local(x_bsd, chosen_bsk, weights_bsk, w_gate, w_up, w_down, *biases)
    # Each expert's ffn width split over `tensor` (as the dense MLP's), partial outputs summed after the down
    # projection; replicated when tensor does not divide it. The sequence stays split over `context`.
    tensor = "tensor" if "tensor" in names and cfg.expert_d_ff % mesh.shape["tensor"] == 0 else None
    context = "context" if "context" in names and x_bsd.shape[1] % mesh.shape["context"] == 0 else None
    fsdp = mesh.shape["fsdp"] if "fsdp" in names else 1
    exchange = cfg.moe.dispatch == "exchange_tokens" and fsdp > 1 and cfg.moe.experts % fsdp == 0
    experts = "fsdp" if exchange else None

    def gather_weights_body(x, chosen, weights, wg, wu, wd, *bias):
        y = local(x, chosen, weights, wg, wu, wd, *bias)
        return jax.lax.psum(y, tensor) if tensor else y

    def exchange_tokens_body(x, chosen, weights, wg, wu, wd, *bias):
        x_td, chosen_tk, weights_tk = flat(x, chosen, weights)
        first = jax.lax.axis_index("fsdp") * wg.shape[0]
        # [fsdp, t, ...]: every token of the fsdp group, by the device that holds it.
        sources = tuple(jax.lax.all_gather(a, "fsdp") for a in (x_td, chosen_tk, weights_tk))
        # One source device at a time, recomputed in the backward pass: the sorted buffers stay t * k rows.
        partial = jax.lax.map(
            jax.checkpoint(
                lambda src: routed_experts(*src, wg, wu, wd, gated, first, *bias, weights_on_input=on_input)
            ),
            sources,
        )
        y = jax.lax.psum_scatter(partial, "fsdp", scatter_dimension=0)  # each token's sum, back to its device
        y = jax.lax.psum(y, tensor) if tensor else y
        return y.reshape(x.shape)

    rows = P(batch_axes, context)
    bias_specs = (P(experts, tensor), P(experts, tensor)) if has_bias else ()
    return jax.shard_map(
        exchange_tokens_body if exchange else gather_weights_body,
        in_specs=(
            rows,
            rows,
            rows,
            P(experts, None, tensor),
            P(experts, None, tensor),
            P(experts, tensor, None),
            *bias_specs,
        ),
        out_specs=rows,
        check_vma=False,
    )(x_bsd, chosen_bsk, weights_bsk, w_gate, w_up, w_down, *biases)


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
        zeros = nn.initializers.zeros
        expert_bias = {}
        if moe.expert_biases:  # gpt-oss
            for name, width, axis in (("b_gate", f, "mlp"), ("b_up", f, "mlp"), ("b_down", d, "embed")):
                expert_bias[name] = self.param(name, nn.with_logical_partitioning(zeros, ("expert", axis)), (n, width))

        # The router in float32: top-k decisions should not flip with the compute dtype.
        logits_bsx = jnp.einsum("bsd,dx->bsx", x_bsd.astype(jnp.float32), router)
        if moe.router_bias:  # gpt-oss: part of the logits (selection and weights), unlike DeepSeek's expert_bias
            logits_bsx = logits_bsx + self.param(
                "router_bias", nn.with_logical_partitioning(zeros, (None,)), (n,)
            ).astype(jnp.float32)
        chosen, weights, probs = route(cfg, logits_bsx, bias)
        in_biases = (
            (expert_bias["b_gate"].astype(dtype), expert_bias["b_up"].astype(dtype)) if moe.expert_biases else ()
        )
        y = _sharded_experts(
            cfg,
            x_bsd.astype(dtype),
            chosen,
            weights,
            w_gate.astype(dtype),
            w_up.astype(dtype),
            w_down.astype(dtype),
            *in_biases,
        )
        if moe.expert_biases:
            # The down bias of each chosen expert, times its weight: one [tokens, x] · [x, d] product outside the
            # shard_map, so a tensor-split expert does not add it once per shard.
            combine_bsx = jnp.einsum("bskx,bsk->bsx", jax.nn.one_hot(chosen, n, dtype=jnp.float32), weights)
            y = y + combine_bsx @ expert_bias["b_down"].astype(jnp.float32)
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
            glu(cfg, x @ w_gate.astype(dtype), x @ w_up.astype(dtype)), ("batch", "length", "act_mlp")
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
