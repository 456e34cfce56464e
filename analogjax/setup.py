"""The builder: from a config to a mesh, a student, a teacher, its objective, a born-sharded state and the jitted steps.

`build(config)` returns a `Run`; it is the one builder: training, evaluation and compile-check (`abstract=True`:
nothing read or allocated, the teacher's params as sharded shapes) all go through it, so what compile-check compiles
is the program a run executes. The objective is built here once (`Objective.build`) and handed to the steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from analogjax import mesh as mesh_lib
from analogjax import on_policy
from analogjax.config import Config
from analogjax.data import heldout_batches
from analogjax.errors import UserError
from analogjax.fidelity import intervals
from analogjax.models.transformer import Transformer
from analogjax.objective import Objective, check_distill, needs_teacher
from analogjax.objective.hidden import init_projections, projection_logical_axes
from analogjax.objective.optimizer import make_optimizer, state_shardings
from analogjax.runtime.batch_sums import rows_over_batches, sum_over_batches
from analogjax.runtime.metrics_log import means
from analogjax.step import (
    HeldoutEval,
    TrainState,
    make_distill_step,
    make_eval_rows_step,
    make_eval_step,
    rows_chunk_size,
)
from analogjax.teacher import Teacher, forward_rows, keeps_rows, load_teacher, runs_live


@dataclass(frozen=True, kw_only=True)
class Run:
    """Everything built for one run; the pieces a library user may also assemble by hand."""

    config: Config
    mesh: Any
    student: Transformer
    teacher: Teacher | None
    teacher_params: Any  # sharded arrays (or ShapeDtypeStructs when built abstract)
    objective: Objective  # what step_fn minimises
    state: TrainState | None  # None when built with init=False: restore_or_init makes or restores it
    step_fn: Any  # jitted distill step
    eval_fn: HeldoutEval  # the eval step (its teacher rows and the student's sums, each jitted)
    batch_sharding: Any
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the init and the restore target
    tx: Any  # the optimizer
    on_policy_objective: Objective | None = None  # distill.on_policy's terms, on the student's own samples
    on_policy_step_fn: Any = None  # jitted distill step minimising on_policy_objective (on_policy.py feeds it)
    # What evaluation measures against: the run's teacher when it is live, else the `eval_teacher` given to build
    # (held-out batches are not cached, so a cached run needs one for KL and agreement); None: held-out CE only.
    eval_teacher: Teacher | None = None
    eval_teacher_params: Any = None
    eval_rows_fn: Any = None  # jitted eval-rows step (step.make_eval_rows_step): per-row sums of several students

    @property
    def state_shardings(self) -> Any:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

    def fresh_state(self) -> TrainState:
        """A freshly initialised state, born sharded (what a run starts from without a checkpoint)."""
        with jax.set_mesh(self.mesh):
            return init_state(self.config, self.mesh, self.student, self.tx, self.state_shardings)

    def student_model(self, state: TrainState):
        """The student of `state` as a callable `Model` (what `analogjax.hf.save` writes)."""
        from analogjax.data.tokenize import resolve_tokenizer
        from analogjax.models.model import Model

        tokenizer = resolve_tokenizer(self.config.data)  # a run on prepared shards: the shards' own tokenizer
        return Model(
            self.config.model,
            state.params["model"],
            mesh=self.mesh,
            rules=mesh_lib.STUDENT_RULES,
            tokenizer=None if tokenizer == "none" else tokenizer,
        )


def build_mesh(config: Config, devices=None):
    """The config's mesh over `devices` (default: all of them; compile-check passes a TPU topology's)."""
    mesh = mesh_lib.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices, context=config.mesh.context
    )
    check_mesh(config, mesh)
    return mesh


def check_mesh(config: Config, mesh) -> None:
    """The run's shapes against the mesh: the batch over data x fsdp, the sequence over context, each model's experts
    over fsdp."""
    mesh_lib.check_batch(config.data.global_batch, mesh, config.optim.grad_accum)
    mesh_lib.check_context(config.data.seq_len, mesh)
    mesh_lib.check_experts(config.model.moe.experts, mesh, "model.moe.experts")
    mesh_lib.check_experts(config.teacher.model.moe.experts, mesh, "teacher.model.moe.experts")
    for key, model in (("model", config.model), ("teacher.model", config.teacher.model)):
        chunked = "chunked" in model.layer_kinds
        mesh_lib.check_chunks(
            config.data.seq_len, mesh, model.attention_chunk if chunked else 0, f"{key}.attention_chunk"
        )


def _init_student_boxed(config: Config, student: Transformer, with_proj: bool):
    """Boxed (logically named) student params: the model plus, for hidden-state terms, the projections."""
    layer_map = config.distill.layer_map

    def init(rng):
        model_rng, proj_rng = jax.random.split(rng)
        params = {"model": student.init_boxed(model_rng)}
        if with_proj:
            proj = init_projections(layer_map, config.model.d_model, config.teacher.model.d_model, proj_rng)
            params["hidden_proj"] = jax.tree.map(
                lambda value, names: nn.LogicallyPartitioned(value, tuple(names)),
                proj,
                projection_logical_axes(layer_map),
                is_leaf=lambda x: isinstance(x, P),
            )
        return params

    return init


def logical_specs(config: Config, student: Transformer, with_proj: bool):
    """The state's params as a tree of logical PartitionSpecs (what Muon reads to choose its matrices)."""
    boxed = jax.eval_shape(_init_student_boxed(config, student, with_proj), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def abstract_state(config: Config, mesh, student: Transformer, tx, with_proj: bool) -> tuple[TrainState, Any]:
    """The sharded abstract train state: the init target and the restore target alike."""
    init_boxed = _init_student_boxed(config, student, with_proj)
    abstract_params = mesh_lib.abstract_sharded(init_boxed, mesh, mesh_lib.STUDENT_RULES)
    # Optimizer moments are shaped like the params and take the params' shardings; counters are replicated.
    rep = mesh_lib.replicated(mesh)
    abstract_opt = state_shardings(tx, abstract_params, rep)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    )
    return state, jax.tree.map(lambda a: a.sharding, state)


def init_state(config: Config, mesh, student: Transformer, tx, shardings) -> TrainState:
    """A fresh state, born sharded: each device computes only its own shards (`shardings` says whether it holds
    hidden-state projections)."""
    init_boxed = _init_student_boxed(config, student, "hidden_proj" in shardings.params)

    def init(seed):
        rng = jax.random.key(seed)
        params = nn.unbox(init_boxed(jax.random.fold_in(rng, 0)))
        return TrainState(
            step=jnp.int32(0),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
        )

    return jax.jit(init, out_shardings=shardings)(config.train.seed)


def build(
    config: Config,
    teacher: Teacher | None = None,
    teacher_params: Any = None,
    mesh=None,
    init: bool = True,
    abstract: bool = False,
    eval_teacher: tuple[Teacher, Any] | None = None,
) -> Run:
    """Build a run. Pass `teacher` + `teacher_params` to bring your own teacher (else the config's is loaded),
    and `mesh` to use your own (else one is made from the config over all devices). With init=False no state is
    materialised (a resume then never holds a fresh state beside the restored one). abstract=True builds the same
    run from shapes alone (compile-check): the config's teacher is not read, no state is made.

    `eval_teacher=(Teacher, params)`: a live teacher that evaluation (held-out metrics, the fidelity curve,
    `evaluate_rows`) measures against instead of the run's own: how a run distilled from a teacher cache, or a
    CE-only baseline, reports KL and agreement. Without it, evaluation uses the run's teacher when live and measures
    held-out CE only otherwise."""
    check_distill(config.distill)
    if mesh is None:
        mesh = build_mesh(config)
    else:
        check_mesh(config, mesh)
    student = Transformer(config.model)
    if teacher is None and needs_teacher(config.distill):
        teacher, teacher_params = load_teacher(config, mesh, abstract=abstract)
    objective = Objective.build(config.distill, teacher=teacher, student=config.model, total_steps=config.train.steps)
    on_policy_objective = None
    if config.distill.on_policy.enabled:  # the same step on sampled rows, minimising the on-policy terms
        on_policy.check(config, teacher)
        on_policy_objective = Objective.build(
            config.distill, teacher=teacher, student=config.model, total_steps=config.train.steps, on_policy=True
        )
    # The state holds hidden-state projections when either objective trains them (on-policy steps share the state).
    with_proj = any(o is not None and o.collects_layers for o in (objective, on_policy_objective))
    # Muon chooses its matrices by the params' logical axis names; AdamW needs none (no second trace of the init)
    specs = logical_specs(config, student, with_proj) if config.optim.name == "muon" else None
    tx = make_optimizer(config.optim, config.train.steps, specs)
    abstract_st, shardings = abstract_state(config, mesh, student, tx, with_proj)
    batch_sh = mesh_lib.batch_sharding(mesh)
    teacher_params = _on_mesh(teacher_params, mesh)
    teacher_sh = jax.tree.map(lambda a: a.sharding, teacher_params)

    def jit_step(minimised: Objective):
        # The state is donated: its buffers are reused for the next state, so a step never holds two copies of the
        # student. The teacher keeps the shardings it was loaded with (its own rules); the batch is data-sharded.
        step = make_distill_step(
            student,
            mesh_lib.STUDENT_RULES,
            teacher,
            tx,
            minimised,
            config.optim.grad_accum,
            skip_nonfinite=config.train.nonfinite == "skip",
        )
        return jax.jit(
            step,
            in_shardings=(shardings, teacher_sh, batch_sh),
            out_shardings=(shardings, mesh_lib.replicated(mesh)),
            donate_argnums=(0,),
        )

    # Held-out batches are not cached: a cached teacher's run measures the student's held-out CE only, unless it is
    # given a live eval_teacher.
    if eval_teacher is not None:
        measuring, measuring_params = eval_teacher
        if measuring is None or measuring.is_cached:
            raise UserError("eval_teacher must be a live teacher (a model or a logits function), not a teacher cache")
        measuring_params = _on_mesh(measuring_params, mesh)
    elif runs_live(teacher):
        measuring, measuring_params = teacher, teacher_params
    else:
        measuring, measuring_params = None, None
    measured = Objective.measurement(teacher=measuring, student=config.model, chunk_size=config.distill.chunk_size)
    measuring_sh = jax.tree.map(lambda a: a.sharding, measuring_params)
    # The teacher's rows ([b, s, d] hidden or [b, s, v] logits) stay split over the batch's rows, as the batch is.
    teacher_rows_fn = None
    if keeps_rows(measuring):
        teacher_rows_fn = jax.jit(
            functools.partial(forward_rows, measuring), in_shardings=(measuring_sh, batch_sh), out_shardings=batch_sh
        )
    eval_fn = HeldoutEval(
        teacher_rows_fn,
        jax.jit(
            make_eval_step(student, mesh_lib.STUDENT_RULES, measuring, measured),
            in_shardings=(
                shardings.params["model"],
                measuring_sh,
                None if teacher_rows_fn is None else batch_sh,
                batch_sh,
            ),
            out_shardings=mesh_lib.replicated(mesh),
        ),
    )
    # Per-row sums measure the rows side by side: a chunk size that keeps a chunk's logits as small as eval_fn's.
    measured_rows = Objective.measurement(
        teacher=measuring,
        student=config.model,
        chunk_size=rows_chunk_size(config.distill.chunk_size, config.data.global_batch),
    )
    # No in_shardings: the number of students varies; every input already lives on the mesh (evaluate_rows).
    eval_rows_fn = jax.jit(
        make_eval_rows_step(student, mesh_lib.STUDENT_RULES, measuring, measured_rows),
        out_shardings=mesh_lib.replicated(mesh),
    )
    run = Run(
        config=config,
        mesh=mesh,
        student=student,
        teacher=teacher,
        teacher_params=teacher_params,
        objective=objective,
        state=None,
        step_fn=jit_step(objective),
        eval_fn=eval_fn,
        batch_sharding=batch_sh,
        abstract_state=abstract_st,
        tx=tx,
        on_policy_objective=on_policy_objective,
        on_policy_step_fn=jit_step(on_policy_objective) if on_policy_objective is not None else None,
        eval_teacher=measuring,
        eval_teacher_params=measuring_params,
        eval_rows_fn=eval_rows_fn,
    )
    if init and not abstract:
        run = dataclasses.replace(run, state=run.fresh_state())
    return run


def _on_mesh(teacher_params, mesh):
    """A bring-your-own teacher's params keep the shardings they were placed with on this mesh (as do abstract
    ones); anything else (host arrays, arrays on one device) is replicated over the mesh."""
    mesh_devices = set(mesh.devices.flat)

    def place(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
            return x
        return jax.device_put(x, mesh_lib.replicated(mesh))

    return jax.tree.map(place, teacher_params)


def evaluate(run: Run, params, batches: int) -> dict[str, float]:
    """Held-out metrics at T=1 of the run's student against its evaluation teacher (`Run.eval_teacher`): means
    over the first `batches` held-out batches."""
    return heldout_metrics(run.config, run.eval_fn, params, run.eval_teacher_params, run.batch_sharding, batches)


def evaluate_rows(run: Run, params_by_name: Mapping[str, Any], batches: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-row held-out sums of several students of the run's shape, for intervals over held-out documents
    (fidelity/intervals.py): {name: {key: float64 [rows]}}, the keys those of `evaluate` plus `count` (each row's
    valid tokens): ce, and against a live evaluation teacher kl, teacher_ce, agreement, ... as sums over the row;
    and intervals.DOCUMENT, the held-out document each row comes from (the bootstrap's unit).

    The rows are those of the first `batches` held-out batches (empty padding rows dropped), concatenated in the same
    order for every student, so two students' arrays are paired row by row (`intervals.compare`). The teacher runs
    once per batch for all students; the program compiles once per number of students. For each student, Σ over its
    rows / Σ count is what `evaluate` reports."""
    if not params_by_name:
        return {}
    names = list(params_by_name)
    # Every student onto the run's student shardings (a no-op for states of this mesh): one program for them all.
    shardings = jax.tree.map(lambda a: a.sharding, run.abstract_state.params["model"])
    students = tuple(jax.device_put(params_by_name[name], shardings) for name in names)
    heldout = heldout_batches(
        run.config.data,
        seed=run.config.train.seed,
        vocab_size=run.config.model.vocab_size,
        sharding=run.batch_sharding,
        batches=batches,
        documents=True,
    )
    documents: list[np.ndarray] = []

    def batches_noting_documents():
        for batch, labels in heldout:
            documents.append(labels)
            yield batch

    with jax.set_mesh(run.mesh):
        rows = rows_over_batches(run.eval_rows_fn, batches_noting_documents(), students, run.eval_teacher_params)
    if rows is None:
        raise UserError("the held-out split is empty: raise data.heldout_fraction or add documents")
    labels = np.concatenate(documents).astype(np.float64)
    filled = rows[0]["count"] > 0  # a short held-out split pads its last batch with empty rows: not rows at all
    return {
        name: {key: value[filled] for key, value in {**per_row, intervals.DOCUMENT: labels}.items()}
        for name, per_row in zip(names, rows)
    }


def heldout_metrics(config: Config, eval_fn, params, teacher_params, batch_sharding, batches: int) -> dict[str, float]:
    """Means over `batches` batches of the held-out split (documents never trained on) of a jitted eval step."""
    heldout = heldout_batches(
        config.data,
        seed=config.train.seed,
        vocab_size=config.model.vocab_size,
        sharding=batch_sharding,
        batches=batches,
    )
    total = sum_over_batches(eval_fn, heldout, params, teacher_params)
    if not total:
        raise UserError("the held-out split is empty: raise data.heldout_fraction or add documents")
    return means(total)
