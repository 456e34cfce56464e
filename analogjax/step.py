"""The distill step and the eval step: pure functions, jitted once by the loop with explicit shardings.

distill_step(state, teacher_params, batch) -> (state, metrics). The teacher's forward runs inside the same jitted
step (on the same sharded batch, its own sharding rules) and outside autodiff; it is an input, never optimised,
never part of the state and so never checkpointed with the student.

Metrics come back as sums over valid tokens plus `count` (and a few per-step scalars), so the loop can average
exactly over steps and hosts. The eval-rows step returns the same sums per row (for intervals over held-out documents),
for several students against one teacher forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from analogjax.objective import Objective, StudentOutputs
from analogjax.runtime import compute_dtype
from analogjax.teacher import Teacher, signal_of_rows
from analogjax.teacher import forward as teacher_forward


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar; drives the LR and loss-weight schedules, so resuming resumes them too
    params: Any  # {"model": student params, "hidden_proj": projections for hidden-state terms (if any)}
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key data: checkpointable as a plain array


def forward_outputs(student, student_rules, teacher: Teacher | None, params, teacher_params, batch, collect_layers):
    """The student's outputs (differentiable, tokens flattened) and the teacher's signal (constant: teacher.forward
    stops its gradient) for one (micro)batch."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    with nn.logical_axis_rules(list(student_rules)):
        # The objective applies the student's final soft-cap to the logits it builds (Objective.student_softcap).
        feats = student.features(params["model"], tokens, seg, pos, collect_layers, applies_final_softcap=True)
        # The loss's head products run in the hidden states' dtype: the compute dtype, as the model's own logits
        # (features are float32; bf16 products with float32 sums run 1.5-2x float32's rate on AVX512-BF16 CPUs)
        hidden_bsd = feats.hidden_bsd.astype(compute_dtype.of(student.cfg.dtype))
        hidden_nd = hidden_bsd.reshape(-1, hidden_bsd.shape[-1])
        s_out = StudentOutputs(hidden_nd, student.head(params["model"]), feats.layers_lbsd, feats.router)
    if teacher is None:
        return s_out, None
    return s_out, teacher_forward(teacher, teacher_params, batch, collect_layers)


def make_distill_step(
    student,
    student_rules,
    teacher: Teacher | None,
    tx: optax.GradientTransformation,
    objective: Objective,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
) -> Callable:
    """Build the pure step minimising `objective` (Objective.build). `teacher=None` gives the same step with a
    CE-only objective (pretraining, baselines).

    Metrics carry `nonfinite` (1.0 when this step's loss or gradient norm is inf/NaN). With `skip_nonfinite` such a
    step keeps the previous params and optimizer state (selected inside the step, so no host round trip) and only
    the step counter moves on; otherwise the update is applied and the loop halts on the flag before saving.
    """
    collect = objective.collects_layers

    def loss_fn(params, teacher_params, batch, step, valid_count):
        s_out, signal = forward_outputs(student, student_rules, teacher, params, teacher_params, batch, collect)
        return objective.loss(step, s_out, signal, batch, valid_count, params.get("hidden_proj"))

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def distill_step(state: TrainState, teacher_params, batch: dict[str, jax.Array]):
        # The global valid-token count of the whole step: every microbatch divides by it, so accumulated
        # gradients equal the full-batch gradient exactly.
        valid_count = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        if grad_accum == 1:
            grads, sums = grad_fn(state.params, teacher_params, batch, state.step, valid_count)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry, mb):
                g, s = grad_fn(state.params, teacher_params, mb, state.step, valid_count)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(
                    grad_fn, state.params, teacher_params, jax.tree.map(lambda x: x[0], micro), state.step, valid_count
                ),
            )
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # Every metric, not just the loss: the divergences give NaN teacher probabilities zero mass (finite loss),
        # so a teacher gone NaN shows only in its own metrics (teacher_ce).
        metrics_finite = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(sums)]
        finite = jnp.isfinite(grad_norm) & jnp.all(jnp.stack(metrics_finite))
        if skip_nonfinite:
            keep_if_bad = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep_if_bad, params, state.params)
            opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
        metrics = dict(sums, count=valid_count, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return distill_step


def make_eval_step(student, student_rules, teacher: Teacher | None, objective: Objective) -> Callable:
    """Held-out metrics (sums + count) of `objective` (Objective.measurement: at T=1, KL(teacher‖student), ce,
    teacher_ce, agreement): (params, teacher_params, teacher_rows, batch) -> sums. `teacher_rows`: the batch's
    teacher.forward_rows, computed by a program of its own (HeldoutEval) so a caller measuring the same batch again
    keeps them; None runs the teacher's whole forward here (a teacher that does not keep rows)."""

    def eval_step(params, teacher_params, teacher_rows, batch):
        inline = teacher if teacher_rows is None else None  # no rows kept: the teacher's whole forward runs here
        s_out, signal = forward_outputs(student, student_rules, inline, {"model": params}, teacher_params, batch, False)
        if inline is None and teacher is not None:
            signal = signal_of_rows(teacher, teacher_params, teacher_rows)
        return objective.eval_sums(s_out, signal, batch)

    return eval_step


@dataclass(frozen=True)
class HeldoutEval:
    """The eval step as two jitted programs: the teacher's rows of a batch (its trunk, the costly part), and the
    student's sums against them. Called like one step, (params, teacher_params, batch) -> sums; `rows` alone gives
    what a caller measuring the same batch at many points keeps (fidelity curves) for `sums`."""

    teacher_rows: Callable | None  # (teacher_params, batch) -> rows; None: no teacher, or one that keeps no rows
    sums: Callable  # (params, teacher_params, rows, batch) -> sums (make_eval_step)

    def rows(self, teacher_params, batch):
        return None if self.teacher_rows is None else self.teacher_rows(teacher_params, batch)

    def __call__(self, params, teacher_params, batch):
        return self.sums(params, teacher_params, self.rows(teacher_params, batch), batch)


def make_eval_rows_step(student, student_rules, teacher: Teacher | None, objective: Objective) -> Callable:
    """Per-row held-out sums of several students against one teacher forward:
    (tuple of student params, teacher_params, batch) -> a tuple (one per student, in order) of {key: [rows]}.

    Each row's sums are `objective.eval_sums` over that row's tokens alone (the eval step's sums split over the
    batch's rows; `count` is the row's valid tokens, 0 for an empty row), so Σ over the rows is the eval step's
    batch total. The teacher runs once per batch whatever the number of students; a jit of this step compiles once
    per number of students. Build `objective` with `Objective.measurement(chunk_size=rows_chunk_size(...))`."""

    def eval_rows(students, teacher_params, batch):
        signal = None if teacher is None else teacher_forward(teacher, teacher_params, batch, False)
        out = []
        for params in students:
            s_out, _ = forward_outputs(student, student_rules, None, {"model": params}, None, batch, False)
            out.append(per_row_sums(objective, s_out, signal, batch))
        return tuple(out)

    return eval_rows


def rows_chunk_size(chunk_size: int, global_batch: int) -> int:
    """The measurement objective's chunk size for per-row sums: the rows are measured side by side (vmapped), each
    in chunks, so a chunk of every row together holds about as many tokens per batch shard as `chunk_size` does in
    the batched loss (the [tokens, vocab] logits of a chunk stay the same size)."""
    return max(1, chunk_size // max(global_batch, 1))


def per_row_sums(objective: Objective, s_out: StudentOutputs, signal, batch: dict[str, jax.Array]) -> dict:
    """`objective.eval_sums` of each row of the batch (vmapped over rows): {key: [rows]}, `count` the row's valid
    tokens. Only live teacher signals (hidden states or logits, [rows, seq, ...]) and no teacher are split here."""
    rows, seq = batch["tokens"].shape[:2]
    hidden = s_out.hidden_nd.reshape(rows, seq, -1)
    if signal is not None and not signal.is_live:
        raise ValueError("per-row sums need a live teacher's signal (a cache's rows are not split by row)")

    def one_row(hidden_sd, teacher_rows, batch_row):
        row_signal = None if signal is None else signal.replace(rows=teacher_rows, layers=None)
        sums = objective.eval_sums(StudentOutputs(hidden_sd, s_out.head_dv), row_signal, batch_row)
        return dict(sums, count=batch_row["loss_mask"].astype(jnp.float32).sum())

    labels = {key: batch[key] for key in ("targets", "loss_mask")}  # what the measurement reads of a batch
    return jax.vmap(one_row)(hidden, None if signal is None else signal.rows, labels)
