"""`analogjax export --checkpoint DIR --out DIR [--tokenizer FILE | --weights-only] [--force] [--dtype ...]`: a run's
student as a HF folder with its tokenizer (the run's data.tokenizer, or for "none" the one its prepared shards name).
"""

from __future__ import annotations

from analogjax.commands import add_job_arguments, join_job


def add_bundle_arguments(parser) -> None:
    """Flags export and release share."""
    parser.add_argument("--checkpoint", required=True, help="a run's workdir or its checkpoints directory")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights' dtype")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer the run's token ids belong to, when its config and data do not say",
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="publish the weights without a tokenizer (refused otherwise when none is found)",
    )


def add_arguments(parser) -> None:
    add_bundle_arguments(parser)
    add_job_arguments(parser)


def run(args) -> int:
    join_job(args)
    from analogjax.release import export_run
    from analogjax.runtime import storage

    with storage.output_folder(args.out, force=args.force) as folder:  # a gs:// --out: staged, then uploaded
        export_run(
            args.checkpoint,
            folder,
            force=args.force,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            weights_only=args.weights_only,
        )
    print(f"wrote {args.out}")
    return 0
