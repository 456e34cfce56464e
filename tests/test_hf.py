"""Hugging Face interop against transformers itself: tiny random Llama, Mistral, Qwen2, Qwen3 and Gemma models.

Import must reproduce transformers' logits (float32, 1e-4), export must load back in transformers with the same
logits, and import → export → import must be exact.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from analogjax import hf  # noqa: E402
from analogjax import mesh as mesh_lib  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models.config import ModelConfig  # noqa: E402
from analogjax.models.hf.families import FAMILIES  # noqa: E402
from analogjax.models.transformer import Transformer  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=10000.0, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(head_dim=8, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"),
    ),
}


def _randomise(model):
    # Fresh HF inits leave norms at exactly 1 (or 0) and biases at 0: perturb everything so each tensor matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def make_hf_model(kind: str, folder):
    config_cls, model_cls, extra = CASES[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).float().eval()
    _randomise(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def tokens(batch=2, seq=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


def hf_logits(model, toks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("kind", list(CASES))
def test_import_matches_transformers(kind, tmp_path):
    model = make_hf_model(kind, tmp_path / kind)
    cfg = hf.model_config_from_hf(tmp_path / kind)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.qk_norm == (kind == "qwen3")
    assert cfg.embed_scale == (kind == "gemma")
    analog = hf.load(tmp_path / kind)
    toks = tokens()
    np.testing.assert_allclose(np.asarray(analog(toks)), hf_logits(model, toks), atol=1e-4, rtol=1e-4)


def test_import_on_a_tensor_sharded_mesh_reads_shards(tmp_path):
    # 2 x 2 x 2 mesh: stacked layers, heads and widths all cut into shards; values must not depend on the mesh.
    model = make_hf_model("llama", tmp_path / "m")
    mesh = mesh_lib.make_mesh(2, 2, 2)
    cfg = hf.model_config_from_hf(tmp_path / "m")
    params = hf.load_params(tmp_path / "m", cfg, mesh, mesh_lib.TEACHER_RULES)
    wq = params["params"]["layers"]["attn"]["wq"]
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    toks = tokens()
    out = Transformer(cfg)(jax.device_get(params), toks)
    np.testing.assert_allclose(np.asarray(out), hf_logits(model, toks), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma"])
def test_export_loads_in_transformers_and_round_trips(kind, tmp_path):
    cfg = ModelConfig(
        vocab_size=259,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3",
        embed_scale=kind == "gemma",
        norm_offset=1.0 if kind == "gemma" else 0.0,
        tie_embeddings=kind in ("qwen2", "gemma"),
        activation="gelu_tanh" if kind == "gemma" else "silu",
    )
    model = Transformer(cfg)
    params = jax.device_get(
        jax.tree.map(lambda x: x, __import__("flax").linen.unbox(model.init_boxed(jax.random.key(3))))
    )
    # Non-trivial norms and biases so a wrong mapping cannot hide behind ones and zeros.
    params = jax.tree.map(
        lambda x: x + 0.05 * np.random.default_rng(x.size).standard_normal(x.shape).astype(x.dtype), params
    )
    out = tmp_path / "export"
    hf.save_params(params, cfg, out, tokenizer="bytes")
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf.architecture_for(cfg)[0]]
    toks = np.random.default_rng(1).integers(0, 259, (2, 10)).astype(np.int32)
    ours = np.asarray(model(params, toks))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(loaded, toks), ours, atol=1e-4, rtol=1e-4)
    # import → export → import is exact
    assert hf.model_config_from_hf(out) == cfg
    back = hf.load_params(out, cfg, mesh_lib.make_mesh(-1, 1, 1), mesh_lib.STUDENT_RULES)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), jax.device_get(back), params)
    if kind == "llama":  # the "bytes" tokenizer as a plain PreTrainedTokenizerFast: byte i is token i
        tok = transformers.AutoTokenizer.from_pretrained(out)
        text = "héllo wörld\n  def f(x): return x"
        assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
        assert tok.decode(list(text.encode("utf-8"))) == text


def test_teacher_shape_comes_from_config_json(tmp_path):
    from analogjax.config import load_config

    make_hf_model("qwen3", tmp_path / "q")
    config = load_config(None, [f"teacher.hf_path={tmp_path / 'q'}", "teacher.model.dtype=bfloat16"])
    expected = hf.model_config_from_hf(tmp_path / "q")
    assert config.teacher.model == expected.__class__(**{**expected.__dict__, "dtype": "bfloat16"})


def test_bad_inputs_are_user_errors(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    # unsupported architecture
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        hf.model_config_from_hf(tmp_path / "x")
    # missing folder, missing weights
    with pytest.raises(UserError, match="not found"):
        hf.model_config_from_hf(tmp_path / "nowhere")
    (tmp_path / "x" / "config.json").write_text(json.dumps(config))
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    with pytest.raises(UserError, match="model.safetensors"):
        hf.load_params(tmp_path / "x", hf.model_config_from_hf(tmp_path / "x"), mesh, mesh_lib.TEACHER_RULES)
    # shapes that do not match config.json
    wrong = hf.model_config_from_hf(tmp_path / "m").__class__(
        **{**hf.model_config_from_hf(tmp_path / "m").__dict__, "d_ff": 40}
    )
    with pytest.raises(UserError, match="shape"):
        hf.load_params(tmp_path / "m", wrong, mesh, mesh_lib.TEACHER_RULES)
    # export never overwrites a non-empty folder
    with pytest.raises(UserError, match="not empty"):
        hf.save_params({}, wrong, tmp_path / "m")


# Keys that cannot change the logits (issue 27, item 5): transformers' own bookkeeping (a leading underscore),
# special-token ids, and the runtime switches older transformers wrote into config.json.
BOOKKEEPING = dict(
    _model_name_or_path="HuggingFaceTB/SmolLM2-135M",
    unk_token_id=0,
    sep_token_id=4,
    cls_token_id=5,
    mask_token_id=6,
    pad_token_id=7,
)
RUNTIME_SWITCHES = dict(
    use_cache=False,
    output_attentions=False,
    output_hidden_states=False,
    return_dict=True,
    torch_dtype="bfloat16",
    dtype="bfloat16",
    output_scores=False,
    num_beams=1,
    _commit_hash="0" * 40,
)

# Shapes a family's transformers defaults leave unusable, as its released config.json writes them: Glm4MoeConfig
# defaults to 96 heads over hidden_size 4096 with no head_dim (GLM-4.5 writes head_dim 128).
INCOHERENT_DEFAULTS = {"glm4_moe": {"head_dim": 128}}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_bookkeeping_keys_of_every_family_are_accepted(family, tmp_path):
    # Each family's save_pretrained output under the pinned transformers, with the bookkeeping keys present (config
    # level only: whether they change logits is settled by transformers never reading them in a forward).
    transformers.AutoConfig.for_model(
        family.model_type, **BOOKKEEPING, **INCOHERENT_DEFAULTS.get(family.model_type, {})
    ).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {"_model_name_or_path", "unk_token_id"} <= set(written)
    (tmp_path / "config.json").write_text(json.dumps({**written, **RUNTIME_SWITCHES}))
    cfg = hf.model_config_from_hf(tmp_path)
    assert cfg == hf.config_from_hf_dict({k: v for k, v in written.items() if k not in BOOKKEEPING})
    # A key that is neither read nor inert is still refused by name.
    with pytest.raises(UserError, match="config field 'token_mixer'"):
        hf.config_from_hf_dict({**written, "token_mixer": "conv"})
