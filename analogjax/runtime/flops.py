"""Model FLOPs and the peak they are measured against (MFU).

MFU counts model FLOPs only (matmuls, attention scores; no recomputation from remat), the PaLM convention:
training the student is 3× its forward (forward + two backward matmuls), the teacher costs one forward.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from analogjax.models.config import CHUNKED, ModelConfig
from analogjax.runtime import compute_dtype

# Dense bf16 peaks per chip (vendor figures), for MFU on accelerators. CPUs are measured instead.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def _ffn_params(cfg: ModelConfig, layer: int, active: bool) -> int:
    """Feed-forward weights of one layer: dense SwiGLU; or (MoE) the router (and its bias), the experts (all of
    them, or the top_k a token uses when `active`; with their biases, gpt-oss), the shared expert and its gate."""
    d, moe = cfg.d_model, cfg.moe
    if not moe.is_moe_layer(layer):
        return 3 * d * cfg.d_ff
    used = moe.top_k if active else moe.experts
    expert = 3 * d * cfg.expert_d_ff + ((2 * cfg.expert_d_ff + d) if moe.expert_biases else 0)
    router = d * moe.experts + (moe.experts if moe.router_bias else 0)  # weights (, gpt-oss's logit bias)
    router += moe.experts if moe.expert_bias else 0  # DeepSeek-V3's selection bias
    return router + used * expert + 3 * d * moe.shared_d_ff + (d if moe.shared_gate else 0)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one token's forward. MoE layers count the active parameters only (the router, the top_k
    experts the token uses, the shared expert): the FLOPs the token causes, whatever the dispatch costs."""
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    projections = 2 * d * h * e * 2 + 2 * d * k * e * 2  # q and o; k and v
    # q·k and probs·v over the full row (no causal discount); a chunked layer's row is its chunk (Llama 4)
    keys = [min(seq_len, cfg.attention_chunk) if kind == CHUNKED else seq_len for kind in cfg.layer_kinds]
    scores = sum(2 * 2 * t * h * e for t in keys)
    if cfg.mla.enabled:  # latent attention: its own projections and head dims per layer, scores included (mla.py)
        from analogjax.models.mla import attention_flops_per_token

        projections, scores = int(attention_flops_per_token(cfg, seq_len)), 0
    ffn = sum(2 * _ffn_params(cfg, i, active=True) for i in range(cfg.n_layers))  # gate, up, down (, router)
    return cfg.n_layers * projections + scores + ffn + 2 * d * cfg.vocab_size


def distill_flops_per_step(student: ModelConfig, teacher: ModelConfig | None, tokens: int, seq_len: int) -> float:
    flops = 3 * forward_flops_per_token(student, seq_len)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len)
    return flops * tokens


def param_count(cfg: ModelConfig, active: bool = False) -> int:
    """All parameters; with `active`, those one token uses (an MoE layer's top_k experts, not all of them)."""
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    block = d * h * e * 2 + d * k * e * 2 + 2 * d
    if cfg.mla.enabled:
        from analogjax.models.mla import attention_params

        block = attention_params(cfg) + 2 * d
    if cfg.qkv_bias:
        block += (h + 2 * k) * e
    if cfg.qk_norm:
        block += 2 * e
    block += (d if cfg.attn_out_bias else 0) + (h if cfg.attn_sinks else 0)  # gpt-oss
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    ffn = sum(_ffn_params(cfg, i, active) for i in range(cfg.n_layers))
    return cfg.n_layers * block + ffn + cfg.vocab_size * d + d + head


def measured_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device, median of `repeats` after warm-up. 2048 is large
    enough to be steady on CPUs (1024 under-reads after idle), small enough to take ~40 ms."""
    a = jnp.ones((n, n), dtype)
    # the result dtype the models' products ask for (models/projection.py): on CPU the fast bf16 path's
    result = compute_dtype.product_result()
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=result))
    mm(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def vendor_peak_flops() -> float | None:
    """All devices' datasheet dense-bf16 peak (PEAK_FLOPS) where the chip is known; None otherwise (CPUs)."""
    devices = jax.devices()
    kind = devices[0].device_kind
    return next((peak * len(devices) for name, peak in PEAK_FLOPS.items() if kind.startswith(name)), None)


def peak_flops_per_second(dtype=jnp.float32) -> float:
    """All devices' peak: vendor figures for known accelerators, a measured matmul for anything else (CPUs)."""
    vendor = vendor_peak_flops()
    # Fake CPU devices share the same cores: one measured matmul is the whole machine's peak.
    return vendor if vendor is not None else measured_matmul_peak(dtype)
