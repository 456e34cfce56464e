"""The decoder's shape, and the named presets. YAML may start from a preset and override single fields.

Every architecture option defaults to off (the plain Llama decoder); each one is a static field, so the forward
branches on it in Python and the plain path compiles to exactly what it did before the option existed.
Per-layer differences (sliding/full attention, local/global RoPE) are described here once (`layer_kinds`) and
become per-layer arrays inside the scanned stack (transformer.py), never separate code per layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from analogjax.errors import UserError, check_choice

# The attention kernels `model.attention` may name (models/attention.py says what each is and when `auto` takes it).
# Listed here, not there, so that reading a config imports no JAX (`analogjax config`, a refused config).
KERNELS = ("auto", "xla", "splash", "cudnn", "pallas_gpu")

FULL, SLIDING = "full", "sliding"  # the attention kinds a layer can have (and CHUNKED below)
# Llama 4's local layers: a query sees only the earlier keys of its own chunk (equal position // attention_chunk).
CHUNKED = "chunked"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for long context, as transformers' modeling_rope_utils computes it.

    kind: none | linear (frequencies / factor) | llama3 (Llama 3.1+: long wavelengths / factor, short kept, smooth
    between) | yarn (ramped interpolation, plus an attention factor on cos/sin).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_positions: int = 0  # llama3, yarn: the pretraining context length
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: floor/ceil the correction range
    attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0 = derived from factor (and mscale, mscale_all_dim)
    mscale: float = 0.0  # yarn (DeepSeek style); 0 = unset
    mscale_all_dim: float = 0.0  # yarn; 0 = unset

    def check(self, prefix: str) -> None:
        check_choice(f"{prefix}.kind", self.kind, ("none", "linear", "llama3", "yarn"))
        if self.kind != "none" and self.factor <= 0:
            raise UserError(f"{prefix}.factor must be positive, got {self.factor}")
        if self.kind in ("llama3", "yarn") and self.original_max_positions <= 0:
            raise UserError(f"{prefix}.original_max_positions must be positive for {self.kind} scaling")
        # Equal factors leave no smoothed band (Llama 4 Scout's config: both 1.0); transformers computes them alike.
        if self.kind == "llama3" and self.high_freq_factor < self.low_freq_factor:
            raise UserError(f"{prefix}.high_freq_factor must not be below low_freq_factor")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers (models/moe.py). experts = 0: a dense model (the default).

    Which layers are MoE: the first `first_dense_layers` are dense; after them, every `every`-th layer is MoE (the
    last of each group of `every`), as Qwen2-MoE's decoder_sparse_step and DeepSeek's first_k_dense_replace count.
    Router: softmax (Mixtral, Qwen, OLMoE) or sigmoid (DeepSeek-V3) scores over all experts; the top_k chosen;
    their weights renormalised to sum 1 when `norm_topk`, then times `routed_scale`. `expert_bias` adds a learned
    per-expert bias to the scores used for *selection only* (DeepSeek-V3's e_score_correction_bias); the weights
    use the unbiased scores. Shared experts (one SwiGLU of width shared_d_ff, always on) are added to the routed
    output, times sigmoid(x·w) when `shared_gate` (Qwen2-MoE). gpt-oss: `router_bias` adds a learned per-expert bias
    to the router logits (selection and weights alike; its softmax over the chosen top-k logits is the softmax over
    all of them renormalised over the chosen: norm_topk), and `expert_biases` gives every expert's gate, up and down
    projections a bias.
    """

    experts: int = 0
    top_k: int = 2
    expert_d_ff: int = 0  # each routed expert's ffn width; 0 = the model's d_ff
    shared_d_ff: int = 0  # the shared expert's ffn width (several shared experts = one of their summed width); 0: none
    shared_gate: bool = False
    router: str = "softmax"  # softmax | sigmoid
    norm_topk: bool = True
    routed_scale: float = 1.0
    expert_bias: bool = False
    # Llama 4: each chosen expert's routing weight scales the token going into the expert, expert(w·x), rather
    # than its output, w·expert(x) (SwiGLU is not linear, so the two differ).
    weights_on_input: bool = False
    first_dense_layers: int = 0
    every: int = 1
    # Group-limited selection (DeepSeek-V3, GLM-4.5; sigmoid routers): the experts split into n_group equal groups,
    # each group ranked by the sum of its two best selection scores, and only the topk_group best groups' experts
    # may be chosen. 1 and 1: no limit (the default).
    n_group: int = 1
    topk_group: int = 1
    # How experts spread over fsdp meet their tokens (models/moe.py): exchange_tokens (each device keeps its E/fsdp
    # experts; the fsdp group's tokens are all-gathered and the outputs reduce-scattered back) or gather_weights
    # (each device runs every expert on its own tokens, the expert weights all-gathered layer by layer).
    dispatch: str = "exchange_tokens"
    # Objective weights of the router terms (the student's; a teacher's are unused): Switch/GShard load balancing
    # α·E·Σᵢ fᵢ·Pᵢ and the ST-MoE router z-loss mean(logsumexp(logits)²), averaged over the MoE layers.
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    router_bias: bool = False  # gpt-oss: a learned bias on the router logits
    expert_biases: bool = False  # gpt-oss: biases on each expert's gate, up and down projections

    @property
    def enabled(self) -> bool:
        return self.experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.enabled
            and layer >= self.first_dense_layers
            and (layer - self.first_dense_layers + 1) % self.every == 0
        )

    def validate(self, prefix: str, n_layers: int) -> None:
        """Checked by ModelConfig.check, which knows the layer count."""
        if self.experts < 0:
            raise UserError(f"{prefix}.experts must not be negative, got {self.experts}")
        if not self.enabled:
            return
        check_choice(f"{prefix}.router", self.router, ("softmax", "sigmoid"))
        check_choice(f"{prefix}.dispatch", self.dispatch, ("exchange_tokens", "gather_weights"))
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"{prefix}.top_k ({self.top_k}) must be between 1 and {prefix}.experts ({self.experts})")
        for name in ("expert_d_ff", "shared_d_ff", "first_dense_layers", "aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{prefix}.{name} must not be negative, got {getattr(self, name)}")
        if self.routed_scale <= 0:
            raise UserError(f"{prefix}.routed_scale must be positive, got {self.routed_scale}")
        if self.shared_gate and not self.shared_d_ff:
            raise UserError(f"{prefix}.shared_gate needs a shared expert ({prefix}.shared_d_ff > 0)")
        if self.every < 1:
            raise UserError(f"{prefix}.every must be at least 1, got {self.every}")
        self._validate_groups(prefix)
        if self.first_dense_layers >= n_layers:
            raise UserError(
                f"{prefix}.first_dense_layers ({self.first_dense_layers}) leaves no MoE layer of {n_layers}"
            )
        # The MoE layers are scanned in groups of `every` layers (every-1 dense, then one MoE), after a scanned
        # dense prefix: the layers after the prefix must fill whole groups.
        if (n_layers - self.first_dense_layers) % self.every:
            raise UserError(
                f"{prefix}.every ({self.every}) must divide the layers after {prefix}.first_dense_layers "
                f"({n_layers - self.first_dense_layers})"
            )

    def _validate_groups(self, prefix: str) -> None:
        if self.n_group < 1 or self.experts % self.n_group:
            raise UserError(
                f"{prefix}.n_group ({self.n_group}) must be positive and divide {prefix}.experts ({self.experts})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise UserError(
                f"{prefix}.topk_group ({self.topk_group}) must be between 1 and {prefix}.n_group ({self.n_group})"
            )
        if self.n_group > 1:
            if self.router != "sigmoid":
                raise UserError(f"{prefix}.n_group > 1 (group-limited routing) needs {prefix}.router: sigmoid")
            per_group = self.experts // self.n_group
            if per_group < 2:
                raise UserError(
                    f"{prefix}.n_group ({self.n_group}) leaves fewer than 2 experts per group (groups rank by their "
                    "two best experts)"
                )
            if self.top_k > self.topk_group * per_group:
                raise UserError(
                    f"{prefix}.top_k ({self.top_k}) exceeds the {self.topk_group * per_group} experts of "
                    f"{prefix}.topk_group ({self.topk_group}) groups"
                )


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (models/mla.py: DeepSeek-V2/V3, Kimi K2). kv_lora_rank 0: off (the default).

    Queries: x·W_q, or, with q_lora_rank > 0, RMSNorm(x·W_dq)·W_uq. Keys and values come from one latent
    c = RMSNorm(x·W_dkv) of kv_lora_rank dims: per head k = [c·W_uk (qk_nope_head_dim) | k_rope] and v = c·W_uv
    (v_head_dim), where k_rope (qk_rope_head_dim) is one rotary key x·W_kr shared by every head. Only the last
    qk_rope_head_dim dims of each query and key rotate; `rope_interleave` rotates them as interleaved pairs
    (transformers' rope_interleave, DeepSeek's released layout) rather than as halves. Decoding caches c and k_rope.
    """

    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False

    @property
    def enabled(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, prefix: str) -> None:
        """Checked by ModelConfig.check."""
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 0:
                raise UserError(f"{prefix}.{name} must not be negative, got {getattr(self, name)}")
        if not self.enabled:
            return
        for name in ("qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise UserError(f"{prefix}.{name} must be positive with {prefix}.kv_lora_rank > 0")
        if self.qk_rope_head_dim % 2:
            raise UserError(
                f"{prefix}.qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}"
            )


def _merged(base: dict, given: dict) -> dict:
    """`given` over `base`, nested sections key by key: `moe: {dispatch: ...}` over a preset keeps the preset's
    experts (a shallow merge replaced its whole moe section with defaults: an MoE preset turned silently dense)."""
    out = dict(base)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass(frozen=True)
class ModelConfig:
    preset: str = ""
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (plain multi-head attention)
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # silu (Llama, Qwen, Mistral) | gelu_tanh (Gemma) | clamped_swiglu (gpt-oss: swiglu_alpha, swiglu_limit below)
    activation: str = "silu"
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3, Gemma 3, OLMo 2: RMSNorm on queries and keys before RoPE
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + weight), offset 1
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | auto (runtime/compute_dtype.py); params stay float32
    remat: str = "none"  # none | block (recompute each block's activations in the backward pass)
    # Attention kernel (models/attention.py): auto (TPU: splash, GPU: pallas_gpu then cudnn, CPU: xla; the next one
    # where a kernel cannot do this model's windows/soft-cap/dtype/length) | xla (materialises [s, s] scores) | splash |
    # pallas_gpu (segment-aware Pallas flash attention, models/flash_gpu.py; measured on one H200, BENCHMARKS.md) |
    # cudnn (a dense [s, s] document mask).
    attention: str = "auto"
    # --- architecture options of newer families; every default is the plain Llama decoder ---
    # Where the block's RMSNorms sit. pre: x + f(norm(x)) (Llama). sandwich: x + post_norm(f(norm(x))) (Gemma 2/3).
    # post: x + post_norm(f(x)) (OLMo 2).
    norm_placement: str = "pre"
    # head: each head normed alone (Qwen3, Gemma 3) | all_heads: one norm over h·e (OLMo 2)
    qk_norm_scope: str = "head"
    # Sliding-window attention: a query at position i sees keys at positions (i - sliding_window, i]. 0 = none.
    sliding_window: int = 0
    # Attention kind per layer, repeated cyclically over the layers ("sliding" / "full"). Empty: every layer is
    # sliding when sliding_window > 0, else full. Gemma 2: [sliding, full]; Gemma 3: 5 × sliding then full.
    layer_pattern: tuple[str, ...] = ()
    local_rope_theta: float = 0.0  # RoPE base of sliding layers, unscaled (Gemma 3: 10k); 0 = as the full layers
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attn_softcap: float = 0.0  # attention logits → cap·tanh(logits/cap) before the mask (Gemma 2: 50); 0 = off
    final_softcap: float = 0.0  # output logits → cap·tanh(logits/cap) (Gemma 2: 30); 0 = off
    query_scalar: float = 0.0  # scores scale by query_scalar^-0.5 (Gemma's query_pre_attn_scalar); 0 = head dim
    # The Hugging Face architecture export writes (e.g. Phi3ForCausalLM, whose fused weights compute what Llama's
    # do). Empty: the architecture the other fields imply (hf.architecture_for).
    hf_architecture: str = ""
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts layers (experts 0: dense)
    # --- Llama 4 ---
    # Chunked local attention on the layers layer_pattern marks "chunked" (every layer when layer_pattern is empty
    # and sliding_window is 0): a query at position i sees the keys at positions j <= i with j // attention_chunk
    # == i // attention_chunk. 0 = none.
    attention_chunk: int = 0
    # NoPE layers, repeated cyclically over the layers like layer_pattern: true = no rotary embedding on that layer
    # (Llama 4's global layers). Empty: every layer rotates.
    nope_pattern: tuple[bool, ...] = ()
    # Llama 4's q/k norm: on RoPE layers only, queries and keys divided by their RMS over the head dim, no weight.
    qk_l2_norm: bool = False
    # Llama 4's attention temperature tuning, on NoPE layers only: queries times
    # 1 + attn_temperature_scale · log1p(floor((position + 1) / attn_temperature_floor)). 0 = off.
    attn_temperature_scale: float = 0.0
    attn_temperature_floor: int = 8192
    # --- gpt-oss ---
    # Attention sinks: one learned logit per query head in every softmax denominator, attending to nothing.
    attn_sinks: bool = False
    attn_out_bias: bool = False  # a bias on the attention output projection (gpt-oss's attention_bias: q, k, v, o)
    # activation clamped_swiglu: (clip(up, ±limit) + 1) · g · sigmoid(alpha · g), g = min(gate, limit)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # --- DeepSeek-V3, Kimi K2, GLM-4.5 ---
    # Share of each head's dims that rotate (the first ones; the rest carry no position): GLM-4.5's
    # partial_rotary_factor 0.5. 1: all of them.
    rotary_fraction: float = 1.0
    mla: MLAConfig = field(default_factory=MLAConfig)  # multi-head latent attention (kv_lora_rank 0: off)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """How many dims of each query and key head rotate."""
        if self.mla.enabled:
            return self.mla.qk_rope_head_dim
        return int(self.dim_per_head * self.rotary_fraction)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's attention kind (FULL, SLIDING or CHUNKED)."""
        if self.layer_pattern:
            return tuple(self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers))
        return ((SLIDING if self.sliding_window else CHUNKED if self.attention_chunk else FULL),) * self.n_layers

    @property
    def layer_nope(self) -> tuple[bool, ...]:
        """Each layer: true where it has no rotary embedding (nope_pattern, repeated)."""
        if not self.nope_pattern:
            return (False,) * self.n_layers
        return tuple(bool(self.nope_pattern[i % len(self.nope_pattern)]) for i in range(self.n_layers))

    @property
    def uniform_layers(self) -> bool:
        """True when every layer attends alike (same window, same RoPE): no per-layer data enters the scan."""
        kinds = set(self.layer_kinds)
        return len(kinds) == 1 and not (kinds == {SLIDING} and self.local_rope_theta) and len(set(self.layer_nope)) == 1

    @classmethod
    def from_preset_dict(cls, raw: dict, prefix: str) -> dict:
        name = raw.get("preset", "")
        if not name:
            return raw
        if name not in PRESETS:
            raise UserError(f"{prefix}.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
        return _merged(dataclasses.asdict(PRESETS[name]), raw)

    def check(self, prefix: str) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise UserError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0 and self.d_model % self.n_heads and not self.mla.enabled:
            raise UserError(f"{prefix}.n_heads ({self.n_heads}) must divide {prefix}.d_model ({self.d_model})")
        if self.n_heads % self.kv_heads:
            raise UserError(f"{prefix}.n_kv_heads ({self.kv_heads}) must divide {prefix}.n_heads ({self.n_heads})")
        if not 0 < self.rotary_fraction <= 1:
            raise UserError(f"{prefix}.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if self.rope_dim % 2 or not self.rope_dim:
            raise UserError(
                f"{prefix}.head_dim must give an even, non-zero count of rotary dims, got {self.rope_dim} "
                f"(head_dim {self.dim_per_head} x rotary_fraction {self.rotary_fraction})"
            )
        choices = {
            "activation": ("silu", "gelu_tanh", "clamped_swiglu"),
            "dtype": ("float32", "bfloat16", "auto"),
            "remat": ("none", "block"),
            "attention": KERNELS,
            "norm_placement": ("pre", "sandwich", "post"),
            "qk_norm_scope": ("head", "all_heads"),
        }
        for name, allowed in choices.items():
            check_choice(f"{prefix}.{name}", getattr(self, name), allowed)
        for i, kind in enumerate(self.layer_pattern):
            check_choice(f"{prefix}.layer_pattern[{i}]", kind, (FULL, SLIDING, CHUNKED))
        for name in (
            "sliding_window",
            "local_rope_theta",
            "attn_softcap",
            "final_softcap",
            "query_scalar",
            "attention_chunk",
            "attn_temperature_scale",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"{prefix}.{name} must not be negative, got {getattr(self, name)}")
        if SLIDING in self.layer_kinds and not self.sliding_window:
            raise UserError(f"{prefix}.layer_pattern has sliding layers but {prefix}.sliding_window is 0")
        if CHUNKED in self.layer_kinds and not self.attention_chunk:
            raise UserError(f"{prefix}.layer_pattern has chunked layers but {prefix}.attention_chunk is 0")
        if self.attn_temperature_scale and self.attn_temperature_floor <= 0:
            raise UserError(f"{prefix}.attn_temperature_floor must be positive, got {self.attn_temperature_floor}")
        self.moe.validate(f"{prefix}.moe", self.n_layers)
        self.mla.validate(f"{prefix}.mla")
        if self.mla.enabled:
            self._check_mla(prefix)
        if self.activation == "clamped_swiglu" and (self.swiglu_alpha <= 0 or self.swiglu_limit <= 0):
            raise UserError(
                f"{prefix}.swiglu_alpha and {prefix}.swiglu_limit must be positive for activation clamped_swiglu, "
                f"got {self.swiglu_alpha} and {self.swiglu_limit}"
            )

    def _check_mla(self, prefix: str) -> None:
        """What latent attention does not combine with (each refused by name rather than ignored)."""
        if self.kv_heads != self.n_heads:
            raise UserError(f"{prefix}.mla: every head has its own keys and values; {prefix}.n_kv_heads must be 0")
        combos = {
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            "sliding_window": self.sliding_window,
            "layer_pattern": self.layer_pattern,
            "attn_softcap": self.attn_softcap,
            "query_scalar": self.query_scalar,
            "head_dim": self.head_dim,
            "attention_chunk": self.attention_chunk,
            "nope_pattern": any(self.nope_pattern),
            "qk_l2_norm": self.qk_l2_norm,
            "attn_temperature_scale": self.attn_temperature_scale,
            "attn_sinks": self.attn_sinks,
            "attn_out_bias": self.attn_out_bias,
        }
        for name, value in combos.items():
            if value:
                raise UserError(f"{prefix}.{name}: not supported with latent attention ({prefix}.mla)")
        if self.rotary_fraction != 1.0:
            raise UserError(f"{prefix}.rotary_fraction: latent attention sets its rotary dims by mla.qk_rope_head_dim")

    @property
    def expert_d_ff(self) -> int:
        return self.moe.expert_d_ff or self.d_ff


def _preset(**kwargs) -> ModelConfig:
    return ModelConfig(**kwargs)


# Named model shapes, from test-sized to the public Llama 3 shapes. They live here, beside the schema, so the
# schema can resolve `preset:` without importing a module that imports it back. The large presets are shapes only
# (nothing is downloaded); they let `compile-check` plan real pod runs.
PRESETS: dict[str, ModelConfig] = {
    # Test and demo sizes.
    "tiny": _preset(preset="tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192),
    "tiny-teacher": _preset(
        preset="tiny-teacher", vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384
    ),
    # bench/step.py dimensions.
    "bench-teacher": _preset(preset="bench-teacher", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, d_ff=1536),
    "bench-student": _preset(preset="bench-student", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=768),
    # Llama 3 family shapes (vocab 128256, GQA with 8 KV heads, rope theta 500000).
    "llama3-1b": _preset(
        preset="llama3-1b",
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        dtype="bfloat16",
        remat="block",
    ),
    "llama3-8b": _preset(
        preset="llama3-8b",
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        rope_theta=500000.0,
        dtype="bfloat16",
        remat="block",
    ),
    "llama3-70b": _preset(
        preset="llama3-70b",
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        rope_theta=500000.0,
        dtype="bfloat16",
        remat="block",
    ),
    # Mixture-of-experts shapes (public config.json values; shapes only). param_count: Mixtral-8x7B 46.7B total /
    # 12.9B active, Qwen3-30B-A3B 30.5B / 3.3B, Qwen3-235B-A22B 235B / 22B.
    "mixtral-8x7b": _preset(
        preset="mixtral-8x7b",
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        rope_theta=1e6,
        dtype="bfloat16",
        remat="block",
        moe=MoEConfig(experts=8, top_k=2),
    ),
    "qwen3-30b-a3b": _preset(
        preset="qwen3-30b-a3b",
        vocab_size=151936,
        d_model=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        d_ff=6144,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_norm=True,
        dtype="bfloat16",
        remat="block",
        moe=MoEConfig(experts=128, top_k=8, expert_d_ff=768),
    ),
    "qwen3-235b-a22b": _preset(
        preset="qwen3-235b-a22b",
        vocab_size=151936,
        d_model=4096,
        n_layers=94,
        n_heads=64,
        n_kv_heads=4,
        head_dim=128,
        d_ff=12288,
        rope_theta=1e6,
        norm_eps=1e-6,
        qk_norm=True,
        dtype="bfloat16",
        remat="block",
        moe=MoEConfig(experts=128, top_k=8, expert_d_ff=1536),
    ),
    # gpt-oss-120b (openai/gpt-oss-120b config.json; shapes only): 36 layers alternating a 128-token window and full
    # attention, attention sinks, biases on q/k/v/o, the router and the experts, 128 experts top-4 with the clamped
    # SwiGLU, YaRN x32 from 4k. param_count: 116.8B total, 5.7B active (OpenAI's 5.1B leaves out the embedding
    # table).
    "gpt-oss-120b": _preset(
        preset="gpt-oss-120b",
        vocab_size=201088,
        d_model=2880,
        n_layers=36,
        n_heads=64,
        n_kv_heads=8,
        head_dim=64,
        d_ff=2880,
        rope_theta=150000.0,
        rope_scaling=RopeScaling(kind="yarn", factor=32.0, original_max_positions=4096, truncate=False),
        sliding_window=128,
        layer_pattern=(SLIDING, FULL),
        qkv_bias=True,
        attn_out_bias=True,
        attn_sinks=True,
        activation="clamped_swiglu",
        dtype="bfloat16",
        remat="block",
        moe=MoEConfig(experts=128, top_k=4, router_bias=True, expert_biases=True),
    ),
    # DeepSeek-V3 (671B total / 37B active without its multi-token-prediction layer) and Kimi K2 (1.04T / 32B): one
    # block (multi-head latent attention, sigmoid group-limited routing over 256 / 384 experts, one shared expert,
    # dense first layers), YaRN-scaled RoPE; public config.json values, shapes only.
    "deepseek-v3-671b": _preset(
        preset="deepseek-v3-671b",
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        n_heads=128,
        d_ff=18432,
        norm_eps=1e-6,
        rope_scaling=RopeScaling(kind="yarn", factor=40.0, original_max_positions=4096, mscale=1.0, mscale_all_dim=1.0),
        dtype="bfloat16",
        remat="block",
        mla=MLAConfig(
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            rope_interleave=True,
        ),
        moe=MoEConfig(
            experts=256,
            top_k=8,
            expert_d_ff=2048,
            shared_d_ff=2048,
            router="sigmoid",
            expert_bias=True,
            routed_scale=2.5,
            first_dense_layers=3,
            n_group=8,
            topk_group=4,
        ),
    ),
    "kimi-k2-1t": _preset(
        preset="kimi-k2-1t",
        vocab_size=163840,
        d_model=7168,
        n_layers=61,
        n_heads=64,
        d_ff=18432,
        rope_theta=50000.0,
        norm_eps=1e-6,
        rope_scaling=RopeScaling(
            kind="yarn",
            factor=32.0,
            original_max_positions=4096,
            beta_fast=1.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        dtype="bfloat16",
        remat="block",
        mla=MLAConfig(
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            rope_interleave=True,
        ),
        moe=MoEConfig(
            experts=384,
            top_k=8,
            expert_d_ff=2048,
            shared_d_ff=2048,
            router="sigmoid",
            expert_bias=True,
            routed_scale=2.827,
            first_dense_layers=1,
        ),
    ),
}

# The fields `like_teacher` may override: size only. Everything else (family, norms, RoPE, attention pattern,
# activation, vocabulary) comes from the teacher.
SIZE_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "dtype", "remat", "attention")
