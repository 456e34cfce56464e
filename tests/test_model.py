"""The decoder against a float64 NumPy reference, packed-sequence isolation, and sharding of its parameters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analogjax import mesh as mesh_lib
from analogjax.models.config import ModelConfig
from analogjax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, rope_theta=100.0)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def reference_forward(p, cfg, tokens, segment_ids, positions):
    """Float64 NumPy Llama forward, written from the equations, one layer at a time."""
    p = _np(p["params"])
    h, k, e = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

    def rope(x, pos):  # x [s, heads, e]
        half = e // 2
        freq = 1.0 / cfg.rope_theta ** (np.arange(half) / half)
        ang = pos[:, None, None] * freq
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

    out = []
    for b in range(tokens.shape[0]):
        x = p["embedding"][tokens[b]]
        s = x.shape[0]
        for layer in range(cfg.n_layers):
            lp = jax.tree.map(lambda a: a[layer], p["layers"])
            a_in = rms(x, lp["attn_norm"]["scale"])
            q = rope(np.einsum("sd,dhe->she", a_in, lp["attn"]["wq"]), positions[b])
            kk = rope(np.einsum("sd,dhe->she", a_in, lp["attn"]["wk"]), positions[b])
            v = np.einsum("sd,dhe->she", a_in, lp["attn"]["wv"])
            heads = []
            for head in range(h):
                kv = head // (h // k)
                scores = q[:, head] @ kk[:, kv].T / np.sqrt(e)
                allowed = np.tril(np.ones((s, s), bool)) & (segment_ids[b][:, None] == segment_ids[b][None, :])
                scores = np.where(allowed, scores, -np.inf)
                w = np.exp(scores - scores.max(-1, keepdims=True))
                heads.append((w / w.sum(-1, keepdims=True)) @ v[:, kv])
            x = x + np.einsum("she,hed->sd", np.stack(heads, 1), lp["attn"]["wo"])
            m_in = rms(x, lp["mlp_norm"]["scale"])
            gate = m_in @ lp["mlp"]["w_gate"]
            x = x + (gate / (1 + np.exp(-gate)) * (m_in @ lp["mlp"]["w_up"])) @ lp["mlp"]["w_down"]
        out.append(rms(x, p["final_norm"]["scale"]) @ p["lm_head"])
    return np.stack(out)


def _params(cfg, seed=0):
    # One jitted program (eagerly, Flax's init and the noise compiled op by op: most of these tests' time).
    @jax.jit
    def init(rng):
        params = nn.unbox(Transformer(cfg).init_boxed(rng))
        # Non-trivial norm scales, so the reference checks they are applied.
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape) if "scale" in str(path) else x,
            params,
        )

    return init(jax.random.key(seed))


def test_decoder_layer_matches_float64_reference():
    params = _params(CFG)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    segment_ids = np.array([[1] * 12, [1] * 5 + [2] * 7], np.int32)
    positions = np.array([list(range(12)), list(range(5)) + list(range(7))], np.int32)
    got = jax.jit(Transformer(CFG))(params, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(positions))
    want = reference_forward(params, CFG, tokens, segment_ids, positions)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_two_layers_match_reference():
    cfg = dataclasses.replace(CFG, n_layers=2)
    params = _params(cfg, seed=3)
    tokens = np.arange(10, dtype=np.int32)[None] % cfg.vocab_size
    seg, pos = np.ones_like(tokens), np.arange(10, dtype=np.int32)[None]
    got = jax.jit(Transformer(cfg))(params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(got), reference_forward(params, cfg, tokens, seg, pos), rtol=2e-5, atol=2e-5)


def test_packed_documents_never_attend_across():
    """Doc B's logits are the same whether doc A before it is one text or another, and equal doc B alone."""
    model, params = jax.jit(Transformer(CFG)), _params(CFG)
    rng = np.random.default_rng(1)
    doc_a1, doc_a2, doc_b = (rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in (6, 6, 9))
    seg = jnp.asarray([[1] * 6 + [2] * 9])
    pos = jnp.asarray([list(range(6)) + list(range(9))])
    out1 = model(params, jnp.asarray([np.concatenate([doc_a1, doc_b])]), seg, pos)
    out2 = model(params, jnp.asarray([np.concatenate([doc_a2, doc_b])]), seg, pos)
    alone = model(params, jnp.asarray([doc_b]))
    np.testing.assert_allclose(out1[0, 6:], out2[0, 6:], atol=1e-6)
    np.testing.assert_allclose(out1[0, 6:], alone[0], atol=2e-5)
    assert not np.allclose(out1[0, :6], out2[0, :6])


def test_padding_does_not_change_real_tokens():
    model, params = jax.jit(Transformer(CFG)), _params(CFG)
    tokens = jnp.asarray([[5, 6, 7, 8, 0, 0]])
    seg = jnp.asarray([[1, 1, 1, 1, 0, 0]])
    pos = jnp.asarray([[0, 1, 2, 3, 0, 0]])
    padded = model(params, tokens, seg, pos)
    plain = model(params, tokens[:, :4])
    np.testing.assert_allclose(padded[0, :4], plain[0], atol=2e-5)
    assert np.isfinite(np.asarray(padded)).all()


def test_features_return_every_layer_and_tied_head():
    cfg = dataclasses.replace(CFG, n_layers=3, tie_embeddings=True)
    model = Transformer(cfg)
    params = jax.jit(lambda r: nn.unbox(model.init_boxed(r)))(jax.random.key(0))
    assert "lm_head" not in params["params"]
    feats = jax.jit(lambda p, t: model.features(p, t, collect_layers=True))(params, jnp.zeros((2, 5), jnp.int32))
    assert feats.layers_lbsd.shape == (3, 2, 5, cfg.d_model)
    assert feats.hidden_bsd.dtype == jnp.float32
    np.testing.assert_array_equal(model.head(params), params["params"]["embedding"].T)


def test_remat_and_bfloat16_agree_with_float32():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    params = _params(CFG)

    def loss(cfg):
        return jax.jit(jax.value_and_grad(lambda p: Transformer(cfg)(p, tokens).mean()))(params)

    base_val, base_grad = loss(CFG)
    remat_val, remat_grad = loss(dataclasses.replace(CFG, remat="block"))
    np.testing.assert_allclose(remat_val, base_val, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grad, base_grad)
    bf16 = jax.jit(Transformer(dataclasses.replace(CFG, dtype="bfloat16")))(params, tokens)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, jax.jit(Transformer(CFG))(params, tokens), atol=5e-2)


@pytest.mark.parametrize(
    "rules, expected_embed",
    [(mesh_lib.STUDENT_RULES, "fsdp"), (mesh_lib.TEACHER_RULES, ("fsdp", "data"))],
)
def test_partition_specs_follow_each_models_rules(rules, expected_embed):
    from jax.sharding import PartitionSpec as P

    mesh = mesh_lib.make_mesh(2, 2, 2)
    params, _ = mesh_lib.init_sharded(Transformer(CFG).init_boxed, jax.random.key(0), mesh, rules)
    p = params["params"]
    assert p["layers"]["mlp"]["w_gate"].sharding.spec == P(None, expected_embed, "tensor")
    assert p["layers"]["mlp"]["w_down"].sharding.spec == P(None, "tensor", expected_embed)
    assert p["layers"]["attn"]["wq"].sharding.spec == P(None, expected_embed, "tensor", None)
    assert p["embedding"].sharding.spec == P(None, expected_embed)  # vocab 97: not divisible, left whole
    assert p["final_norm"]["scale"].sharding.spec == P(None)
    # Born sharded: each device holds only its slice.
    shard = p["layers"]["mlp"]["w_gate"].addressable_shards[0].data
    assert shard.shape == (1, CFG.d_model // (2 if rules is mesh_lib.STUDENT_RULES else 4), CFG.d_ff // 2)


def test_forward_in_pieces_equals_features():
    """embed → block(i) for every layer → finish is the scanned forward (what stitching and steering build on)."""
    cfg = ModelConfig(
        vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, embed_scale=True, norm_offset=1.0
    )
    model = Transformer(cfg)
    params = jax.jit(lambda r: nn.unbox(model.init_boxed(r)))(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 97)
    segments = jnp.array([[1] * 5 + [2] * 4, [1] * 9])
    positions = jnp.array([list(range(5)) + list(range(4)), list(range(9))])
    feats = jax.jit(lambda *a: model.features(*a, collect_layers=True))(params, tokens, segments, positions)

    @jax.jit  # the pieces compiled as one program (op by op they dominated this test's time)
    def in_pieces(params, tokens, segments, positions):
        xs = [model.embed(params, tokens)]
        for layer in range(cfg.n_layers):
            xs.append(model.block(params, layer, xs[-1], segments, positions))
        return xs[1:], model.finish(params, xs[-1])

    layers, hidden = in_pieces(params, tokens, segments, positions)
    for layer in range(cfg.n_layers):
        np.testing.assert_allclose(layers[layer], feats.layers_lbsd[layer], atol=1e-5)
    np.testing.assert_allclose(hidden, feats.hidden_bsd, atol=1e-5)
    # the rest of the stack as one scan (what steering runs after its layer) from the embedding and from layer 1
    rest = jax.jit(model.blocks, static_argnums=1)
    x0 = model.embed(params, tokens)
    np.testing.assert_allclose(rest(params, 0, x0, segments, positions), feats.layers_lbsd[-1], atol=1e-5)
    np.testing.assert_allclose(rest(params, 1, layers[0], segments, positions), feats.layers_lbsd[-1], atol=1e-5)
