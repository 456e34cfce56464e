"""The mixture-of-experts block against a reference that sends each token through its top-k experts one by one.

The numpy float64 reference loops over tokens and their chosen experts (ties to the lower index, as lax.top_k and
torch.topk); the router is built so that two experts always tie and one expert never receives a token. Gradients
are checked against a dense jax reference (every expert on every token, masked by the routing weights); sharding
against the unsharded forward on 4 of the 8 fake devices, experts spread over fsdp.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from analogjax import mesh as mesh_lib
from analogjax.config import Config, from_dict
from analogjax.errors import UserError
from analogjax.models import moe as moe_lib
from analogjax.models.config import ModelConfig, MoEConfig
from analogjax.models.transformer import Transformer

D, F, E = 16, 24, 6
CASES = {
    "mixtral": MoEConfig(experts=E, top_k=2),
    "qwen2_moe": MoEConfig(experts=E, top_k=3, norm_topk=False, shared_d_ff=20, shared_gate=True),
    "deepseek_like": MoEConfig(
        experts=E, top_k=2, router="sigmoid", expert_bias=True, routed_scale=2.5, shared_d_ff=20
    ),
}


def _cfg(moe: MoEConfig, **kw) -> ModelConfig:
    return ModelConfig(d_model=D, d_ff=40, n_layers=2, n_heads=2, moe=dataclasses.replace(moe, expert_d_ff=F), **kw)


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    x = jnp.zeros((1, 4, D))
    params = jax.jit(lambda r: nn.unbox(moe_lib.MoE(cfg).init(r, x))["params"])(jax.random.key(seed))
    router = np.array(params["router"])
    router[:, 1] = router[:, 0]  # experts 0 and 1 always tie
    router[:, E - 1] = 0.0
    router[0, E - 1] = -10.0  # the inputs' feature 0 is constant 3: the last expert's logit is -30 for every token
    params = dict(params, router=jnp.asarray(router))
    if "expert_bias" in params:  # with sigmoid scores, selection is steered by the bias
        params["expert_bias"] = jnp.asarray([0.0, 0.0, 0.2, -0.2, -0.2, -5.0])
    return params


def _inputs(seed: int = 1, b: int = 4, s: int = 5):
    x = np.asarray(jax.random.normal(jax.random.key(seed), (b, s, D)), np.float64)
    x[..., 0] = 3.0  # with the router's row 0 (_params), no token ever picks the last expert
    return x


def _silu(a):
    return a / (1.0 + np.exp(-a))


def reference(cfg: ModelConfig, params: dict, x_bsd: np.ndarray):
    """Per token, per chosen expert, in float64. Returns (y, chosen experts per token)."""
    moe = cfg.moe
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = x_bsd.reshape(-1, D)
    out = np.zeros_like(x)
    chosen_all = []
    for t in range(x.shape[0]):
        logits = x[t] @ p["router"]
        if moe.router == "softmax":
            scores = np.exp(logits - logits.max())
            scores /= scores.sum()
        else:
            scores = 1.0 / (1.0 + np.exp(-logits))
        select = scores + p["expert_bias"] if moe.expert_bias else scores
        chosen = np.argsort(-select, kind="stable")[: moe.top_k]
        weights = scores[chosen]
        if moe.norm_topk:
            weights = weights / weights.sum()
        weights = weights * moe.routed_scale
        chosen_all.append(chosen)
        for e, w in zip(chosen, weights):
            hidden = _silu(x[t] @ p["w_gate"][e]) * (x[t] @ p["w_up"][e])
            out[t] += w * (hidden @ p["w_down"][e])
        if moe.shared_d_ff:
            sp = p["shared"]
            shared = (_silu(x[t] @ sp["w_gate"]) * (x[t] @ sp["w_up"])) @ sp["w_down"]
            if moe.shared_gate:
                shared = shared / (1.0 + np.exp(-(x[t] @ p["shared_gate"])[0]))
            out[t] += shared
    return out.reshape(x_bsd.shape), np.stack(chosen_all)


@pytest.mark.parametrize("name", sorted(CASES))
def test_moe_block_matches_per_token_reference(name):
    cfg = _cfg(CASES[name])
    params = _params(cfg)
    x = _inputs()
    y, stats = jax.jit(moe_lib.MoE(cfg).apply)({"params": params}, jnp.asarray(x, jnp.float32))
    want, chosen = reference(cfg, params, x)
    # The cases the reference is built to contain: tied experts both chosen somewhere, and an idle expert.
    counts = np.bincount(chosen.reshape(-1), minlength=E)
    assert counts[E - 1] == 0, counts
    zero, one = (chosen == 0).any(1), (chosen == 1).any(1)
    assert np.any(zero & ~one), "no token where the tie between experts 0 and 1 decides the top-k"
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(stats.load_x), counts / counts.sum(), atol=1e-6)


def _dense_reference(cfg: ModelConfig, params, x_bsd):
    """Every expert on every token, weighted by the routing weights scattered into [t, E] (zero if not chosen)."""
    chosen, weights, _ = moe_lib.route(
        cfg, jnp.einsum("bsd,dx->bsx", x_bsd, params["router"]), params.get("expert_bias")
    )
    combine = jnp.sum(jax.nn.one_hot(chosen, E) * weights[..., None], axis=-2)  # [b, s, E]
    hidden = jax.nn.silu(jnp.einsum("bsd,xdf->bsxf", x_bsd, params["w_gate"])) * jnp.einsum(
        "bsd,xdf->bsxf", x_bsd, params["w_up"]
    )
    y = jnp.einsum("bsxf,xfd,bsx->bsd", hidden, params["w_down"], combine)
    if cfg.moe.shared_d_ff:
        sp = params["shared"]
        shared = (jax.nn.silu(x_bsd @ sp["w_gate"]) * (x_bsd @ sp["w_up"])) @ sp["w_down"]
        if cfg.moe.shared_gate:
            shared = shared * jax.nn.sigmoid(x_bsd @ params["shared_gate"])
        y = y + shared
    return y


@pytest.mark.parametrize("name", sorted(CASES))
def test_moe_gradients_match_dense_reference(name):
    cfg = _cfg(CASES[name])
    params = _params(cfg)
    x = jnp.asarray(_inputs(), jnp.float32)
    probe = jax.random.normal(jax.random.key(7), x.shape)

    def ours(p):
        return jnp.sum(moe_lib.MoE(cfg).apply({"params": p}, x)[0] * probe)

    def ref(p):
        return jnp.sum(_dense_reference(cfg, p, x) * probe)

    got, want = jax.jit(jax.grad(ours))(params), jax.jit(jax.grad(ref))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = _leaf(want, path)
        assert np.abs(np.asarray(w)).max() > 0 or "expert_bias" in jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            np.asarray(g),
            np.asarray(w),
            atol=1e-5 * (np.abs(np.asarray(w)).max() + 1e-6),
            err_msg=jax.tree_util.keystr(path),
        )
    # The router learns through the chosen weights; the idle expert learns nothing.
    assert np.abs(np.asarray(got["router"])).max() > 0
    assert np.abs(np.asarray(got["w_gate"][E - 1])).max() == 0


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _ep_model(dispatch: str) -> Transformer:
    moe = MoEConfig(experts=4, top_k=2, shared_d_ff=16, shared_gate=True, first_dense_layers=1, dispatch=dispatch)
    return Transformer(
        ModelConfig(
            vocab_size=64, d_model=16, d_ff=32, n_layers=2, n_heads=2, moe=dataclasses.replace(moe, expert_d_ff=24)
        )
    )


def _ep_loss(model: Transformer):
    tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 64)

    def loss(p):
        with nn.logical_axis_rules(list(mesh_lib.STUDENT_RULES)):
            feats = model.features(p, tokens)
        return jnp.sum(feats.hidden_bsd**2) + moe_lib.load_balancing_loss(feats.router), feats.hidden_bsd

    return loss


@pytest.fixture(scope="module")
def unsharded_ep_run():
    """The unsharded model's params, loss, output and gradients (the dispatch does not matter on one device)."""
    model = _ep_model("exchange_tokens")
    params = jax.jit(lambda r: nn.unbox(model.init_boxed(r)))(jax.random.key(0))
    return params, jax.jit(jax.value_and_grad(_ep_loss(model), has_aux=True))(params)


@pytest.mark.parametrize(
    "mesh_shape, dispatch",
    [((1, 4, 1), "exchange_tokens"), ((2, 2, 2), "exchange_tokens"), ((1, 4, 1), "gather_weights")],
)
def test_expert_sharded_equals_unsharded(unsharded_ep_run, mesh_shape, dispatch):
    """A 2-layer MoE model (dense first layer, shared gated expert), experts over fsdp: on 4 of the 8 devices
    (fsdp=4: one expert a device) and on all 8 (data=2, fsdp=2, tensor=2: two experts a device, each expert's ffn
    width split over tensor), forward and gradients equal the unsharded model's."""
    params, ((want_loss, want_hidden), want_grad) = unsharded_ep_run
    model = _ep_model(dispatch)
    loss = _ep_loss(model)
    devices = int(np.prod(mesh_shape))
    mesh = mesh_lib.make_mesh(*mesh_shape, devices=jax.devices()[:devices])
    mesh_lib.check_experts(4, mesh, "model.moe.experts")
    with jax.set_mesh(mesh):
        abstract = mesh_lib.abstract_sharded(model.init_boxed, mesh, mesh_lib.STUDENT_RULES)
        sharded = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))
        w_gate = sharded["params"]["moe_layers"]["mlp"]["w_gate"]
        assert w_gate.sharding.spec[1] == "fsdp"  # [layers, expert, embed, mlp]: experts spread over fsdp
        assert w_gate.sharding.shard_shape(w_gate.shape)[1] == 4 // mesh_shape[1]
        step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(sharded).compile()
        (got_loss, got_hidden), got_grad = step(sharded)
        hlo = step.as_text()
    # exchange_tokens never gathers expert weights: their only collectives are the token all-gather and the
    # reduce-scatter (their gradients' too); gather_weights all-gathers [.., experts, d, f] weights.
    weight_gathers = [
        line for line in hlo.splitlines() if "all-gather" in line and re.search(r"\[1,4,(16|24|12),", line)
    ]
    if dispatch == "gather_weights":
        assert weight_gathers, "expected the expert weights all-gathered"
    else:
        assert not weight_gathers, weight_gathers[:2]
        assert "reduce-scatter" in hlo
    np.testing.assert_allclose(np.asarray(got_hidden), np.asarray(want_hidden), atol=2e-5)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4 * (np.abs(np.asarray(w)).max() + 1e-6))


def test_expert_parallel_block_with_an_idle_device():
    """The MoE block with 8 experts over fsdp=4 (two a device) where the last device's experts receive no token:
    equal to the per-token float64 reference, and that device's experts get zero gradient."""
    e = 8
    cfg = ModelConfig(d_model=D, d_ff=40, n_layers=2, n_heads=2, moe=MoEConfig(experts=e, top_k=2, expert_d_ff=F))
    init = jax.jit(lambda r: nn.unbox(moe_lib.MoE(cfg).init(r, jnp.zeros((1, 4, D))))["params"])
    params = init(jax.random.key(0))
    router = np.array(params["router"])
    router[:, e - 2 :] = 0.0
    router[0, e - 2 :] = -10.0  # feature 0 is constant 3 (_inputs): experts 6 and 7 (the last device's) stay idle
    params = dict(params, router=jnp.asarray(router))
    x = _inputs(b=8)
    want, chosen = reference(cfg, params, x)
    assert not np.isin(chosen, [e - 2, e - 1]).any() and len(np.unique(chosen)) == e - 2
    probe = jax.random.normal(jax.random.key(7), x.shape)
    mesh = mesh_lib.make_mesh(1, 4, 1, devices=jax.devices()[:4])

    def loss(p, x):
        y = moe_lib.MoE(cfg).apply({"params": p}, x)[0]
        return jnp.sum(y * probe), y

    unsharded_grad = jax.jit(jax.grad(loss, has_aux=True))(params, jnp.asarray(x, jnp.float32))[0]
    with jax.set_mesh(mesh):
        experts = jax.sharding.NamedSharding(mesh, P("fsdp"))
        placed = {k: jax.device_put(v, experts) if k.startswith("w_") else v for k, v in params.items()}
        rows = jax.device_put(jnp.asarray(x, jnp.float32), jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        grad, y = jax.jit(jax.grad(loss, has_aux=True))(placed, rows)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=1e-5 * np.abs(want).max(), rtol=0)
    assert np.abs(np.asarray(grad["w_gate"][e - 2 :])).max() == 0
    for name in ("router", "w_gate", "w_up", "w_down"):
        w = np.asarray(unsharded_grad[name])
        np.testing.assert_allclose(np.asarray(grad[name]), w, atol=1e-5 * np.abs(w).max(), err_msg=name)


def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


def test_blocked_grouped_matmul_equals_ragged_dot():
    """The CPU form of the grouped SwiGLU against jax.lax.ragged_dot (the TPU/GPU form): empty groups, a group
    larger than a block, and rows past the last group (other devices' assignments), which must give 0."""
    rows, n = 40, 5
    keys = jax.random.split(jax.random.key(3), 4)
    xs = jax.random.normal(keys[0], (rows, D))
    wg, wu = (jax.random.normal(k, (n, D, F)) for k in keys[1:3])
    wd = jax.random.normal(keys[3], (n, F, D))
    sizes = jnp.asarray([0, 17, 3, 0, 9], jnp.int32)  # 29 of the 40 rows in groups
    assert moe_lib.block_rows(rows, n) == 8  # so expert 1's 17 rows span three blocks
    # Jitted (op by op, compiling each op was most of this test's time).
    got = jax.jit(moe_lib._blocked_swiglu, static_argnums=5)(xs, sizes, wg, wu, wd, _swiglu)
    want = jax.jit(moe_lib._ragged_swiglu, static_argnums=5)(xs, sizes, wg, wu, wd, _swiglu)
    assert np.abs(np.asarray(want[:29])).min(axis=1).max() > 0 and np.all(np.asarray(want[29:]) == 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    grads = [
        jax.jit(jax.grad(lambda w, f=f: jnp.sum(f(xs, sizes, wg, w, wd, _swiglu) ** 2)))(wu)
        for f in (moe_lib._blocked_swiglu, moe_lib._ragged_swiglu)
    ]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=1e-4, atol=1e-3)


def test_bad_moe_config_refused():
    def model(**moe):
        return from_dict(Config, {"model": {"preset": "tiny", "moe": moe}}).model

    with pytest.raises(UserError, match=r"model\.moe\.top_k"):
        model(experts=4, top_k=5).check("model")
    with pytest.raises(UserError, match=r"model\.moe\.every"):
        model(experts=4, top_k=1, every=3).check("model")
    with pytest.raises(UserError, match=r"model\.moe\.router"):
        model(experts=4, top_k=1, router="relu").check("model")
    with pytest.raises(UserError, match=r"model\.moe\.dispatch"):
        model(experts=4, top_k=1, dispatch="all_to_all").check("model")
    mesh = mesh_lib.make_mesh(2, 4, 1)
    with pytest.raises(UserError, match=r"model\.moe\.experts \(6\).*mesh\.fsdp \(4\)"):
        mesh_lib.check_experts(6, mesh, "model.moe.experts")


def test_dense_param_tree_unchanged():
    # The tree's structure is the check: abstract shapes (eval_shape), not an initialised default-sized model.
    params = nn.unbox(jax.eval_shape(Transformer(ModelConfig()).init_boxed, jax.random.key(0)))["params"]
    assert sorted(params) == ["embedding", "final_norm", "layers", "lm_head"]
    assert sorted(params["layers"]["mlp"]) == ["w_down", "w_gate", "w_up"]


def test_load_balancing_term_lowers_the_imbalance_it_measures():
    """An MoE student (CE only) started with every token routed to expert 0: the aux term spreads the load."""
    from synthetic import packed_batch

    from analogjax.config import load_config
    from analogjax.setup import build

    config = load_config(
        None,
        [
            "model.preset=tiny",
            "model.moe.experts=4",
            "model.moe.top_k=1",
            "model.moe.aux_loss_weight=1.0",
            "model.moe.z_loss_weight=0.001",
            "data.global_batch=8",
            "data.seq_len=16",
            "train.steps=12",
            "optim.warmup_steps=0",
            "optim.learning_rate=0.03",
            "distill.terms=[{kind: ce, weight: 1.0}]",
        ],
    )
    run = build(config, mesh=mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    params = jax.device_get(run.state.params)
    model = params["model"]["params"]
    # A direction common to every token, and a router column that reads it: expert 0 wins everywhere.
    direction = np.zeros(model["embedding"].shape[1], np.float32)
    direction[0] = 1.0
    model["embedding"] = model["embedding"] + 0.2 * direction
    router = np.array(model["moe_layers"]["mlp"]["router"])
    router[:, 0, 0] = 5.0
    model["moe_layers"]["mlp"]["router"] = router
    state = run.state.replace(params=jax.device_put(params, jax.tree.map(lambda a: a.sharding, run.state.params)))
    batch = jax.device_put(packed_batch(8, 16, 512), run.batch_sharding)
    history = []
    with jax.set_mesh(run.mesh):
        for _ in range(12):
            state, metrics = run.step_fn(state, run.teacher_params, batch)
            metrics = jax.device_get(metrics)
            history.append(
                {
                    k: float(metrics[k]) / float(metrics["count"])
                    for k in ("moe_load_max", "moe_load_min", "moe_balance", "moe_load_entropy")
                }
            )
    first, last = history[0], history[-1]
    print("moe load first", first, "last", last)
    assert first["moe_load_max"] > 3.0  # nearly all of the 4 experts' load on one
    assert last["moe_load_max"] < first["moe_load_max"] - 1.0
    assert last["moe_balance"] < first["moe_balance"]
    assert last["moe_load_entropy"] > first["moe_load_entropy"] + 0.2


@pytest.mark.parametrize(
    "preset, total, active",
    [
        ("mixtral-8x7b", 46.7e9, 12.9e9),
        ("qwen3-30b-a3b", 30.5e9, 3.3e9),
        ("qwen3-235b-a22b", 235e9, 22e9),
    ],
)
def test_presets_count_total_and_active_parameters(preset, total, active):
    """The public figures of each MoE model; FLOPs per token follow the active count, not the total."""
    from analogjax.models.config import PRESETS
    from analogjax.runtime.flops import forward_flops_per_token, param_count

    cfg = PRESETS[preset]
    cfg.check("model")
    assert param_count(cfg) == pytest.approx(total, rel=0.02)
    assert param_count(cfg, active=True) == pytest.approx(active, rel=0.03)
    dense_equivalent = dataclasses.replace(cfg, moe=MoEConfig(), d_ff=cfg.moe.top_k * cfg.expert_d_ff)
    router = 2 * cfg.d_model * cfg.moe.experts * cfg.n_layers
    assert forward_flops_per_token(cfg, 128) == forward_flops_per_token(dense_equivalent, 128) + router


def test_bad_moe_input_is_one_error_line_at_the_cli(tmp_path):
    import subprocess
    import sys

    for override, needle in (
        ("model.moe.top_k=9", "model.moe.top_k"),
        ("model.moe.experts=6", "model.moe.experts (6) must be divisible by mesh.fsdp (4)"),
    ):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "analogjax",
                "distill",
                "--config",
                "configs/tiny.yaml",
                "--set",
                "model.moe.experts=8",
                "--set",
                override,
                "--set",
                "mesh.fsdp=4",
                "--set",
                "mesh.data=2",
                "--workdir",
                str(tmp_path / "w"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in out.stderr.strip().splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr[-2000:]


def test_moe_every_nth_layer_with_dense_prefix_scans_like_its_blocks():
    """Dense prefix + groups of `every` layers (the last MoE): the scanned forward equals block by block, and the
    layers named MoE are exactly those is_moe_layer names."""
    moe = MoEConfig(experts=4, top_k=2, first_dense_layers=1, every=2)
    cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=32, n_layers=5, n_heads=2, moe=moe)
    cfg.check("model")
    model = Transformer(cfg)
    params = jax.jit(lambda r: nn.unbox(model.init_boxed(r)))(jax.random.key(0))
    assert sorted(params["params"]["moe_layers"]) == ["dense_0", "moe"]
    assert [moe.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    feats = jax.jit(lambda p, t: model.features(p, t, collect_layers=True))(params, tokens)
    assert feats.layers_lbsd.shape[0] == 5 and feats.router.load_x.shape == (2, 4)

    @jax.jit  # block by block as one program (op by op, compiling each op was most of this test's time)
    def in_pieces(params, tokens):
        xs = [model.embed(params, tokens)]
        for i in range(5):
            xs.append(model.block(params, i, xs[-1]))
        return xs[1:], model.finish(params, xs[-1])

    layers, hidden = in_pieces(params, tokens)
    for i in range(5):
        np.testing.assert_allclose(np.asarray(layers[i]), np.asarray(feats.layers_lbsd[i]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(feats.hidden_bsd), atol=1e-5)
    rest = jax.jit(model.blocks, static_argnums=1)  # every=2 alternates stacks: runs of one layer each
    np.testing.assert_allclose(np.asarray(rest(params, 1, layers[0])), np.asarray(feats.layers_lbsd[4]), atol=1e-5)
    # every=1: the MoE layers are one stack, run as one scan after the dense prefix
    cfg1 = ModelConfig(**{**cfg.__dict__, "moe": MoEConfig(experts=4, top_k=2, first_dense_layers=2, every=1)})
    model1 = Transformer(cfg1)
    params1 = jax.jit(lambda r: nn.unbox(model1.init_boxed(r)))(jax.random.key(2))
    feats1 = jax.jit(lambda p, t: model1.features(p, t, collect_layers=True))(params1, tokens)
    x1 = model1.embed(params1, tokens)
    for first in (0, 1, 3):
        got = jax.jit(model1.blocks, static_argnums=1)(
            params1, first, x1 if first == 0 else feats1.layers_lbsd[first - 1]
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(feats1.layers_lbsd[4]), atol=1e-5)


def test_setting_one_moe_key_keeps_the_rest_of_the_presets_moe():
    """`--set teacher.model.moe.aux_loss_weight=...` on an MoE preset changes that key only (it once reset the
    whole section to the dense defaults: experts 0, a silently dense model)."""
    from analogjax.config import load_config
    from analogjax.models.presets import PRESETS

    config = load_config(None, ["teacher.model.preset=qwen3-30b-a3b", "teacher.model.moe.aux_loss_weight=0.02"])
    want = dataclasses.replace(PRESETS["qwen3-30b-a3b"].moe, aux_loss_weight=0.02)
    assert config.teacher.model.moe == want and want.experts == 128
