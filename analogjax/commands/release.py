"""`analogjax release --checkpoint DIR --out DIR [--set release.KEY=VALUE ...]`: HF folder + fidelity report + model
card for a finished run.

What the card discloses comes from the run's `release` config section, overridden here with --set (teacher_name,
data_description, lab, license, language, base_model_public, allow_local_paths, prompt); no local path, host or user
name reaches the bundle unless release.allow_local_paths is true.

The release gate (analogjax.release.gates): release.tasks (lm-eval) run for the analog and the teacher, then the size
cap (release.size_cap) and release.gates are judged; a failing gate refuses the release (one `error:` line per gate,
exit 2, nothing written) unless `--override-gate NAME --reason TEXT` releases past it, which the card then states.
"""

from __future__ import annotations

from analogjax.commands import add_job_arguments, join_job
from analogjax.commands.export import add_bundle_arguments


def add_arguments(parser) -> None:
    add_bundle_arguments(parser)
    parser.add_argument("--batches", type=int, default=None, help="held-out batches (default: train.eval_batches)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="release.KEY=VALUE",
        help="a release setting over the run's own, e.g. release.teacher_name=org/model (repeatable)",
    )
    parser.add_argument("--concepts", default=None, help="JSONL of your own concepts for the transfer checks")
    parser.add_argument("--no-transfer", action="store_true", help="leave the transfer checks out of the release")
    parser.add_argument(
        "--override-gate",
        dest="override_gates",
        action="append",
        default=[],
        metavar="NAME",
        help="release although this gate fails (size_cap, TASK.max_accuracy, ...); each needs its --reason",
    )
    parser.add_argument(
        "--reason",
        dest="reasons",
        action="append",
        default=[],
        metavar="TEXT",
        help="why the matching --override-gate is released past (the card's release statement prints it)",
    )
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.errors import UserError

    if args.concepts and args.no_transfer:
        raise UserError("--concepts is for the transfer checks, which --no-transfer leaves out")
    if len(args.override_gates) != len(args.reasons):
        raise UserError(
            f"--override-gate and --reason come in pairs: {len(args.override_gates)} gates, {len(args.reasons)} reasons"
        )
    join_job(args)
    from analogjax.fidelity.concepts import read_user_concepts
    from analogjax.release import write_release
    from analogjax.runtime import storage

    user = read_user_concepts(args.concepts) if args.concepts else ()
    with storage.output_folder(args.out, force=args.force) as folder:  # a gs:// --out: staged, then uploaded
        out = write_release(
            args.checkpoint,
            folder,
            batches=args.batches,
            force=args.force,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            weights_only=args.weights_only,
            release_overrides=args.overrides,
            transfer=not args.no_transfer,
            user_concepts=user,
            override_gates=list(zip(args.override_gates, args.reasons)),
        )
    print(f"wrote {args.out if storage.is_remote(args.out) else out}")
    return 0
