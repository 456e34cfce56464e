"""The loop: build → restore or init → jit once → run.

Metrics of step N are read after step N+1 is dispatched, so the host never waits on the device just to log.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from analogjax import checkpoint as ckpt_lib
from analogjax import mesh as mesh_lib
from analogjax.config import Config, run_identity, to_dict
from analogjax.data import heldout_batches, make_batch_iterator, to_global_batch
from analogjax.errors import UserError
from analogjax.flops import distill_flops_per_step, peak_flops_per_second
from analogjax.hidden_matching import init_projections, projection_logical_axes
from analogjax.metrics_log import MetricsLog, means
from analogjax.models.transformer import Transformer
from analogjax.objective import check_distill, needs_layers, needs_teacher
from analogjax.preemption import PreemptionWatcher
from analogjax.step import Teacher, TrainState, make_distill_step, make_eval_step, make_optimizer, model_teacher

RUN_FILE = "run.json"


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

    @property
    def state_shardings(self) -> Any:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)


def build_mesh(config: Config, devices=None):
    """The config's mesh over `devices` (default: all of them; compile-check passes a TPU topology's)."""
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    mesh_lib.check_batch(config.data.global_batch, mesh, config.optim.grad_accum)
    return mesh


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
                proj, projection_logical_axes(layer_map), is_leaf=lambda x: isinstance(x, P),
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
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.fold_in(rng, 1)))

    return jax.jit(init, out_shardings=shardings)(config.train.seed)


def load_teacher(config: Config, mesh) -> tuple[Teacher | None, Any]:
    """The configured teacher and its params, restored sharded under the teacher's own rules."""
    if not needs_teacher(config.distill):
        return None, None
    if config.teacher.cache:  # distill from cached teacher outputs: nothing of the teacher is loaded
        from analogjax.teacher_cache import cached_teacher

        return cached_teacher(config), None
    model = Transformer(config.teacher.model)
    teacher = model_teacher(model, mesh_lib.TEACHER_RULES)
    if config.teacher.hf_path:
        from analogjax.models import hf

        return teacher, hf.load_params(config.teacher.hf_path, config.teacher.model, mesh, mesh_lib.TEACHER_RULES)
    if config.teacher.gguf_path:
        from analogjax.models import gguf

        return teacher, gguf.load_params(config.teacher.gguf_path, config.teacher.model, mesh, mesh_lib.TEACHER_RULES)
    if config.teacher.checkpoint:
        abstract = mesh_lib.abstract_sharded(model.init_boxed, mesh, mesh_lib.TEACHER_RULES)
        return teacher, ckpt_lib.restore_params(config.teacher.checkpoint, abstract)
    if jax.process_index() == 0:  # one warning per job, not one per host
        print("warning: no teacher.checkpoint or teacher.hf_path: the teacher is randomly initialised", file=sys.stderr)
    params, _ = mesh_lib.init_sharded(model.init_boxed, jax.random.key(config.train.seed + 1), mesh,
                                      mesh_lib.TEACHER_RULES)
    return teacher, params


def build(config: Config, teacher: Teacher | None = None, teacher_params: Any = None, mesh=None,
          init: bool = True) -> Run:
    """Build a run. Pass `teacher` + `teacher_params` to bring your own teacher (else the config's is loaded),
    and `mesh` to use your own (else one is made from the config over all devices). With init=False no state is
    materialised (a resume then never holds a fresh state beside the restored one)."""
    check_distill(config.distill)
    if mesh is None:
        mesh = build_mesh(config)
    else:
        mesh_lib.check_batch(config.data.global_batch, mesh, config.optim.grad_accum)
    student = Transformer(config.model)
    if teacher is None and needs_teacher(config.distill):
        teacher, teacher_params = load_teacher(config, mesh)
    if teacher is not None and teacher.vocab_size is not None:
        check_vocab(config.model.vocab_size, teacher.vocab_size)
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
    # Held-out batches are not cached: a cached teacher's run measures the student's held-out CE only.
    eval_teacher = None if teacher is not None and teacher.from_batch is not None else teacher
    eval_step = make_eval_step(student, mesh_lib.STUDENT_RULES, eval_teacher, config.distill.chunk_size)
    eval_fn = jax.jit(eval_step, in_shardings=(shardings.params["model"], teacher_sh, batch_sh),
                      out_shardings=mesh_lib.replicated(mesh))
    state = None
    if init:
        with jax.set_mesh(mesh):
            state = init_state(config, mesh, student, tx, shardings)
    return Run(config, mesh, student, teacher, teacher_params, state, step_fn, eval_fn, batch_sh, abstract, tx)


def jit_distill_step(config: Config, student, teacher, tx, state_shardings, teacher_shardings, batch_sharding, mesh):
    """The config's distill step, jitted once with explicit shardings: what training runs and what compile-check
    compiles. The state is donated: its buffers are reused for the next state, so a step never holds two copies of
    the student."""
    step = make_distill_step(student, mesh_lib.STUDENT_RULES, teacher, tx, config.distill, config.train.steps,
                             config.optim.grad_accum, skip_nonfinite=config.train.nonfinite == "skip")
    return jax.jit(step, in_shardings=(state_shardings, teacher_shardings, batch_sharding),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """Same tokenizer, padded differently (e.g. 152064 vs 151936) is fine: the shared real range is used.
    Anything else means different tokenizers, which token-level distillation cannot bridge."""
    small, large = sorted((student_vocab, teacher_vocab))
    if small != large and (large % 64 != 0 or large - small >= 1024):
        raise UserError(f"model.vocab_size ({student_vocab}) and teacher.model.vocab_size ({teacher_vocab}) differ "
                        "by more than padding: teacher and student must share a tokenizer")


def _guard_workdir(workdir: Path, config: Config) -> bool:
    """A workdir belongs to one run: refuse to resume (or overwrite) one made under another model or data config,
    unless `checkpoint.allow_config_change` says so. Returns whether run.json must be (re)written, which
    `_claim_workdir` does only once the run has been built, so a refused config never leaves a workdir behind."""
    run_file = workdir / RUN_FILE
    if not run_file.exists():
        return True
    saved = json.loads(run_file.read_text()).get("identity", {})
    return bool(check_identity(saved, run_identity(config), config.checkpoint.allow_config_change, str(workdir)))


def _claim_workdir(workdir: Path, config: Config) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / RUN_FILE).write_text(json.dumps({"identity": run_identity(config), "config": to_dict(config)},
                                                   indent=2))


def check_identity(saved: dict, identity: dict, allowed: bool, where: str) -> list[str]:
    """The parts (model, data) in which `saved` differs from `identity`; a UserError unless `allowed`."""
    changed = [part for part in ("model", "data") if saved.get(part) != identity[part]]
    if changed and not allowed:
        raise UserError(f"{where} holds a run with a different {' and '.join(changed)} config; use another "
                        "--workdir, or --set checkpoint.allow_config_change=true to resume it anyway")
    if changed:
        print(f"warning: {where}: resuming under a changed {' and '.join(changed)} config "
              "(checkpoint.allow_config_change)", file=sys.stderr)
    return changed


def evaluate(run: Run, params, batches: int) -> dict[str, float]:
    """Held-out metrics at T=1 of the run's student against the run's teacher."""
    return heldout_metrics(run.config, run.eval_fn, params, run.teacher_params, run.batch_sharding, batches)


def heldout_metrics(config: Config, eval_fn, params, teacher_params, batch_sharding, batches: int) -> dict[str, float]:
    """Means over `batches` batches of the held-out split (documents never trained on) of a jitted eval step."""
    total: dict[str, float] = {}
    for batch in heldout_batches(config.data, seed=config.train.seed, vocab_size=config.model.vocab_size,
                                 sharding=batch_sharding, batches=batches):
        sums = jax.device_get(eval_fn(params, teacher_params, batch))
        for key, value in sums.items():
            total[key] = total.get(key, 0.0) + float(value)
    if not total:
        raise UserError("the held-out split is empty: raise data.heldout_fraction or add documents")
    return means(total)


def run_training(config: Config, workdir: str | Path, *, teacher: Teacher | None = None, teacher_params: Any = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train (distill, or pretrain when the objective needs no teacher) into `workdir`; returns final metrics.

    Relaunching the same call resumes exactly where the last checkpoint left off (resume order: `restore_or_init`).
    On SIGTERM or a preemption notice the run saves at the next step boundary and returns with `preempted=True`.
    A non-finite loss or gradient halts the run with a `NonFiniteError` (`train.nonfinite=halt`) or skips that
    update (`skip`); a non-finite state is never saved.
    """
    workdir = Path(workdir).absolute()
    claim = _guard_workdir(workdir, config)
    run = build(config, teacher, teacher_params, init=False)
    cfg = config
    data_iter = make_batch_iterator(cfg.data, split="train", seed=cfg.train.seed, vocab_size=cfg.model.vocab_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.teacher.cache:  # cached teacher rows join each local batch, aligned with it step for step
        from analogjax.teacher_cache import CacheReader

        cache_reader = CacheReader(cfg)
    ck = cfg.checkpoint
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", every=ck.every, keep=ck.keep,
                                         async_save=ck.async_save, keep_best=ck.keep_best,
                                         best_metric=ck.best_metric, best_mode=ck.best_mode,
                                         compression=ck.compression)
    state = restore_or_init(run, checkpointer, data_iter)
    has_heldout = cfg.data.heldout_fraction > 0
    start = int(jax.device_get(state.step))
    # metrics.jsonl stays append-only, except that records of steps after the restored one (logged by a run that died
    # before its next checkpoint) are dropped: this run logs those steps again, so each step appears exactly once.
    logged = ckpt_lib.trim_metrics(workdir, start)
    log = MetricsLog(workdir)
    meta = {"config": to_dict(cfg), "identity": run_identity(cfg), "provenance": ckpt_lib.provenance(run.mesh)}
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    live_teacher = run.teacher is not None and run.teacher.from_batch is None
    flops_per_step = distill_flops_per_step(cfg.model, cfg.teacher.model if live_teacher else None,
                                            tokens_per_step, cfg.data.seq_len)
    peak = peak_flops_per_second()
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not progress or jax.process_index() != 0,
               desc="distill" if run.teacher else "train", dynamic_ncols=True)
    # Throughput windows run between two completed steps (compilation of the first step excluded).
    pending, window_start, window_first, last = None, time.perf_counter(), start, {}
    # The previous step's non-finite flag, read one step late like the metrics (the device is busy meanwhile).
    unchecked = None
    last_saved = start if start in checkpointer.all_steps() else None
    preempted = False

    def flush(step_done, metrics):
        nonlocal window_start, window_first, last
        record = {"step": step_done, **means(jax.device_get(metrics))}  # blocks until that step is done
        now = time.perf_counter()
        dt = (now - window_start) / max(step_done - window_first, 1)
        record.update(tokens_per_s=tokens_per_step / dt, step_s=dt, mfu=flops_per_step / dt / peak)
        window_start, window_first, last = now, step_done, record
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def check_finite(step_done, flag):
        if float(jax.device_get(flag)) == 0.0:
            return
        if cfg.train.nonfinite == "skip":  # the step itself kept the previous params and optimizer state
            print(f"warning: step {step_done}: non-finite loss or gradient; its update was skipped", file=sys.stderr)
            return
        raise ckpt_lib.NonFiniteError(
            f"step {step_done}: non-finite loss or gradient; the run halted without saving it (latest checkpoint: "
            f"{last_saved}). Lower optim.learning_rate, check the data and teacher, or set train.nonfinite=skip")

    try:
        with jax.set_mesh(run.mesh), PreemptionWatcher() as watcher:
            for step in range(start, cfg.train.steps):
                local_batch = next(data_iter)
                if claim:  # the config's data has produced a batch: only now does the workdir become this run's
                    _claim_workdir(workdir, config)
                    claim = False
                if cfg.teacher.cache:
                    local_batch = cache_reader.add_to(step, local_batch)
                batch = to_global_batch(local_batch, run.batch_sharding)
                state, metrics = run.step_fn(state, run.teacher_params, batch)
                if step == start:  # keep compilation out of the throughput figures
                    jax.block_until_ready(metrics)
                    window_start, window_first = time.perf_counter(), start + 1
                if unchecked is not None:
                    check_finite(*unchecked)
                if pending is not None:  # read the previous step's metrics only now: the device is already busy
                    flush(*pending)
                done = step + 1
                unchecked = (done, metrics["nonfinite"])
                pending = (done, metrics) if done % cfg.train.log_every == 0 or done == cfg.train.steps else None
                stop = watcher.should_stop(done)  # every step, on every host: the preemption sync point needs it
                evaluate_now = (has_heldout and cfg.train.eval_every and done % cfg.train.eval_every == 0
                                and done < cfg.train.steps)
                save_now = stop or (checkpointer.should_save(done) and done < cfg.train.steps)
                if save_now or evaluate_now:
                    # Wait for this step: never evaluate or save a non-finite state, and write the step's records
                    # before its checkpoint, so a resume from it finds them (metrics.jsonl never loses a step).
                    check_finite(*unchecked)
                    unchecked = None
                    if pending is not None:
                        flush(*pending)
                        pending = None
                ranked = dict(last) if last.get("step") == done else {}
                if evaluate_now:
                    eval_record = {f"eval_{k}": v for k, v in
                                   evaluate(run, state.params["model"], cfg.train.eval_batches).items()}
                    log.write({"step": done, **eval_record})
                    ranked.update(eval_record)
                    window_start, window_first = time.perf_counter(), done
                if save_now:
                    # Returns once a copy of `state` to host memory is started: the next step may donate it.
                    checkpointer.save(done, state, data_iter, meta, metrics=ranked)
                    last_saved = done
                bar.update(1)
                if stop:
                    preempted = True
                    break
            if unchecked is not None:
                check_finite(*unchecked)
            if pending is not None:
                flush(*pending)
            final_step = int(jax.device_get(state.step))
            if last_saved != final_step:
                checkpointer.save(final_step, state, data_iter, meta,
                                  metrics=dict(last) if last.get("step") == final_step else {})
            heldout = (evaluate(run, state.params["model"], cfg.train.eval_batches)
                       if has_heldout and not preempted else {})
    finally:
        # Always let async saves finish (or fail loudly) before the interpreter shuts down.
        checkpointer.close()
        bar.close()
    if preempted:
        watcher.announce(final_step)
    # A relaunch of a finished run trains nothing and must not log its final record twice.
    elif not any(r.get("step") == final_step and "loss" not in r for r in logged):
        log.write({"step": final_step, **{f"eval_{k}": v for k, v in heldout.items()}})
    log.close()
    return {"train": last, "heldout": heldout, "step": final_step, "state": state, "run": run,
            "preempted": preempted}


def restore_or_init(run: Run, checkpointer: ckpt_lib.Checkpointer, data_iter) -> TrainState:
    """The resume order:
    1. the latest complete checkpoint in the workdir: params, optimizer state, step, RNG and data position
       (refused if it was written under another model or data config, unless checkpoint.allow_config_change;
       after an allowed data change the data starts from its beginning);
    2. else checkpoint.init_path: its params only (optimizer, step and data start fresh);
    3. else a fresh init (born sharded).
    Restores target the run's abstract sharded state, so arrays land on their devices on this run's mesh."""
    latest = checkpointer.latest_step()
    if latest is not None:
        saved = checkpointer.meta(latest).get("identity", {})
        changed = check_identity(saved, run_identity(run.config), run.config.checkpoint.allow_config_change,
                                 str(checkpointer.directory / str(latest)))
        return checkpointer.restore(latest, run.abstract_state, None if "data" in changed else data_iter)
    state = run.state
    if state is None:
        with jax.set_mesh(run.mesh):
            state = init_state(run.config, run.mesh, run.student, run.tx, run.state_shardings)
    init_path = run.config.checkpoint.init_path
    if init_path:
        params = dict(state.params, model=ckpt_lib.restore_params(init_path, run.abstract_state.params["model"]))
        return state.replace(params=params)
    return state
