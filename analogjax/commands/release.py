"""`analogjax release --checkpoint DIR --out DIR`: HF folder + fidelity report + model card for a finished run."""

from __future__ import annotations

from analogjax.commands import add_job_arguments, join_job


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints directory")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    parser.add_argument("--batches", type=int, default=None, help="held-out batches (default: train.eval_batches)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights' dtype")
    add_job_arguments(parser)


def run(args) -> int:
    join_job(args)
    from analogjax.release import write_release

    out = write_release(args.checkpoint, args.out, batches=args.batches, force=args.force, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
