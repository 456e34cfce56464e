"""`analogjax cache-teacher --config FILE [--set k=v ...] [--kind topk|sampled] [--k K] [--codec raw|zstd] [--out DIR]`.

Runs the config's teacher over the exact batches a run of that config consumes and writes its top-k logits (or
samples) to teacher.cache (or --out); `analogjax distill` with the same config then reads them instead of a teacher.
Restarting after an interruption skips the steps already written.
"""

from __future__ import annotations

import json

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="cache directory (default: teacher.cache)")
    parser.add_argument(
        "--kind",
        default="topk",
        choices=("topk", "sampled"),
        help="topk: k largest logits + ids + logsumexp; sampled: k importance-weighted samples",
    )
    parser.add_argument("--k", type=int, default=64, help="top-k entries or samples per token (default 64)")
    parser.add_argument(
        "--values-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="dtype of top-k values (float32 with k = vocab is an exact dense teacher)",
    )
    parser.add_argument("--codec", default="raw", choices=("raw", "zstd"), help="chunk compression")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.config import load_config
    from analogjax.runtime import storage

    config = load_config(args.config, args.overrides)
    storage.check_config_paths(config, ("--out", args.out))  # a missing bucket or credential: before anything
    join_job(args)
    from analogjax.teacher_cache import CacheLayout, build_cache  # heavy imports only once the config is good

    layout = CacheLayout(kind=args.kind, k=args.k, values_dtype=args.values_dtype, codec=args.codec)
    summary = build_cache(config, layout, args.out, progress=not args.no_progress)
    print(
        json.dumps(
            {key: summary[key] for key in ("path", "complete", "tokens_per_s", "bytes_per_token")}
            | {"written_steps": len(summary["written_steps"]), "skipped_steps": summary["skipped_steps"]}
        )
    )
    return 0
