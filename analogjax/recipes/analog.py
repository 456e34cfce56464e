"""The analog recipe as phases (`recipe:` in the config; RecipeConfig says what each phase is): prune → cache →
distill → on-policy, run by `analogjax distill` on any supported teacher, on a pod as on a laptop.

Each phase writes its own sub-directory of the workdir and resumes from what it finds there, so a killed run continues
where it stopped: the pruned start is written under a temporary name and renamed once complete (an interrupted prune
is redone, nothing half-written is ever read); the cache writer completes missing chunks; the two training phases
resume from their checkpoints, bitwise as any run does. The live teacher is loaded once and shared by every phase
that needs it (pruning, writing the cache, scoring the on-policy samples, evaluation).

WORKDIR/recipe.json names the phases and the final one; `run_dir.resolve_run` follows it, so `analogjax eval`,
`export` and `release` of WORKDIR take the recipe's output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from analogjax.config import Config, RecipeConfig, to_dict
from analogjax.data.spec import distinct_steps
from analogjax.errors import UserError
from analogjax.run_dir import RECIPE_FILE

PRUNED, CACHE, DISTILL, ON_POLICY = "pruned_init", "teacher_cache", "distill", "on_policy"


class PhaseClock:
    """Wall time of each phase, in order; `start` announces the phase on stderr."""

    def __init__(self, tag: str = "recipe"):
        self.tag = tag
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()
        self._name, self._t0 = "", self._started

    def start(self, name: str, text: str) -> None:
        self._name, self._t0 = name, time.perf_counter()
        print(f"[{self.tag}] {name}: {text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.seconds[self._name] = round(time.perf_counter() - self._t0, 1)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self._started, 1)


def phase_names(config: Config) -> list[str]:
    """The phases this config's recipe runs, in order (their sub-directories' names)."""
    recipe = config.recipe
    return [
        name
        for name, on in (
            (PRUNED, recipe.prune_batches > 0),
            (CACHE, recipe.cache_k > 0),
            (DISTILL, True),
            (ON_POLICY, recipe.on_policy_steps > 0),
        )
        if on
    ]


def check(config: Config) -> None:
    """Refuse a recipe that cannot run with this teacher, before any phase starts."""
    from analogjax.objective.terms import needs_teacher
    from analogjax.teacher import live_source_kind

    recipe = config.recipe
    live = live_source_kind(config)
    user_cache = bool(config.teacher.cache)
    if recipe.cache_k and user_cache:
        raise UserError(
            "recipe.cache_k: the recipe writes its own teacher cache (WORKDIR/teacher_cache); unset teacher.cache, "
            "or set recipe.cache_k: 0 to distill from the cache teacher.cache names"
        )
    if recipe.cache_k and not needs_teacher(config.distill):
        raise UserError("recipe.cache_k: the distillation's objective uses no teacher, so there is nothing to cache")
    for key, on, what in (
        ("recipe.prune_batches", recipe.prune_batches, "pruning reads the teacher's weights"),
        ("recipe.on_policy_steps", recipe.on_policy_steps, "the on-policy phase scores new samples with the teacher"),
    ):
        if on and user_cache and live == "random":
            raise UserError(
                f"{key}: {what}, and this teacher is a cache only (teacher.cache without hf_path, gguf_path or "
                "checkpoint): name the teacher's weights too, or set it to 0"
            )
    if recipe.prune_batches:
        from analogjax.models.prune import check_target

        check_target(config.teacher.model, config.model)


def phase_configs(config: Config, workdir: Path) -> dict[str, Config]:
    """The config each phase runs (pruning and the cache run the distillation's own config)."""
    recipe = config.recipe
    # A phase's own config is a plain run (no recipe): its config.yaml reruns that phase alone; recipe.json holds
    # the recipe.
    distill = dataclasses.replace(config, recipe=type(recipe)())
    if recipe.cache_k:
        distill = dataclasses.replace(distill, teacher=dataclasses.replace(config.teacher, cache=str(workdir / CACHE)))
    if recipe.prune_batches:
        distill = dataclasses.replace(
            distill, checkpoint=dataclasses.replace(config.checkpoint, init_path=str(workdir / PRUNED))
        )
    configs = {DISTILL: distill}
    if recipe.on_policy_steps:
        steps = recipe.on_policy_steps
        configs[ON_POLICY] = dataclasses.replace(
            config,
            recipe=type(recipe)(),
            distill=dataclasses.replace(config.distill, on_policy=recipe.on_policy),
            checkpoint=dataclasses.replace(config.checkpoint, init_path=str(workdir / DISTILL / "checkpoints")),
            optim=dataclasses.replace(
                config.optim,
                learning_rate=recipe.on_policy_learning_rate,
                warmup_steps=min(recipe.on_policy_warmup_steps, steps - 1),
            ),
            train=dataclasses.replace(
                config.train,
                steps=steps,
                log_every=min(config.train.log_every, steps),
                curve_points=continued_curve_points(config.train.curve_points, config.train.steps, steps),
            ),
        )
    return configs


def continued_curve_points(points: int, distill_steps: int, steps: int) -> int:
    """Curve points of a phase of `steps` steps continuing a distillation of `distill_steps` steps measured at
    `points` points: about the same spacing in steps (a point costs a held-out forward of the student and the
    teacher's head, as much as a step or more: a short phase measured at every step would spend as long measuring
    as training), never fewer than its start, middle and end; 0 stays 0 (no curve)."""
    if points <= 0:
        return 0
    spaced = -(-(points - 1) * steps // max(distill_steps, 1)) + 1  # gaps rounded up, plus the start
    return min(points, max(3, spaced))


def final_phase(workdir: Path) -> Path | None:
    """The directory of the recipe's final phase when `workdir` holds a recipe (recipe.json), else None."""
    path = Path(workdir) / RECIPE_FILE
    if not path.is_file():
        return None
    return Path(workdir) / json.loads(path.read_text())["final"]


def run_recipe(
    config: Config,
    workdir: str | Path,
    *,
    progress: bool = True,
    teacher=None,
    clock: PhaseClock | None = None,
    final_eval: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every phase of config.recipe in `workdir`; returns the final training phase's result, with
    `phases` (name → directory), `phase_results` (training phases' results) and `phase_seconds` added. `teacher`:
    (Teacher, params) of the live teacher when the caller holds it already (else the config's is loaded once,
    here); `clock` times the phases (the demo's own clock, so its table lists them); `final_eval=False`: no phase
    measures its final held-out figures (run_training's, for a caller that measures the states itself)."""
    import jax

    check(config)
    workdir = Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} exists and is not a directory")
    from analogjax.runtime.workdir_lock import hold_for_job

    # One recipe per workdir: its phases (each a run holding its own sub-directory's lock) are this job's alone.
    with hold_for_job(workdir, jax.process_index(), jax.process_count()):
        return _run_phases(config, workdir, progress, teacher, clock or PhaseClock(), final_eval)


def _run_phases(
    config: Config, workdir: Path, progress: bool, teacher, clock: PhaseClock, final_eval: bool
) -> dict[str, Any]:
    import jax

    from analogjax.setup import build_mesh
    from analogjax.teacher import load_teacher

    names = phase_names(config)
    configs = phase_configs(config, workdir)
    mesh = build_mesh(config)
    if teacher is None:
        teacher = load_teacher(config, mesh, live=True)
    live, live_params = teacher
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        record = {
            "phases": names,
            "final": names[-1],
            "recipe": to_dict(config.recipe),
            "steps": {name: cfg.train.steps for name, cfg in configs.items()},
            # the different batches the distillation reads (fewer than its steps when it makes epochs)
            "distinct_steps": distinct_steps(configs[DISTILL].data, configs[DISTILL].train.steps),
        }
        (workdir / RECIPE_FILE).write_text(json.dumps(record, indent=1) + "\n")

    if PRUNED in names:
        _prune(config, workdir, mesh, live_params, progress, clock)
    if CACHE in names:
        _cache(configs[DISTILL], config.recipe, workdir, mesh, (live, live_params), progress, clock)
    from analogjax.on_policy import on_policy_index
    from analogjax.train import run_training

    results = {}
    for name in (n for n in names if n in configs):
        cfg = configs[name]
        steps = cfg.train.steps
        on_samples = on_policy_index(steps, config.recipe.on_policy.fraction)  # the on-policy steps before `steps`
        which = f"{steps} steps" if on_samples == steps else f"{steps} steps, {on_samples} of them"
        clock.start(name, _TRAINING[name].format(steps=steps, which=which, on_policy=config.recipe.on_policy))
        # The on-policy phase scores samples with the live teacher; the distillation reads the cache when there is
        # one. Both are measured against the live teacher (held-out KL and agreement, curves).
        own = (live, live_params) if not configs[name].teacher.cache else None
        results[name] = run_training(
            configs[name],
            workdir / name,
            teacher=own[0] if own else None,
            teacher_params=own[1] if own else None,
            progress=progress,
            # A cached phase is measured (held-out KL, agreement, its fidelity curve) against the live teacher.
            eval_teacher=None if own else (live, live_params),
            final_eval=final_eval,
        )
        clock.stop()
        if results[name]["preempted"]:
            break  # the next launch resumes this phase
    last = results[list(results)[-1]]
    return {
        **last,
        "phases": {n: str(workdir / n) for n in names},
        "phase_results": results,
        "phase_seconds": {n: clock.seconds[n] for n in names if n in clock.seconds},
    }


_TRAINING = {
    DISTILL: "{steps} steps of distillation",
    ON_POLICY: "{which} on the analog's own samples ({on_policy.prompt_len}-token prompts, "
    "{on_policy.max_new_tokens} new tokens at T={on_policy.temperature}), scored by the live teacher",
}


def _prune(config: Config, workdir: Path, mesh, teacher_params, progress: bool, clock: PhaseClock) -> None:
    """The pruned start, written whole or not at all: pruned under a temporary name, renamed when complete."""
    import jax

    from analogjax.models.prune import prune_to

    done = workdir / PRUNED
    if done.is_dir():
        return
    partial = workdir / (PRUNED + ".partial")
    if partial.exists() and jax.process_index() == 0:
        print(f"[{clock.tag}] {PRUNED}: an interrupted prune left {partial.name}; pruning again", file=sys.stderr)
        shutil.rmtree(partial)
    clock.start(
        PRUNED,
        f"importance of the teacher's heads, neurons, channels and layers on {config.recipe.prune_batches} batches, "
        "cut to the analog's shape",
    )
    prune_to(
        config,
        partial,
        batches=config.recipe.prune_batches,
        mesh=mesh,
        teacher_params=teacher_params,
        progress=progress,
    )
    if jax.process_index() == 0:
        partial.rename(done)
    clock.stop()
    if jax.process_count() > 1:  # every process reads the renamed start; none may look before it is there
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("analogjax recipe: pruned start renamed")


def _cache(
    config: Config, recipe: RecipeConfig, workdir: Path, mesh, teacher, progress: bool, clock: PhaseClock
) -> None:
    """The teacher cache (Teacher, params) of `recipe.cache_kind` over the batches `config` (the distillation) reads."""
    from analogjax.teacher_cache import CacheLayout, build_cache

    data, k = config.data, recipe.cache_k
    steps = distinct_steps(data, config.train.steps)  # an epoch's batches when the distillation makes epochs
    tokens = steps * data.global_batch * data.seq_len
    sampled = recipe.cache_kind == "sampled"
    what = f"{k} ids per token sampled from the teacher" if sampled else f"the teacher's top-{k} logits"
    clock.start(CACHE, f"{what} over {steps} batches ({tokens:,} tokens), once")
    cache = build_cache(
        config,
        CacheLayout(kind=recipe.cache_kind, k=k),
        str(workdir / CACHE),
        mesh=mesh,
        teacher=teacher[0],
        teacher_params=teacher[1],
        progress=progress,
    )
    if not cache["complete"]:
        raise UserError(f"teacher cache {cache['path']} is incomplete; run the same command again to finish it")
    clock.stop()
