"""Hugging Face interop, public names: `analogjax.hf.load(path)(tokens) -> logits`, `save`, `load_params`.

The implementation lives in analogjax/models/hf.py; this module only re-exports it under a short name.
"""

from analogjax.models.hf import (  # noqa: F401
    HFModel,
    architecture_for,
    config_from_hf_dict,
    load,
    load_params,
    model_config_from_hf,
    save,
)

__all__ = ["HFModel", "architecture_for", "config_from_hf_dict", "load", "load_params", "model_config_from_hf", "save"]
