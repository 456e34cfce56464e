"""The builder: from a config to a mesh, a student, a teacher, a born-sharded state and the jitted steps.

What every command that trains, evaluates or compiles imports (train.py is the loop alone). `build(config)` returns a
`Run`; `jit_distill_step` is the one jit of the distill step, shared by training and compile-check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from analogjax import mesh as mesh_lib
from analogjax import on_policy
from analogjax.config import Config
from analogjax.data import heldout_batches
from analogjax.errors import UserError
from analogjax.models.transformer import Transformer
from analogjax.objective import check_distill, needs_layers, needs_teacher
from analogjax.objective.hidden import init_projections, projection_logical_axes
from analogjax.runtime.metrics_log import means
from analogjax.step import TrainState, make_distill_step, make_eval_step, make_optimizer
from analogjax.teacher import Teacher, load_teacher


@dataclass
class Run:
    """Everything built for one run; the pieces a library user may also assemble by hand."""

    config: Config
    mesh: Any
    student: Transformer
    teacher: Teacher | None
    teacher_params: Any
    state: TrainState | None  # None when built with init=False: restore_or_init makes or restores it
    step_fn: Any  # jitted distill step
    eval_fn: Any  # jitted eval step
    batch_sharding: Any
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the init and the restore target
    tx: Any  # the optimizer
    on_policy_step_fn: Any = None  # jitted distill step with distill.on_policy's terms (on_policy.py feeds it)

    @property
    def state_shardings(self) -> Any:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

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


def _init_student_boxed(config: Config, student: Transformer):
    """Boxed (logically named) student params: the model plus, for hidden-state terms, the projections."""
    layer_map = config.distill.layer_map
    with_proj = needs_layers(config.distill)

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


def abstract_state(config: Config, mesh, student: Transformer, tx) -> tuple[TrainState, Any]:
    """The sharded abstract train state: the init target and the restore target alike."""
    init_boxed = _init_student_boxed(config, student)
    abstract_params = mesh_lib.abstract_sharded(init_boxed, mesh, mesh_lib.STUDENT_RULES)
    # Optimizer moments are shaped like the params and take the params' shardings; counters are replicated.
    rep = mesh_lib.replicated(mesh)
    param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    abstract_opt = optax.tree_map_params(
        tx,
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, abstract_params),
        param_shardings,
        transform_non_params=lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
    )
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    )
    return state, jax.tree.map(lambda a: a.sharding, state)


def init_state(config: Config, mesh, student: Transformer, tx, shardings) -> TrainState:
    """A fresh state, born sharded: each device computes only its own shards."""
    init_boxed = _init_student_boxed(config, student)

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
    config: Config, teacher: Teacher | None = None, teacher_params: Any = None, mesh=None, init: bool = True
) -> Run:
    """Build a run. Pass `teacher` + `teacher_params` to bring your own teacher (else the config's is loaded),
    and `mesh` to use your own (else one is made from the config over all devices). With init=False no state is
    materialised (a resume then never holds a fresh state beside the restored one)."""
    check_distill(config.distill)
    if mesh is None:
        mesh = build_mesh(config)
    else:
        check_mesh(config, mesh)
    student = Transformer(config.model)
    if teacher is None and needs_teacher(config.distill):
        teacher, teacher_params = load_teacher(config, mesh)
    if teacher is not None and teacher.vocab_size is not None:
        check_vocab(config.model.vocab_size, teacher.vocab_size)
    on_policy.check(config, teacher)
    tx = make_optimizer(config.optim, config.train.steps)
    abstract, shardings = abstract_state(config, mesh, student, tx)
    batch_sh = mesh_lib.batch_sharding(mesh)
    # A bring-your-own teacher's params keep the shardings they were placed with on this mesh; anything else (host
    # arrays, arrays on one device) is replicated over the mesh.
    mesh_devices = set(mesh.devices.flat)

    def on_mesh(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
            return x
        return jax.device_put(x, mesh_lib.replicated(mesh))

    teacher_params = jax.tree.map(on_mesh, teacher_params)
    teacher_sh = jax.tree.map(lambda a: a.sharding, teacher_params)
    step_fn = jit_distill_step(config, student, teacher, tx, shardings, teacher_sh, batch_sh, mesh)
    on_policy_step_fn = None
    if config.distill.on_policy.enabled:  # the same step on sampled rows, with the on-policy terms
        terms = dataclasses.replace(config.distill, terms=config.distill.on_policy.terms)
        on_policy_config = dataclasses.replace(config, distill=terms)
        on_policy_step_fn = jit_distill_step(
            on_policy_config, student, teacher, tx, shardings, teacher_sh, batch_sh, mesh
        )
    # Held-out batches are not cached: a cached teacher's run measures the student's held-out CE only.
    eval_teacher = None if teacher is not None and teacher.is_cached else teacher
    eval_step = make_eval_step(student, mesh_lib.STUDENT_RULES, eval_teacher, config.distill.chunk_size)
    eval_fn = jax.jit(
        eval_step,
        in_shardings=(shardings.params["model"], teacher_sh, batch_sh),
        out_shardings=mesh_lib.replicated(mesh),
    )
    state = None
    if init:
        with jax.set_mesh(mesh):
            state = init_state(config, mesh, student, tx, shardings)
    return Run(
        config,
        mesh,
        student,
        teacher,
        teacher_params,
        state,
        step_fn,
        eval_fn,
        batch_sh,
        abstract,
        tx,
        on_policy_step_fn,
    )


def jit_distill_step(config: Config, student, teacher, tx, state_shardings, teacher_shardings, batch_sharding, mesh):
    """The config's distill step, jitted once with explicit shardings: what training runs and what compile-check
    compiles. The state is donated: its buffers are reused for the next state, so a step never holds two copies of
    the student."""
    step = make_distill_step(
        student,
        mesh_lib.STUDENT_RULES,
        teacher,
        tx,
        config.distill,
        config.train.steps,
        config.optim.grad_accum,
        skip_nonfinite=config.train.nonfinite == "skip",
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, teacher_shardings, batch_sharding),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """Same tokenizer, padded differently (e.g. 152064 vs 151936) is fine: the shared real range is used.
    Anything else means different tokenizers, which token-level distillation cannot bridge."""
    small, large = sorted((student_vocab, teacher_vocab))
    if small != large and (large % 64 != 0 or large - small >= 1024):
        raise UserError(
            f"model.vocab_size ({student_vocab}) and teacher.model.vocab_size ({teacher_vocab}) differ "
            "by more than padding: teacher and student must share a tokenizer"
        )


def evaluate(run: Run, params, batches: int) -> dict[str, float]:
    """Held-out metrics at T=1 of the run's student against the run's teacher."""
    return heldout_metrics(run.config, run.eval_fn, params, run.teacher_params, run.batch_sharding, batches)


def heldout_metrics(config: Config, eval_fn, params, teacher_params, batch_sharding, batches: int) -> dict[str, float]:
    """Means over `batches` batches of the held-out split (documents never trained on) of a jitted eval step."""
    from analogjax.runtime.batch_sums import sum_over_batches

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
