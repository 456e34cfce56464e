"""The decoder's shape. Presets name real shapes; YAML may start from a preset and override single fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from analogjax.errors import UserError, check_choice


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
    activation: str = "silu"  # silu (Llama, Qwen, Mistral) | gelu_tanh (Gemma)
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + weight), offset 1
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    remat: str = "none"  # none | block (recompute each block's activations in the backward pass)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @classmethod
    def from_preset_dict(cls, raw: dict, prefix: str) -> dict:
        name = raw.get("preset", "")
        if not name:
            return raw
        from analogjax.models.presets import PRESETS

        if name not in PRESETS:
            raise UserError(f"{prefix}.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
        return {**dataclasses.asdict(PRESETS[name]), **raw}

    def check(self, prefix: str) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise UserError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise UserError(f"{prefix}.n_heads ({self.n_heads}) must divide {prefix}.d_model ({self.d_model})")
        if self.n_heads % self.kv_heads:
            raise UserError(f"{prefix}.n_kv_heads ({self.kv_heads}) must divide {prefix}.n_heads ({self.n_heads})")
        if self.dim_per_head % 2:
            raise UserError(f"{prefix}.head_dim must be even for rotary embeddings, got {self.dim_per_head}")
        choices = {"activation": ("silu", "gelu_tanh"), "dtype": ("float32", "bfloat16"), "remat": ("none", "block")}
        for name, allowed in choices.items():
            check_choice(f"{prefix}.{name}", getattr(self, name), allowed)
