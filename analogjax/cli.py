"""The front door: `analogjax <command> ...`. Flags → config → run; each command lives in its own module.

Every mistake a user can make ends in one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable

from analogjax.errors import UserError
from analogjax.runtime.huge_pages import reexec_with_huge_pages
from analogjax.runtime.xla_flags import add_cpu_flags

# name → (module, help). Modules provide add_arguments(parser) and run(args) -> int; imported only when used, so
# `analogjax --help` stays fast and one command's heavy imports never slow another.
COMMANDS = {
    "demo": ("analogjax.commands.demo", "the whole analog workflow on an embedded corpus, nothing downloaded"),
    "distill": ("analogjax.commands.distill", "distill a teacher into a student from a config"),
    "prepare": ("analogjax.commands.prepare", "tokenize a text corpus into shards"),
    "compile-check": (
        "analogjax.commands.compile_check",
        "compile the distill step for a TPU topology: memory, FLOPs, fit",
    ),
    "cache-teacher": ("analogjax.commands.cache_teacher", "cache a teacher's top-k or sampled logits for distill"),
    "eval": ("analogjax.commands.eval", "fidelity of an analog to its teacher: KL, agreement, ECE, CKA, plots"),
    "transfer": (
        "analogjax.commands.transfer",
        "do the analog's stitching maps, probes and steering directions hold on the teacher?",
    ),
    "export": ("analogjax.commands.export", "write a run's student as a Hugging Face folder"),
    "release": ("analogjax.commands.release", "HF folder + fidelity report + model card for a finished run"),
    "config": ("analogjax.commands.config", "print the fully resolved config a run would use (--explain: sources)"),
    "generate": ("analogjax.commands.generate", "continue prompts with a run's student or a HF model (sampling)"),
    "prune": ("analogjax.commands.prune", "start an analog from its teacher: prune by activation importance"),
    "evaluate-tasks": (
        "analogjax.commands.evaluate_tasks",
        "lm-evaluation-harness tasks for a run, a HF folder or bundle, or a GGUF file (lm-eval's results JSON)",
    ),
    "check": (
        "analogjax.commands.check",
        "verify a workdir's checkpoints, a teacher cache or prepared shards: intact, damaged, what a resume uses",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line (exit 2) like every other user error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="analogjax", description="Distill a large JAX model into a small analog.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(cmd)
    return parser


def skip_absent_tpu(environ=os.environ) -> None:
    """libtpu (the `tpu` extra, which compile-check needs) makes every JAX start-up probe for TPU chips and print
    errors on machines that have none. Where none is attached and the user named no platform, skip the probe;
    compile-check still finds libtpu for its compile-only TPU devices."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return
    from analogjax.runtime.distributed import detected_platform

    tpu_hints = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "COLAB_TPU_ADDR", "TPU_WORKER_HOSTNAMES")
    if (
        detected_platform(environ) == "tpu"
        or any(k in environ for k in tpu_hints)
        or glob.glob("/dev/accel*")
        or glob.glob("/dev/vfio/[0-9]*")
    ):
        return
    cuda = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"


def quiet_libraries() -> None:
    """What a user sees is what analogjax says: its own warnings (printed to stderr) and errors.

    Orbax and Grain log routine events through absl at WARNING ("read_only=True, setting save_interval_steps=0"),
    which read as trouble on a user's screen: only their errors are shown. A worker thread (the checkpoint writer, a
    data reader) that stops on a UserError prints nothing: the error reaches the main thread, which prints its one
    line; any other exception in a thread keeps its traceback."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    if getattr(threading.excepthook, "quiet_on_user_error", False):  # main() may run many times in one process
        return
    threading.excepthook = QuietOnUserError(threading.excepthook)


class QuietOnUserError:
    """A thread excepthook that says nothing for a UserError and hands every other exception to the hook it wraps.
    A class (not a closure) so the marker quiet_libraries looks for is a declared attribute."""

    quiet_on_user_error = True

    def __init__(self, default_hook: Callable[[threading.ExceptHookArgs], object]) -> None:
        self.default_hook = default_hook

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.exc_value, UserError):
            self.default_hook(args)


def console_main() -> None:
    """The `analogjax` command's process entry (and `python -m analogjax`): huge pages for the host allocator (a
    re-execution where the environment lacks them; analogjax/runtime/huge_pages.py says why), then `main`. Library
    callers and tests call `main` itself, which never replaces the process."""
    reexec_with_huge_pages()
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A UserError (or a usage mistake) is one `error:` line and exit status 2; any other exception
    is a bug and keeps its traceback, so it is deliberately not caught here."""
    argv = sys.argv[1:] if argv is None else argv
    skip_absent_tpu()
    add_cpu_flags()  # before any command starts a JAX backend (analogjax/runtime/xla_flags.py says why)
    quiet_libraries()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return importlib.import_module(args._module).run(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def add_config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    """--config FILE and repeated --set key=value, shared by every command that reads a config."""
    parser.add_argument("--config", required=config_required, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.steps=200 (repeatable)",
    )


if __name__ == "__main__":
    sys.exit(main())
