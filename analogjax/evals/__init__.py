"""Task evaluation through EleutherAI's lm-evaluation-harness (`lm_eval`, the `eval` extra).

- `lm`: `AnalogLM`, any model analogjax runs as an lm-eval model (loglikelihood, loglikelihood_rolling,
  generate_until), batched on the mesh;
- `load`: `load_lm(spec)` for a run, a HF folder or release bundle, or a GGUF file;
- `tasks`: lm-eval tasks by name or local file, run for one model or compared between analog and teacher (the
  release's task fidelity).

`analogjax.evals.AnalogLM` and `analogjax.evals.load_lm` import lm-eval on first use, so this package costs nothing
until a task runs.
"""

from __future__ import annotations

from typing import Any

from analogjax.errors import UserError

__all__ = ["AnalogLM", "load_lm", "require_lm_harness"]


def require_lm_harness(key: str) -> None:
    """UserError naming `key` where lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"{key} needs lm-evaluation-harness: pip install 'analogjax[eval]'") from None


def __getattr__(name: str) -> Any:
    if name == "AnalogLM":
        require_lm_harness("analogjax.evals.AnalogLM")
        from analogjax.evals.lm import AnalogLM

        return AnalogLM
    if name == "load_lm":
        from analogjax.evals.load import load_lm

        return load_lm
    raise AttributeError(f"module 'analogjax.evals' has no attribute {name!r}")
