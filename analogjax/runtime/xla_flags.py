"""XLA settings analogjax's own processes start with (the CLI, bench/, the tests), added to XLA_FLAGS before JAX
starts a backend. A library import changes nothing: another codebase's process keeps its own flags.

On CPU, XLA 0.10 hands reductions to the YNNPACK library, which takes its input materialised: a log-softmax over a
[chunk, vocabulary] block then writes and re-reads that block once per reduction (the max, the exponentials' sum,
the target pick), where XLA's own loop fusion computes the reduced values in the pass that produces them. Measured
on 2 cores, one run each (BENCHMARKS.md, "What changed because of it"): the fused loss + gradient at the demo's
shape (512 tokens, d_model 256, 49,152-token vocabulary) 0.55 s → 0.49 s; its whole distill step 0.72 s → 0.63 s;
bench/step.py's dims unchanged (MFU 0.583 → 0.585). YNNPACK keeps the dots, where it is the fast path. The cost:
XLA's own full reductions are slower on CPU, most visibly the optimizer's global gradient norm (the demo student's
15.7M-entry gradient: 3-4 ms → 38-46 ms per step, written as a row, column or dot reduction alike), which the
loss's gain more than pays for at every shape measured.

Only these flags are added, each only when XLA_FLAGS does not already set it (a user's choice wins), and only for
the jaxlib releases whose XLA knows it: an unknown flag in XLA_FLAGS aborts every JAX process, so an upgraded
jaxlib simply runs without it until it is measured again.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# flag name → (value, jaxlib versions it is known for, as "major.minor" prefixes)
CPU_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "--xla_cpu_experimental_ynn_fusion_type": ("-reduce", ("0.10.",)),
}


def _jaxlib_version() -> str:
    """The installed jaxlib's version from its package metadata: importing jaxlib would cost every command (`--help`,
    a refused config) the start-up it otherwise never pays."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


def add_cpu_flags(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> list[str]:
    """Add CPU_FLAGS to environ["XLA_FLAGS"] where absent and known to this jaxlib; the flags added. Call before the
    first JAX computation: XLA reads its flags once, when a backend starts."""
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    given = environ.get("XLA_FLAGS", "").split()
    given_names = {flag.split("=", 1)[0] for flag in given}
    added = [
        f"{name}={value}"
        for name, (value, versions) in CPU_FLAGS.items()
        if name not in given_names and version.startswith(versions)
    ]
    if added:
        environ["XLA_FLAGS"] = " ".join(given + added)
    return added


__all__ = ["CPU_FLAGS", "add_cpu_flags"]
