"""`analogjax distill --config FILE [--set k=v ...] [--workdir DIR]`: one run, or the config's recipe of phases
(prune → cache → distill → on-policy, `recipe:`; recipes/analog.py)."""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job
from analogjax.errors import UserError
from analogjax.runtime import distributed, storage


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.config import load_config

    config = load_config(args.config, args.overrides)
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    if config.recipe.enabled:  # refused before the job joins or anything loads
        from analogjax.recipes import analog

        analog.check(config)
        if storage.is_remote(workdir):  # its phases' workdirs and recipe.json are local paths (recipes/analog.py)
            raise UserError(f"--workdir {workdir}: a recipe (recipe.enabled) runs in a local workdir only")
    storage.check_config_paths(config, ("--workdir", workdir))  # a missing bucket or credential: before anything
    join_job(args)
    # heavy imports only once the config is known to be good
    if config.recipe.enabled:
        from analogjax.recipes.analog import run_recipe

        result = run_recipe(config, workdir, progress=not args.no_progress)
    else:
        from analogjax.train import run_training

        result = run_training(config, workdir, progress=not args.no_progress)
    if not distributed.is_main():  # one report per job, from process 0
        return 0
    report = {
        "step": result["step"],
        "workdir": workdir,
        **{f"heldout_{k}": round(v, 5) for k, v in result["heldout"].items()},
    }
    if "phases" in result:
        report["phases"] = result["phases"]
    print(json.dumps(report))
    return 0
