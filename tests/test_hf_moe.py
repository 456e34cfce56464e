"""Mixture-of-experts families against transformers itself, from tiny random models (float32).

Import must give transformers' logits (max error under 1e-4 of the largest logit), with the experts spread over
fsdp as a teacher's are; Qwen3-MoE and Mixtral also export (other params) and load in transformers with equal
logits. DeepSeek-V2 is refused by name (gpt-oss: test_hf_gpt_oss.py; DeepSeek-V3: test_hf_frontier_deepseek.py).
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

VOCAB, SEQ = 64, 12
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    num_experts_per_tok=2,
)
# name: (config class, model class, extra config, export too)
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4), True),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            num_hidden_layers=3,
            mlp_only_layers=[0],
        ),
        True,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=24, norm_topk_prob=True),
        True,
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4), True),
}


def _make(name, folder):
    config_cls, model_cls, extra, _ = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **extra})).float().eval()
    with torch.no_grad():  # fresh inits leave norms at 1 and routers near uniform: make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


def _rel(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("name", list(CASES))
def test_moe_import_and_export_match_transformers(name, tmp_path):
    model = _make(name, tmp_path / "hf")
    mesh = mesh_lib.make_mesh(2, 4, 1)
    analog = hf.load(tmp_path / "hf", mesh=mesh)
    assert analog.config.moe.experts == 4
    # Each device holds (and read) only its experts: a quarter of them, over fsdp.
    stack = analog.params["params"]["moe_layers"]["mlp"]["w_gate"]
    assert stack.sharding.spec[1] == "fsdp"
    assert {s.data.shape[1] for s in stack.addressable_shards} == {1}
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    error = _rel(analog(toks), _hf_logits(model, toks))
    print(name, "import", error)
    assert error < 1e-4
    if not CASES[name][3]:
        return
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), jax.device_get(analog.params)
    )
    hf.save_params(params, analog.config, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [CASES[name][1]]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded).__name__ == CASES[name][1]
    error = _rel(analog.model(params, toks), _hf_logits(loaded, toks))
    print(name, "export", error)
    assert error < 1e-4
    assert hf.model_config_from_hf(tmp_path / "out") == analog.config


@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM"])
def test_unsupported_moe_architectures_are_refused_by_name(arch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "x"}))
    with pytest.raises(UserError, match=f"architecture {arch} is not supported yet"):
        hf.model_config_from_hf(tmp_path)
