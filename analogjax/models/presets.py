"""Named model shapes, from test-sized to the public Llama 3 shapes.

The large presets are shapes only (nothing is downloaded); they let `compile-check` plan real pod runs.
"""

from analogjax.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Test and demo sizes.
    "tiny": ModelConfig(preset="tiny", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192),
    "tiny-teacher": ModelConfig(
        preset="tiny-teacher", vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384
    ),
    # bench/step.py dimensions.
    "bench-teacher": ModelConfig(preset="bench-teacher", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, d_ff=1536),
    "bench-student": ModelConfig(preset="bench-student", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=768),
    # Llama 3 family shapes (vocab 128256, GQA with 8 KV heads, rope theta 500000).
    "llama3-1b": ModelConfig(
        preset="llama3-1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16", remat="block",
    ),
    "llama3-8b": ModelConfig(
        preset="llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=500000.0, dtype="bfloat16", remat="block",
    ),
    "llama3-70b": ModelConfig(
        preset="llama3-70b", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
        rope_theta=500000.0, dtype="bfloat16", remat="block",
    ),
}
