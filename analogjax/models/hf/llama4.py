"""Llama 4 text's per-layer config.json keys ⇄ the ModelConfig fields they set, under convert.py's refusal rule.

Read after the common keys (convert.config_from_hf_dict), in place of the generic layer-window and MoE readers, as
transformers' Llama4TextConfig resolves them:
- no_rope_layers: 1 = the layer rotates, 0 = NoPE (default: every `no_rope_layer_interval`-th layer is NoPE);
- layer_types: chunked_attention / full_attention (default: the RoPE layers chunked when attention_chunk_size is
  set) → layer_pattern, attention_chunk;
- use_qk_norm → qk_l2_norm (RoPE layers only); attn_temperature_tuning, attn_scale, floor_scale →
  attn_temperature_scale/floor (NoPE layers only);
- moe_layers, else every `interleave_moe_layer_step`-th layer → a dense prefix then every n-th layer MoE
  (models/config.MoEConfig); the experts and the always-on shared expert are `intermediate_size` wide, the dense
  layers `intermediate_size_mlp`; top-k sigmoid routing whose weights scale the experts' inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from analogjax.models.config import CHUNKED, FULL, ModelConfig, MoEConfig
from analogjax.models.hf.rope import Refuse

_KINDS = {"chunked_attention": CHUNKED, "full_attention": FULL}


def _cycle(values: list) -> tuple:
    """The shortest cycle that repeats to `values`."""
    for period in range(1, len(values) + 1):
        if all(values[i] == values[i % period] for i in range(len(values))):
            return tuple(values[:period])
    return tuple(values)


def from_hf(cfg: ModelConfig, hf: dict, refuse: Refuse) -> ModelConfig:
    """`cfg` (read from the common keys) with Llama 4's per-layer attention and MoE layers set from `hf`."""
    layers = cfg.n_layers
    interval = int(hf.get("no_rope_layer_interval", 4))
    rotates = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(rotates) < layers or any(r not in (0, 1) for r in rotates[:layers]):
        refuse(f"no_rope_layers {rotates!r} (one 0 or 1 per layer)")
    nope = [not r for r in rotates[:layers]]
    chunk = hf.get("attention_chunk_size", 8192)
    types = hf.get("layer_types")
    if types is None:
        types = ["chunked_attention" if not n and chunk is not None else "full_attention" for n in nope]
    if len(types) != layers or any(t not in _KINDS for t in types):
        refuse(f"layer_types {types!r}")
    kinds = [_KINDS[t] for t in types]
    if CHUNKED in kinds and not (isinstance(chunk, int) and chunk > 0):
        refuse(f"chunked layers with attention_chunk_size {chunk!r}")
    if hf.get("attention_bias"):
        refuse("attention_bias")
    tuning = bool(hf.get("attn_temperature_tuning", True)) and any(nope)
    scale = float(hf.get("attn_scale", 0.1)) if tuning else 0.0
    floor = hf.get("floor_scale", 8192)
    if scale and not (isinstance(floor, (int, float)) and floor > 0 and float(floor).is_integer()):
        refuse(f"floor_scale {floor!r} (a positive whole number of tokens)")
    pattern = _cycle(kinds)
    d_ff = int(hf.get("intermediate_size_mlp", 16384))
    return dataclasses.replace(
        cfg,
        d_ff=d_ff,
        layer_pattern=() if len(pattern) == 1 else pattern,
        attention_chunk=int(chunk) if CHUNKED in kinds else 0,
        nope_pattern=_cycle(nope) if any(nope) else (),
        qk_l2_norm=bool(hf.get("use_qk_norm", True)) and not all(nope),
        attn_temperature_scale=scale,
        attn_temperature_floor=int(floor) if scale else 8192,
        moe=_moe_from_hf(hf, layers, refuse),
    )


def _moe_from_hf(hf: dict, layers: int, refuse: Refuse) -> MoEConfig:
    step = int(hf.get("interleave_moe_layer_step", 1))
    listed = hf.get("moe_layers")
    moe_layers = set(listed if listed is not None else range(step - 1, layers, step) if step > 0 else [])
    sparse = [i in moe_layers for i in range(layers)]
    if not any(sparse):
        return MoEConfig()
    width = int(hf.get("intermediate_size", 8192))
    if step > 0 and sparse == [(i + 1) % step == 0 for i in range(layers)]:
        every, first_dense = step, 0  # the step's own layout (one MoE layer in 2 could also read as prefix 1)
    else:
        first = sparse.index(True)
        later = [i for i in range(first + 1, layers) if sparse[i]]
        every = later[0] - first if later else layers - first
        first_dense = first - (every - 1)
    moe = MoEConfig(
        experts=int(hf.get("num_local_experts", 16)),
        top_k=int(hf.get("num_experts_per_tok", 1)),
        # Always spelled out (never 0, "the dense width"): an analog that changes d_ff keeps its experts' width,
        # which its shared expert shares, and so stays a Llama 4.
        expert_d_ff=width,
        shared_d_ff=width,
        router="sigmoid",
        norm_topk=False,
        weights_on_input=True,
        first_dense_layers=max(first_dense, 0),
        every=every,
    )
    if (
        first_dense < 0
        or (layers - first_dense) % every
        or any(moe.is_moe_layer(i) != sparse[i] for i in range(layers))
        or any(i >= layers or i < 0 for i in moe_layers)
    ):
        refuse(
            f"MoE layers at {sorted(moe_layers)}: only a dense prefix then every n-th layer (the last of each n) "
            "is supported"
        )
    return moe


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Llama 4's per-layer keys for `cfg` (convert.architecture_for's round trip refuses what they cannot carry)."""
    moe = cfg.moe
    return {
        "intermediate_size": cfg.expert_d_ff if moe.enabled else cfg.d_ff,
        "intermediate_size_mlp": cfg.d_ff,
        "num_local_experts": moe.experts if moe.enabled else 1,
        "num_experts_per_tok": moe.top_k if moe.enabled else 1,
        "moe_layers": [i for i in range(cfg.n_layers) if moe.is_moe_layer(i)],
        "interleave_moe_layer_step": moe.every if moe.enabled else 1,
        "router_jitter_noise": 0.0,
        "use_qk_norm": cfg.qk_l2_norm,
        "no_rope_layers": [0 if nope else 1 for nope in cfg.layer_nope],
        "attention_chunk_size": cfg.attention_chunk or None,
        "layer_types": ["chunked_attention" if kind == CHUNKED else "full_attention" for kind in cfg.layer_kinds],
        "attn_temperature_tuning": bool(cfg.attn_temperature_scale),
        "attn_scale": cfg.attn_temperature_scale or 0.1,
        "floor_scale": cfg.attn_temperature_floor,
    }
