"""`analogjax distill --config FILE [--set k=v ...] [--workdir DIR]`: one run, or the config's recipe of phases
(prune → cache → distill → on-policy, `recipe:`; recipes/analog.py)."""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job
from analogjax.runtime import distributed


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.config import load_config

    config = load_config(args.config, args.overrides)
    if config.recipe.enabled:  # refused before the job joins or anything loads
        from analogjax.recipes import analog

        analog.check(config)
    join_job(args)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
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
        "workdir": str(workdir),
        **{f"heldout_{k}": round(v, 5) for k, v in result["heldout"].items()},
    }
    if "phases" in result:
        report["phases"] = result["phases"]
    print(json.dumps(report))
    return 0
