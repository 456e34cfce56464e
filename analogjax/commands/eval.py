"""`analogjax eval --config FILE [--checkpoint DIR] [--out DIR] [--batches N]`: fidelity of an analog to its teacher.

The config names the teacher and the held-out data; the checkpoint (default: the distill command's default workdir,
runs/<config name>) holds the student. Writes fidelity.json, fidelity.md and PNG plots; unless --no-transfer, the
transfer checks (analogjax.fidelity.transfer) are included under `transfer` in fidelity.json and as a section of
fidelity.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint", default=None, help="a run's workdir or checkpoints directory (default: runs/<config name>)"
    )
    parser.add_argument("--out", default=None, help="report folder (default: <workdir>/fidelity)")
    parser.add_argument("--batches", type=int, default=None, help="held-out batches (default: train.eval_batches)")
    parser.add_argument(
        "--concepts",
        default=None,
        help="JSONL of your own concepts for the transfer checks (see `analogjax transfer --help`)",
    )
    parser.add_argument(
        "--no-transfer", action="store_true", help="skip the transfer checks (stitching, probes, steering)"
    )
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.config import load_config
    from analogjax.errors import UserError
    from analogjax.fidelity.concepts import read_user_concepts
    from analogjax.fidelity.measure_run import fidelity_of_run
    from analogjax.run_dir import resolve_run
    from analogjax.runtime import storage

    config = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or str(Path("runs") / Path(args.config).stem)
    if args.batches is not None and args.batches <= 0:
        raise UserError("--batches must be positive")
    if args.concepts and args.no_transfer:
        raise UserError("--concepts is for the transfer checks, which --no-transfer skips")
    user = read_user_concepts(args.concepts) if args.concepts else ()
    ckpt_dir, workdir = resolve_run(checkpoint)
    join_job(args)
    out = args.out or str((workdir or ckpt_dir.parent) / "fidelity")
    with storage.output_folder(out, "--out", overwrite=True) as folder:  # a gs:// --out: staged, then uploaded
        report = fidelity_of_run(
            checkpoint, folder, config=config, batches=args.batches, transfer=not args.no_transfer, user_concepts=user
        )
    print(
        json.dumps(
            {
                "out": str(out),
                "documents": report.get("documents"),
                **{k: round(v, 5) if isinstance(v, float) else v for k, v in report["overall"].items()},
            }
        )
    )
    return 0
