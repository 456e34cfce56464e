"""`analogjax demo [--teacher smollm2|self] [--config FILE] [--set k=v] [--workdir DIR]`: the whole analog workflow
on an embedded corpus (analogjax/recipes/demo.py), nothing downloaded at run time."""

from __future__ import annotations

from analogjax.cli import add_config_arguments
from analogjax.commands import add_job_arguments, join_job
from analogjax.recipes import demo_teacher


def add_arguments(parser) -> None:
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--workdir", default="runs/demo", help="where every phase writes (default: runs/demo)")
    parser.add_argument(
        "--teacher",
        choices=sorted(demo_teacher.NAMES),
        default="smollm2",
        help=f"smollm2: SmolLM2-135M-Instruct from the {demo_teacher.WHEEL} wheel (default); self: a small "
        "teacher pretrained by the demo, nothing installed beyond analogjax",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_job_arguments(parser)


def run(args) -> int:
    join_job(args)
    from analogjax.recipes.demo import run_real, run_self

    return run_self(args) if args.teacher == "self" else run_real(args)
