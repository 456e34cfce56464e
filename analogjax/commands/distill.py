"""`analogjax distill --config FILE [--set k=v ...] [--workdir DIR]`."""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job
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
    storage.check_config_paths(config, ("--workdir", workdir))  # a missing bucket or credential: before anything
    join_job(args)
    from analogjax.train import run_training  # heavy imports only once the config is known to be good

    result = run_training(config, workdir, progress=not args.no_progress)
    if not distributed.is_main():  # one report per job, from process 0
        return 0
    print(
        json.dumps(
            {
                "step": result["step"],
                "workdir": workdir,
                **{f"heldout_{k}": round(v, 5) for k, v in result["heldout"].items()},
            }
        )
    )
    return 0
