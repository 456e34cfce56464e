"""gpt-oss against transformers itself, from a tiny random model (float32): attention sinks, alternating sliding and
full layers (sequences longer than the window), biases on q/k/v/o, the router and the experts, the clamped SwiGLU,
YaRN without truncation, and expert weights stored as MXFP4 blocks and scales.

Import must give transformers' logits (max error under 1e-4 of the largest logit) with the experts spread over
fsdp; greedy decoding with the KV cache must equal transformers' `generate`; a gpt-oss-shaped analog
(`model.like_teacher`) must export as GptOssForCausalLM (float32 experts, not MXFP4) and load in transformers with
equal logits. MXFP4 dequantization is checked against transformers' own routine on random blocks.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from analogjax import hf  # noqa: E402
from analogjax import mesh as mesh_lib  # noqa: E402
from analogjax.config import load_config  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models import sampling  # noqa: E402
from analogjax.models.hf import mxfp4  # noqa: E402
from analogjax.models.transformer import Transformer  # noqa: E402

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


def _random_params(cfg, seed=1):
    """Every tensor of `cfg` random (norm scales around 1), drawn on the host from an abstract init."""
    boxed = jax.eval_shape(Transformer(cfg).init_boxed, jax.random.key(0))
    shapes = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, boxed, is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        identity = 1.0 if path[-1].key == "scale" else 0.0
        return np.asarray(identity + 0.1 * rng.standard_normal(leaf.shape), np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_gpt_oss_import_generate_and_analog_export_match_transformers(tmp_path):
    reference = _make_mxfp4_checkpoint(tmp_path / "teacher")
    analog = hf.load(tmp_path / "teacher", mesh=mesh_lib.make_mesh(2, 4, 1))
    cfg = analog.config
    assert cfg.attn_sinks and cfg.attn_out_bias and cfg.qkv_bias and cfg.activation == "clamped_swiglu"
    assert cfg.layer_kinds == ("sliding", "full") and cfg.sliding_window == WINDOW < SEQ
    assert cfg.moe.router_bias and cfg.moe.expert_biases and not cfg.rope_scaling.truncate
    stack = analog.params["params"]["moe_layers"]["mlp"]["w_gate"]  # each device read only its expert
    assert stack.sharding.spec[1] == "fsdp" and {s.data.shape[1] for s in stack.addressable_shards} == {1}
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    error = _rel(analog(toks), _hf_logits(reference, toks))
    print("gpt-oss import (MXFP4 experts)", error)
    assert error < 1e-4

    # Greedy decoding with the KV cache (sinks, windows) equals transformers' generate, past the window.
    prompts = [[5, 17, 33, 9, 40], [20, 3]]
    ours = sampling.generate(analog, prompts, max_new_tokens=8)
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, eos_token_id=None)
        assert completion == theirs[0, len(prompt) :].tolist()

    # A gpt-oss-shaped analog (like_teacher) exports as GptOssForCausalLM and loads with equal logits.
    config = load_config(
        None,
        [
            f"teacher.hf_path={tmp_path / 'teacher'}",
            "model.like_teacher.d_model=16",
            "model.like_teacher.n_heads=2",
            "model.like_teacher.n_kv_heads=1",
            "model.like_teacher.d_ff=32",
        ],
    )
    student = config.model
    assert student.attn_sinks and student.moe == cfg.moe and student.layer_pattern == cfg.layer_pattern
    params = _random_params(student)
    hf.save_params(params, student, tmp_path / "analog")
    assert json.loads((tmp_path / "analog" / "config.json").read_text())["architectures"] == ["GptOssForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "analog", dtype=torch.float32).eval()
    error = _rel(Transformer(student)(params, jnp.asarray(toks)), _hf_logits(loaded, toks))
    print("gpt-oss analog export", error)
    assert error < 1e-4
    assert hf.model_config_from_hf(tmp_path / "analog") == student


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
