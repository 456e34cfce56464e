"""A finished run as input: its resolved config, its checkpoints, its student restored on an evaluation mesh.

Every command that reads a run rather than making one (eval, export, generate, transfer, release) comes through
here, so "which checkpoint, which config, which mesh" is decided once. A run is named by its workdir (with
checkpoints/ and run.json) or by its checkpoints directory alone (the config then comes from the checkpoint's meta
item).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from etils import epath

from analogjax.errors import UserError
from analogjax.runtime import storage

RUN_FILE = "run.json"  # written by train._claim_workdir
CHECKPOINTS = "checkpoints"
RECIPE_FILE = "recipe.json"  # a recipe's workdir (recipes/analog.py): its phases, and which one is its output


class Student(NamedTuple):
    """A finished run's student, restored: what eval, export, generate and release work on."""

    config: Any  # the run's Config (or the caller's, describing the same model)
    workdir: Path | None
    step: int
    mesh: Any
    params: Any


def resolve_run(path: str | Path | epath.Path) -> tuple[epath.Path, epath.Path | None]:
    """(checkpoint directory, workdir or None) for a run's workdir or its checkpoints directory (a recipe's workdir:
    its final phase's)."""
    folder = storage.location(path, "--checkpoint")
    if not folder.is_dir():
        raise UserError(f"--checkpoint: no such directory {folder}")
    if (folder / RECIPE_FILE).is_file():  # a recipe's workdir: its output is its final phase's run
        folder = folder / str(json.loads((folder / RECIPE_FILE).read_text())["final"])
        if not (folder / CHECKPOINTS).is_dir():
            raise UserError(f"--checkpoint: the recipe's final phase {folder} has no checkpoints yet (not finished)")
    if (folder / CHECKPOINTS).is_dir():
        return folder / CHECKPOINTS, folder
    if any(p.name.isdigit() for p in folder.iterdir()):
        parent = folder.parent
        return folder, parent if (parent / RUN_FILE).is_file() else None
    raise UserError(
        f"--checkpoint: {folder} is neither a run's workdir (with {CHECKPOINTS}/) nor a checkpoint directory"
    )


def _manager(ckpt_dir: Path):
    import orbax.checkpoint as ocp

    from analogjax.checkpoint import ITEMS

    return ocp.CheckpointManager(ckpt_dir, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))


def run_config(path: str | Path):
    """(Config, checkpoint dir, workdir, step) of a finished run: the config it was trained with, resolved."""
    import orbax.checkpoint as ocp

    from analogjax.checkpoint import newest_intact_step
    from analogjax.config import Config, from_dict

    ckpt_dir, workdir = resolve_run(path)
    # The newest step whose params verify (a damaged newer one is named in a warning and skipped).
    step = newest_intact_step(ckpt_dir, item="params")
    manager = _manager(ckpt_dir)
    try:
        if step is None:
            raise UserError(f"no complete checkpoint in {ckpt_dir}")
        if workdir is not None and (workdir / RUN_FILE).is_file():
            raw = json.loads((workdir / RUN_FILE).read_text())["config"]
        else:
            try:
                raw = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["config"]
            except (KeyError, FileNotFoundError, ValueError):
                raise UserError(f"{ckpt_dir}: checkpoint {step} has no meta item with the run's config") from None
    finally:
        manager.close()
    return from_dict(Config, raw), ckpt_dir, workdir, step


def restore_student(config, ckpt_dir: Path, mesh, step: int | None = None):
    """The student's model params of a checkpoint, restored sharded under the student rules."""
    from analogjax import mesh as mesh_lib
    from analogjax.checkpoint import restore_params
    from analogjax.models.transformer import Transformer

    abstract = mesh_lib.abstract_sharded(Transformer(config.model).init_boxed, mesh, mesh_lib.STUDENT_RULES)
    return restore_params(ckpt_dir, abstract, step)


def eval_mesh(config):
    """All devices on the batch axes (data = -1), keeping the run's tensor size when it divides the devices."""
    import jax

    from analogjax import mesh as mesh_lib

    tensor = config.mesh.tensor if jax.device_count() % max(config.mesh.tensor, 1) == 0 else 1
    mesh = mesh_lib.make_mesh(-1, 1, tensor)
    mesh_lib.check_batch(config.data.global_batch, mesh)
    return mesh


def load_student(path: str | Path, config=None) -> Student:
    """The run's student restored onto an evaluation mesh. `config` replaces the run's own (e.g. another data
    section) but must describe the same model."""
    run_cfg, ckpt_dir, workdir, step = run_config(path)
    config = config or run_cfg
    check_same_model(config, run_cfg, ckpt_dir)
    mesh = eval_mesh(config)
    return Student(config, workdir, step, mesh, restore_student(config, ckpt_dir, mesh, step))


def check_same_model(config, run_cfg, ckpt_dir: Path) -> None:
    """A config given beside a run may change its data or teacher, never the student it describes."""
    if config.model != run_cfg.model:
        raise UserError(f"{ckpt_dir} holds a student of another shape than the config's model section")
