"""Hugging Face interop, public names: `analogjax.hf.load(path)(tokens) -> logits`, `save(model, out_dir)`
(`save(load(path), out)` round-trips; a run's `result["student"]` saves the same way), `save_params`, `load_params`.

The implementation lives in the package analogjax/models/hf/; this module only re-exports it under a short name.
"""

from analogjax.models.hf import (  # noqa: F401
    HFModel,
    Model,
    architecture_for,
    config_from_hf_dict,
    load,
    load_params,
    model_config_from_hf,
    save,
    save_params,
)

__all__ = [
    "HFModel",
    "Model",
    "architecture_for",
    "config_from_hf_dict",
    "load",
    "load_params",
    "model_config_from_hf",
    "save",
    "save_params",
]
