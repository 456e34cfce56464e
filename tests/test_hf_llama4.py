"""Llama 4 text against transformers itself, from a tiny random Llama4ForCausalLM (float32): chunked layers (chunk 4,
sequences of 12, so three chunks), NoPE layers with attention temperature tuning, L2 q/k norm, llama3 RoPE scaling on
interleaved pairs, MoE on every 2nd layer with a shared expert and sigmoid routing whose weights scale the experts'
inputs, experts stored fused. Import and export must give transformers' logits (1e-4 of the largest logit); cached
decoding equals the full forward; the fused kernels' chunked masks equal the XLA reference (interpret mode).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from analogjax import hf  # noqa: E402
from analogjax import mesh as mesh_lib  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models import attention as att  # noqa: E402

VOCAB, SEQ, CHUNK = 64, 12, 4
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=24,
    intermediate_size_mlp=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    interleave_moe_layer_step=2,  # layers 1 and 3 MoE
    no_rope_layer_interval=2,  # layers 1 and 3 NoPE (global), 0 and 2 chunked
    attention_chunk_size=CHUNK,
    floor_scale=2,  # the temperature changes every 2 positions, so a sequence of 12 sees it
    attn_scale=0.5,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    ),
)


def _make(folder, **overrides):
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(**{**CONFIG, **overrides})
    model = transformers.Llama4ForCausalLM(config).float().eval()
    with torch.no_grad():  # fresh inits leave norms at 1 and routers near uniform: make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


def _rel(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


TOKS = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(HF folder, the transformers model, our import of it on a data x fsdp mesh, our logits of TOKS)."""
    folder = tmp_path_factory.mktemp("llama4") / "hf"
    model = _make(folder)
    analog = hf.load(folder, mesh=mesh_lib.make_mesh(2, 4, 1))
    return folder, model, analog, np.asarray(analog(TOKS))


def test_llama4_import_and_export_match_transformers(imported, tmp_path):
    folder, model, analog, ours = imported
    cfg = analog.config
    assert cfg.layer_kinds == ("chunked", "full") * 2 and cfg.layer_nope == (False, True) * 2
    assert cfg.attention_chunk == CHUNK and cfg.qk_l2_norm and cfg.attn_temperature_scale == 0.5
    assert (cfg.moe.experts, cfg.moe.every, cfg.moe.router, cfg.moe.weights_on_input) == (4, 2, "sigmoid", True)
    # Each device holds (and read) only its experts: a quarter of them, over fsdp.
    stack = analog.params["params"]["moe_layers"]["moe"]["mlp"]["w_gate"]
    assert stack.sharding.spec[1] == "fsdp" and {s.data.shape[1] for s in stack.addressable_shards} == {1}
    toks = TOKS
    error = _rel(ours, _hf_logits(model, toks))
    print("llama4 import", error)
    assert error < 1e-4
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), jax.device_get(analog.params)
    )
    hf.save_params(params, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded).__name__ == "Llama4ForCausalLM"
    # The same shardings as the imported params: the import's compiled forward runs them.
    imported_params, analog.params = (
        analog.params,
        jax.device_put(params, jax.tree.map(lambda x: x.sharding, analog.params)),
    )
    try:
        error = _rel(analog(toks), _hf_logits(loaded, toks))
    finally:
        analog.params = imported_params
    print("llama4 export", error)
    assert error < 1e-4
    assert hf.model_config_from_hf(tmp_path / "out") == cfg
    # FLOPs: active experts only (moe tests), and a chunked layer's scores over its chunk, not the whole row.
    from analogjax.runtime.flops import forward_flops_per_token

    unchunked = dataclasses.replace(cfg, layer_pattern=(), attention_chunk=0)
    saved = 2 * 2 * 2 * (SEQ - CHUNK) * cfg.n_heads * cfg.dim_per_head  # two chunked layers, q·k and probs·v
    assert forward_flops_per_token(unchunked, SEQ) - forward_flops_per_token(cfg, SEQ) == saved


def test_llama4_cached_decoding_equals_the_full_forward(imported):
    # One token at a time through three chunks: the chunk mask and the NoPE layers' temperature read positions
    # from the cache, as the full forward reads them.
    from analogjax.models import sampling
    from analogjax.models.transformer import logits

    _, _, analog, full = imported
    cfg = analog.config
    params = jax.device_get(analog.params)
    cache = sampling.init_cache(cfg, 2, SEQ)
    pos = np.tile(np.arange(SEQ, dtype=np.int32), (2, 1))

    @jax.jit
    def step(cache, tok, pos):
        hidden, cache = analog.model.decode(params, tok, jnp.ones_like(tok), pos, cache)
        return logits(params, cfg, hidden), {**cache, "index": cache["index"] + 1}

    got = []
    for i in range(SEQ):
        out, cache = step(cache, TOKS[:, i : i + 1], pos[:, i : i + 1])
        got.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-4 * np.abs(full).max())


def test_chunked_attention_in_the_fused_kernels_equals_the_xla_reference():
    # Packed documents that start mid-chunk (chunks count from each document's start, by position) and padding;
    # splash and pallas_gpu in interpret mode, the cuDNN call through jax's XLA implementation.
    s, chunk = 128, 24
    seg = np.ones((1, s), np.int32)
    pos = np.arange(s, dtype=np.int32)[None].copy()
    seg[0, 50:110], pos[0, 50:110] = 2, np.arange(60)
    seg[0, 110:], pos[0, 110:] = 0, 0
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, s, 2, 16))
    k, v = (jax.random.normal(key, (1, s, 1, 16)) for key in keys[1:])
    want = att.attend(q, k, v, pos, pos, seg, seg, scale=0.25, chunk=chunk)
    real = np.asarray(seg != 0)[:, :, None, None]
    runs = {
        "splash": lambda: att.self_attention(
            q, k, v, pos, seg, scale=0.25, kernel="splash", interpret=True, block=128, chunk=chunk
        ),
        "pallas_gpu": lambda: att.self_attention(
            q, k, v, pos, seg, scale=0.25, kernel="pallas_gpu", interpret=True, block=64, chunk=chunk
        ),
        "cudnn": lambda: att.cudnn_attention(
            q, k, v, att.chunk_segments(pos, seg, chunk), scale=0.25, implementation="xla"
        ),
    }
    for name, run in runs.items():
        np.testing.assert_allclose(np.asarray(run()) * real, np.asarray(want) * real, atol=2e-5, err_msg=name)
    # The reference itself: a chunk is a wall (the last query of document 2 sees only its own chunk's keys).
    allowed = np.asarray(att.allowed(pos, pos, seg, seg, chunk=chunk))
    assert allowed[0, 109].nonzero()[0].tolist() == list(range(50 + 48, 110))


def test_llama4_bad_input_is_refused_by_name(imported, tmp_path):
    folder = imported[0]
    config = json.loads((folder / "config.json").read_text())

    def refused(match, **changes):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(UserError, match=match):
            hf.model_config_from_hf(tmp_path)

    refused("layer_types", layer_types=["chunked_attention", "sliding_attention"] * 2)
    refused("MoE layers at", moe_layers=[0, 3])
    refused("no_rope_layers", no_rope_layers=[1, 2, 1, 0])
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Llama4ForConditionalGeneration"], "text_config": config, "audio_config": {}})
    )
    with pytest.raises(UserError, match="Llama4ForConditionalGeneration with config field 'audio_config'"):
        hf.model_config_from_hf(tmp_path)
    # Pruning has no rule for experts: refused before any work.
    from analogjax.models import prune

    with pytest.raises(UserError, match="mixture of experts"):
        prune.check_target(imported[2].config, imported[2].config)
    # A chunk that does not divide each context shard's length.
    from analogjax.config import load_config
    from analogjax.setup import build_mesh

    run = load_config(
        None, [f"teacher.hf_path={folder}", "model.like_teacher.n_layers=2", "data.seq_len=24", "mesh.context=4"]
    )
    assert run.model.attention_chunk == CHUNK and run.model.layer_nope == (False, True)
    # The like_teacher analog is a Llama 4 (it exports as one); its mesh is what is refused.
    assert hf.architecture_for(dataclasses.replace(run.model, d_ff=48))[0] == "Llama4ForCausalLM"
    with pytest.raises(UserError, match="attention_chunk"):
        build_mesh(run)


def test_llama4_conditional_generation_is_read_for_its_text_model(imported, tmp_path):
    # A Llama4ForConditionalGeneration folder (tiny vision tower) whose language model holds the text model's
    # weights: we read the text model's config and params from it.
    folder, model, analog, _ = imported
    vision = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vision_output_dim=16,
        image_size=28,
        patch_size=14,
        projector_input_dim=16,
        projector_output_dim=16,
    )
    both = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=CONFIG, vision_config=vision)
    ).eval()
    both.language_model.load_state_dict(model.state_dict())
    both.save_pretrained(tmp_path / "cg")
    # Its forward on text is its language model's on the embedded ids (transformers 5.24's own text-only call then
    # fails building its output: MoeCausalLMOutputWithPast has no image_outputs), so the language model is run.
    np.testing.assert_allclose(_hf_logits(both.language_model, TOKS), _hf_logits(model, TOKS), rtol=0, atol=1e-6)
    assert hf.model_config_from_hf(tmp_path / "cg") == analog.config
    params = hf.load_params(tmp_path / "cg", analog.config, analog.mesh, analog.rules)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(analog.params))
