"""analogjax: distill a large JAX teacher into a small, faithful analog.

The public API, what other JAX codebases import (each name is tested in tests/test_public_api.py). Names load on
first use, so `import analogjax` (and the CLI's start) stays light.

    from analogjax import load_config, Teacher, build, run_training, hf, losses
"""

import importlib

__version__ = "0.1.0"

# name → (module, attribute or None for the module itself)
_EXPORTS = {
    "Config": ("analogjax.config", "Config"),
    "load_config": ("analogjax.config", "load_config"),
    "UserError": ("analogjax.errors", "UserError"),
    "Teacher": ("analogjax.teacher", "Teacher"),
    "model_teacher": ("analogjax.teacher", "model_teacher"),
    "Run": ("analogjax.setup", "Run"),
    "build": ("analogjax.setup", "build"),
    "evaluate": ("analogjax.setup", "evaluate"),
    "run_training": ("analogjax.train", "run_training"),
    "Transformer": ("analogjax.models.transformer", "Transformer"),
    "ModelConfig": ("analogjax.models.config", "ModelConfig"),
    "Model": ("analogjax.models.model", "Model"),
    "make_mesh": ("analogjax.mesh", "make_mesh"),
    "hf": ("analogjax.hf", None),
    "losses": ("analogjax.objective.divergences", None),
    "Objective": ("analogjax.objective.core", "Objective"),
    "TeacherSignal": ("analogjax.objective.signal", "TeacherSignal"),
    "fidelity": ("analogjax.fidelity", None),
    "generate": ("analogjax.models.sampling", "generate"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analogjax' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return __all__
