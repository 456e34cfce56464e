"""`analogjax prune --config FILE --out DIR [--batches N]`: start an analog from its teacher (Minitron pruning).

The config names the teacher (teacher.checkpoint, teacher.hf_path, or a preset: random, for trials) and the
student's shape (`model`, best as `model.like_teacher: {size fields}`). Importance is gathered on the first N
batches of the config's training data; DIR receives a step-0 checkpoint of the pruned student (start a run from it
with `--set checkpoint.init_path=DIR`; `analogjax eval --checkpoint DIR` and `analogjax export --checkpoint DIR`
read it) plus importance.json, importance.npz and importance.png. An existing DIR is never overwritten.
"""

from __future__ import annotations

import json

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="new directory for the pruned checkpoint and importance files")
    parser.add_argument(
        "--batches", type=int, default=None, help="calibration batches of the training data (default 16)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.config import load_config
    from analogjax.errors import UserError
    from analogjax.models.prune import DEFAULT_BATCHES, check_target
    from analogjax.runtime import storage

    config = load_config(args.config, args.overrides)
    batches = DEFAULT_BATCHES if args.batches is None else args.batches
    if batches <= 0:
        raise UserError("--batches must be positive")
    storage.check_config_paths(config, ("--out", args.out))  # before any teacher is loaded
    out = storage.location(args.out, "--out")
    if out.exists():
        raise UserError(f"--out {out} exists: prune never overwrites; choose a new directory")
    check_target(config.teacher.model, config.model)
    join_job(args)
    from analogjax.models.prune import prune_to

    summary = prune_to(config, args.out, batches=batches, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
