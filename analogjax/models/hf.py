"""Hugging Face interop: decoder-family safetensors + config.json ⇄ analogjax params.

Import reads tensor by tensor onto the mesh: each device's shard is cut out of the safetensors files with
`get_slice`, so no host ever holds a whole model (a stacked [layers, ...] shard reads only the layers it covers).
Export writes the HF layout back (process 0), so `AutoModelForCausalLM.from_pretrained` loads it with no custom code.

Covered, exactly (logits equal to transformers' in float32): Llama 2/3/3.x (RoPE scaling llama3, linear, yarn),
Mistral (sliding window), Qwen2/2.5 (q/k/v biases, yarn, sliding layers), Qwen3 (q/k norms), Gemma (embedding
scale, norm offset, tanh-GELU), Gemma 2 (sandwich norms, attention and final soft-caps, query_pre_attn_scalar,
alternating sliding/full layers), Gemma 3 text (q/k norms, 5:1 pattern, local and global RoPE bases and scaling),
Phi-3 (fused qkv and gate/up projections, sliding window), OLMo 2 (post-norms, q/k norms over all heads).

The refusal rule, so nothing that changes the forward pass is ignored: every key of config.json must be either
read (in `_READ` for every family or `_FAMILY_KEYS` for its family; its value is implemented exactly or refused
with a UserError naming key and value), or listed in `_INERT` (bookkeeping that cannot change the logits: token
ids, dtype, caching, initialisation, dropout, which eval never applies). Any other key is refused by name. A
RoPE dictionary is held to the same rule (`_ROPE_KEYS`). Export is checked the same way: the config.json it
would write is read back with these rules and must give the model config being exported.

Layout facts this rests on:
- HF Linear weights are [out, in]; ours are [in, ...out] with heads split out (wq [d, h, e], wo [h, e, d]).
- HF q/k projections of these families already use the rotate-half RoPE convention, as ours do: no permutation.
- Gemma's RMSNorm scales by (1 + weight): that is our `norm_offset=1` with scale = weight, so norms copy as they are.
- Phi-3's fused qkv_proj rows are [q; k; v] and gate_up_proj rows [gate; up]: each of ours is a row range.
- Gemma 2/3's `post_attention_layernorm` is the norm *after* attention (ours attn_post_norm), not Llama's pre-MLP norm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors can hand out bf16 slices
import numpy as np

from analogjax.data.tokenizer_files import byte_tokenizer_json, write_tokenizer  # noqa: F401  (re-exported)
from analogjax.errors import UserError
from analogjax.models.config import FULL, SLIDING, ModelConfig, MoEConfig, RopeScaling
from analogjax.models.model import Model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF architecture name → the model_type that goes with it.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    # Mixture-of-experts families (models/moe.py).
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# MoE architectures that are wanted but not built yet: refused by name, with what is missing.
_NOT_YET = {
    "DeepseekV3ForCausalLM": "multi-head latent attention and group-limited sigmoid routing are not implemented",
    "DeepseekV2ForCausalLM": "multi-head latent attention and group-limited routing are not implemented",
    "GptOssForCausalLM": "gpt-oss's attention sinks, clamped SwiGLU and expert biases are not implemented",
    "Llama4ForCausalLM": "Llama 4's chunked attention and interleaved MoE are not implemented",
    "Llama4ForConditionalGeneration": "Llama 4's chunked attention and interleaved MoE are not implemented",
}
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}
_GEMMAS = ("gemma", "gemma2", "gemma3_text")
_SANDWICH = ("gemma2", "gemma3_text")

# Keys every family reads (their values are implemented, or refused by value).
_READ = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "max_position_embeddings",
    "use_bidirectional_attention",
}
# Keys one family reads besides.
_WINDOWED = {"sliding_window", "layer_types"}
_FAMILY_KEYS = {
    "llama": set(),
    "mistral": {"sliding_window"},
    "qwen2": _WINDOWED | {"use_sliding_window", "max_window_layers"},
    "qwen3": _WINDOWED | {"use_sliding_window", "max_window_layers"},
    "gemma": {"hidden_activation"},
    "gemma2": _WINDOWED
    | {
        "hidden_activation",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "use_bidirectional_attention",
    },
    "gemma3_text": _WINDOWED
    | {
        "hidden_activation",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "use_bidirectional_attention",
        "rope_local_base_freq",
        # transformers writes its private copy of the pattern; layer_types supersedes it
        "sliding_window_pattern",
        "_sliding_window_pattern",
    },
    "phi3": {"sliding_window", "original_max_position_embeddings", "partial_rotary_factor"},
    "olmo2": set(),
    "mixtral": {"sliding_window", "num_local_experts", "num_experts_per_tok", "router_jitter_noise"},
    "qwen2_moe": _WINDOWED
    | {
        "use_sliding_window",
        "max_window_layers",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "qkv_bias",
    },
    "qwen3_moe": _WINDOWED
    | {
        "use_sliding_window",
        "max_window_layers",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "num_local_experts",
    },  # transformers writes this alias of num_experts itself
    "olmoe": {"num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv"},
}
# Keys that cannot change the logits of an eval forward.
_INERT = {
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "attention_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "hidden_dropout",
    "pretraining_tp",
    "cache_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "tokenizer_class",
    "chunk_size_feed_forward",
    "problem_type",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "torchscript",
    "tie_encoder_decoder",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "use_return_dict",
    "tf_legacy_loss",
    "_attn_implementation",
    "attn_implementation",
    "initializer_factor",
    "max_length",
    "generation_config",
    # MoE training-only knobs (an eval forward never reads them)
    "router_aux_loss_coef",
    "output_router_logits",
}
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


# ----------------------------------------------------------------------------------------------------------------
# config.json ⇄ ModelConfig


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc})") from None


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """The ModelConfig of a HF folder's config.json; UserError for architectures or fields we do not implement."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Hugging Face model folder not found: {path}")
    return config_from_hf_dict(_read_json(path / CONFIG_FILE), str(path))


def _model_type(hf: dict, where: str) -> tuple[str, str]:
    arch = (hf.get("architectures") or [None])[0]
    if arch in _NOT_YET:
        raise UserError(f"{where}: architecture {arch} is not supported yet ({_NOT_YET[arch]})")
    model_type = ARCHITECTURES.get(arch) if arch else hf.get("model_type")
    if model_type not in ARCHITECTURES.values():
        raise UserError(
            f"{where}: unsupported architecture {arch or hf.get('model_type')!r} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if arch is None:
        arch = next(a for a, t in ARCHITECTURES.items() if t == model_type)
    return arch, model_type


def _rope(params: dict, hf: dict, model_type: str, refuse) -> tuple[float | None, RopeScaling]:
    """(theta or None, scaling) of one RoPE dictionary (transformers' rope_parameters / rope_scaling)."""
    for key in params:
        if key not in _ROPE_KEYS:
            refuse(f"RoPE parameter {key!r}")
    kind = params.get("rope_type", params.get("type")) or "default"
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        refuse(f"partial_rotary_factor {params['partial_rotary_factor']}")
    theta = params.get("rope_theta")
    if kind == "default":
        return theta, RopeScaling()
    if model_type == "phi3" or kind not in ("linear", "llama3", "yarn"):
        refuse(f"RoPE type {kind!r}")  # Phi-3 turns yarn into longrope; dynamic and longrope depend on length
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
    extra = {}
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


def _pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest cycle that repeats to `kinds`."""
    for period in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
            return tuple(kinds[:period])
    return tuple(kinds)


def config_from_hf_dict(hf: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig a transformers config.json describes, under the refusal rule in the module docstring."""
    arch, model_type = _model_type(hf, where)

    def refuse(feature: str):
        raise UserError(f"{where}: {arch} with {feature} is not supported by the analogjax decoder")

    known = _READ | _FAMILY_KEYS[model_type] | _INERT
    for key in hf:
        if key not in known:
            refuse(f"config field {key!r} (not read by analogjax's {model_type} reader; refused rather than ignored)")
    if hf.get("attention_bias"):
        refuse("attention_bias (biases on the attention projections)" if model_type != "qwen2" else "attention_bias")
    if model_type == "qwen2_moe" and not hf.get("qkv_bias", True):
        refuse("qkv_bias false")
    if hf.get("clip_qkv") is not None:
        refuse(f"clip_qkv {hf['clip_qkv']}")
    if hf.get("mlp_bias"):
        refuse("mlp_bias")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention")
    gemma = model_type in _GEMMAS
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if model_type == "gemma" and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # what transformers itself runs for Gemma's legacy "gelu"
    if act_name not in _ACTIVATIONS:
        refuse(f"activation {act_name!r}")
    try:
        heads, layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        head_dim = int(hf.get("head_dim") or 0)
        if gemma and not head_dim:
            head_dim = 256  # the Gemma configs' default
        if head_dim * heads == int(hf["hidden_size"]):
            head_dim = 0  # our spelling of "d_model // n_heads", so configs compare equal after a round trip
        if model_type in ("qwen2", "phi3", "olmo2") and head_dim and head_dim * heads != int(hf["hidden_size"]):
            refuse(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")  # their code ignores it

        # RoPE: one dictionary, or (Gemma 3) one per attention kind.
        rope = hf.get("rope_parameters") or {}
        if hf.get("rope_scaling"):
            rope = {**rope, **hf["rope_scaling"]} if not rope.get("full_attention") else rope
        local_theta = 0.0
        if model_type == "gemma3_text":
            if "full_attention" in rope or "sliding_attention" in rope:
                for key in rope:
                    if key not in ("full_attention", "sliding_attention"):
                        refuse(f"RoPE parameter {key!r} beside per-layer-type parameters")
                full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
            else:  # legacy: rope_scaling applies to the global layers, rope_local_base_freq to the local ones
                full, local = rope, {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
            theta, scaling = _rope(full, hf, model_type, refuse)
            theta = theta or hf.get("rope_theta") or 1_000_000.0
            local_theta_value, local_scaling = _rope(local, hf, model_type, refuse)
            if local_scaling.kind != "none":
                refuse(f"RoPE scaling {local_scaling.kind!r} on the sliding layers")
            local_theta = float(local_theta_value or hf.get("rope_local_base_freq") or 10000.0)
        else:
            theta, scaling = _rope(rope, hf, model_type, refuse)
            theta = theta or hf.get("rope_theta") or 10000.0
        if float(hf.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            refuse(f"partial_rotary_factor {hf['partial_rotary_factor']}")

        # Which layers slide, and how far.
        window = hf.get("sliding_window")
        qwens = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
        if model_type in qwens and not hf.get("use_sliding_window"):
            window = None
        if model_type in qwens + ("gemma2", "gemma3_text"):
            kinds = hf.get("layer_types")
            if kinds is None:
                if model_type in qwens:
                    first_sliding = int(hf.get("max_window_layers", 28))
                    kinds = [
                        "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                        for i in range(layers)
                    ]
                else:
                    period = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
                    kinds = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
            if len(kinds) != layers or any(k not in ("sliding_attention", "full_attention") for k in kinds):
                refuse(f"layer_types {kinds!r}")
            kinds = [SLIDING if k == "sliding_attention" else FULL for k in kinds]
        else:  # Mistral, Phi-3: the window (if any) on every layer
            kinds = [SLIDING if window is not None else FULL] * layers
        if SLIDING in kinds and not window:
            refuse("sliding layers but no sliding_window")
        pattern = _pattern(kinds)
        if pattern == (FULL,):
            pattern, window = (), None
        elif pattern == (SLIDING,):
            pattern = ()
        if local_theta and SLIDING not in kinds:
            local_theta = 0.0
        if local_theta == float(theta) and scaling.kind == "none":
            local_theta = 0.0  # the same RoPE on every layer

        attn_cap = hf.get("attn_logit_softcapping") if model_type == "gemma2" else None
        if model_type == "gemma3_text" and hf.get("attn_logit_softcapping"):
            refuse("attn_logit_softcapping (Gemma 3's transformers code does not apply it)")
        query_scalar = float(hf.get("query_pre_attn_scalar") or 256) if model_type in _SANDWICH else 0.0
        e = head_dim or int(hf["hidden_size"]) // heads
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type != "olmo2" else 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            activation=_ACTIVATIONS[act_name],
            qkv_bias=model_type in ("qwen2", "qwen2_moe"),
            qk_norm=model_type in ("qwen3", "gemma3_text", "olmo2", "qwen3_moe", "olmoe"),
            embed_scale=gemma,
            norm_offset=1.0 if gemma else 0.0,
            norm_placement="sandwich" if model_type in _SANDWICH else "post" if model_type == "olmo2" else "pre",
            qk_norm_scope="all_heads" if model_type in ("olmo2", "olmoe") else "head",
            sliding_window=int(window or 0),
            layer_pattern=pattern,
            local_rope_theta=local_theta,
            rope_scaling=scaling,
            attn_softcap=float(attn_cap or 0.0),
            final_softcap=float(hf.get("final_logit_softcapping") or 0.0) if model_type in _SANDWICH else 0.0,
            query_scalar=0.0 if query_scalar == e else query_scalar,
            moe=_moe_from_hf(hf, model_type, layers, refuse) if model_type in _MOE_TYPES else MoEConfig(),
        )
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc.args[0]!r}") from None
    try:
        cfg.check("model")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    # Name the architecture only where the fields alone would export as another one (e.g. Phi-3, Mistral).
    return cfg if _infer_architecture(cfg) == arch else dataclasses.replace(cfg, hf_architecture=arch)


def _moe_from_hf(hf: dict, model_type: str, layers: int, refuse) -> MoEConfig:
    """The MoE layers of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (softmax routers, all of them)."""
    # transformers 5 names Qwen3-MoE's count num_local_experts in config.json (num_experts is its alias)
    experts = int(hf["num_local_experts"] if model_type == "mixtral" or "num_experts" not in hf else hf["num_experts"])
    if int(hf.get("num_local_experts", experts)) != experts:
        refuse(f"num_local_experts {hf['num_local_experts']} != num_experts {experts}")
    qwen = model_type in ("qwen2_moe", "qwen3_moe")
    first_dense, every = 0, 1
    if qwen:
        # transformers: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
        step, dense_only = int(hf.get("decoder_sparse_step", 1)), set(hf.get("mlp_only_layers") or [])
        sparse = [i not in dense_only and (i + 1) % step == 0 for i in range(layers)]
        # Ours: a dense prefix, then groups of `every` layers whose last is MoE (config.MoEConfig).
        every = max(step, 1)
        first_dense = (sparse.index(True) if True in sparse else layers) - (every - 1)
        probe = MoEConfig(experts=experts, first_dense_layers=max(first_dense, 0), every=every)
        if (
            first_dense < 0
            or first_dense >= layers
            or (layers - first_dense) % every
            or [probe.is_moe_layer(i) for i in range(layers)] != sparse
        ):
            refuse(
                f"MoE layers at {[i for i, s in enumerate(sparse) if s]} (decoder_sparse_step {step}, "
                f"mlp_only_layers {sorted(dense_only)}): only a dense prefix then every n-th layer is supported"
            )
    shared = int(hf.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    if model_type == "qwen2_moe" and not shared:
        refuse("shared_expert_intermediate_size 0")
    return MoEConfig(
        experts=experts,
        top_k=int(hf["num_experts_per_tok"]),
        expert_d_ff=int(hf["moe_intermediate_size"]) if qwen else 0,
        shared_d_ff=shared,
        shared_gate=bool(shared),
        router="softmax",
        norm_topk=True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        first_dense_layers=first_dense,
        every=every,
    )


def _moe_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """The MoE fields of config.json (architecture_for's round trip refuses what a family cannot carry)."""
    moe = cfg.moe
    out: dict[str, Any] = {"num_experts_per_tok": moe.top_k}
    if model_type in ("mixtral", "olmoe"):  # experts only, of the model's ffn width
        out["intermediate_size"] = cfg.expert_d_ff
    if model_type == "mixtral":
        out.update(num_local_experts=moe.experts, router_jitter_noise=0.0)
        return out
    out.update(num_experts=moe.experts, norm_topk_prob=moe.norm_topk)
    if model_type == "olmoe":
        out["clip_qkv"] = None
        return out
    out.update(
        moe_intermediate_size=cfg.expert_d_ff,
        decoder_sparse_step=moe.every,
        mlp_only_layers=[i for i in range(cfg.n_layers) if (i + 1) % moe.every == 0 and not moe.is_moe_layer(i)],
    )
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=moe.shared_d_ff, qkv_bias=True)
    return out


def _infer_architecture(cfg: ModelConfig) -> str:
    if cfg.hf_architecture:
        return cfg.hf_architecture
    if cfg.moe.enabled:
        if cfg.moe.shared_d_ff:
            return "Qwen2MoeForCausalLM"
        if cfg.qk_norm:
            return "OlmoeForCausalLM" if cfg.qk_norm_scope == "all_heads" else "Qwen3MoeForCausalLM"
        return "MixtralForCausalLM"
    if cfg.norm_placement == "sandwich":
        return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
    if cfg.norm_placement == "post":
        return "Olmo2ForCausalLM"
    if cfg.embed_scale or cfg.norm_offset:
        return "GemmaForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"


_NOT_ARCHITECTURE = ("preset", "dtype", "remat", "hf_architecture")


def architecture_for(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the HF class that computes exactly what `cfg` does (cfg.hf_architecture when
    set, else implied by the fields); UserError when that class cannot express some field."""
    arch = _infer_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise UserError(
            f"model.hf_architecture {arch!r} is not one analogjax writes (known: {', '.join(ARCHITECTURES)})"
        )
    # Exactness check: the config.json we would write must read back to this very config.
    back = config_from_hf_dict(_hf_config_for(cfg, arch, "float32", 4096, {}), f"export as {arch}")
    strip = {name: getattr(ModelConfig(), name) for name in _NOT_ARCHITECTURE}

    def canonical(c: ModelConfig) -> ModelConfig:  # 0 spells "as many kv heads as heads" / "d_model // n_heads"
        return dataclasses.replace(c, **strip, n_kv_heads=c.kv_heads, head_dim=c.dim_per_head)

    want, got = canonical(cfg), canonical(back)
    if want != got:
        differing = [f.name for f in dataclasses.fields(ModelConfig) if getattr(want, f.name) != getattr(got, f.name)]
        raise UserError(
            f"no Hugging Face architecture expresses this model exactly: {arch} cannot carry "
            f"{', '.join(f'{n}={getattr(cfg, n)!r}' for n in differing)}"
        )
    return arch, ARCHITECTURES[arch]


def _rope_dict(theta: float, scaling: RopeScaling) -> dict[str, Any]:
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


def hf_config(
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    max_positions: int = 4096,
    special_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """config.json for `cfg` (architecture chosen and checked by `architecture_for`)."""
    arch, _ = architecture_for(cfg)
    return _hf_config_for(cfg, arch, dtype, max_positions, special_ids or {})


def _hf_config_for(cfg: ModelConfig, arch: str, dtype: str, max_positions: int, special_ids: dict) -> dict[str, Any]:
    model_type = ARCHITECTURES[arch]
    act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "silu"
    # Long-context scaling needs room: transformers defaults the original length from max_position_embeddings.
    max_positions = max(max_positions, cfg.rope_scaling.original_max_positions)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": act,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if model_type not in ("qwen2", "phi3"):
        out["attention_bias"] = False
    if model_type in ("llama",):
        out["mlp_bias"] = False
    if model_type == "gemma3_text":
        out["rope_parameters"] = {
            "full_attention": _rope_dict(cfg.rope_theta, cfg.rope_scaling),
            "sliding_attention": _rope_dict(cfg.local_rope_theta or cfg.rope_theta, RopeScaling()),
        }
    else:
        out["rope_theta"] = cfg.rope_theta
        out["rope_parameters"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    if model_type in _GEMMAS:
        out["hidden_activation"] = act
    kinds = ["sliding_attention" if k == SLIDING else "full_attention" for k in cfg.layer_kinds]
    window = cfg.sliding_window or None
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=cfg.n_layers,
            layer_types=kinds,
        )
    elif model_type in ("mistral", "phi3", "mixtral"):
        out["sliding_window"] = window
    elif model_type in _SANDWICH:
        out.update(
            sliding_window=window,
            layer_types=kinds,
            use_bidirectional_attention=False,
            query_pre_attn_scalar=int(cfg.query_scalar or cfg.dim_per_head),
            final_logit_softcapping=cfg.final_softcap or None,
        )
        out["attn_logit_softcapping"] = cfg.attn_softcap or None
    if model_type in _MOE_TYPES:
        out.update(_moe_to_hf(cfg, model_type))
    # Token ids written always (null when unknown): some families default them outside a small vocabulary.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out[key] = None if special_ids.get(key) is None else int(special_ids[key])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The tensor table: one row per analogjax param, saying which HF tensor holds it and how the axes move.


@dataclass(frozen=True)
class TensorMap:
    """ours (per layer) = reshape(hf[rows], flatten(groups)).transpose(perm).

    groups: the HF tensor's dims, each split into factors (q_proj [h·e, d] → ((h, e), (d,))).
    perm: for each of our dims, the index of the split dim it takes.
    row_offset, fused_rows: for a fused HF tensor (Phi-3's qkv_proj), ours is rows [row_offset, row_offset + rows)
    of a tensor with `fused_rows` rows (0 = not fused).
    """

    ours: tuple[str, ...]  # path under params["params"]
    hf: str  # HF tensor name; "{i}" is the layer index for stacked params
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool
    row_offset: int = 0
    fused_rows: int = 0
    # MoE models keep several stacks (models/transformer.py layer_location): this stack's i-th entry is HF layer
    # layer_offset + i·layer_stride, of layer_count entries (0: all n_layers).
    layer_offset: int = 0
    layer_stride: int = 1
    layer_count: int = 0
    # Expert weights: one HF tensor per expert ("{j}"), stacked on our axis after the layers' (0: not per expert).
    experts: int = 0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.groups)

    @property
    def file_shape(self) -> tuple[int, ...]:
        """The shape of the whole HF tensor (the fused one, for a row range)."""
        return ((self.fused_rows,) + self.hf_shape[1:]) if self.fused_rows else self.hf_shape

    @property
    def split_shape(self) -> tuple[int, ...]:
        return tuple(n for g in self.groups for n in g)

    def names(self, n_layers: int) -> list:
        """HF names per layer (a list per layer of names per expert, for expert weights)."""
        if not self.stacked:
            return [self.hf]
        layers = [self.layer_offset + i * self.layer_stride for i in range(self.layer_count or n_layers)]
        if self.experts:
            return [[self.hf.format(i=i, j=j) for j in range(self.experts)] for i in layers]
        return [self.hf.format(i=i) for i in layers]

    def stack_shape(self, n_layers: int) -> tuple[int, ...]:
        """Our leading (layers[, experts]) dims."""
        return ((self.layer_count or n_layers,) if self.stacked else ()) + ((self.experts,) if self.experts else ())

    def to_hf(self, ours_layer: np.ndarray) -> np.ndarray:
        """Our per-layer array → the HF tensor (its rows, for a fused one)."""
        return np.transpose(ours_layer, np.argsort(self.perm)).reshape(self.hf_shape)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    v, d, f = cfg.vocab_size, cfg.d_model, cfg.d_ff
    h, k, e = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    layer = "model.layers.{i}."
    fused = _infer_architecture(cfg) == "Phi3ForCausalLM"

    def norm(ours: str, hf: str) -> TensorMap:
        return TensorMap(("layers", ours, "scale"), layer + hf + ".weight", ((d,),), (0,), True)

    maps = [
        TensorMap(("embedding",), "model.embed_tokens.weight", ((v,), (d,)), (0, 1), False),
        TensorMap(("final_norm", "scale"), "model.norm.weight", ((d,),), (0,), False),
    ]
    maps += {
        "pre": [norm("attn_norm", "input_layernorm"), norm("mlp_norm", "post_attention_layernorm")],
        "sandwich": [
            norm("attn_norm", "input_layernorm"),
            norm("attn_post_norm", "post_attention_layernorm"),
            norm("mlp_norm", "pre_feedforward_layernorm"),
            norm("mlp_post_norm", "post_feedforward_layernorm"),
        ],
        "post": [
            norm("attn_post_norm", "post_attention_layernorm"),
            norm("mlp_post_norm", "post_feedforward_layernorm"),
        ],
    }[cfg.norm_placement]
    if fused:
        qkv, rows = layer + "self_attn.qkv_proj.weight", (h + 2 * k) * e
        maps += [
            TensorMap(("layers", "attn", "wq"), qkv, ((h, e), (d,)), (2, 0, 1), True, 0, rows),
            TensorMap(("layers", "attn", "wk"), qkv, ((k, e), (d,)), (2, 0, 1), True, h * e, rows),
            TensorMap(("layers", "attn", "wv"), qkv, ((k, e), (d,)), (2, 0, 1), True, (h + k) * e, rows),
        ]
    else:
        maps += [
            TensorMap(
                ("layers", "attn", f"w{n}"), layer + f"self_attn.{n}_proj.weight", ((heads, e), (d,)), (2, 0, 1), True
            )
            for n, heads in (("q", h), ("k", k), ("v", k))
        ]
    maps.append(TensorMap(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight", ((d,), (h, e)), (1, 2, 0), True))
    if fused:
        gate_up = layer + "mlp.gate_up_proj.weight"
        maps += [
            TensorMap(("layers", "mlp", "w_gate"), gate_up, ((f,), (d,)), (1, 0), True, 0, 2 * f),
            TensorMap(("layers", "mlp", "w_up"), gate_up, ((f,), (d,)), (1, 0), True, f, 2 * f),
        ]
    else:
        maps += [
            TensorMap(("layers", "mlp", "w_gate"), layer + "mlp.gate_proj.weight", ((f,), (d,)), (1, 0), True),
            TensorMap(("layers", "mlp", "w_up"), layer + "mlp.up_proj.weight", ((f,), (d,)), (1, 0), True),
        ]
    maps.append(TensorMap(("layers", "mlp", "w_down"), layer + "mlp.down_proj.weight", ((d,), (f,)), (1, 0), True))
    if cfg.qkv_bias:
        for name, heads in (("q", h), ("k", k), ("v", k)):
            maps.append(
                TensorMap(
                    ("layers", "attn", f"w{name}_bias"),
                    layer + f"self_attn.{name}_proj.bias",
                    ((heads, e),),
                    (0, 1),
                    True,
                )
            )
    if cfg.qk_norm:
        for name, heads in (("q", h), ("k", k)):
            groups, perm = (((e,),), (0,)) if cfg.qk_norm_scope == "head" else (((heads, e),), (0, 1))
            maps.append(
                TensorMap(
                    ("layers", "attn", f"{name}_norm", "scale"),
                    layer + f"self_attn.{name}_norm.weight",
                    groups,
                    perm,
                    True,
                )
            )
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", ((v,), (d,)), (1, 0), False))
    return _moe_maps(cfg, maps) if cfg.moe.enabled else maps


def _moe_maps(cfg: ModelConfig, dense_maps: list[TensorMap]) -> list[TensorMap]:
    """An MoE model's table: each stack (dense prefix, MoE groups: transformer.layer_location) gets the attention
    and norm rows with its own HF layer numbers; MoE layers get router, per-expert and shared-expert rows."""
    from analogjax.models.transformer import moe_layout

    moe, d = cfg.moe, cfg.d_model
    f, n = cfg.expert_d_ff, moe.experts
    layer = "model.layers.{i}."
    mixtral = _infer_architecture(cfg) == "MixtralForCausalLM"
    block = layer + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    moe_rows = [
        TensorMap(("mlp", "router"), block + "gate.weight", ((n,), (d,)), (1, 0), True),
        TensorMap(("mlp", "w_gate"), block + f"experts.{{j}}.{names[0]}.weight", ((f,), (d,)), (1, 0), True, experts=n),
        TensorMap(("mlp", "w_up"), block + f"experts.{{j}}.{names[1]}.weight", ((f,), (d,)), (1, 0), True, experts=n),
        TensorMap(("mlp", "w_down"), block + f"experts.{{j}}.{names[2]}.weight", ((d,), (f,)), (1, 0), True, experts=n),
    ]
    if moe.shared_d_ff:
        g = moe.shared_d_ff
        moe_rows += [
            TensorMap(("mlp", "shared", w), layer + f"mlp.shared_expert.{p}.weight", shape, (1, 0), True)
            for w, p, shape in (
                ("w_gate", "gate_proj", ((g,), (d,))),
                ("w_up", "up_proj", ((g,), (d,))),
                ("w_down", "down_proj", ((d,), (g,))),
            )
        ]
    if moe.shared_gate:
        moe_rows.append(
            TensorMap(("mlp", "shared_gate"), layer + "mlp.shared_expert_gate.weight", ((1,), (d,)), (1, 0), True)
        )
    unstacked = [m for m in dense_maps if not m.stacked]
    per_layer = [m for m in dense_maps if m.stacked and m.ours[1] != "mlp"]
    dense_mlp = [m for m in dense_maps if m.stacked and m.ours[1] == "mlp"]

    def stack(rows, path, offset, stride, count):
        return [
            dataclasses.replace(
                m,
                ours=path + m.ours[1:] if m.ours[0] == "layers" else path + m.ours,
                layer_offset=offset,
                layer_stride=stride,
                layer_count=count,
            )
            for m in rows
        ]

    prefix, groups = moe_layout(cfg)
    out = list(unstacked)
    if prefix:
        out += stack(per_layer + dense_mlp, ("layers",), 0, 1, prefix)
    if moe.every == 1:
        return out + stack(per_layer + moe_rows, ("moe_layers",), prefix, 1, groups)
    for j in range(moe.every - 1):
        out += stack(per_layer + dense_mlp, ("moe_layers", f"dense_{j}"), prefix + j, moe.every, groups)
    return out + stack(per_layer + moe_rows, ("moe_layers", "moe"), prefix + moe.every - 1, moe.every, groups)


# ----------------------------------------------------------------------------------------------------------------
# Import


class _SafetensorFiles:
    """Which file holds which tensor (single file or a sharded index), with open handles kept per file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            self.where: dict[str, Path] | None = {name: folder / file for name, file in weight_map.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            self.where = None
            self.single = folder / WEIGHTS_FILE
        else:
            raise UserError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read)")
        self._handles: dict[Path, Any] = {}
        if self.where is None:
            self.where = {name: self.single for name in self._open(self.single).keys()}
        for file in set(self.where.values()):
            if not file.is_file():
                raise UserError(f"{folder}: {INDEX_FILE} names {file.name}, which is missing")

    def _open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="np")
            except Exception as exc:  # the Rust reader raises plain exceptions for corrupt headers
                raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
        return self._handles[file]

    def slice(self, name: str):
        if name not in self.where:
            raise UserError(f"{self.folder}: tensor {name} is missing from the safetensors files")
        return self._open(self.where[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())


def _read_block(tensor_slice, tmap: TensorMap, ours_index: tuple[slice, ...]) -> np.ndarray:
    """The block of one layer's HF tensor that lands at `ours_index` (slices of our per-layer array), as float32."""
    split_index: list[slice] = [slice(None)] * len(tmap.split_shape)
    for ours_dim, split_dim in enumerate(tmap.perm):
        split_index[split_dim] = ours_index[ours_dim]
    read, after = [], []  # slices on the HF tensor; then slices on each group's factors once reshaped
    pos = 0
    for group in tmap.groups:
        parts = [split_index[pos + j].indices(n) for j, n in enumerate(group)]
        inner = math.prod(group[1:])
        # A contiguous range of the group's leading factor; trailing factors are cut after reshaping (they are
        # head_dim in practice, never sharded, so nothing is read twice).
        offset = tmap.row_offset if pos == 0 else 0  # a fused tensor's row range starts further down
        read.append(slice(offset + parts[0][0] * inner, offset + parts[0][1] * inner))
        after.append([slice(None)] + [slice(a, b) for a, b, _ in parts[1:]])
        pos += len(group)
    block = np.asarray(tensor_slice[tuple(read)])
    shape = []
    for group, r in zip(tmap.groups, read):
        shape += [(r.stop - r.start) // math.prod(group[1:]), *group[1:]]
    block = block.reshape(shape)[tuple(s for sl in after for s in sl)]
    return np.transpose(block, tmap.perm).astype(np.float32)


def load_params(path: str | Path, model_cfg: ModelConfig, mesh, rules) -> dict:
    """A HF folder's weights as analogjax params ({"params": ...}), each array born sharded under `rules`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"teacher.hf_path: Hugging Face model folder not found: {path}")
    return params_from_tensors(_SafetensorFiles(path), model_cfg, mesh, rules, f"{path}: config.json")


def params_from_tensors(files, model_cfg: ModelConfig, mesh, rules, source: str) -> dict:
    """Params ({"params": ...}) born sharded from `files`: anything with `shape(hf_name)` and `slice(hf_name)`
    (an object indexable like a numpy array in the HF layout). `source` names where the shapes come from."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    abstract = mesh_lib.abstract_sharded(Transformer(model_cfg).init_boxed, mesh, rules)["params"]
    params: dict = {}
    for tmap in tensor_maps(model_cfg):
        target = _get(abstract, tmap.ours)
        names = tmap.names(model_cfg.n_layers)
        for name in np.asarray(names).reshape(-1) if tmap.experts else names:
            found = files.shape(name)
            if found != tmap.file_shape:
                raise UserError(
                    f"{source}: tensor {name} has shape {list(found)}, but the config implies {list(tmap.file_shape)}"
                )
        _set(params, tmap.ours, _sharded_array(files, tmap, names, target))
    return {"params": params}


def _sharded_array(files: _SafetensorFiles, tmap: TensorMap, names: list[str], target) -> jax.Array:
    cache: dict[tuple, np.ndarray] = {}  # replicas of one shard on several local devices are read once

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, target.shape))
        if key not in cache:
            if tmap.experts:  # [layers, experts, ...]: this device's layers and experts only
                layers = range(*index[0].indices(target.shape[0]))
                experts = range(*index[1].indices(target.shape[1]))
                cache[key] = np.stack(
                    [
                        np.stack([_read_block(files.slice(names[i][j]), tmap, index[2:]) for j in experts])
                        for i in layers
                    ]
                )
            elif tmap.stacked:
                layers = range(*index[0].indices(target.shape[0]))
                cache[key] = np.stack([_read_block(files.slice(names[i]), tmap, index[1:]) for i in layers])
            else:
                cache[key] = _read_block(files.slice(names[0]), tmap, index)
        return cache[key]

    return jax.make_array_from_callback(target.shape, target.sharding, read)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class HFModel(Model):
    """A HF checkpoint as a callable: int32 tokens [b, s] → float32 logits [b, s, v]; params live on `mesh`."""

    def __init__(self, path: str | Path, *, mesh=None, rules=None):
        from analogjax import mesh as mesh_lib

        config = self.read_config(path)
        mesh = mesh if mesh is not None else mesh_lib.make_mesh(-1, 1, 1)
        rules = tuple(rules if rules is not None else mesh_lib.TEACHER_RULES)
        super().__init__(
            config,
            self.read_params(path, config, mesh, rules),
            mesh=mesh,
            rules=rules,
            tokenizer=self.read_tokenizer(path),
        )

    # Where the config, weights and tokenizer come from; other file formats (GGUF) override these.
    read_config = staticmethod(model_config_from_hf)
    read_params = staticmethod(load_params)

    @staticmethod
    def read_tokenizer(path) -> str | None:
        file = Path(path) / "tokenizer.json"
        return str(file) if file.is_file() else None


def load(path: str | Path, *, mesh=None, rules=None) -> HFModel:
    """`analogjax.hf.load(path)(tokens) -> logits`."""
    return HFModel(path, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------------------
# Export


def _host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse a non-empty output folder unless forced: checked before any work is done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another --out or pass --force")
    return out


def prepare_out_dir(out_dir: str | Path, force: bool) -> Path:
    """An empty output folder (a forced non-empty one is emptied first)."""
    out = check_out_dir(out_dir, force)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(
    model: Model,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    force: bool = False,
    dtype: str = "float32",
    max_positions: int = 4096,
) -> Path:
    """Write a `Model` (what `load` returns, or a run's `result["student"]`) as a HF folder; its own tokenizer is
    written unless `tokenizer` names another. `save_params` is the same from a params tree and a ModelConfig."""
    if not isinstance(model, Model):
        raise UserError(
            f"hf.save takes a Model (hf.load's result or a run's student), got {type(model).__name__}; "
            "use hf.save_params(params, model_config, out_dir) for a bare params tree"
        )
    return save_params(
        model.params,
        model.config,
        out_dir,
        tokenizer=tokenizer or model.tokenizer,
        force=force,
        dtype=dtype,
        max_positions=max_positions,
    )


def save_params(
    params,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer: str | None = None,
    *,
    force: bool = False,
    dtype: str = "float32",
    max_positions: int = 4096,
) -> Path:
    """Write `params` as a HF folder: model.safetensors, config.json and (for a tokenizer spec) tokenizer files.

    `tokenizer`: a data.tokenizer value (a HF tokenizers .json or "bytes"); None or "none" writes no tokenizer.
    Every process gathers; process 0 writes.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"export dtype must be float32 or bfloat16, got {dtype!r}")
    check_out_dir(out_dir, force)
    tree = params["params"] if "params" in params else params
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    architecture_for(model_cfg)  # refuses, before any work, a model no HF architecture expresses exactly
    tensors: dict[str, np.ndarray] = {}
    row_ranges: dict[str, list[tuple[int, np.ndarray]]] = {}  # fused tensors, assembled from their row ranges
    for tmap in tensor_maps(model_cfg):
        try:
            value = _host(_get(tree, tmap.ours))
        except KeyError:
            raise UserError(f"params have no {'/'.join(tmap.ours)} but the model config needs it") from None
        expected = tmap.stack_shape(model_cfg.n_layers) + tuple(tmap.split_shape[p] for p in tmap.perm)
        if value.shape != expected:
            raise UserError(
                f"params {'/'.join(tmap.ours)} has shape {list(value.shape)}, the model config implies {list(expected)}"
            )
        layers = list(value) if tmap.stacked else [value]
        names = tmap.names(model_cfg.n_layers)
        if tmap.experts:  # one HF tensor per (layer, expert)
            names = [name for per_layer in names for name in per_layer]
            layers = [expert for layer in layers for expert in layer]
        for name, layer in zip(names, layers):
            if tmap.fused_rows:
                row_ranges.setdefault(name, []).append((tmap.row_offset, tmap.to_hf(layer)))
            else:
                tensors[name] = np.ascontiguousarray(tmap.to_hf(layer).astype(np_dtype))
    for name, parts in row_ranges.items():
        tensors[name] = np.ascontiguousarray(
            np.concatenate([p for _, p in sorted(parts, key=lambda x: x[0])]).astype(np_dtype)
        )
    if jax.process_index() != 0:
        return Path(out_dir)
    out = prepare_out_dir(out_dir, force)
    specials = write_tokenizer(tokenizer, out, max_positions) if tokenizer and tokenizer != "none" else {}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(model_cfg, dtype=dtype, max_positions=max_positions, special_ids=specials)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in specials.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def folder_fingerprint(folder: str | Path, small_bytes: int = 1 << 20) -> str:
    """A sha256 over a folder's manifest: every file's relative path and size, plus the contents of small files.

    Cheap for a 140 GB teacher yet changes with any new shard, config or tokenizer; it is an identity, not a
    checksum of every weight byte.
    """
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder)}\0{size}\0".encode())
        if size <= small_bytes:
            digest.update(file.read_bytes())
    return digest.hexdigest()


__all__ = [
    "load",
    "load_params",
    "params_from_tensors",
    "model_config_from_hf",
    "config_from_hf_dict",
    "save",
    "save_params",
    "Model",
    "HFModel",
    "architecture_for",
    "hf_config",
    "tensor_maps",
    "byte_tokenizer_json",
    "folder_fingerprint",
    "check_out_dir",
    "prepare_out_dir",
]
