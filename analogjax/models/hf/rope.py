"""RoPE dictionaries of config.json ⇄ (theta, RopeScaling), under the refusal rule of convert.py.

transformers spells one RoPE as `rope_parameters` (or the older `rope_scaling` beside `rope_theta`); Gemma 3 has one
dictionary per attention kind (its global and local bases). Every key of a dictionary is read (`_ROPE_KEYS`) and
every RoPE type is computed as transformers does, or refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from analogjax.models.config import RopeScaling
from analogjax.models.hf.families import Family

Refuse = Callable[[str], NoReturn]  # raises the UserError that names the feature (convert.config_from_hf_dict)

_ROPE_KEYS = {
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "partial_rotary_factor",
}


def _from_dictionary(params: dict, hf: dict, family: Family, refuse: Refuse) -> tuple[float | None, RopeScaling]:
    """(theta or None, scaling) of one RoPE dictionary (transformers' rope_parameters / rope_scaling)."""
    for key in params:
        if key not in _ROPE_KEYS:
            refuse(f"RoPE parameter {key!r}")
    kind = params.get("rope_type", params.get("type")) or "default"
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0 and not family.rotary_fraction_default:
        refuse(f"partial_rotary_factor {params['partial_rotary_factor']}")
    theta = params.get("rope_theta")
    if kind == "default":
        return theta, RopeScaling()
    if kind not in family.rope_scalings:
        refuse(f"RoPE type {kind!r}")  # dynamic and longrope depend on the sequence length
    original = int(
        params.get("original_max_position_embeddings")
        or hf.get("original_max_position_embeddings")
        or hf.get("max_position_embeddings")
        or 0
    )
    factor = params.get("factor")
    if factor is None and kind == "yarn" and original:
        factor = float(hf.get("max_position_embeddings", 0)) / original
    if factor is None:
        refuse(f"RoPE type {kind!r} without a factor")
    extra: dict[str, Any] = {}
    if kind == "llama3":
        extra = dict(
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"])
        )
    if kind == "yarn":
        extra = dict(
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            truncate=bool(params.get("truncate", True)),
            attention_factor=float(params.get("attention_factor") or 0.0),
            mscale=float(params.get("mscale") or 0.0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        )
    scaling = RopeScaling(
        kind=kind, factor=float(factor), original_max_positions=original if kind != "linear" else 0, **extra
    )
    return theta, scaling


def rope_from_hf(hf: dict, family: Family, refuse: Refuse) -> tuple[Any, RopeScaling, float]:
    """(theta, scaling, local theta or 0.0) from one RoPE dictionary, or (Gemma 3) one per attention kind."""
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):
        rope = {**rope, **hf["rope_scaling"]} if not rope.get("full_attention") else rope
    local_theta = 0.0
    if family.rope_per_layer_type:
        if "full_attention" in rope or "sliding_attention" in rope:
            for key in rope:
                if key not in ("full_attention", "sliding_attention"):
                    refuse(f"RoPE parameter {key!r} beside per-layer-type parameters")
            full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        else:  # legacy: rope_scaling applies to the global layers, rope_local_base_freq to the local ones
            full, local = rope, {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        theta, scaling = _from_dictionary(full, hf, family, refuse)
        theta = theta or hf.get("rope_theta") or 1_000_000.0
        local_theta_value, local_scaling = _from_dictionary(local, hf, family, refuse)
        if local_scaling.kind != "none":
            refuse(f"RoPE scaling {local_scaling.kind!r} on the sliding layers")
        local_theta = float(local_theta_value or hf.get("rope_local_base_freq") or 10000.0)
    else:
        theta, scaling = _from_dictionary(rope, hf, family, refuse)
        theta = theta or hf.get("rope_theta") or family.default_rope_theta
    if float(hf.get("partial_rotary_factor", 1.0) or 1.0) != 1.0 and not family.rotary_fraction_default:
        refuse(f"partial_rotary_factor {hf['partial_rotary_factor']}")
    return theta, scaling, local_theta


def rotary_fraction_from_hf(hf: dict, family: Family) -> float:
    """The share of head dims that rotate: partial_rotary_factor (in the RoPE dictionary or beside it) where the
    family reads it (GLM-4.5), else 1 (rope_from_hf refuses any other value)."""
    if not family.rotary_fraction_default:
        return 1.0
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    value = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    return float(value if value is not None else family.rotary_fraction_default)


def rope_to_hf(theta: float, scaling: RopeScaling) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default" if scaling.kind == "none" else scaling.kind, "rope_theta": theta}
    if scaling.kind == "none":
        return out
    out["factor"] = scaling.factor
    if scaling.kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = scaling.original_max_positions
    if scaling.kind == "llama3":
        out.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    if scaling.kind == "yarn":
        out.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(scaling, key):
                out[key] = getattr(scaling, key)
    return out
