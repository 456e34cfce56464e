"""Today's open architectures against transformers itself, each on sequences longer than its sliding window.

Per family, from a tiny random transformers model (float32): import must give transformers' logits (max error under
1e-4 of the largest logit), and where the analog can be trained as that family, export of other params must load in
transformers under the family's architecture with equal logits. The measured errors are printed (`pytest -s`).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from analogjax import hf  # noqa: E402
from analogjax.config import load_config  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models.config import FULL, SLIDING  # noqa: E402
from analogjax.models.transformer import Transformer  # noqa: E402

VOCAB, SEQ = 80, 20
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(head_dim=8, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=12)
# name: (config class, model class, extra config, what our config must say, export too)
CASES = {
    "llama3.1_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            )
        ),
        dict(rope_scaling__kind="llama3"),
        True,
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
        dict(rope_scaling__kind="linear"),
        False,
    ),
    "qwen2.5_yarn": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8)
        ),
        dict(rope_scaling__kind="yarn", qkv_bias=True),
        True,
    ),
    "mistral_window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=6),
        dict(sliding_window=6, hf_architecture=""),
        True,
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), dict(qk_norm=True), True),
    "qwen3_sliding_layers": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1),
        dict(sliding_window=5, layer_pattern=(FULL, SLIDING, SLIDING)),
        False,
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(**GEMMA, sliding_window=6, attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
        dict(
            norm_placement="sandwich",
            layer_pattern=(SLIDING, FULL),
            attn_softcap=1.0,
            final_softcap=2.0,
            query_scalar=12.0,
        ),
        True,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            **GEMMA,
            num_hidden_layers=4,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1_000_000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10_000.0),
            },
        ),
        dict(qk_norm=True, layer_pattern=(SLIDING, SLIDING, SLIDING, FULL), local_rope_theta=10_000.0),
        True,
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(sliding_window=7),
        dict(sliding_window=7, hf_architecture="Phi3ForCausalLM"),
        True,
    ),
    "olmo2": (
        "Olmo2Config",
        "Olmo2ForCausalLM",
        dict(),
        dict(norm_placement="post", qk_norm=True, qk_norm_scope="all_heads"),
        True,
    ),
}
ERRORS: dict[str, dict[str, float]] = {}


def _randomise(model):
    # Fresh HF inits leave norms at exactly 1 (or 0): perturb everything so each tensor matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def make_hf_model(name, folder, **overrides):
    config_cls, model_cls, extra, _, _ = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).float().eval()
    _randomise(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def hf_logits(model, toks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


def relative_error(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _field(cfg, dotted):
    for part in dotted.split("__"):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", list(CASES))
def test_import_and_export_match_transformers(name, tmp_path):
    model = make_hf_model(name, tmp_path / "hf")
    analog = hf.load(tmp_path / "hf")
    for field, value in CASES[name][3].items():
        assert _field(analog.config, field) == value, field
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    ERRORS[name] = {"import": relative_error(analog(toks), hf_logits(model, toks))}
    assert ERRORS[name]["import"] < 1e-4, ERRORS[name]
    if not CASES[name][4]:
        return
    # Export other params (the imported ones, perturbed) and load them with transformers' own class.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), jax.device_get(analog.params)
    )
    hf.save_params(params, analog.config, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [CASES[name][1]]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded).__name__ == CASES[name][1]
    ours = analog.model(params, toks)
    ERRORS[name]["export"] = relative_error(ours, hf_logits(loaded, toks))
    assert ERRORS[name]["export"] < 1e-4, ERRORS[name]
    assert hf.model_config_from_hf(tmp_path / "out") == analog.config


def test_zz_print_measured_errors():
    # Runs after the parametrized cases (file order): the figures for the record.
    for name, errors in ERRORS.items():
        print(json.dumps({"family": name, **{k: float(f"{v:.2e}") for k, v in errors.items()}}))


def test_the_window_matters_and_each_block_applies_its_own():
    """A window shorter than the sequence changes logits, and block(layer) follows each layer's kind."""
    from analogjax.models.config import ModelConfig

    base = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        sliding_window=4,
        layer_pattern=(SLIDING, FULL),
        local_rope_theta=100.0,
    )
    model = Transformer(base)
    params = __import__("flax").linen.unbox(model.init_boxed(jax.random.key(0)))
    toks = jax.random.randint(jax.random.key(1), (1, 12), 0, VOCAB)
    full = Transformer(ModelConfig(**{**base.__dict__, "layer_pattern": (FULL,)}))(params, toks)
    assert not np.allclose(model(params, toks), full, atol=1e-3)
    feats = model.features(params, toks, collect_layers=True)
    x = model.embed(params, toks)
    # the stack scanned with each layer's own window and RoPE as scanned data (what steering runs)
    np.testing.assert_allclose(model.blocks(params, 0, x), feats.layers_lbsd[-1], atol=1e-5)
    for layer in range(base.n_layers):
        x = model.block(params, layer, x)
        np.testing.assert_allclose(x, feats.layers_lbsd[layer], atol=1e-5)


def test_unimplemented_fields_are_refused(tmp_path):
    make_hf_model("llama3.1_rope", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    cases = {
        "dynamic": {**config, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
        "quantization_config": {**config, "quantization_config": {"quant_method": "bitsandbytes"}},
        "partial_rotary_factor": {
            **config,
            "rope_parameters": {**config["rope_parameters"], "partial_rotary_factor": 0.5},
        },
        "mlp_bias": {**config, "mlp_bias": True},
        "'some_new_knob'": {**config, "some_new_knob": 3},
    }
    for needle, bad in cases.items():
        (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=needle):
            hf.model_config_from_hf(tmp_path / "m")


def test_unsupported_field_is_one_error_line_at_the_cli(tmp_path):
    make_hf_model("llama3.1_rope", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "analogjax",
            "distill",
            "--config",
            "configs/tiny.yaml",
            "--set",
            f"teacher.hf_path={tmp_path / 'm'}",
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "short_factor" in lines[0] or "longrope" in lines[0]


def test_like_teacher_student_exports_under_the_teachers_architecture(tmp_path):
    make_hf_model("gemma2", tmp_path / "teacher")
    sizes = [
        "model.like_teacher.n_layers=2",
        "model.like_teacher.d_model=16",
        "model.like_teacher.d_ff=24",
        "model.like_teacher.n_heads=2",
        "model.like_teacher.n_kv_heads=1",
    ]
    config = load_config(None, [f"teacher.hf_path={tmp_path / 'teacher'}", *sizes])
    student, teacher = config.model, config.teacher.model
    assert (student.n_layers, student.d_model, student.n_heads, student.kv_heads) == (2, 16, 2, 1)
    same = (
        "norm_placement",
        "layer_pattern",
        "sliding_window",
        "attn_softcap",
        "final_softcap",
        "activation",
        "vocab_size",
        "head_dim",
        "query_scalar",
        "embed_scale",
        "norm_offset",
        "rope_theta",
    )
    assert all(getattr(student, f) == getattr(teacher, f) for f in same)
    model = Transformer(student)
    params = jax.device_get(__import__("flax").linen.unbox(model.init_boxed(jax.random.key(2))))
    hf.save_params(params, student, tmp_path / "analog")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "analog", dtype=torch.float32).eval()
    assert type(loaded).__name__ == "Gemma2ForCausalLM"
    toks = np.random.default_rng(3).integers(0, VOCAB, (1, SEQ)).astype(np.int32)
    assert relative_error(model(params, toks), hf_logits(loaded, toks)) < 1e-4
    with pytest.raises(UserError, match="like_teacher.rope_theta"):
        load_config(None, [f"teacher.hf_path={tmp_path / 'teacher'}", "model.like_teacher.rope_theta=5.0"])
    with pytest.raises(UserError, match="model.vocab_size"):
        load_config(
            None, [f"teacher.hf_path={tmp_path / 'teacher'}", "model.like_teacher.n_layers=2", "model.vocab_size=7"]
        )


def test_hidden_state_callers_must_apply_the_final_softcap():
    """Logits built from hidden states · head skip Gemma 2's final soft-cap: such callers are refused unless they
    say they apply it (model(...) and hf.load apply it themselves)."""
    from analogjax.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=24, final_softcap=2.0)
    model = Transformer(cfg)
    params = __import__("flax").linen.unbox(model.init_boxed(jax.random.key(0)))
    toks = np.zeros((1, 4), np.int32)
    with pytest.raises(UserError, match="final_softcap"):
        model.features(params, toks)
    hidden = model.features(params, toks, applies_final_softcap=True).hidden_bsd
    capped = np.tanh(np.asarray(hidden @ model.head(params)) / 2.0) * 2.0
    np.testing.assert_allclose(model(params, toks), capped, atol=1e-5)
