"""`analogjax compile-check --config FILE [--topology v5p-256]`: compile the real distill step ahead of time for a
TPU slice (libtpu on this machine; no TPU needed) and print memory per chip, FLOPs and a roofline bound.

It never joins a multi-host job: one process compiles for the whole slice's devices.
"""

from __future__ import annotations

import sys

from analogjax.errors import UserError


def add_arguments(parser) -> None:
    from analogjax.cli import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument(
        "--topology",
        default=None,
        help="TPU slice to compile for, e.g. v4-32, v5e-64, v5p-256, v6e-256 (default: the config's topology)",
    )


def run(args) -> int:
    from analogjax.config import load_config
    from analogjax.runtime.compile_check import compile_plan, parse_topology, report

    config = load_config(args.config, args.overrides)
    name = args.topology or config.topology
    if not name:
        raise UserError("no topology: pass --topology (e.g. v5p-256) or set topology: in the config")
    plan = compile_plan(config, parse_topology(name))
    if config.distill.on_policy.enabled:
        print(
            "warning: distill.on_policy: only the off-policy distill step was compiled; the on-policy rollout "
            "(KV cache) and its step are not in these figures",
            file=sys.stderr,
        )
    for line in report(plan):
        print(line)
    sys.stdout.flush()
    return 0 if plan.fits else 1
