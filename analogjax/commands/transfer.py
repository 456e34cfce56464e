"""`analogjax transfer --config FILE [--checkpoint DIR] [--concepts FILE] [--out DIR]`: do stitching maps, probes
and steering directions found on the analog hold on its teacher? (analogjax.fidelity.transfer)

The config names the teacher and the held-out data; the checkpoint (default: runs/<config name>) holds the analog.
Writes transfer.json, transfer.md and PNG plots (default folder: <workdir>/transfer).
"""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job
from analogjax.errors import UserError


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint", default=None, help="a run's workdir or checkpoints directory (default: runs/<config name>)"
    )
    parser.add_argument(
        "--concepts",
        default=None,
        help='JSONL of your own concepts: {"concept": NAME, "text": ..., '
        '"spans": [[start, end], ...]} per line (character offsets, end exclusive)',
    )
    parser.add_argument("--out", default=None, help="report folder (default: <workdir>/transfer)")
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="held-out batches, about half of them fitting the maps and probes (default: train.eval_batches)",
    )
    parser.add_argument(
        "--fit-batches",
        type=int,
        default=None,
        help="held-out batches of fit documents for the maps and probes (default: half of --batches, rounded up)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help="held-out batches of eval documents measured (stitching, probes, steering; default: half of --batches)",
    )
    parser.add_argument(
        "--intervention-batches",
        type=int,
        default=None,
        help="of the eval batches, how many also run the interventions: stitched forwards and steering, ~10x a "
        "plain forward each (the rows of --concepts texts always do); the rest measure explained variance, probes "
        "and CE only (default: all)",
    )
    parser.add_argument(
        "--pairs",
        default=None,
        metavar="I:J,...",
        help="analog:teacher layer pairs (default: equal fractions of depth)",
    )
    parser.add_argument(
        "--concept-pair",
        default=None,
        metavar="I:J",
        help="the layer pair for probes and steering (default: the middle pair, rounding down)",
    )
    add_job_arguments(parser)


def parse_pairs(text: str, flag: str) -> tuple[tuple[int, int], ...]:
    """ "0:1,1:3" → ((0, 1), (1, 3)); anything else is a UserError naming the flag."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            pairs.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise UserError(f"{flag}: {item.strip()!r} is not an analog:teacher layer pair such as 1:3") from None
    return tuple(pairs)


def run(args) -> int:
    from analogjax.config import load_config
    from analogjax.fidelity.concepts import read_user_concepts
    from analogjax.fidelity.measure_run import transfer_of_run
    from analogjax.run_dir import check_same_model, resolve_run, run_config
    from analogjax.runtime import storage

    config = load_config(args.config, args.overrides)
    for flag in ("batches", "fit_batches", "eval_batches", "intervention_batches"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    pairs = parse_pairs(args.pairs, "--pairs") if args.pairs else None
    concept_pair = parse_pairs(args.concept_pair, "--concept-pair") if args.concept_pair else None
    if concept_pair is not None and len(concept_pair) != 1:
        raise UserError("--concept-pair takes one analog:teacher layer pair")
    user = read_user_concepts(args.concepts) if args.concepts else ()
    checkpoint = args.checkpoint or str(Path("runs") / Path(args.config).stem)
    ckpt_dir, workdir = resolve_run(checkpoint)
    join_job(args)
    run_cfg, ckpt_dir, workdir, step = run_config(checkpoint)
    check_same_model(config, run_cfg, ckpt_dir)
    out = args.out or str((workdir or ckpt_dir.parent) / "transfer")
    report = transfer_of_run(
        config,
        ckpt_dir,
        step,
        batches=args.batches,
        fit_batches=args.fit_batches,
        eval_batches=args.eval_batches,
        intervention_batches=args.intervention_batches,
        user_concepts=user,
        pairs=pairs,
        concept_pair=concept_pair[0] if concept_pair else None,
    )
    from analogjax.fidelity.transfer import write_report

    with storage.output_folder(out, "--out", overwrite=True) as folder:  # a gs:// --out: staged, then uploaded
        write_report(report, folder)
    print(
        json.dumps(
            {
                "out": str(out),
                "step": step,
                "explained_variance": [round(s["explained_variance"], 4) for s in report["stitch"]],
                "probe_recovered": {p["concept"]: p["recovered"] for p in report["probes"]},
                "steering_recovered": {s["concept"]: s["recovered"] for s in report["steering"]},
                "skipped": [s["concept"] for s in report["skipped"]],
            }
        )
    )
    return 0
