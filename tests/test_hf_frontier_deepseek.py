"""DeepSeek-V3 (and Kimi K2's spelling of it) and GLM-4.5 against transformers itself, from tiny random models.

Import gives transformers' logits in float32 (max error under 1e-4 of the largest logit), experts over fsdp as a
teacher's; a DeepSeek-V3-shaped analog (model.like_teacher) and a GLM-4.5 model export and load in transformers with
equal logits. Multi-head latent attention decodes from its latent cache as the full forward computes; the group-
limited router runs expert-parallel (experts over fsdp) as unsharded; what is not implemented is refused by name.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from analogjax import hf  # noqa: E402
from analogjax import mesh as mesh_lib  # noqa: E402
from analogjax.config import load_config  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models.config import MLAConfig, ModelConfig, MoEConfig, RopeScaling  # noqa: E402
from analogjax.models.hf.convert import hf_config  # noqa: E402
from analogjax.models.transformer import Transformer, logits  # noqa: E402

VOCAB, SEQ = 64, 24
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8)
# Kimi K2's config.json (moonshotai/Kimi-K2-Instruct): DeepseekV3ForCausalLM with its own model_type and the original
# DeepSeek keys, which say what transformers computes (sigmoid scores, noaux_tc selection, every layer MoE after the
# dense ones) or cannot change the logits (ep_size, training-only aux loss keys, no MTP layers)
KIMI_KEYS = dict(
    model_type="kimi_k2",
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    moe_layer_freq=1,
    ep_size=1,
    aux_loss_alpha=0.001,
    seq_aux=True,
    num_nextn_predict_layers=0,
)
# name: (config class, model class, extra config)
CASES = {
    # query latent, interleaved rotary pairs, 4 groups of which 2 kept, YaRN with mscale_all_dim (softmax scale)
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            _MLA,
            q_lora_rank=24,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        ),
    ),
    # partial rotary (default 0.5), q/k norms, q/k/v biases, 2 groups of which 1 kept
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            n_group=2,
            topk_group=1,
            use_qk_norm=True,
            attention_bias=True,
            routed_scaling_factor=1.5,
        ),
    ),
}


def _make(name, folder):
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **extra})).float().eval()
    with torch.no_grad():  # fresh inits leave norms at 1, routers near uniform and the selection bias at 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for key, buffer in model.named_buffers():
            if key.endswith("e_score_correction_bias"):
                buffer.add_(0.05 * torch.randn_like(buffer))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


def _rel(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("name", list(CASES))
def test_import_and_export_match_transformers(name, tmp_path):
    model = _make(name, tmp_path / "hf")
    analog = hf.load(tmp_path / "hf", mesh=mesh_lib.make_mesh(2, 4, 1))
    cfg = analog.config
    assert (cfg.moe.router, cfg.moe.expert_bias, cfg.moe.first_dense_layers) == ("sigmoid", True, 1)
    assert cfg.mla.enabled == (name != "glm4_moe")
    stack = analog.params["params"]["moe_layers"]["mlp"]["w_gate"]
    assert {s.data.shape[1] for s in stack.addressable_shards} == {2}  # 8 experts over fsdp 4
    toks = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    error = _rel(analog(toks), _hf_logits(model, toks))
    print(name, "import", error)
    assert error < 1e-4
    if name == "glm4_moe":
        # Expert-parallel (8 experts over fsdp 4, exchange_tokens) equals unsharded for the group-limited router.
        unsharded = hf.load(tmp_path / "hf", mesh=mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        assert _rel(analog(toks), np.asarray(unsharded(toks))) < 1e-5
        # Export: the config.json it would write reads back to this very config.
        assert hf.config_from_hf_dict(hf_config(cfg)) == cfg
        return
    # A DeepSeek-V3-shaped analog: the teacher's family, MLA and routing, smaller; exported and loaded by transformers.
    sizes = ["n_layers=2", "d_model=16", "d_ff=24", "n_heads=2"]
    student = load_config(
        None, [f"teacher.hf_path={tmp_path / 'hf'}", *(f"model.like_teacher.{s}" for s in sizes)]
    ).model
    assert student.mla == cfg.mla and student.moe == cfg.moe and student.n_heads == 2
    params = _random_params(student)
    hf.save_params(params, student, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded).__name__ == CASES[name][1]
    error = _rel(jax.jit(Transformer(student).__call__)(params, toks), _hf_logits(loaded, toks))
    print(name, "export", error)
    assert error < 1e-4
    assert hf.model_config_from_hf(tmp_path / "out") == student


def _random_params(cfg: ModelConfig, seed: int = 2) -> dict:
    """Random params of `cfg`'s shapes without compiling its init (norm scales near 1)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init_boxed(jax.random.key(0))))
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
            + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
        ),
        shapes,
    )


def _mla_cfg(moe: bool = True) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=40,
        rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_positions=16, mscale=1.0, mscale_all_dim=1.0),
        mla=MLAConfig(
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True
        ),
        moe=MoEConfig(
            experts=8 if moe else 0,
            top_k=2,
            expert_d_ff=16,
            shared_d_ff=16,
            router="sigmoid",
            expert_bias=True,
            routed_scale=2.5,
            first_dense_layers=1,
            n_group=4,
            topk_group=2,
        ),
    )


def test_mla_decodes_from_its_latent_cache_as_the_full_forward():
    """Two rows decoded one token at a time from their latent cache, the second starting later (its first slots
    empty, segment 0): every position's logits equal the full forward's, and the cache holds latents
    (kv_lora_rank + rope dims a token and layer), not expanded keys and values."""
    from analogjax.models import sampling

    cfg = _mla_cfg(moe=False)  # (MoE layers decode as any MoE model's: test_sampling)
    model = Transformer(cfg)
    params = _random_params(cfg, seed=0)
    toks = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (2, 12)), jnp.int32)
    full = np.asarray(jax.jit(model.__call__)(params, toks))
    cache = sampling.init_cache(cfg, 2, 16)
    assert set(cache) >= {"latent", "k_rope"} and not {"k", "v"} & set(cache)
    assert cache["latent"].shape == (2, 2, 16, 16) and cache["k_rope"].shape == (2, 2, 16, 8)
    decode = jax.jit(model.decode)
    start = np.array([0, 3])  # row 1's tokens sit at slots 3.. with positions 0..; slots 0-2 stay empty
    for step in range(12 - start[1]):
        index = jnp.asarray(start + step, jnp.int32)
        cache = {**cache, "index": index}
        hidden, cache = decode(params, toks[:, step, None], jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), step), cache)
        out = np.asarray(logits(params, cfg, hidden))[:, 0]
        np.testing.assert_allclose(out, full[:, step], atol=1e-5 * np.abs(full).max(), err_msg=f"step {step}")


def test_refusals_and_counts(tmp_path, capsys):
    """topk_group > n_group is one error line at the CLI (exit 2) and in a config.json; an explicit fused kernel
    cannot take MLA's unequal head dims (auto falls back to xla); pruning an MLA teacher is refused by name; the
    parameter count is the params tree's."""
    from analogjax.cli import main
    from analogjax.models.attention import choose_kernel
    from analogjax.models.prune import check_target
    from analogjax.runtime.flops import forward_flops_per_token, param_count

    sets = ["model.moe.experts=8", "model.moe.router=sigmoid", "model.moe.n_group=2", "model.moe.topk_group=3"]
    assert main(["config", "--config", "configs/tiny.yaml", *(a for s in sets for a in ("--set", s))]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "topk_group" in lines[0], lines
    hf_cfg = {"architectures": ["DeepseekV3ForCausalLM"], **COMMON, **_MLA, "n_group": 2, "topk_group": 3}
    hf_cfg.update(q_lora_rank=None, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    kimi = hf.config_from_hf_dict(
        {**hf_cfg, **KIMI_KEYS, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827}
    )
    assert kimi.mla.rope_interleave and kimi.moe.routed_scale == 2.827 and kimi.moe.n_group == 1
    assert hf.architecture_for(kimi) == ("DeepseekV3ForCausalLM", "deepseek_v3")
    with pytest.raises(UserError, match="topk_method 'greedy'"):
        hf.config_from_hf_dict({**hf_cfg, **KIMI_KEYS, "topk_group": 1, "topk_method": "greedy"})
    with pytest.raises(UserError, match="topk_group"):
        hf.config_from_hf_dict(hf_cfg)
    with pytest.raises(UserError, match="quantization_config"):
        hf.config_from_hf_dict({**hf_cfg, "topk_group": 1, "quantization_config": {"quant_method": "fp8"}})

    head_dims = (16, 12)
    assert choose_kernel("auto", "tpu", dtype=jnp.bfloat16, seq_len=512, head_dims=head_dims) == "xla"
    for kernel, platform in (("splash", "tpu"), ("cudnn", "gpu"), ("pallas_gpu", "gpu")):
        with pytest.raises(UserError, match="value head dim"):
            choose_kernel(kernel, platform, dtype=jnp.bfloat16, seq_len=512, head_dims=head_dims)

    cfg = _mla_cfg()
    with pytest.raises(UserError, match="multi-head latent attention"):
        check_target(cfg, dataclasses.replace(cfg, n_layers=1))
    for model_cfg in (cfg, dataclasses.replace(cfg, mla=dataclasses.replace(cfg.mla, q_lora_rank=0))):
        shapes = jax.eval_shape(lambda m=model_cfg: nn.unbox(Transformer(m).init_boxed(jax.random.key(0))))
        assert param_count(model_cfg) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    active = param_count(cfg, active=True)
    assert active < param_count(cfg) and forward_flops_per_token(cfg, 64) > 2 * active
