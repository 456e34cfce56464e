"""The objective: what one distill step minimises, decided once.

`Objective.build(distill, teacher=..., student=..., total_steps=...)` reads the distill config exactly once: it checks
the terms against the registry (terms.py), decides how each reads the teacher's signal (a live teacher's full logits,
or a cache's top-k or sampled rows standing in for forward KL), fixes the shared vocabulary and the soft-caps, and
says what the step must ask the teacher for (`needs_teacher`, `collects_layers`). The step then calls `loss`; the
eval step calls `eval_sums` of `Objective.measurement(...)`. An on-policy run builds a second Objective from the
on-policy terms (`on_policy=True`); nothing else re-reads the config.

loss = Σᵢ wᵢ(step)·termᵢ (+ an MoE student's router terms), every term divided by the *global* valid-token count, so
the mean is exact across hosts and microbatches. Metrics are (sum, count) pairs, so logged means stay exact when
summed across steps or processes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from analogjax.config import DistillConfig, LossTerm
from analogjax.errors import UserError
from analogjax.mesh import BATCH_AXES
from analogjax.models import moe as moe_lib
from analogjax.objective import terms as registry
from analogjax.objective.fused import fused_distill_loss, plain_distill_loss
from analogjax.objective.hidden import hidden_loss
from analogjax.objective.signal import TeacherSignal


class StudentOutputs(NamedTuple):
    """What the student's forward hands the objective (tokens flattened)."""

    hidden_nd: jax.Array  # final normed hidden states
    head_dv: jax.Array  # LM head
    layers: Any = None  # per-layer residual streams [l, b, s, d] for hidden-state terms
    router: Any = None  # an MoE student's RouterStats (models/moe.py), stacked over its MoE layers


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """Same tokenizer, padded differently (e.g. 152064 vs 151936) is fine: the shared real range is used.
    Anything else means different tokenizers, which token-level distillation cannot bridge."""
    small, large = sorted((student_vocab, teacher_vocab))
    if small != large and (large % 64 != 0 or large - small >= 1024):
        raise UserError(
            f"model.vocab_size ({student_vocab}) and teacher.model.vocab_size ({teacher_vocab}) differ "
            "by more than padding: teacher and student must share a tokenizer"
        )


def scheduled(start: float, end: float | None, kind: str, step: jax.Array, total_steps: int) -> jax.Array:
    """Value at `step` moving from `start` (step 0) to `end` (step total_steps); driven by the checkpointed step."""
    if end is None or kind == "constant":
        return jnp.float32(start)
    frac = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    if kind == "cosine":
        frac = 0.5 * (1.0 - jnp.cos(math.pi * frac))
    return jnp.float32(start) + (end - start) * frac


def global_chunk(per_shard: int) -> int:
    """`distill.chunk_size` counts tokens per batch shard; the fused loss chunks the global token axis, whose chunks
    split over the data and fsdp axes. Scaling by their size keeps each device's [chunk, vocab] block the same on
    a laptop and on a pod (the mesh in context is the one the step is traced under)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_shard
    return per_shard * math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


class _Divergence(NamedTuple):
    position: int  # among the config's terms (names the metric term_{position}_{kind})
    kind: str  # the config's kind
    loss_kind: str  # what the fused loss computes: the kind itself, or its sparse stand-in for a cached teacher
    params: tuple[tuple[str, float], ...]
    t2: bool


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective, resolved: its terms, how it reads the teacher, and the loss and eval sums it computes."""

    terms: tuple[LossTerm, ...]
    signal: str | None  # the teacher signal kind it reads ("hidden", "logits", "topk", "sampled"); None = no teacher
    temperature: float
    final_temperature: float | None
    temperature_schedule: str
    layer_map: tuple[tuple[int, int], ...]
    fused: bool
    chunk_size: int
    total_steps: int
    vocab_size: int | None  # the vocabulary both models really share (padding excluded); None without a teacher
    student_softcap: float
    router: Any = None  # the student's MoEConfig when its router terms join the loss
    divergences: tuple[_Divergence, ...] = ()

    @classmethod
    def build(
        cls,
        distill: DistillConfig,
        *,
        teacher: Any,
        student: Any,
        total_steps: int,
        on_policy: bool = False,
    ) -> Objective:
        """The run's objective from its distill section (`on_policy`: the on-policy terms), for `teacher` (a
        teacher.Teacher or None) and the `student` ModelConfig. Every refusal names its config key."""
        registry.check_distill(distill)
        terms = distill.on_policy.terms if on_policy else distill.terms
        where = "distill.on_policy.terms" if on_policy else "distill.terms"
        signal = teacher.signal_kind if teacher is not None else None
        if registry.any_needs_teacher(terms) and teacher is None:
            raise UserError(f"{where}: the divergence and hidden-state terms need a teacher")
        if signal in registry.SPARSE_SIGNALS:
            registry.check_sparse(terms, where)
        vocab_size = None
        if teacher is not None:
            if teacher.vocab_size is not None:
                check_vocab(student.vocab_size, teacher.vocab_size)
            vocab_size = min(student.vocab_size, teacher.vocab_size or student.vocab_size)
        divergences = []
        for i, term in enumerate(terms):
            found = registry.TERMS[term.kind]
            if found.family != registry.DIVERGENCE:
                continue
            loss_kind, params = term.kind, found.parameters(term, f"{where}[{i}]")
            if signal in registry.SPARSE_SIGNALS:  # the cache's estimate of forward KL stands in
                loss_kind, params = registry.sparse_kind(signal, distill.topk_treatment), ()
            divergences.append(_Divergence(i, term.kind, loss_kind, params, registry.t2_scaled(term)))
        return cls(
            terms=tuple(terms),
            signal=signal,
            temperature=distill.temperature,
            final_temperature=distill.final_temperature,
            temperature_schedule=distill.temperature_schedule,
            layer_map=tuple(distill.layer_map),
            fused=distill.fused,
            chunk_size=distill.chunk_size,
            total_steps=total_steps,
            vocab_size=vocab_size,
            student_softcap=student.final_softcap,
            router=student.moe if student.moe.enabled else None,
            divergences=tuple(divergences),
        )

    @classmethod
    def measurement(cls, *, teacher: Any, student: Any, chunk_size: int) -> Objective:
        """What held-out evaluation sums: forward KL at T=1 without T² (a measurement, not a training signal) against
        a live teacher, or CE alone without one. Router terms are training terms and stay out."""
        kind = "forward_kl" if teacher is not None else "ce"
        distill = DistillConfig(terms=(LossTerm(kind, 1.0, t2_scale=False),), temperature=1.0, chunk_size=chunk_size)
        measured = cls.build(distill, teacher=teacher, student=student, total_steps=1)
        return dataclasses.replace(measured, router=None)

    # ---- what the step asks of the teacher and of the state ----

    @property
    def needs_teacher(self) -> bool:
        return self.signal is not None

    @property
    def collects_layers(self) -> bool:
        """Whether the step collects per-layer residual streams (hidden-state terms, trained projections)."""
        return any(registry.TERMS[t.kind].family == registry.HIDDEN for t in self.terms)

    @property
    def kd_terms(self) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
        """The divergences as the fused loss takes them: (kind it computes, params)."""
        return tuple((d.loss_kind, d.params) for d in self.divergences)

    # ---- the loss ----

    def loss(
        self,
        step: jax.Array,
        student: StudentOutputs,
        teacher: TeacherSignal | None,
        batch: dict[str, jax.Array],
        valid_count: jax.Array,
        hidden_proj: Any = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(normalised loss, metric sums). `valid_count` is the global Σ loss_mask of the whole (all-microbatch)
        batch; `teacher` is this (micro)batch's signal (None without a teacher)."""
        temperature = scheduled(
            self.temperature, self.final_temperature, self.temperature_schedule, step, self.total_steps
        )
        weights = [scheduled(t.weight, t.final_weight, t.schedule, step, self.total_steps) for t in self.terms]
        ce_weight = sum(
            (w for t, w in zip(self.terms, weights) if registry.TERMS[t.kind].family == registry.LABELS),
            jnp.float32(0.0),
        )
        kd_weights = [weights[d.position] * (temperature**2 if d.t2 else 1.0) for d in self.divergences]
        loss_fn = fused_distill_loss if self.fused else plain_distill_loss
        sums = loss_fn(
            student.hidden_nd,
            student.head_dv,
            teacher,
            batch["targets"].reshape(-1),
            batch["loss_mask"].reshape(-1).astype(jnp.float32),
            kd_terms=self.kd_terms,
            kd_weights=jnp.stack(kd_weights) if kd_weights else jnp.zeros((0,), jnp.float32),
            ce_weight=ce_weight,
            temperature=temperature,
            vocab_size=self.vocab_size,
            chunk_size=global_chunk(self.chunk_size),
            student_softcap=self.student_softcap,  # Gemma 2's logits exist only capped
        )
        loss = sums["loss"] / valid_count
        metrics: dict[str, jax.Array] = {k: sums[k] for k in ("ce", "teacher_ce", "kl", "agreement") if k in sums}
        for j, d in enumerate(self.divergences):
            metrics[f"term_{d.position}_{d.kind}"] = sums["kd_terms"][j]
        for i, term in enumerate(self.terms):
            measure = registry.TERMS[term.kind].hidden_measure
            if measure is None:
                continue
            # hidden_loss returns Σ over valid tokens of the per-token loss (averaged over layer pairs) and Σ
            # weights; dividing by the global valid count keeps it exact across microbatches and hosts.
            assert teacher is not None
            h_sum, _ = hidden_loss(
                hidden_proj, student.layers, teacher.layers, batch["loss_mask"], self.layer_map, measure
            )
            loss = loss + weights[i] * h_sum / valid_count
            metrics[f"term_{i}_{term.kind}"] = h_sum
        tokens = batch["loss_mask"].astype(jnp.float32).sum()
        if self.router is not None and student.router is not None:
            extra, router_metrics = router_terms(self.router, student.router, tokens, valid_count)
            loss = loss + extra
            metrics.update(router_metrics)
        metrics["loss"] = loss * valid_count
        # Every metric is a sum over valid tokens: weigh by this (micro)batch's own count, so the sums over the
        # microbatches of an accumulated step add up to temperature × the global count, like the other metrics.
        metrics["temperature"] = temperature * tokens
        return loss, metrics

    def eval_sums(
        self, student: StudentOutputs, teacher: TeacherSignal | None, batch: dict[str, jax.Array]
    ) -> dict[str, jax.Array]:
        """Metric sums of one held-out batch plus its `count` (the step is 0: nothing is scheduled)."""
        valid_count = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        _, sums = self.loss(jnp.int32(0), student, teacher, batch, valid_count)
        return dict(sums, count=valid_count)


def router_terms(moe, stats, tokens: jax.Array, valid_count: jax.Array):
    """An MoE student's router terms: (loss to add, metric sums).

    loss: aux_loss_weight · (Switch/GShard load balancing E·Σᵢ fᵢ·Pᵢ) + z_loss_weight · (router z-loss), each the
    mean over this (micro)batch's real tokens and over the MoE layers, weighed by this microbatch's share of the
    step's valid tokens (so accumulated microbatches add up to the full-batch mean, as the other terms do).
    Metrics (sums weighed by the microbatch's token count, like `temperature`): moe_balance, moe_z, and the expert
    load: moe_load_max / moe_load_min (the most and least loaded expert's share × E; 1 = balanced) and
    moe_load_entropy (entropy of the load / log E; 1 = uniform)."""
    balance, z = moe_lib.load_balancing_loss(stats), moe_lib.z_loss(stats)
    extra = tokens / valid_count * (moe.aux_loss_weight * balance + moe.z_loss_weight * z)
    metrics = {"moe_balance": balance, "moe_z": z, **moe_lib.load_metrics(stats)}
    return extra, {name: jax.lax.stop_gradient(value) * tokens for name, value in metrics.items()}
