"""The optimiser: AdamW, or Muon for the blocks' weight matrices and AdamW for the rest (`optim.name`).

Muon (Jordan 2024; Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982) replaces a matrix's update by
its momentum orthogonalised with a few Newton-Schulz iterations. It is optax's own (`optax.contrib.muon`); this
module only decides which parameters it takes and how each is seen as a matrix, from the parameters' logical axis
names (the same names the mesh rules shard by):
- the stack axes (`layers`, and `expert` of a MoE block) are batch axes: each layer's (expert's) matrix is
  orthogonalised on its own;
- a parameter that reads the residual stream (`embed` first: q, k, v, the feed-forward's gate and up, a router; or
  `latent` first: latent attention's up-projections) is a matrix from that axis to the rest of its axes (a query
  projection [embed, heads, head_dim] is one embed x heads·head_dim matrix); one that writes it (`embed` last: the
  attention output, the feed-forward's down) maps the rest to `embed`;
- everything else keeps AdamW: embeddings and LM heads (`vocab`; Muon's authors keep them on AdamW), norms, biases
  and attention sinks. With Muon, optax gives them AdamW with Nesterov momentum, as Muon's own momentum.
Updates are scaled to AdamW's RMS (0.2 · sqrt(max(fan_in, fan_out)), Liu et al.), so one learning rate, schedule
and weight decay serve both; `optim.muon_lr_scale` multiplies the rate for the matrices Muon takes. Measured on the
demo's 4-layer analog (recipes/demo.py): the same 120 distillation steps from its pruned start, held-out KL /
agreement 2.740 / 0.268 with AdamW, 2.588 / 0.289 with Muon at twice AdamW's rate (each step 0.1 s slower on 2 CPU
cores: the Newton-Schulz products do not grow with the batch).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers, muon

from analogjax.config import OptimConfig

# Axes a stack of matrices repeats over: each slice is a matrix of its own.
_STACK_AXES = ("layers", "expert")
# Axes that make a parameter an embedding or a head: AdamW whatever their shape.
_ADAM_AXES = ("vocab",)
# What a matrix reads: the residual stream, or latent attention's compressed one.
_STREAM_AXES = ("embed", "latent")
# Muon's consistent-RMS factor: its updates then have AdamW's RMS at the same learning rate (Liu et al., 2025).
CONSISTENT_RMS = 0.2


def schedule_of(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to the peak rate, then cosine decay to `min_lr_ratio` of it at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def matrix_view(names: tuple) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter with these logical axis names, or None for AdamW (see the module docstring)."""
    if any(name in _ADAM_AXES for name in names):
        return None
    inner = [axis for axis, name in enumerate(names) if name not in _STACK_AXES]
    if len(inner) < 2:
        return None
    if names[inner[0]] in _STREAM_AXES:  # reads the residual stream (or the latent one)
        return MuonDimensionNumbers(reduction_axis=inner[0], output_axis=tuple(inner[1:]))
    if names[inner[-1]] == "embed":  # writes the residual stream
        return MuonDimensionNumbers(reduction_axis=tuple(inner[:-1]), output_axis=inner[-1])
    return None


def muon_views(logical_specs: Any) -> Any:
    """A tree like the params: each leaf's MuonDimensionNumbers, or None where AdamW updates it."""
    return jax.tree.map(
        lambda spec: matrix_view(tuple(spec)), logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, logical_specs: Any = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or Muon + AdamW. `logical_specs`: the params' tree of logical PartitionSpecs,
    which Muon needs to know its matrices (refused without it)."""
    schedule = schedule_of(cfg, total_steps)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    if cfg.name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
        return optax.chain(*chain)
    if logical_specs is None:
        raise ValueError("optim.name=muon needs the params' logical axis names to choose its matrices")
    scale = cfg.muon_lr_scale

    def muon_schedule(count):
        return schedule(count) * scale

    chain.append(
        muon(
            muon_schedule,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            adam_learning_rate=schedule,
            adam_b1=cfg.b1,
            adam_b2=cfg.b2,
            adam_weight_decay=cfg.weight_decay,
            muon_weight_dimension_numbers=muon_views(logical_specs),
            consistent_rms=CONSISTENT_RMS,
        )
    )
    return optax.chain(*chain)


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, replicated) -> Any:
    """The optimiser state as sharded ShapeDtypeStructs: every tree in it shaped like the params (moments) takes the
    params' shardings, everything else (counters, Muon's Newton-Schulz coefficients) is replicated. Muon's state
    holds optax's MaskedNode where a moment belongs to the other optimiser (optax.tree_map_params cannot map it)."""
    params_def = jax.tree.structure(abstract_params)
    shardings = [a.sharding for a in jax.tree.leaves(abstract_params)]

    def masked(node) -> bool:
        return isinstance(node, optax.MaskedNode)

    def like_params(node) -> bool:
        # jaxlib ships no stub for its PyTreeDef, which mypy then sees as an unresolved type without a `==`.
        return not masked(node) and jax.tree.structure(node, is_leaf=masked) == params_def  # type: ignore[operator]

    def place(node):
        if masked(node):
            return node
        if like_params(node):
            leaves = jax.tree.leaves(node, is_leaf=masked)
            placed = [
                leaf if masked(leaf) else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
                for leaf, sharding in zip(leaves, shardings)
            ]
            return jax.tree.unflatten(params_def, placed)
        return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=replicated)

    state = jax.eval_shape(tx.init, abstract_params)
    return jax.tree.map(place, state, is_leaf=lambda node: masked(node) or like_params(node))
