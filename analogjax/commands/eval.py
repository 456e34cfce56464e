"""`analogjax eval --config FILE [--checkpoint DIR] [--out DIR] [--batches N]`: fidelity of an analog to its teacher.

The config names the teacher and the held-out data; the checkpoint (default: the distill command's default workdir,
runs/<config name>) holds the student. Writes fidelity.json, fidelity.md and PNG plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", default=None, help="a run's workdir or checkpoints directory "
                        "(default: runs/<config name>)")
    parser.add_argument("--out", default=None, help="report folder (default: <workdir>/fidelity)")
    parser.add_argument("--batches", type=int, default=None, help="held-out batches (default: train.eval_batches)")
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.config import load_config
    from analogjax.errors import UserError
    from analogjax.release import fidelity_of_run, resolve_run

    config = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or str(Path("runs") / Path(args.config).stem)
    if args.batches is not None and args.batches <= 0:
        raise UserError("--batches must be positive")
    ckpt_dir, workdir = resolve_run(checkpoint)
    join_job(args)
    out = Path(args.out) if args.out else (workdir or ckpt_dir.parent) / "fidelity"
    report = fidelity_of_run(checkpoint, out, config=config, batches=args.batches)
    print(json.dumps({"out": str(out), **{k: round(v, 5) if isinstance(v, float) else v
                                          for k, v in report["overall"].items()}}))
    return 0
