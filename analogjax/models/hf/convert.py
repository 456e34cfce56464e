"""config.json ⇄ ModelConfig, both ways, for the families of families.py.

The refusal rule, so nothing that changes the forward pass is ignored: every key of config.json must be either
read (in `_READ` for every family or in its family's `keys`; its value is implemented exactly or refused with a
UserError naming key and value), or inert (`inert`: bookkeeping that cannot change the logits: transformers' private
keys with a leading underscore, special-token ids, dtype, caching and output switches, generation defaults,
initialisation, dropout, which eval never applies). Any other key is refused by name. A RoPE
dictionary is held to the same rule (rope.py's `_ROPE_KEYS`). Export is checked the same way: the config.json it
would write is read back with these rules and must give the model config being exported (`architecture_for`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NoReturn

from analogjax.errors import UserError
from analogjax.models.config import FULL, SLIDING, MLAConfig, ModelConfig, MoEConfig, RopeScaling
from analogjax.models.hf import llama4
from analogjax.models.hf.families import (
    ARCHITECTURES,
    BY_ARCHITECTURE,
    BY_MODEL_TYPE,
    NOT_YET,
    WRAPPERS,
    Family,
    MoEFamily,
    implied_architecture,
)
from analogjax.models.hf.rope import Refuse, rope_from_hf, rope_to_hf, rotary_fraction_from_hf
from analogjax.runtime import storage

CONFIG_FILE = "config.json"

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}
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
    # Runtime and generation switches older transformers wrote into config.json (the forward's logits never read
    # them: they choose what a call returns or how `generate` samples).
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "pruned_heads",
    "torch_compile",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "cross_attention_hidden_size",
}


def inert(key: str) -> bool:
    """A config.json key that cannot change the logits: listed in `_INERT`, transformers' own bookkeeping (a leading
    underscore: `_name_or_path`, `_model_name_or_path`, `_commit_hash`...; a family that reads one lists it in its
    record, which is checked first), or a special-token id (`unk_token_id`, `mask_token_id`, ...: tokenizer facts
    that no decoder forward reads)."""
    return key in _INERT or key.startswith("_") or key.endswith(("_token_id", "_token_ids"))


# ----------------------------------------------------------------------------------------------------------------
# config.json → ModelConfig


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc})") from None


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """The ModelConfig of a HF folder's config.json (local or on a bucket); UserError for architectures or fields we
    do not implement."""
    folder = storage.location(path, "teacher.hf_path")
    if not folder.is_dir():
        raise UserError(f"Hugging Face model folder not found: {path}")
    return config_from_hf_dict(read_json(folder / CONFIG_FILE), str(path))


def _family(hf: dict, where: str) -> tuple[str, Family]:
    """(architecture, family) that config.json names (by its architectures, else its model_type)."""
    arch = (hf.get("architectures") or [None])[0]
    if arch in NOT_YET:
        raise UserError(f"{where}: architecture {arch} is not supported yet ({NOT_YET[arch]})")
    model_type = hf.get("model_type")
    if arch:
        family = BY_ARCHITECTURE.get(arch)
    else:  # a model_type that is not a string names no family (and is refused below)
        family = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserError(
            f"{where}: unsupported architecture {arch or hf.get('model_type')!r} "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    return family.architecture, family


def _pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest cycle that repeats to `kinds`."""
    for period in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
            return tuple(kinds[:period])
    return tuple(kinds)


def _layer_kinds(hf: dict, family: Family, layers: int, refuse: Refuse) -> tuple[list[str], int | None]:
    """(each layer's attention kind, the window or None)."""
    window = hf.get("sliding_window")
    if family.layer_windows == "max_window_layers" and not hf.get("use_sliding_window"):
        window = None
    if family.layer_windows == "uniform":  # the window (if any) on every layer
        return [SLIDING if window is not None else FULL] * layers, window
    kinds = hf.get("layer_types")
    if kinds is None:
        if family.layer_windows == "max_window_layers":
            first_sliding = int(hf.get("max_window_layers", 28))
            kinds = [
                "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                for i in range(layers)
            ]
        else:
            period = int(hf.get("sliding_window_pattern", family.sliding_period))
            kinds = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    if len(kinds) != layers or any(k not in ("sliding_attention", "full_attention") for k in kinds):
        refuse(f"layer_types {kinds!r}")
    return [SLIDING if k == "sliding_attention" else FULL for k in kinds], window


def _text_model(hf: dict, where: str) -> dict:
    """A multimodal config.json (families.WRAPPERS) as its text model's, its own keys under the refusal rule; any
    other config.json as it is."""
    outer = (hf.get("architectures") or [None])[0]
    wrapper = WRAPPERS.get(outer)
    if wrapper is None:
        return hf
    for key in hf:
        if key not in wrapper.keys | _INERT | {"text_config"}:
            raise UserError(
                f"{where}: {outer} with config field {key!r} is not supported by the analogjax decoder "
                "(not read by its text-model reader; refused rather than ignored)"
            )
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise UserError(f"{where}: {outer} without a text_config")
    if bool(hf.get("tie_word_embeddings", False)) != bool(text.get("tie_word_embeddings", False)):
        raise UserError(f"{where}: {outer} whose tie_word_embeddings differs from its text_config's")
    return {**text, "architectures": [wrapper.text_architecture]}


def tensor_prefix(hf: dict) -> str:
    """What a config.json's architecture puts before its text model's tensor names ("" but for WRAPPERS)."""
    wrapper = WRAPPERS.get((hf.get("architectures") or [None])[0])
    return wrapper.tensor_prefix if wrapper else ""


def config_from_hf_dict(hf: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig a transformers config.json describes, under the refusal rule in the module docstring."""
    hf = _text_model(hf, where)
    arch, family = _family(hf, where)

    def refuse(feature: str) -> NoReturn:
        raise UserError(f"{where}: {arch} with {feature} is not supported by the analogjax decoder")

    known = _READ | family.keys
    for key in hf:
        if key not in known and not inert(key):
            reader = family.model_type
            refuse(f"config field {key!r} (not read by analogjax's {reader} reader; refused rather than ignored)")
    # attention_bias: gpt-oss's biases on q, k, v and o (default true); GLM-4.5's on q, k and v only.
    attention_bias = bool(hf.get("attention_bias", True)) if family.biased_attention else False
    if hf.get("attention_bias") and not (family.biased_attention or family.attention_bias_is_qkv):
        # (a family whose q/k/v projections always have biases is told only the key's name)
        refuse(
            "attention_bias" if family.qkv_bias == "fixed" else "attention_bias (biases on the attention projections)"
        )
    _check_quantization(hf.get("quantization_config"), refuse)
    if family.rope_required and not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        refuse("no rope_parameters (its transformers class then applies its own default scaling; write it out)")
    if family.qkv_bias == "keyed" and not hf.get("qkv_bias", True):
        refuse("qkv_bias false")
    if hf.get("clip_qkv") is not None:
        refuse(f"clip_qkv {hf['clip_qkv']}")
    if hf.get("mlp_bias"):
        refuse("mlp_bias")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention")
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or family.default_activation
    if family.gelu_is_tanh and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # what transformers itself runs for Gemma's legacy "gelu"
    if family.fixed_activation:
        act_name = family.fixed_activation  # hidden_act is read by no module of this family
    elif act_name not in _ACTIVATIONS:
        refuse(f"activation {act_name!r}")
    if "experts_per_token" in hf and hf["experts_per_token"] != hf.get("num_experts_per_tok"):
        refuse(f"experts_per_token {hf['experts_per_token']} != num_experts_per_tok {hf.get('num_experts_per_tok')}")
    try:
        heads, layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        head_dim = int(hf.get("head_dim") or 0) or family.default_head_dim
        if head_dim * heads == int(hf["hidden_size"]):
            head_dim = 0  # our spelling of "d_model // n_heads", so configs compare equal after a round trip
        if not family.reads_head_dim and head_dim and head_dim * heads != int(hf["hidden_size"]):
            refuse(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")  # their code ignores it

        theta, scaling, local_theta = rope_from_hf(hf, family, refuse)
        kinds, window = _layer_kinds(hf, family, layers, refuse)
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

        attn_cap = hf.get("attn_logit_softcapping") if family.attn_softcap else None
        for key, why in family.ignored_by_hf:
            if hf.get(key):
                refuse(f"{key} ({why})")
        query_scalar = float(hf.get("query_pre_attn_scalar") or 256) if family.query_scalar else 0.0
        e = head_dim or int(hf["hidden_size"]) // heads
        mla = _mla_from_hf(hf, refuse) if family.mla else MLAConfig()
        if mla.enabled:
            head_dim = 0  # config.json's head_dim is the rotary part's (checked in _mla_from_hf); MLA sets its own
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=0 if mla.enabled else int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", family.default_norm_eps)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", family.default_tie)),
            activation=_ACTIVATIONS.get(act_name, act_name),
            qkv_bias=bool(family.qkv_bias)
            or attention_bias
            or (family.attention_bias_is_qkv and bool(hf.get("attention_bias"))),
            attn_out_bias=attention_bias,
            attn_sinks=family.attn_sinks,
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
            qk_norm=family.qk_norm or bool(family.qk_norm_key and hf.get(family.qk_norm_key)),
            embed_scale=family.embed_scale,
            norm_offset=family.norm_offset,
            norm_placement=family.norm_placement,
            qk_norm_scope=family.qk_norm_scope,
            sliding_window=int(window or 0),
            layer_pattern=pattern,
            local_rope_theta=local_theta,
            rope_scaling=scaling,
            attn_softcap=float(attn_cap or 0.0),
            final_softcap=float(hf.get("final_logit_softcapping") or 0.0) if family.final_softcap else 0.0,
            query_scalar=0.0 if query_scalar == e else query_scalar,
            moe=_moe_from_hf(hf, family.moe, layers, refuse)
            if family.moe and not family.llama4_layers
            else MoEConfig(),
            rotary_fraction=rotary_fraction_from_hf(hf, family),
            mla=mla,
        )
        if family.llama4_layers:
            cfg = llama4.from_hf(cfg, hf, refuse)
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc.args[0]!r}") from None
    try:
        cfg.check("model")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    # Name the architecture only where the fields alone would export as another one (e.g. Phi-3, Mistral).
    return cfg if implied_architecture(cfg) == arch else dataclasses.replace(cfg, hf_architecture=arch)


def _check_quantization(quantization: Any, refuse: Refuse) -> None:
    """A quantization_config is read only where its family lists it (gpt-oss), and only MXFP4, whose expert
    weights read.py dequantizes exactly as transformers does (mxfp4.py); every key of it is one we know."""
    if quantization is None:
        return
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "mxfp4":
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        refuse(f"quantization_config quant_method {method!r} (only mxfp4 expert weights are dequantized at import)")
    # modules_to_not_convert: the modules stored unquantized (read as they are); dequantize: whether transformers
    # dequantizes at load (import always does).
    for key in quantization:
        if key not in ("quant_method", "modules_to_not_convert", "dequantize"):
            refuse(f"quantization_config key {key!r}")


def _mla_from_hf(hf: dict, refuse: Refuse) -> MLAConfig:
    """DeepSeek-V3's latent attention keys; the values transformers derives from them must agree."""
    mla = MLAConfig(
        q_lora_rank=int(hf["q_lora_rank"] or 0),  # null: no query latent (absent: transformers' 1536, so required)
        kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
        qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
        v_head_dim=int(hf["v_head_dim"]),
        rope_interleave=bool(hf.get("rope_interleave", True)),
    )
    if not mla.enabled:
        refuse(f"kv_lora_rank {hf['kv_lora_rank']}")
    derived = {"head_dim": mla.qk_rope_head_dim, "qk_head_dim": mla.qk_head_dim}
    for key, value in derived.items():
        if hf.get(key) is not None and int(hf[key]) != value:
            refuse(f"{key} {hf[key]} (transformers derives {value} from the MLA dims)")
    if int(hf.get("num_key_value_heads") or hf["num_attention_heads"]) != int(hf["num_attention_heads"]):
        refuse(f"num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads (MLA expands every head)")
    return mla


def _sigmoid_moe_from_hf(hf: dict, layers: int, refuse: Refuse) -> MoEConfig:
    """DeepSeek-V3 / Kimi K2 / GLM-4.5 routing (families.MoEFamily.sigmoid_groups)."""
    original = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
    for key, value in original.items():
        if key in hf and hf[key] != value:
            refuse(f"{key} {hf[key]!r} (only {value!r}, what transformers computes, is implemented)")
    experts = int(hf["n_routed_experts"])
    if int(hf.get("num_local_experts", experts)) != experts:
        refuse(f"num_local_experts {hf['num_local_experts']} != n_routed_experts {experts}")
    width = int(hf["moe_intermediate_size"])
    # Required rather than defaulted: DeepSeek-V3's and GLM-4.5's transformers classes default these differently
    # (first_k_dense_replace 3 vs 1, n_group 8 vs 1, ...), and every released config.json writes them.
    return MoEConfig(
        experts=experts,
        top_k=int(hf["num_experts_per_tok"]),
        expert_d_ff=width,
        shared_d_ff=width * int(hf["n_shared_experts"] or 0),
        router="sigmoid",
        norm_topk=bool(hf["norm_topk_prob"]),
        routed_scale=float(hf["routed_scaling_factor"]),
        expert_bias=True,
        first_dense_layers=int(hf["first_k_dense_replace"] or 0),
        n_group=int(hf["n_group"] or 1),
        topk_group=int(hf["topk_group"] or 1),
    )


def _moe_from_hf(hf: dict, family: MoEFamily, layers: int, refuse: Refuse) -> MoEConfig:
    """The MoE layers of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss (softmax routers), or sigmoid-routed ones
    (DeepSeek-V3, Kimi K2, GLM-4.5)."""
    if family.sigmoid_groups:
        return _sigmoid_moe_from_hf(hf, layers, refuse)
    # transformers 5 names Qwen3-MoE's count num_local_experts in config.json (num_experts is its alias)
    key = family.experts_key
    experts = int(hf[key] if key in hf else hf["num_local_experts"])
    if int(hf.get("num_local_experts", experts)) != experts:
        refuse(f"num_local_experts {hf['num_local_experts']} != num_experts {experts}")
    first_dense, every = 0, 1
    if family.sparse_step:
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
    shared = int(hf.get("shared_expert_intermediate_size") or 0) if family.shared_expert else 0
    if family.shared_expert and not shared:
        refuse("shared_expert_intermediate_size 0")
    return MoEConfig(
        experts=experts,
        top_k=int(hf["num_experts_per_tok"]),
        expert_d_ff=int(hf[family.expert_width_key]) if family.expert_width_key else 0,
        shared_d_ff=shared,
        shared_gate=bool(shared),
        router="softmax",
        norm_topk=family.norm_topk if family.norm_topk is not None else bool(hf.get("norm_topk_prob", False)),
        first_dense_layers=first_dense,
        every=every,
        router_bias=family.biases,
        expert_biases=family.biases,
    )


# ----------------------------------------------------------------------------------------------------------------
# ModelConfig → config.json

_NOT_ARCHITECTURE = ("preset", "dtype", "remat", "hf_architecture")


def architecture_for(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the HF class that computes exactly what `cfg` does (cfg.hf_architecture when
    set, else implied by the fields); UserError when that class cannot express some field."""
    arch = implied_architecture(cfg)
    if arch not in BY_ARCHITECTURE:
        raise UserError(
            f"model.hf_architecture {arch!r} is not one analogjax writes (known: {', '.join(ARCHITECTURES)})"
        )
    # Exactness check: the config.json we would write must read back to this very config.
    back = config_from_hf_dict(_hf_config_for(cfg, BY_ARCHITECTURE[arch], "float32", 4096, {}), f"export as {arch}")
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


def hf_config(
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    max_positions: int = 4096,
    special_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """config.json for `cfg` (architecture chosen and checked by `architecture_for`)."""
    arch, _ = architecture_for(cfg)
    return _hf_config_for(cfg, BY_ARCHITECTURE[arch], dtype, max_positions, special_ids or {})


def _hf_config_for(
    cfg: ModelConfig, family: Family, dtype: str, max_positions: int, special_ids: dict[str, int | None]
) -> dict[str, Any]:
    act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "silu"
    # Long-context scaling needs room: transformers defaults the original length from max_position_embeddings.
    max_positions = max(max_positions, cfg.rope_scaling.original_max_positions)
    out: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
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
    out.update(family.pinned)
    if family.rope_per_layer_type:
        out["rope_parameters"] = {
            "full_attention": rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
            "sliding_attention": rope_to_hf(cfg.local_rope_theta or cfg.rope_theta, RopeScaling()),
        }
    else:
        out["rope_theta"] = cfg.rope_theta
        out["rope_parameters"] = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    if "hidden_activation" in family.keys:
        out["hidden_activation"] = act
    kinds = ["sliding_attention" if k == SLIDING else "full_attention" for k in cfg.layer_kinds]
    window = cfg.sliding_window or None
    if family.layer_windows == "max_window_layers":
        out.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=cfg.n_layers,
            layer_types=kinds,
        )
    elif family.layer_windows == "pattern":
        out.update(sliding_window=window, layer_types=kinds)
    elif "sliding_window" in family.keys:
        out["sliding_window"] = window
    # Gemma 2/3's attention fields, each written where the family's config.json has it.
    if "use_bidirectional_attention" in family.keys:
        out["use_bidirectional_attention"] = False
    if family.query_scalar:
        out["query_pre_attn_scalar"] = int(cfg.query_scalar or cfg.dim_per_head)
    if family.final_softcap:
        out["final_logit_softcapping"] = cfg.final_softcap or None
    if "attn_logit_softcapping" in family.keys:
        out["attn_logit_softcapping"] = cfg.attn_softcap or None
    if family.biased_attention:
        out["attention_bias"] = cfg.attn_out_bias
    if family.fixed_activation == "clamped_swiglu":
        out.update(swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)
    if family.llama4_layers:
        out.update(llama4.to_hf(cfg))
    elif family.moe:
        out.update(_moe_to_hf(cfg, family.moe))
    if family.mla:
        mla = cfg.mla
        out.update(
            head_dim=mla.qk_rope_head_dim,
            q_lora_rank=mla.q_lora_rank or None,
            kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_nope_head_dim,
            qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim,
            rope_interleave=mla.rope_interleave,
        )
    if family.qk_norm_key:
        out[family.qk_norm_key] = cfg.qk_norm
    if family.attention_bias_is_qkv:
        out["attention_bias"] = cfg.qkv_bias
    if family.rotary_fraction_default:
        out["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_fraction
    # Token ids written always (null when unknown): some families default them outside a small vocabulary.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = special_ids.get(key)
        out[key] = None if value is None else int(value)
    return out


def _moe_to_hf(cfg: ModelConfig, family: MoEFamily) -> dict[str, Any]:
    """The MoE fields of config.json (architecture_for's round trip refuses what a family cannot carry)."""
    moe = cfg.moe
    if family.sigmoid_groups:
        return {
            "n_routed_experts": moe.experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": cfg.expert_d_ff,
            # whole shared experts of the routed width; a remainder reads back differently and is refused
            "n_shared_experts": moe.shared_d_ff // cfg.expert_d_ff,
            "routed_scaling_factor": moe.routed_scale,
            "n_group": moe.n_group,
            "topk_group": moe.topk_group,
            "first_k_dense_replace": moe.first_dense_layers,
            "norm_topk_prob": moe.norm_topk,
            "num_nextn_predict_layers": 0,  # no multi-token-prediction layers: transformers builds none
        }
    out: dict[str, Any] = {"num_experts_per_tok": moe.top_k}
    if not family.expert_width_key:  # experts only, of the model's ffn width
        out["intermediate_size"] = cfg.expert_d_ff
    out[family.experts_key] = moe.experts
    if family.norm_topk is None:
        out["norm_topk_prob"] = moe.norm_topk
    if family.expert_width_key:
        out[family.expert_width_key] = cfg.expert_d_ff
    if family.sparse_step:
        out.update(
            decoder_sparse_step=moe.every,
            mlp_only_layers=[i for i in range(cfg.n_layers) if (i + 1) % moe.every == 0 and not moe.is_moe_layer(i)],
        )
    if family.shared_expert:
        out["shared_expert_intermediate_size"] = moe.shared_d_ff
    out.update(family.pinned)
    return out
