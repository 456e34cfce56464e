"""The distillation objective: config terms → weighted, scheduled, masked sums over the fused (or plain) loss.

loss = Σᵢ wᵢ(step)·termᵢ, every term (logit and hidden-state alike) divided by the *global* valid-token count (so the
mean is exact across hosts and microbatches). Everything is returned as (sum, count) pairs too,
so logged means stay exact when summed across steps or processes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from analogjax.config import DistillConfig, LossTerm
from analogjax.errors import UserError, check_choice
from analogjax.mesh import BATCH_AXES
from analogjax.models import moe as moe_lib
from analogjax.objective.divergences import DIVERGENCES
from analogjax.objective.fused import TeacherHead, fused_distill_loss, plain_distill_loss
from analogjax.objective.hidden import hidden_loss
from analogjax.objective.sparse import SampledTeacher, TopKTeacher

HIDDEN_KINDS = {"hidden_mse": "mse", "hidden_cosine": "cosine"}
SCHEDULES = ("constant", "linear", "cosine")
T2_BY_DEFAULT = ("forward_kl", "soft_ce")  # the Hinton family: gradient ∝ 1/T² without the factor


def check_distill(cfg: DistillConfig) -> None:
    """Names the offending key; called when the run is built (the loss registry lives here, not in config)."""
    _check_terms(cfg.terms, "distill.terms", cfg.layer_map)
    _check_terms(cfg.on_policy.terms, "distill.on_policy.terms", cfg.layer_map)
    if cfg.temperature <= 0 or (cfg.final_temperature is not None and cfg.final_temperature <= 0):
        raise UserError("distill.temperature must be positive")
    check_choice("distill.temperature_schedule", cfg.temperature_schedule, SCHEDULES)
    if cfg.chunk_size <= 0:
        raise UserError("distill.chunk_size must be positive")


def _check_terms(terms, where: str, layer_map) -> None:
    known = set(DIVERGENCES) | {"ce"} | set(HIDDEN_KINDS)
    if not terms:
        raise UserError(f"{where}: at least one loss term is needed")
    for i, term in enumerate(terms):
        key = f"{where}[{i}]"
        if term.kind not in known:
            raise UserError(f"{key}.kind: unknown loss term {term.kind!r} (known: {', '.join(sorted(known))})")
        check_choice(f"{key}.schedule", term.schedule, SCHEDULES)
        if term.kind in HIDDEN_KINDS and not layer_map:
            raise UserError(f"{key}: {term.kind} needs distill.layer_map (student layer, teacher layer) pairs")
        if term.kind == "jsd" and not 0.0 <= term.beta <= 1.0:
            raise UserError(f"{key}.beta must lie in [0, 1], got {term.beta}")
        if term.kind.startswith("skew") and not 0.0 <= term.alpha < 1.0:
            raise UserError(f"{key}.alpha must lie in [0, 1), got {term.alpha}")


def needs_teacher(cfg: DistillConfig) -> bool:
    return any(t.kind != "ce" for t in cfg.terms) or cfg.on_policy.enabled


def needs_layers(cfg: DistillConfig) -> bool:
    """Whether a step of this objective collects per-layer residual streams (and the run trains projections); the
    on-policy terms count too, since their steps share the state."""
    terms = cfg.terms + (cfg.on_policy.terms if cfg.on_policy.enabled else ())
    return any(t.kind in HIDDEN_KINDS for t in terms)


def scheduled(start: float, end: float | None, kind: str, step: jax.Array, total_steps: int) -> jax.Array:
    """Value at `step` moving from `start` (step 0) to `end` (step total_steps); driven by the checkpointed step."""
    if end is None or kind == "constant":
        return jnp.float32(start)
    frac = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    if kind == "cosine":
        frac = 0.5 * (1.0 - jnp.cos(math.pi * frac))
    return jnp.float32(start) + (end - start) * frac


def _t2(term: LossTerm) -> bool:
    return term.kind in T2_BY_DEFAULT if term.t2_scale is None else term.t2_scale


def _params(term: LossTerm) -> tuple:
    if term.kind == "jsd":
        return (("beta", term.beta),)
    if term.kind.startswith("skew"):
        return (("alpha", term.alpha),)
    return ()


def _kd_kind(cfg: DistillConfig, kind: str, teacher) -> str:
    """A sparse (cached) teacher stands in for forward KL (teacher_cache.check_run refuses other divergences): it
    becomes the configured top-k treatment, or the unbiased sampled estimate (same gradient as forward KL)."""
    if isinstance(teacher, TopKTeacher):
        return f"topk_{cfg.topk_treatment}"
    if isinstance(teacher, SampledTeacher):
        return "sampled_kd"
    return kind


def global_chunk(per_shard: int) -> int:
    """`distill.chunk_size` counts tokens per batch shard; the fused loss chunks the global token axis, whose chunks
    split over the data and fsdp axes. Scaling by their size keeps each device's [chunk, vocab] block the same on
    a laptop and on a pod (the mesh in context is the one the step is traced under)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_shard
    return per_shard * math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


class Outputs(NamedTuple):
    """What the student (or teacher) forward hands the objective."""

    hidden_nd: jax.Array  # final normed hidden states, tokens flattened
    head_dv: jax.Array | None  # LM head; None when the teacher is a logits-only function
    logits_nv: jax.Array | None  # a bring-your-own teacher's logits
    layers: Any = None  # per-layer residual streams [l, b, s, d] for hidden-state terms
    router: Any = None  # an MoE student's RouterStats (models/moe.py), stacked over its MoE layers


def router_terms(moe, stats, batch: dict[str, jax.Array], valid_count: jax.Array):
    """An MoE student's router terms: (loss to add, metric sums).

    loss: aux_loss_weight · (Switch/GShard load balancing E·Σᵢ fᵢ·Pᵢ) + z_loss_weight · (router z-loss), each the
    mean over this (micro)batch's real tokens and over the MoE layers, weighed by this microbatch's share of the
    step's valid tokens (so accumulated microbatches add up to the full-batch mean, as the other terms do).
    Metrics (sums weighed by the microbatch's token count, like `temperature`): moe_balance, moe_z, and the expert
    load: moe_load_max / moe_load_min (the most and least loaded expert's share × E; 1 = balanced) and
    moe_load_entropy (entropy of the load / log E; 1 = uniform)."""
    tokens = batch["loss_mask"].astype(jnp.float32).sum()
    balance, z = moe_lib.load_balancing_loss(stats), moe_lib.z_loss(stats)
    extra = tokens / valid_count * (moe.aux_loss_weight * balance + moe.z_loss_weight * z)
    metrics = {"moe_balance": balance, "moe_z": z, **moe_lib.load_metrics(stats)}
    return extra, {name: jax.lax.stop_gradient(value) * tokens for name, value in metrics.items()}


def objective(
    cfg: DistillConfig,
    total_steps: int,
    step: jax.Array,
    student: Outputs,
    teacher: Outputs | None,
    batch: dict[str, jax.Array],
    valid_count: jax.Array,
    vocab_size: int | None,
    hidden_proj: Any = None,
    softcaps: tuple[float, float] = (0.0, 0.0),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(normalised loss, metric sums). `valid_count` is the global Σ loss_mask of the whole (all-microbatch) batch."""
    temperature = scheduled(cfg.temperature, cfg.final_temperature, cfg.temperature_schedule, step, total_steps)
    weights = [scheduled(t.weight, t.final_weight, t.schedule, step, total_steps) for t in cfg.terms]
    kd = [i for i, t in enumerate(cfg.terms) if t.kind in DIVERGENCES]
    ce_weight = sum((w for t, w in zip(cfg.terms, weights) if t.kind == "ce"), jnp.float32(0.0))
    kd_weights = [weights[i] * (temperature**2 if _t2(cfg.terms[i]) else 1.0) for i in kd]

    if teacher is None:  # pretraining or a CE-only baseline: the same loss, teacher-free
        teacher_arg = None
    elif isinstance(teacher, (TopKTeacher, SampledTeacher)):  # a cached teacher (teacher_cache.py)
        teacher_arg = teacher
    elif teacher.head_dv is not None:  # teacher outputs arrive constant (teacher.forward stops their gradient)
        teacher_arg = TeacherHead(teacher.hidden_nd, teacher.head_dv)
    else:
        teacher_arg = teacher.logits_nv
    loss_fn = fused_distill_loss if cfg.fused else plain_distill_loss
    sums = loss_fn(
        student.hidden_nd,
        student.head_dv,
        teacher_arg,
        batch["targets"].reshape(-1),
        batch["loss_mask"].reshape(-1).astype(jnp.float32),
        kd_terms=tuple((_kd_kind(cfg, cfg.terms[i].kind, teacher_arg), _params(cfg.terms[i])) for i in kd),
        kd_weights=jnp.stack(kd_weights) if kd else jnp.zeros((0,), jnp.float32),
        ce_weight=ce_weight,
        temperature=temperature,
        vocab_size=vocab_size,
        chunk_size=global_chunk(cfg.chunk_size),
        softcaps=softcaps,  # (student, teacher) final logit soft-caps: Gemma 2's logits exist only capped
    )
    loss = sums["loss"] / valid_count
    metrics = {name: sums[name] for name in ("ce", "teacher_ce", "kl", "agreement") if name in sums}
    for j, i in enumerate(kd):
        metrics[f"term_{i}_{cfg.terms[i].kind}"] = sums["kd_terms"][j]

    for i, term in enumerate(cfg.terms):
        if term.kind not in HIDDEN_KINDS:
            continue
        # hidden_loss returns Σ over valid tokens of the per-token loss (averaged over layer pairs) and Σ weights;
        # dividing by the global valid count keeps it exact across microbatches and hosts, like the logit terms.
        h_sum, _ = hidden_loss(
            hidden_proj, student.layers, teacher.layers, batch["loss_mask"], cfg.layer_map, HIDDEN_KINDS[term.kind]
        )
        loss = loss + weights[i] * h_sum / valid_count
        metrics[f"term_{i}_{term.kind}"] = h_sum
    metrics["loss"] = loss * valid_count
    # Every metric is a sum over valid tokens: weigh by this (micro)batch's own count, so the sums over the
    # microbatches of an accumulated step add up to temperature × the global count, like the other metrics.
    metrics["temperature"] = temperature * batch["loss_mask"].astype(jnp.float32).sum()
    return loss, metrics
