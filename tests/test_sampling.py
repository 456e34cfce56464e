"""The sampler: KV-cached decoding equals the full forward, greedy equals transformers' `generate`, sampling draws
from the filtered distribution, and bad options are one `error:` line."""

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analogjax import mesh as mesh_lib
from analogjax.errors import UserError
from analogjax.models import sampling
from analogjax.models.config import FULL, SLIDING, ModelConfig, MoEConfig
from analogjax.models.model import Model
from analogjax.models.transformer import Transformer, logits

VOCAB = 64
FAMILIES = {
    "llama": ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
    # Gemma 2's shape: windows on alternate layers, attention and final soft-caps, sandwich norms, scaled queries.
    "gemma2": ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        head_dim=8,
        sliding_window=3,
        layer_pattern=(SLIDING, FULL),
        attn_softcap=1.0,
        final_softcap=2.0,
        norm_placement="sandwich",
        query_scalar=12.0,
        norm_offset=1.0,
        embed_scale=True,
        activation="gelu_tanh",
    ),
    # every layer windowed, Gemma 3-like local RoPE base and qk norms
    "windowed_qknorm": ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=48, sliding_window=4, qk_norm=True
    ),
    # Mixture of experts: a dense prefix, then one MoE layer after another (the cache split 1 + 2), with a gated
    # shared expert
    "moe_prefix": ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        moe=MoEConfig(experts=4, top_k=2, expert_d_ff=24, shared_d_ff=16, shared_gate=True, first_dense_layers=1),
    ),
    # a dense prefix, then groups of a dense and an MoE layer (the cache split 1 + 2 x 2), DeepSeek-style router
    "moe_groups": ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=5,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        moe=MoEConfig(
            experts=4,
            top_k=2,
            expert_d_ff=24,
            router="sigmoid",
            expert_bias=True,
            routed_scale=2.0,
            first_dense_layers=1,
            every=2,
        ),
    ),
}


@functools.cache
def _params(cfg, seed=0):
    # The tree's shapes from an abstract init (a compiled init took 8-30 s for the MoE models here), the values
    # drawn on the host: every tensor random, norm scales around their identity, so each one matters.
    boxed = jax.eval_shape(Transformer(cfg).init_boxed, jax.random.key(seed))
    shapes = jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x, boxed, is_leaf=lambda x: hasattr(x, "unbox")
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        identity = 1.0 - cfg.norm_offset if path[-1].key == "scale" else 0.0
        return jnp.asarray(identity + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# plain Llama: the transformers test below; MoE with every layer MoE: the packed test and the Mixtral test below
@pytest.mark.parametrize("family", ["gemma2", "windowed_qknorm", "moe_groups"])
def test_cached_decoding_equals_the_full_forward_at_every_position(family):
    cfg = FAMILIES[family]
    params = _params(cfg)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    lengths = np.array([3, 9, 1, 5], np.int32)  # right-padded prompts of different lengths
    total, width = 12, 9
    full_tokens = rng.integers(0, VOCAB, (4, total)).astype(np.int32)
    reference = np.asarray(jax.jit(model.__call__)(params, full_tokens))  # each row one document, no padding

    prompt = np.where(np.arange(width)[None] < lengths[:, None], full_tokens[:, :width], 7).astype(np.int32)
    cache = sampling.init_cache(cfg, 4, width + total)
    segments = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (4, width))

    @jax.jit
    def decode(tokens, segments, positions, cache):
        hidden, cache = model.decode(params, tokens, segments, positions, cache)
        return logits(params, cfg, hidden), cache

    got, cache = decode(*map(jnp.asarray, (prompt, segments, positions)), cache)
    got = np.asarray(got)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i, :n], reference[i, :n], atol=2e-5, rtol=1e-5)
    # then one token at a time, each row at its own position
    for step in range(total - lengths.min()):
        where = lengths + step
        live = where < total
        token = full_tokens[np.arange(4), np.minimum(where, total - 1)][:, None]
        cache = {**cache, "index": jnp.asarray(where, jnp.int32)}
        got, cache = decode(
            jnp.asarray(token), jnp.ones((4, 1), jnp.int32), jnp.asarray(where[:, None], jnp.int32), cache
        )
        got = np.asarray(got)[:, 0]
        for i in np.flatnonzero(live):
            np.testing.assert_allclose(got[i], reference[i, where[i]], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "moe_prefix"])
def test_packed_prefill_keeps_documents_apart(family):
    # Two documents packed in one prefill row: the second one's logits are those of that document alone.
    cfg = FAMILIES[family]
    params = _params(cfg)
    model = Transformer(cfg)
    toks = np.random.default_rng(1).integers(0, VOCAB, (1, 10)).astype(np.int32)
    segments = np.array([[1] * 4 + [2] * 6], np.int32)
    positions = np.array([list(range(4)) + list(range(6))], np.int32)
    hidden, _ = jax.jit(model.decode)(params, toks, segments, positions, sampling.init_cache(cfg, 1, 10))
    got = np.asarray(logits(params, cfg, hidden))
    alone = np.asarray(jax.jit(model.__call__)(params, toks, segments, positions))  # the packed full forward
    np.testing.assert_allclose(got[0], alone[0], atol=2e-5, rtol=1e-5)
    unpacked = np.asarray(jax.jit(model.__call__)(params, toks[:, 4:]))[0]  # the second document by itself
    np.testing.assert_allclose(got[0, 4:], unpacked, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["windowed_qknorm", "moe_prefix"])
def test_bfloat16_models_prefill_as_their_full_forward_and_generate(family):
    # bf16 compute runs its products with float32 results (models/projection.py). XLA's CPU fallback dot has no
    # bf16 x bf16 -> float32 (a decode-time crash once, in the cache-layout attention product), so the decode
    # programs run here, not only the training ones.
    cfg = dataclasses.replace(FAMILIES[family], dtype="bfloat16")
    params = _params(cfg)
    model = Transformer(cfg)
    toks = np.random.default_rng(2).integers(0, VOCAB, (2, 6)).astype(np.int32)
    segments, positions = np.ones((2, 6), np.int32), np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
    hidden, _ = jax.jit(model.decode)(params, toks, segments, positions, sampling.init_cache(cfg, 2, 8))
    got = np.asarray(logits(params, cfg, hidden))
    full = np.asarray(jax.jit(model.__call__)(params, toks))
    f32 = np.asarray(jax.jit(Transformer(dataclasses.replace(cfg, dtype="float32")).__call__)(params, toks))
    np.testing.assert_allclose(got, full, atol=0.05)  # two bf16 programs: their own roundings
    np.testing.assert_allclose(full, f32, atol=0.05)  # bf16 activations against float32 ones
    served = Model(cfg, params, mesh=mesh_lib.make_mesh(-1, 1, 1), rules=mesh_lib.STUDENT_RULES)
    out = sampling.generate(served, [[5, 6, 7], [1, 2, 3, 4, 5]], max_new_tokens=4, temperature=0.7)
    assert [len(c) for c in out] == [4, 4] and all(0 <= t < VOCAB for c in out for t in c)


def test_generate_greedy_equals_argmax_of_the_full_forward_on_a_sharded_mesh():
    cfg = FAMILIES["gemma2"]
    params = _params(cfg)
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    model = Model(cfg, params, mesh=mesh, rules=mesh_lib.STUDENT_RULES)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9]]
    out = sampling.generate(model, prompts, max_new_tokens=6)
    full = jax.jit(Transformer(cfg).__call__)
    for prompt, completion in zip(prompts, out):
        seq = list(prompt)
        for _ in range(6):  # naive greedy: the full forward over the whole (right-padded, causal) sequence
            padded = np.array([seq + [0] * (20 - len(seq))], np.int32)
            seq.append(int(np.argmax(np.asarray(full(params, padded))[0, len(seq) - 1])))
        assert completion == seq[len(prompt) :]
    # EOS stops a row (the EOS is kept), other rows go on
    eos = out[0][2]
    stopped = sampling.generate(model, prompts, max_new_tokens=6, eos_ids=[eos])
    assert stopped[0] == out[0][: out[0].index(eos) + 1]
    # the context bound stops rows too
    bounded = sampling.generate(model, prompts, max_new_tokens=6, max_positions=13)
    assert [len(c) for c in bounded] == [6, 2, 6]


def test_top_k_top_p_frequencies_match_the_filtered_distribution():
    logits_v = np.log(np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], np.float64))
    draws = 40000

    def frequencies(top_k, top_p, temperature):
        options = sampling.Sampling(temperature, top_k, top_p)
        batch = jnp.broadcast_to(jnp.asarray(logits_v, jnp.float32), (draws, logits_v.size))
        tokens = np.asarray(jax.jit(sampling.next_token, static_argnums=2)(batch, jax.random.key(3), options))
        return np.bincount(tokens, minlength=logits_v.size) / draws

    def expected(top_k, top_p, temperature):
        p = np.exp(logits_v / temperature)
        p /= p.sum()
        order = np.argsort(-p)
        keep = np.zeros(p.size, bool)
        keep[order[: top_k or p.size]] = True
        p = np.where(keep, p, 0)
        p /= p.sum()
        mass_before = np.cumsum(p[order]) - p[order]
        keep_p = np.zeros(p.size, bool)
        keep_p[order[mass_before < top_p]] = True
        p = np.where(keep_p, p, 0)
        return p / p.sum()

    for top_k, top_p, temperature in [(0, 1.0, 1.0), (3, 1.0, 1.0), (0, 0.7, 1.0), (4, 0.8, 0.7), (0, 1.0, 2.0)]:
        want = expected(top_k, top_p, temperature)
        got = frequencies(top_k, top_p, temperature)
        assert np.all(got[want == 0] == 0), (top_k, top_p, got, want)
        # total variation: ~N(0, sqrt(v/draws)) per entry; 0.015 is > 6 standard deviations here
        assert 0.5 * np.abs(got - want).sum() < 0.015, (top_k, top_p, temperature, got, want)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"temperature": -0.5},
        {"prompts": [[1] * 20]},
    ],
)
def test_bad_requests_are_refused(bad):
    model = types.SimpleNamespace(config=FAMILIES["llama"])  # refused before the model is touched
    kwargs = {"max_new_tokens": 3, "max_positions": 16}
    prompts = bad.pop("prompts", [[1, 2]])
    with pytest.raises(UserError):
        sampling.generate(model, prompts, **{**kwargs, **bad})


HF_CASES = {  # vocab 260: room for the "bytes" tokenizer the CLI test writes next to the weights
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}
MOE_HF_CASES = {
    # every layer MoE (the cache scanned as one stack)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # every second layer MoE (the cache split into groups of two), gated shared expert, qkv biases
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 20,
            "decoder_sparse_step": 2,
            "num_hidden_layers": 4,
        },
    ),
}


def _hf_model(kind, folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra = {**HF_CASES, **MOE_HF_CASES}[kind]
    torch.manual_seed(0)
    common = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=24,
        rms_norm_eps=1e-6,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )
    config = getattr(transformers, config_cls)(**{**common, **extra})
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # fresh inits leave norms at 1: perturb everything so each tensor matters
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _transformers_greedy(reference, prompt: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        return reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=8, eos_token_id=258, pad_token_id=256
        )[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", list(HF_CASES))
def test_greedy_equals_transformers_generate(kind, tmp_path):
    from analogjax import hf

    reference = _hf_model(kind, tmp_path)
    prompts = [[5, 17, 33, 2, 90], [200, 3], [41, 41, 41, 7, 8, 9, 10, 11, 12]]
    ours = sampling.generate(hf.load(tmp_path), prompts, max_new_tokens=8, eos_ids=[258])
    for prompt, completion in zip(prompts, ours):
        assert completion == _transformers_greedy(reference, prompt)
        assert len(set(completion)) > 1  # a model that says one token over and over would prove little


@pytest.mark.parametrize("kind", list(MOE_HF_CASES))
def test_moe_greedy_equals_transformers_generate_in_the_api_and_the_cli(kind, tmp_path, capsys):
    from analogjax import hf
    from analogjax.data.tokenizer_files import write_tokenizer

    reference = _hf_model(kind, tmp_path)
    write_tokenizer("bytes", tmp_path, 24)  # token i < 256 is byte i: the CLI's prompts are these very tokens
    texts = ["hi", "hello there", "MoE!"]
    prompts = [list(text.encode()) for text in texts]
    theirs = [_transformers_greedy(reference, prompt) for prompt in prompts]
    assert all(len(set(completion)) > 1 for completion in theirs)  # one token over and over would prove little
    assert sampling.generate(hf.load(tmp_path), prompts, max_new_tokens=8, eos_ids=[258]) == theirs
    argv = [arg for text in texts for arg in ("--prompt", text)]
    rc, out, err = _cli(capsys, "--hf", str(tmp_path), *argv, "--max-new-tokens", "8", "--json")
    assert rc == 0, err
    assert [json.loads(line)["tokens"] for line in out.splitlines()] == theirs


def _cli(capsys, *argv):
    from analogjax.cli import main

    rc = main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_generates_json_and_refuses_bad_options(tmp_path, capsys):
    from analogjax import hf

    _hf_model("llama", tmp_path)
    from analogjax.data.tokenizer_files import write_tokenizer

    write_tokenizer("bytes", tmp_path, 24)
    rc, out, err = _cli(
        capsys, "--hf", str(tmp_path), "--prompt", "hi", "--prompt", "hello", "--max-new-tokens", "4", "--json"
    )
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    model = hf.load(tmp_path)
    want = sampling.generate(model, [list(b"hi"), list(b"hello")], max_new_tokens=4, eos_ids=[258], max_positions=24)
    assert [r["prompt"] for r in rows] == ["hi", "hello"] and [r["tokens"] for r in rows] == want
    assert rows[0]["completion"] == bytes(t for t in want[0] if t < 256).decode("utf-8", "replace")
    for bad in (
        ["--max-new-tokens", "0"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--top-k", "-1"],
        ["--temperature", "-1"],
        ["--prompt", "x" * 24],
    ):
        rc, out, err = _cli(capsys, "--hf", str(tmp_path), "--prompt", "hi", *bad)
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (bad, err)


def test_decode_length_blocks_and_unrolling_leave_greedy_outputs_unchanged(monkeypatch):
    # Short blocks (2 steps, unrolled 2 per loop iteration, then a 1-step block) read fewer cache slots than one
    # block does; with a sliding window, mixed prompt lengths and an EOS stopping rows mid-iteration, every token
    # must equal the single-block loop's (cut at the EOS).
    assert sampling.decode_blocks(8) == [(1, 8)]
    assert sampling.decode_blocks(1) == []
    cfg = FAMILIES["gemma2"]
    params = _params(cfg)
    prompt = np.array([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]], np.int32)
    lengths = np.array([3, 5, 1], np.int32)

    def run(eos):
        fn = jax.jit(functools.partial(sampling.sample, cfg, max_new_tokens=8, eos_ids=eos))
        return [np.asarray(a) for a in fn(params, prompt, lengths, jax.random.key(0))]

    whole, count = run(())
    assert (count == 8).all()
    eos = int(whole[0, 3])
    monkeypatch.setattr(sampling, "MIN_BLOCK", 2)
    monkeypatch.setattr(sampling, "MAX_BLOCKS", 4)
    monkeypatch.setattr(sampling, "UNROLL", 2)
    assert sampling.decode_blocks(8) == [(1, 3), (3, 5), (5, 7), (7, 8)]
    got, got_count = run((eos,))
    for row, want in enumerate(whole):
        n = int(np.argmax(want == eos)) + 1 if (want == eos).any() else 8
        assert got_count[row] == n
        np.testing.assert_array_equal(got[row], np.where(np.arange(8) < n, want, 0))


def test_demo_teacher_logprob_is_the_float64_log_softmax_of_each_completion():
    from analogjax.recipes.demo_samples import teacher_logprob

    cfg = FAMILIES["gemma2"]
    params = _params(cfg)
    model = Model(cfg, params, mesh=mesh_lib.make_mesh(-1, 1, 1), rules=mesh_lib.STUDENT_RULES)
    prompts, completions = [[5, 6, 7], [1, 2, 3, 4, 5]], [[8, 9], [10, 11, 12, 13]]
    got = teacher_logprob(model, prompts, completions)
    full = jax.jit(Transformer(cfg).__call__)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        row = prompt + completion
        logits = np.asarray(full(params, np.array([row], np.int32)), np.float64)[0]
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        # position t's logits score token t + 1: the completion's tokens only, never the prompt's
        want = sum(log_probs[t - 1, row[t]] for t in range(len(prompt), len(row)))
        assert got["count"][i] == len(completion)
        np.testing.assert_allclose(got["sum"][i], want, rtol=1e-5, atol=1e-5)
    # Padded to a wider width (one compiled shape for every model's continuations): the same figures.
    padded = teacher_logprob(model, prompts, completions, width=16)
    assert padded["count"] == got["count"]
    np.testing.assert_allclose(padded["sum"], got["sum"], rtol=1e-5, atol=1e-5)
