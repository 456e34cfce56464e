"""The loop alone: restore or init → step → log one step late → checkpoint → evaluate. `setup.build` makes the run.

Metrics of step N are read after step N+1 is dispatched (`LateMetrics`), so the host never waits on the device just
to log.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
from etils import epath

from analogjax import checkpoint as ckpt_lib
from analogjax.config import Config, differences, run_identity, to_dict, to_yaml
from analogjax.data import make_batch_iterator, to_global_batch
from analogjax.errors import UserError
from analogjax.fidelity.curves import FidelityCurve, step_work
from analogjax.run_dir import RUN_FILE
from analogjax.runtime import storage
from analogjax.runtime.flops import distill_flops_per_step, peak_flops_per_second
from analogjax.runtime.metrics_log import MetricsLog, Progress, means
from analogjax.runtime.preemption import PreemptionWatcher
from analogjax.runtime.workdir_lock import hold_for_job
from analogjax.setup import Run, build, evaluate
from analogjax.step import TrainState
from analogjax.teacher import Teacher, runs_live

CONFIG_FILE = "config.yaml"


def _guard_workdir(workdir: epath.Path, config: Config) -> bool:
    """A workdir belongs to one run: refuse to resume (or overwrite) one made under another model or data config,
    unless `checkpoint.allow_config_change` says so. Returns whether run.json must be (re)written, which
    `_claim_workdir` does only once the run has been built, so a refused config never leaves a workdir behind."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} exists and is not a directory")
    run_file = workdir / RUN_FILE
    if not run_file.exists():
        return True
    saved = json.loads(run_file.read_text()).get("identity", {})
    return bool(check_identity(saved, run_identity(config), config.checkpoint.allow_config_change, str(workdir)))


def _claim_workdir(workdir: epath.Path, config: Config) -> None:
    if jax.process_index() == 0:
        storage.write_atomic(
            workdir / RUN_FILE, json.dumps({"identity": run_identity(config), "config": to_dict(config)}, indent=2)
        )


def show_config(workdir: epath.Path, config: Config) -> None:
    """WORKDIR/config.yaml: the config this run runs, fully resolved (rewritten by each run of the workdir), and one
    line on stderr naming the values that differ from the defaults. Process 0 only."""
    if jax.process_index() != 0:
        return
    storage.write_atomic(workdir / CONFIG_FILE, to_yaml(config))
    # The few values a reader scans for: scalars shown in full, long values (source lists, loss terms) by name only,
    # and at most a dozen; config.yaml has the rest.
    diffs = differences(config)
    shown = [f"{k}={json.dumps(v)}" if len(json.dumps(v)) <= 40 else k for k, v in list(diffs.items())[:_SHOWN]]
    more = f", and {len(diffs) - _SHOWN} more" if len(diffs) > _SHOWN else ""
    print(
        f"config ({workdir / CONFIG_FILE}); differs from the defaults in: {', '.join(shown) or 'nothing'}{more}",
        file=sys.stderr,
    )


_SHOWN = 12


def check_identity(saved: dict, identity: dict, allowed: bool, where: str) -> list[str]:
    """The parts (model, data) in which `saved` differs from `identity`; a UserError unless `allowed`."""
    changed = [part for part in ("model", "data") if saved.get(part) != identity[part]]
    if changed and not allowed:
        raise UserError(
            f"{where} holds a run with a different {' and '.join(changed)} config; use another "
            "--workdir, or --set checkpoint.allow_config_change=true to resume it anyway"
        )
    if changed:
        print(
            f"warning: {where}: resuming under a changed {' and '.join(changed)} config "
            "(checkpoint.allow_config_change)",
            file=sys.stderr,
        )
    return changed


def run_training(
    config: Config,
    workdir: str | Path | epath.Path,
    *,
    teacher: Teacher | None = None,
    teacher_params: Any = None,
    progress: bool = True,
    eval_teacher: tuple[Teacher, Any] | None = None,
    final_eval: bool = True,
) -> dict[str, Any]:
    """Train (distill, or pretrain when the objective needs no teacher) into `workdir`; returns final metrics.

    Relaunching the same call resumes exactly where the last checkpoint left off (resume order: `restore_or_init`).
    On SIGTERM or a preemption notice the run saves at the next step boundary and returns with `preempted=True`.
    A non-finite loss or gradient halts the run with a `NonFiniteError` (`train.nonfinite=halt`) or skips that
    update (`skip`); a non-finite state is never saved.

    `eval_teacher=(teacher, params)`: a live teacher for evaluation (the final held-out metrics, `train.eval_every`,
    the fidelity curve of `train.curve_points`), so that a run distilled from a teacher cache, or a CE-only baseline,
    reports KL and agreement too (setup.build). `final_eval=False` skips the final held-out measurement (`heldout`
    is then empty) for a caller that measures the returned state itself (the demo evaluates all its rows with the
    teacher's forward computed once per batch).
    """
    workdir = storage.location(workdir, "--workdir")
    claim = _guard_workdir(workdir, config)
    # One writer per workdir: a second run here is refused before it loads anything (runtime/workdir_lock.py).
    with hold_for_job(workdir, jax.process_index(), jax.process_count()):
        return _run_locked(
            config,
            workdir,
            claim,
            teacher=teacher,
            teacher_params=teacher_params,
            progress=progress,
            eval_teacher=eval_teacher,
            final_eval=final_eval,
        )


def _run_locked(
    config: Config,
    workdir: Path,
    claim: bool,
    *,
    teacher: Teacher | None,
    teacher_params: Any,
    progress: bool,
    eval_teacher: tuple[Teacher, Any] | None,
    final_eval: bool,
) -> dict[str, Any]:
    cfg = config
    # The data first: a missing or unusable corpus or tokenizer is reported before a model is built.
    data_iter = make_batch_iterator(
        cfg.data,
        split="train",
        seed=cfg.train.seed,
        vocab_size=cfg.model.vocab_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    run = build(config, teacher, teacher_params, init=False, eval_teacher=eval_teacher)
    on_policy = None
    if cfg.distill.on_policy.enabled:  # its prompts too are checked before the workdir gets anything
        from analogjax.on_policy import OnPolicy, RolloutWindow

        on_policy = OnPolicy(run, process_index=jax.process_index(), process_count=jax.process_count())
    cache_reader = None
    if run.teacher is not None and run.teacher.is_cached:  # cached rows join each local batch, step for step
        from analogjax.teacher_cache import CacheReader

        cache_reader = CacheReader(cfg)
    ck = cfg.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        workdir / "checkpoints",
        every=ck.every,
        keep=ck.keep,
        async_save=ck.async_save,
        keep_best=ck.keep_best,
        best_metric=ck.best_metric,
        best_mode=ck.best_mode,
        compression=ck.compression,
    )
    log = None
    try:
        state = restore_or_init(run, checkpointer, data_iter)
        has_heldout = cfg.data.heldout_fraction > 0
        start = int(jax.device_get(state.step))
        # metrics.jsonl stays append-only, except that records of steps after the restored one (logged by a run that
        # died before its next checkpoint) are dropped: this run logs them again, so each step appears exactly once.
        logged = ckpt_lib.trim_metrics(workdir, start)
        log = MetricsLog(workdir)
        meta = {"config": to_dict(cfg), "identity": run_identity(cfg), "provenance": ckpt_lib.provenance(run.mesh)}
        tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        progress_out = Progress(
            cfg.train.steps, start, "distill" if run.teacher else "train", enabled=progress and jax.process_index() == 0
        )
        late = LateMetrics(
            log,
            progress_out,
            tokens_per_step=tokens_per_step,
            flops_per_step=distill_flops_per_step(
                cfg.model, cfg.teacher.model if runs_live(run.teacher) else None, tokens_per_step, cfg.data.seq_len
            ),
            peak=peak_flops_per_second(),
            nonfinite=cfg.train.nonfinite,
            rollouts=RolloutWindow(cfg.data.global_batch) if on_policy is not None else None,
        )
        late.last_saved = start if start in checkpointer.all_steps() else None
        curve = None
        if cfg.train.curve_points and has_heldout:
            spent = step_work(
                cfg,
                teacher=run.teacher is not None,
                on_policy=on_policy,
                teacher_steps=None if cache_reader is None else cache_reader.distinct,
            )
            curve = FidelityCurve(run, log, start=start, logged=logged, work=spent)
        preempted = False
        with jax.set_mesh(run.mesh), PreemptionWatcher() as watcher:
            first_on_policy = True
            for step in range(start, cfg.train.steps):
                rollout = None
                if on_policy is not None and on_policy.covers(step):
                    # No corpus batch is read: the data position moves only with off-policy steps.
                    # Sampling waits for the previous step anyway: log it first, so that this step's sampling time
                    # falls in this step's logging window.
                    late.settle()
                    batch, seconds, sampled = on_policy.batch(state, step)
                    rollout = (seconds, sampled)
                    late.sampled_for(seconds)
                else:
                    local_batch = next(data_iter)
                    if cache_reader is not None:
                        local_batch = cache_reader.add_to(step, local_batch)
                    batch = to_global_batch(local_batch, run.batch_sharding)
                if claim:  # the config's data has produced a batch: only now does the workdir become this run's
                    _claim_workdir(workdir, config)
                    claim = False
                if step == start:
                    show_config(workdir, config)
                    # Said once the data has produced a batch: a refused run's only line is its error.
                    if cfg.train.curve_points and not has_heldout and jax.process_index() == 0:
                        print(
                            "note: no fidelity curve: data.heldout_fraction is 0 (no held-out documents)",
                            file=sys.stderr,
                        )
                    if curve is not None and curve.due(start):  # the curve's first point: the state trained from
                        curve.measure(start, state.params["model"])
                if rollout is None:
                    state, metrics = run.step_fn(state, run.teacher_params, batch)
                    work = None
                else:
                    state, metrics = on_policy.step_fn(state, run.teacher_params, batch)
                    work = (on_policy.tokens_per_step, on_policy.flops_per_step)
                done = step + 1
                # Keep compilation (of the step, and of the first on-policy step's two programs) out of the
                # throughput figures: wait for it, then measure from the next step on.
                compiled_now = step == start or (rollout is not None and first_on_policy)
                if compiled_now:
                    jax.block_until_ready(metrics)
                if rollout is not None:
                    first_on_policy = False
                late.push(
                    done,
                    metrics,
                    log_it=done % cfg.train.log_every == 0 or done == cfg.train.steps,
                    work=work,
                    rollout=rollout,
                    fresh_window=compiled_now,
                )
                stop = watcher.should_stop(done)  # every step, on every host: the preemption sync point needs it
                evaluate_now = (
                    has_heldout and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.steps
                )
                save_now = stop or (checkpointer.should_save(done) and done < cfg.train.steps)
                curve_now = curve is not None and curve.due(done)
                if save_now or evaluate_now or curve_now:
                    # Wait for this step: never evaluate or save a non-finite state, and write the step's records
                    # before its checkpoint, so a resume from it finds them (metrics.jsonl never loses a step).
                    late.settle()
                ranked = late.record_of(done)
                if curve_now:
                    curve.measure(done, state.params["model"])
                    late.restart_window(done)
                if evaluate_now:
                    eval_record = {
                        f"eval_{k}": v for k, v in evaluate(run, state.params["model"], cfg.train.eval_batches).items()
                    }
                    log.write({"step": done, **eval_record})
                    progress_out.note(done, eval_record)
                    ranked.update(eval_record)
                    late.restart_window(done)
                if save_now:
                    log.flush()  # the records up to this step are durable before its checkpoint is
                    # Returns once a copy of `state` to host memory is started: the next step may donate it.
                    checkpointer.save(done, state, data_iter, meta, metrics=ranked)
                    late.last_saved = done
                progress_out.update()
                if stop:
                    preempted = True
                    break
            late.settle()
            final_step = int(jax.device_get(state.step))
            if late.last_saved != final_step:
                log.flush()
                checkpointer.save(final_step, state, data_iter, meta, metrics=late.record_of(final_step))
            measure = final_eval and has_heldout and not preempted
            heldout = evaluate(run, state.params["model"], cfg.train.eval_batches) if measure else {}
    finally:
        # Always let async saves finish (or fail loudly) before the interpreter shuts down; then stop the data
        # workers now (left to Grain's exit-time finalizers after an error, they print tracebacks over it).
        try:
            checkpointer.close()
        finally:
            data_iter.close()
        if log is not None:
            progress_out.close()
    if preempted:
        watcher.announce(final_step)
    # A relaunch of a finished run trains nothing and must not log its final record twice.
    elif not any(r.get("step") == final_step and "loss" not in r and "curve_ce" not in r for r in logged):
        log.write({"step": final_step, **{f"eval_{k}": v for k, v in heldout.items()}})
    log.close()
    return {
        "train": late.last,
        "heldout": heldout,
        "step": final_step,
        "state": state,
        "run": run,
        "preempted": preempted,
        "student": run.student_model(state),
    }


class LateMetrics:
    """The one-step-late bookkeeping: step N's metrics and non-finite flag are read only after step N+1 has been
    dispatched, so reading them never stalls the device. Throughput is measured over windows between completed
    steps (compilation, evaluation and saving excluded by restarting the window)."""

    def __init__(
        self,
        log: MetricsLog,
        progress: Progress,
        *,
        tokens_per_step: int,
        flops_per_step: float,
        peak: float,
        nonfinite: str,
        rollouts=None,
    ):
        self.log, self.progress = log, progress
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
        self.nonfinite = nonfinite
        self.rollouts = rollouts  # on_policy.RolloutWindow of an on-policy run: its figures join each record
        self.last: dict[str, Any] = {}  # the latest logged record
        self.last_saved: int | None = None  # named in the error when a non-finite step halts the run
        self._unchecked: tuple | None = None  # (step, flag) of the newest step
        self._pending: tuple | None = None  # (step, metrics) waiting to be logged
        self.restart_window(0)

    def restart_window(self, first_step: int) -> None:
        """Measure from now, over the steps after `first_step`."""
        self._window_start, self._window_first = time.perf_counter(), first_step
        self._window_tokens, self._window_flops = 0.0, 0.0
        if self.rollouts is not None:
            self.rollouts.reset()

    def sampled_for(self, seconds: float) -> None:
        """An on-policy step just spent `seconds` sampling: wall time of the current window."""
        if self.rollouts is not None:
            self.rollouts.seconds += seconds

    def push(
        self, done: int, metrics: dict, *, log_it: bool, work=None, rollout=None, fresh_window: bool = False
    ) -> None:
        """Step `done` was just dispatched: settle the previous one (its device work is already queued behind).
        `work`: (tokens, FLOPs) of this step when not the run's usual ones (an on-policy step); `rollout`:
        (seconds sampling, tokens sampled) of an on-policy step. `fresh_window`: measure from the next step on
        (this one was waited for: it compiled)."""
        self.settle()
        if fresh_window:
            self.restart_window(done)
        else:
            tokens, flops = work if work is not None else (self.tokens_per_step, self.flops_per_step)
            self._window_tokens += tokens
            self._window_flops += flops
        if rollout is not None and self.rollouts is not None:
            # A compiling step's samples still count; its sampling time does not.
            self.rollouts.add(*rollout, metrics, timed=not fresh_window)
        self._unchecked = (done, metrics["nonfinite"])
        self._pending = (done, metrics, rollout is not None) if log_it else None

    def settle(self) -> None:
        """Wait for the newest step: check its flag, write its record if it is to be logged."""
        if self._unchecked is not None:
            self._check_finite(*self._unchecked)
            self._unchecked = None
        if self._pending is not None:
            self._flush(*self._pending)
            self._pending = None

    def record_of(self, step: int) -> dict[str, Any]:
        """The logged record of `step` (a copy), or {} if that step was not logged."""
        return dict(self.last) if self.last.get("step") == step else {}

    def _flush(self, step_done: int, metrics: dict, on_policy_step: bool) -> None:
        record = {"step": step_done, **means(jax.device_get(metrics))}  # blocks until that step is done
        now = time.perf_counter()
        seconds = now - self._window_start
        steps = step_done - self._window_first
        if steps > 0:
            # Tokens are the rows the steps trained on; FLOPs are model FLOPs (flops.py), sampling included.
            record.update(
                tokens_per_s=self._window_tokens / seconds,
                step_s=seconds / steps,
                mfu=self._window_flops / seconds / self.peak,
            )
        if self.rollouts is not None:
            # The record's own loss and divergences are of this step's batch: samples when on_policy_step is 1.
            record.update(on_policy_step=float(on_policy_step), **self.rollouts.record(seconds))
        self.restart_window(step_done)
        self._window_start = now
        self.last = record
        self.log.write(record)
        self.progress.note(step_done, record)

    def _check_finite(self, step_done: int, flag) -> None:
        if float(jax.device_get(flag)) == 0.0:
            return
        if self.nonfinite == "skip":  # the step itself kept the previous params and optimizer state
            print(f"warning: step {step_done}: non-finite loss or gradient; its update was skipped", file=sys.stderr)
            return
        raise ckpt_lib.NonFiniteError(
            f"step {step_done}: non-finite loss or gradient; the run halted without saving it (latest checkpoint: "
            f"{self.last_saved}). Lower optim.learning_rate, check the data and teacher, or set train.nonfinite=skip"
        )


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
        changed = check_identity(
            saved,
            run_identity(run.config),
            run.config.checkpoint.allow_config_change,
            str(checkpointer.directory / str(latest)),
        )
        return checkpointer.restore(latest, run.abstract_state, None if "data" in changed else data_iter)
    state = run.state if run.state is not None else run.fresh_state()
    init_path = run.config.checkpoint.init_path
    if init_path:
        params = dict(state.params, model=ckpt_lib.restore_params(init_path, run.abstract_state.params["model"]))
        return state.replace(params=params)
    return state
