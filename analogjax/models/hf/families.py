"""The Hugging Face families analogjax reads and writes, as data: one `Family` record per architecture.

A record says everything the converters (convert.py, tensors.py) need to know about a family: the config.json keys
it reads besides the common ones (the refusal rule, convert.py), the forward-pass conventions it fixes (norm offset,
embedding scale, norm placement, q/k norms, biases), the defaults of fields its config.json may leave out, how its
layers slide, which RoPE scalings its transformers class computes as ours does, its tensor names (Phi-3's fused
projections, Mixtral's expert names) and its mixture-of-experts conventions. The converters branch on these fields,
never on a family's name.

Adding a family is adding a record here (and blocks in models/ if it needs new math); `implied_architecture` names
the family a ModelConfig exports as when its `hf_architecture` is empty, so a family reachable only by name (Phi-3)
needs nothing there. A multimodal architecture whose text model is one of these families is a `Wrapper`: read for
its language model alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from analogjax.models.config import ModelConfig

# Llama 4 text's config.json keys besides the common ones (hf/llama4.py reads and writes them).
LLAMA4_KEYS = frozenset(
    {
        "intermediate_size_mlp",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_layers",
        "interleave_moe_layer_step",
        "router_jitter_noise",
        "use_qk_norm",
        "no_rope_layers",
        "no_rope_layer_interval",
        "attention_chunk_size",
        "layer_types",
        "attn_temperature_tuning",
        "floor_scale",
        "attn_scale",
    }
)

# How a family's config.json says which layers slide.
#   uniform: its window (if it reads one) on every layer (Llama, Mistral, Phi-3, Mixtral).
#   max_window_layers: Qwen: use_sliding_window switches the window on; layer_types names each layer's kind, else
#     the layers from max_window_layers on slide.
#   pattern: Gemma 2/3: layer_types, else every `sliding_period`-th layer is full (sliding_window_pattern, where
#     the family reads it, overrides the period).
LayerWindows = Literal["uniform", "max_window_layers", "pattern"]
# Config values a family's transformers class writes beside the ones it computes with (written on export as is).
Pinned = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class MoEFamily:
    """How one family's config.json and tensors spell its mixture-of-experts layers."""

    experts_key: str = "num_experts"  # config.json's expert count (transformers 5 may also write num_local_experts)
    # config.json's expert width; None: the experts are intermediate_size wide (the model's own d_ff).
    expert_width_key: str | None = None
    sparse_step: bool = False  # decoder_sparse_step and mlp_only_layers say which layers are MoE (Qwen)
    shared_expert: bool = False  # one gated shared expert beside the routed ones, which must be there (Qwen2-MoE)
    norm_topk: bool | None = None  # top-k weights renormalised always (Mixtral); None: config.json's norm_topk_prob
    block: str = "mlp."  # the experts' module under each layer
    router: str = "gate"  # the router's module under `block` (Llama 4: router)
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    # Every expert in one tensor per projection, [experts, in, out]: experts.gate_up_proj ([gate | up] on the last
    # dim) and experts.down_proj (Llama 4, gpt-oss; tensors.py).
    fused_experts: bool = False
    # gpt-oss: gate and up interleaved column by column in experts.gate_up_proj. Released checkpoints store the two
    # weights as MXFP4 blocks and scales (mxfp4.py).
    interleaved_gate_up: bool = False
    biases: bool = False  # gpt-oss: biases on the router and on every expert's gate, up and down projections
    pinned: Pinned = ()  # written after the MoE fields
    # DeepSeek-V3-style routing (DeepSeek-V3, Kimi K2, GLM-4.5): sigmoid scores, the selection-only bias
    # gate.e_score_correction_bias, group-limited top-k (n_group, topk_group), routed_scaling_factor, norm_topk_prob,
    # n_shared_experts always-on experts of the routed width, and first_k_dense_replace dense layers.
    sigmoid_groups: bool = False
    shared_block: str = "shared_expert"  # the shared expert's module under each layer's mlp


@dataclass(frozen=True)
class Family:
    """One Hugging Face decoder family. Defaults are Llama's conventions."""

    architecture: str  # transformers' class, as config.json's "architectures" names it
    model_type: str
    keys: frozenset[str] = frozenset()  # config.json keys read besides convert._READ (each implemented or refused)
    # Conventions of the forward pass (ModelConfig fields the family fixes).
    norm_placement: str = "pre"  # pre | sandwich (Gemma 2/3) | post (OLMo 2)
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + weight)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    # q/k/v projection biases: "" none; "fixed" always there (Qwen2); "keyed" there unless config.json's qkv_bias
    # says false, which is refused (Qwen2-MoE).
    qkv_bias: Literal["", "fixed", "keyed"] = ""
    qk_norm: bool = False
    qk_norm_scope: str = "head"  # head | all_heads (OLMo 2, OLMoE: one norm over every head's dims)
    fused_projections: bool = False  # Phi-3: qkv_proj rows [q; k; v], gate_up_proj rows [gate; up]
    # What config.json may leave out.
    default_activation: str = "silu"
    default_head_dim: int = 0  # 0: hidden_size / num_attention_heads
    default_tie: bool = False
    default_norm_eps: float = 1e-6
    gelu_is_tanh: bool = False  # a legacy "gelu" runs as tanh-GELU in transformers (Gemma)
    reads_head_dim: bool = True  # False: its transformers code ignores head_dim, so one that differs is refused
    # Attention.
    layer_windows: LayerWindows = "uniform"
    sliding_period: int = 0  # layer_windows "pattern": every n-th layer is full
    rope_per_layer_type: bool = False  # Gemma 3: one RoPE dictionary per attention kind (local and global bases)
    rope_scalings: tuple[str, ...] = ("linear", "llama3", "yarn")  # RoPE types its class computes as ours does
    query_scalar: bool = False  # query_pre_attn_scalar (default 256) sets the score scale (Gemma 2/3)
    final_softcap: bool = False  # final_logit_softcapping
    attn_softcap: bool = False  # attn_logit_softcapping
    ignored_by_hf: Pinned = ()  # (key, why): keys its class accepts but never applies, so a set value is refused
    pinned: Pinned = (("attention_bias", False),)  # written right after the shape fields
    moe: MoEFamily | None = None
    # Llama 4 text.
    default_rope_theta: float = 10000.0  # when config.json gives none
    mlp_block: str = "mlp."  # the dense feed-forward's module under each layer (Llama 4: feed_forward.)
    interleaved_rope: bool = False  # RoPE on interleaved pairs (Llama 4's complex RoPE; tensors.py reorders q/k)
    # Llama 4's per-layer keys (chunked and NoPE layers, temperature tuning, L2 q/k norm, its MoE layers), read and
    # written by hf/llama4.py in place of the generic layer-window and MoE readers.
    llama4_layers: bool = False
    # gpt-oss. attention_bias (default true) puts biases on q, k, v and o; elsewhere a true one is refused.
    biased_attention: bool = False
    attn_sinks: bool = False  # a learned sink logit per query head (self_attn.sinks)
    # The feed-forward's activation whatever hidden_act says ("": read hidden_act). gpt-oss: clamped_swiglu with
    # config.json's swiglu_alpha / swiglu_limit (its experts never read hidden_act).
    fixed_activation: str = ""
    rope_required: bool = False  # its transformers default RoPE is not plain (gpt-oss: YaRN): refuse a config without
    # Newer families' switches (GLM-4.5, DeepSeek-V3), each off for the families above.
    qk_norm_key: str = ""  # config.json's key that switches the q/k norms on (GLM-4.5: use_qk_norm)
    # attention_bias switches q/k/v biases (not o_proj's) on: GLM-4.5 (qkv_bias "" then means "as attention_bias")
    attention_bias_is_qkv: bool = False
    # partial_rotary_factor is read (the share of head dims that rotate), with this default when absent; 0: a
    # value other than 1 is refused (the families above rotate every dim)
    rotary_fraction_default: float = 0.0
    mla: bool = False  # multi-head latent attention (models/mla.py), configured by the MLA keys below


_WINDOWED = frozenset({"sliding_window", "layer_types"})
_QWEN_WINDOWS = _WINDOWED | {"use_sliding_window", "max_window_layers"}
_GEMMA: dict[str, Any] = dict(
    norm_offset=1.0,
    embed_scale=True,
    default_activation="gelu_pytorch_tanh",
    default_head_dim=256,  # the Gemma configs' default
    default_tie=True,
)
_GEMMA2_KEYS = _WINDOWED | {
    "hidden_activation",
    "query_pre_attn_scalar",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
}
_GEMMA2: dict[str, Any] = dict(
    _GEMMA,
    norm_placement="sandwich",
    layer_windows="pattern",
    query_scalar=True,
    final_softcap=True,
)
_QWEN_MOE_KEYS = _QWEN_WINDOWS | {
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
}
_QWEN_MOE: dict[str, Any] = dict(experts_key="num_experts", expert_width_key="moe_intermediate_size", sparse_step=True)

FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llama", pinned=(("attention_bias", False), ("mlp_bias", False))),
    Family("MistralForCausalLM", "mistral", frozenset({"sliding_window"})),
    Family(
        "Qwen2ForCausalLM",
        "qwen2",
        _QWEN_WINDOWS,
        qkv_bias="fixed",
        reads_head_dim=False,
        layer_windows="max_window_layers",
        pinned=(),
    ),
    Family("Qwen3ForCausalLM", "qwen3", _QWEN_WINDOWS, qk_norm=True, layer_windows="max_window_layers"),
    Family("GemmaForCausalLM", "gemma", frozenset({"hidden_activation"}), gelu_is_tanh=True, **_GEMMA),
    Family("Gemma2ForCausalLM", "gemma2", _GEMMA2_KEYS, attn_softcap=True, sliding_period=2, **_GEMMA2),
    Family(
        "Gemma3ForCausalLM",
        "gemma3_text",
        _GEMMA2_KEYS
        | {
            "rope_local_base_freq",
            # transformers writes its private copy of the pattern; layer_types supersedes it
            "sliding_window_pattern",
            "_sliding_window_pattern",
        },
        qk_norm=True,
        sliding_period=6,
        rope_per_layer_type=True,
        ignored_by_hf=(("attn_logit_softcapping", "Gemma 3's transformers code does not apply it"),),
        **_GEMMA2,
    ),
    Family(
        "Phi3ForCausalLM",
        "phi3",
        frozenset({"sliding_window", "original_max_position_embeddings", "partial_rotary_factor"}),
        fused_projections=True,
        reads_head_dim=False,
        rope_scalings=(),  # Phi-3 turns yarn into longrope; dynamic and longrope depend on the sequence length
        pinned=(),
    ),
    Family(
        "Olmo2ForCausalLM",
        "olmo2",
        norm_placement="post",
        qk_norm=True,
        qk_norm_scope="all_heads",
        default_norm_eps=1e-5,
        reads_head_dim=False,
    ),
    # Mixture-of-experts families (models/moe.py).
    Family(
        "MixtralForCausalLM",
        "mixtral",
        frozenset({"sliding_window", "num_local_experts", "num_experts_per_tok", "router_jitter_noise"}),
        moe=MoEFamily(
            experts_key="num_local_experts",
            norm_topk=True,
            block="block_sparse_moe.",
            expert_names=("w1", "w3", "w2"),
            pinned=(("router_jitter_noise", 0.0),),
        ),
    ),
    Family(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        _QWEN_MOE_KEYS | {"shared_expert_intermediate_size", "qkv_bias"},
        qkv_bias="keyed",
        layer_windows="max_window_layers",
        moe=MoEFamily(**_QWEN_MOE, shared_expert=True, pinned=(("qkv_bias", True),)),
    ),
    Family(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        _QWEN_MOE_KEYS | {"num_local_experts"},  # transformers writes this alias of num_experts itself
        qk_norm=True,
        layer_windows="max_window_layers",
        moe=MoEFamily(**_QWEN_MOE),
    ),
    Family(
        "OlmoeForCausalLM",
        "olmoe",
        frozenset({"num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv"}),
        qk_norm=True,
        qk_norm_scope="all_heads",
        moe=MoEFamily(pinned=(("clip_qkv", None),)),
    ),
    # Llama 4 text: chunked and NoPE layers, L2 q/k norm, interleaved MoE with a shared expert (hf/llama4.py).
    Family(
        "Llama4ForCausalLM",
        "llama4_text",
        LLAMA4_KEYS,
        default_head_dim=128,
        default_norm_eps=1e-5,
        default_rope_theta=500000.0,
        mlp_block="feed_forward.",
        interleaved_rope=True,
        llama4_layers=True,
        moe=MoEFamily(experts_key="num_local_experts", block="feed_forward.", router="router", fused_experts=True),
    ),
    Family(
        "GptOssForCausalLM",
        "gpt_oss",
        _WINDOWED
        | {
            "num_local_experts",
            "num_experts_per_tok",
            "swiglu_alpha",
            "swiglu_limit",
            "quantization_config",  # MXFP4 experts, dequantized at import (convert.py checks the method)
            # Written by the released checkpoints and read by no transformers code (num_experts_per_tok and
            # rope_scaling's original_max_position_embeddings carry what they say).
            "experts_per_token",
            "initial_context_length",
        },
        layer_windows="pattern",
        sliding_period=2,
        default_head_dim=64,
        default_norm_eps=1e-5,
        biased_attention=True,
        attn_sinks=True,
        fixed_activation="clamped_swiglu",
        rope_required=True,
        pinned=(),
        moe=MoEFamily(
            experts_key="num_local_experts",
            norm_topk=True,
            router="router",
            fused_experts=True,
            interleaved_gate_up=True,
            biases=True,
        ),
    ),
)
# DeepSeek-V3's MLA and routing keys. Kimi K2's config.json (architectures DeepseekV3ForCausalLM, model_type kimi_k2,
# its own copy of DeepSeek-V3's modeling code) is this block with other sizes (64 heads, 384 experts, one group, one
# dense layer) plus the original DeepSeek keys scoring_func, topk_method, moe_layer_freq, ep_size, aux_loss_alpha,
# seq_aux: it is read where those keys say what transformers computes (sigmoid, noaux_tc, every layer MoE after the
# dense ones) and refused otherwise (convert.py); its fp8 quantization_config is refused by name like any other key.
_MLA_KEYS = frozenset(
    {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim"}
    | {"rope_interleave"}
)
_SIGMOID_MOE_KEYS = frozenset(
    {
        "n_routed_experts",
        "num_local_experts",  # transformers' alias of n_routed_experts
        "num_experts_per_tok",
        "moe_intermediate_size",
        "n_shared_experts",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "first_k_dense_replace",
        "norm_topk_prob",
        # multi-token-prediction modules: extra layers (model.layers.<n_layers>.*) that transformers' forward
        # never runs and analogjax never reads; they cannot change the logits
        "num_nextn_predict_layers",
        "num_mtp_layers",
        # the original DeepSeek/Kimi spellings (checked in convert.py)
        "scoring_func",
        "topk_method",
        "moe_layer_freq",
        "ep_size",  # expert-parallel degree of their inference code: a runtime layout
        "aux_loss_alpha",  # training-only
        "seq_aux",  # training-only
    }
)
_SIGMOID_MOE = MoEFamily(
    experts_key="n_routed_experts",
    expert_width_key="moe_intermediate_size",
    sigmoid_groups=True,
    shared_block="shared_experts",
)
FAMILIES += (
    Family(
        "DeepseekV3ForCausalLM",
        "deepseek_v3",
        _MLA_KEYS | _SIGMOID_MOE_KEYS,
        mla=True,
        moe=_SIGMOID_MOE,
    ),
    Family(
        "Glm4MoeForCausalLM",
        "glm4_moe",
        _SIGMOID_MOE_KEYS | {"use_qk_norm", "partial_rotary_factor"},
        qk_norm_key="use_qk_norm",
        attention_bias_is_qkv=True,
        rotary_fraction_default=0.5,  # Glm4MoeConfig's default when config.json has none
        default_norm_eps=1e-5,
        pinned=(),
        moe=_SIGMOID_MOE,
    ),
)
BY_ARCHITECTURE = {family.architecture: family for family in FAMILIES}
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}
# HF architecture name → the model_type that goes with it.
ARCHITECTURES = {family.architecture: family.model_type for family in FAMILIES}

# Architectures that are wanted but not built yet: refused by name, with what is missing.
NOT_YET = {
    "DeepseekV2ForCausalLM": "multi-head latent attention and group-limited routing are not implemented",
    # The stretch families of issue 27, not built yet.
    "Qwen3NextForCausalLM": "Qwen3-Next's gated DeltaNet linear-attention layers are not implemented",
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2's sparse-attention indexer is not implemented",
}


@dataclass(frozen=True)
class Wrapper:
    """A multimodal architecture read for its text model alone (text in, logits out: with no image in the input its
    transformers class runs the language model and nothing else). Its config.json nests the text model's under
    `text_config`; its tensors carry `tensor_prefix`. Export writes the text architecture."""

    text_architecture: str
    tensor_prefix: str
    keys: frozenset[str]  # its own config.json keys besides text_config: none changes text-only logits


WRAPPERS = {
    "Llama4ForConditionalGeneration": Wrapper(
        "Llama4ForCausalLM",
        "language_model.",
        frozenset({"vision_config", "boi_token_index", "eoi_token_index", "image_token_index", "tie_word_embeddings"}),
    ),
}


def implied_architecture(cfg: ModelConfig) -> str:
    """The architecture `cfg` exports as: cfg.hf_architecture when set, else the plainest family whose
    conventions its fields use (convert.architecture_for then checks that family carries every field exactly)."""
    if cfg.hf_architecture:
        return cfg.hf_architecture
    if cfg.attention_chunk or any(cfg.nope_pattern) or cfg.qk_l2_norm or cfg.moe.weights_on_input:
        return "Llama4ForCausalLM"  # before the sigmoid router below: Llama 4's is one too
    if cfg.attn_sinks or cfg.activation == "clamped_swiglu":
        return "GptOssForCausalLM"
    if cfg.mla.enabled:
        return "DeepseekV3ForCausalLM"
    if cfg.moe.enabled and cfg.moe.router == "sigmoid":
        return "Glm4MoeForCausalLM"
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


def family_of(cfg: ModelConfig) -> Family | None:
    """The family `cfg` exports as (None: an hf_architecture that is none of FAMILIES)."""
    return BY_ARCHITECTURE.get(implied_architecture(cfg))
