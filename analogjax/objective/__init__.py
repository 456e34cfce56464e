"""What the step minimises.

- `core`: `Objective`, built once from the distill config: its terms, how it reads the teacher's signal, the loss
  and the eval sums;
- `terms`: the term registry, one record per kind of term (function, parameters, T² default, sparse stand-in), and
  the distill section's checks (JAX-free: `analogjax config` validates with it);
- `signal`: `TeacherSignal`, the one shape of a teacher's outputs;
- `divergences`: per-token divergences on logits (public as `analogjax.losses`);
- `fused`: the chunked loss that never holds [tokens, vocab] logits;
- `sparse`: top-k and sampled teachers (a teacher cache's rows);
- `hidden`: hidden-state matching through learned projections.

Names load on first use (as `analogjax`'s do), so importing `analogjax.objective.terms` imports no JAX.
"""

import importlib

_EXPORTS = {
    "Objective": "analogjax.objective.core",
    "StudentOutputs": "analogjax.objective.core",
    "check_vocab": "analogjax.objective.core",
    "TeacherSignal": "analogjax.objective.signal",
    "TERMS": "analogjax.objective.terms",
    "Term": "analogjax.objective.terms",
    "check_distill": "analogjax.objective.terms",
    "needs_teacher": "analogjax.objective.terms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analogjax.objective' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
