"""gpt-oss against transformers itself, from a tiny random model (float32): attention sinks, alternating sliding and
full layers (sequences longer than the window), biases on q/k/v/o, the router and the experts, the clamped SwiGLU,
YaRN without truncation, and expert weights stored as MXFP4 blocks and scales.

Import must give transformers' logits (max error under 1e-4 of the largest logit) with the experts spread over
fsdp; decoding with the KV cache must give transformers' logits at every position; a gpt-oss-shaped analog
(`model.like_teacher`) must export as GptOssForCausalLM (float32 experts, not MXFP4) and load in transformers with
equal logits. MXFP4 dequantization is checked against transformers' own routine on random blocks.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from analogjax import cli, hf  # noqa: E402
from analogjax import mesh as mesh_lib  # noqa: E402
from analogjax.config import load_config  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models import sampling  # noqa: E402
from analogjax.models.config import MoEConfig  # noqa: E402
from analogjax.models.hf import mxfp4  # noqa: E402
from analogjax.models.prune import check_target  # noqa: E402
from analogjax.models.transformer import Transformer, logits  # noqa: E402
from analogjax.runtime.flops import param_count  # noqa: E402

VOCAB, SEQ, WINDOW = 64, 12, 4
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,  # layer_types default: sliding, full
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=WINDOW,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    swiglu_limit=0.4,  # small, so the clamps act on these random weights
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=150000.0,
        factor=4.0,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
        original_max_position_embeddings=64,
    ),
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _random_mxfp4(rng, shape_out_in):
    """Random blocks and scales for a dequantized [experts, in, out] weight."""
    experts, d_in, d_out = shape_out_in
    blocks = torch.as_tensor(rng.integers(0, 256, (experts, d_out, d_in // 32, 16)), dtype=torch.uint8)
    scales = torch.as_tensor(rng.integers(122, 128, (experts, d_out, d_in // 32)), dtype=torch.uint8)
    return blocks, scales


def _make_mxfp4_checkpoint(folder):
    """A tiny gpt-oss whose expert weights are random MXFP4 (the model holds transformers' dequantization of them),
    saved as a released checkpoint is: experts as *_blocks + *_scales, quantization_config in config.json."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**CONFIG)).float().eval()
    rng = np.random.default_rng(0)
    quantized = {}
    with torch.no_grad():
        for p in model.parameters():  # fresh inits leave norms at 1 and biases at 0: make every tensor matter
            p.add_(0.05 * torch.randn_like(p))
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, proj)
                blocks, scales = _random_mxfp4(rng, weight.shape)
                weight.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                quantized[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)
    model.save_pretrained(folder, safe_serialization=True)
    tensors = load_file(folder / "model.safetensors")
    for name, (blocks, scales) in quantized.items():
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    config.update(experts_per_token=2, initial_context_length=64, _model_name_or_path="openai/gpt-oss-tiny")
    (folder / "config.json").write_text(json.dumps(config))
    return model


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


def _rel(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def test_gpt_oss_import_decode_and_export_match_transformers(tmp_path, capsys):
    reference = _make_mxfp4_checkpoint(tmp_path / "teacher")
    analog = hf.load(tmp_path / "teacher", mesh=mesh_lib.make_mesh(2, 4, 1))
    cfg = analog.config
    assert cfg.attn_sinks and cfg.attn_out_bias and cfg.qkv_bias and cfg.activation == "clamped_swiglu"
    assert cfg.layer_kinds == ("sliding", "full") and cfg.sliding_window == WINDOW < SEQ
    assert cfg.moe.router_bias and cfg.moe.expert_biases and not cfg.rope_scaling.truncate
    assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(analog.params))  # biases and sinks counted
    stack = analog.params["params"]["moe_layers"]["mlp"]["w_gate"]  # each device read only its expert
    assert stack.sharding.spec[1] == "fsdp" and {s.data.shape[1] for s in stack.addressable_shards} == {1}
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    want = _hf_logits(reference, toks)
    error = _rel(analog(toks), want)  # the experts exchanged over fsdp (biases, router bias) as in training
    print("gpt-oss import (MXFP4 experts)", error)
    assert error < 1e-4

    # Decoding with the KV cache (sinks, the window, per-layer kinds in the MoE stack), one token at a time from
    # the first, gives transformers' logits at every position, past the window.
    host = jax.device_get(analog.params)
    model = Transformer(cfg)
    step = jax.jit(lambda p, *a: model.decode(p, *a))
    cache = sampling.init_cache(cfg, 2, SEQ)
    for i in range(SEQ):
        cache = {**cache, "index": jnp.full((2,), i, jnp.int32)}
        hidden, cache = step(host, toks[:, i : i + 1], np.ones((2, 1), np.int32), np.full((2, 1), i, np.int32), cache)
        assert _rel(logits(host, cfg, hidden)[:, 0], want[:, i]) < 1e-4, i

    # A gpt-oss-shaped analog exports as GptOssForCausalLM (float32 experts, not MXFP4) and loads in transformers
    # with equal logits: the teacher's shape with new values (the compiled forward reused), and a smaller one made
    # by model.like_teacher.
    rng = np.random.default_rng(1)
    analog.params = jax.tree.map(
        lambda a: jax.device_put(np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(np.float32), a.sharding),
        analog.params,
    )
    hf.save(analog, tmp_path / "analog", max_positions=256)
    assert json.loads((tmp_path / "analog" / "config.json").read_text())["architectures"] == ["GptOssForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "analog", dtype=torch.float32).eval()
    error = _rel(analog(toks), _hf_logits(loaded, toks))
    print("gpt-oss analog export", error)
    assert error < 1e-4
    assert hf.model_config_from_hf(tmp_path / "analog") == cfg
    sizes = ("d_model=16", "n_heads=2", "n_kv_heads=1", "d_ff=32")
    config = load_config(
        None, [f"teacher.hf_path={tmp_path / 'teacher'}", *(f"model.like_teacher.{size}" for size in sizes)]
    )
    student = config.model
    assert student.attn_sinks and student.moe == cfg.moe and student.layer_pattern == cfg.layer_pattern
    assert hf.architecture_for(student) == ("GptOssForCausalLM", "gpt_oss")

    # Pruning has no cut for experts or sinks: `analogjax prune` refuses before any work, one error line.
    (tmp_path / "prune.yaml").write_text(
        f"teacher: {{hf_path: {tmp_path / 'teacher'}}}\nmodel: {{like_teacher: {{d_model: 16}}}}\n"
        "data: {global_batch: 8, seq_len: 32}\n"
    )
    assert cli.main(["prune", "--config", str(tmp_path / "prune.yaml"), "--out", str(tmp_path / "pruned")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mixture of experts" in errors[0] and not (tmp_path / "pruned").exists()
    with pytest.raises(UserError, match="attention sinks"):
        check_target(dataclasses.replace(cfg, moe=MoEConfig()), dataclasses.replace(cfg, moe=MoEConfig()))


def test_mxfp4_dequantization_equals_transformers_and_bad_blocks_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (3, 8, 2, 16)).astype(np.uint8)  # every nibble value, the full scale range
    scales = rng.integers(0, 256, (3, 8, 2)).astype(np.uint8)
    want = convert_moe_packed_tensors(torch.as_tensor(blocks), torch.as_tensor(scales), dtype=torch.float32).numpy()
    got = mxfp4.dequantize(blocks, scales)
    assert got.shape == want.shape == (3, 64, 8)
    np.testing.assert_array_equal(got, want)
    # A slice reads only the groups under it and gives the same values.
    sliced = mxfp4.QuantizedSlice("w", _Slice(blocks), _Slice(scales))[1:3, 20:50, 2:7]
    np.testing.assert_array_equal(sliced, want[1:3, 20:50, 2:7])

    # A checkpoint whose blocks are not [..., 16] bytes: one error naming the tensor.
    reference = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**CONFIG, "num_hidden_layers": 1}))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj"
    del tensors[name]
    tensors[name + "_blocks"] = torch.zeros((4, 32, 1, 8), dtype=torch.uint8)
    tensors[name + "_scales"] = torch.zeros((4, 32, 1), dtype=torch.uint8)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"MXFP4 tensor {name}_blocks has shape \\[4, 32, 1, 8\\]"):
        hf.load(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for bad, message in (
        ({"quantization_config": {"quant_method": "fp8"}}, "quant_method 'fp8'"),
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
        ({"experts_per_token": 3}, "experts_per_token 3 != num_experts_per_tok 2"),
    ):
        with pytest.raises(UserError, match=message):
            hf.config_from_hf_dict({**config, **bad, "num_hidden_layers": 2})


class _Slice:
    """A numpy array standing in for a safetensors slice."""

    def __init__(self, array):
        self.array = array

    def get_shape(self):
        return list(self.array.shape)

    def __getitem__(self, index):
        return self.array[index]


def test_released_gpt_oss_120b_config_reads_as_the_preset():
    # openai/gpt-oss-120b's config.json as released (transformers 4.55 spelling: rope_scaling, experts_per_token,
    # initial_context_length, MXFP4 quantization_config): every key read or inert, the shape is the preset's.
    from analogjax.models.config import PRESETS

    released = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 18,
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "num_local_experts": 128,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 201088,
    }
    preset = dataclasses.replace(PRESETS["gpt-oss-120b"], preset="", dtype="float32", remat="none")
    assert hf.config_from_hf_dict(released) == preset
