"""The optimiser: which parameters Muon takes in each family, its update against optax's Muon on the same matrices
written out as 2-D arrays, and `optim.name` / `optim.muon_lr_scale` from the CLI."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

from analogjax.config import OptimConfig, load_config
from analogjax.errors import UserError
from analogjax.models.transformer import Transformer
from analogjax.objective.optimizer import CONSISTENT_RMS, make_optimizer, muon_views


def _specs(preset: str, layers: int = 2):
    model = load_config(None, [f"model.preset={preset}"]).model
    model = dataclasses.replace(model, n_layers=min(model.n_layers, layers))
    return nn.get_partition_spec(jax.eval_shape(Transformer(model).init_boxed, jax.random.key(0)))


def _flat(tree) -> dict[str, object]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or isinstance(x, Dims))[0]
    return {jax.tree_util.keystr(path).replace("['params']", ""): leaf for path, leaf in leaves}


def test_muon_takes_every_family_s_block_matrices_and_adamw_the_rest():
    dense = _flat(muon_views(_specs("tiny")))
    assert dense["['layers']['attn']['wq']"] == Dims(1, (2, 3))  # embed -> heads x head_dim, per layer
    assert dense["['layers']['attn']['wk']"] == Dims(1, (2, 3))
    assert dense["['layers']['attn']['wo']"] == Dims((1, 2), 3)  # heads x head_dim -> embed
    assert dense["['layers']['mlp']['w_gate']"] == Dims(1, (2,))
    assert dense["['layers']['mlp']['w_down']"] == Dims((1,), 2)
    for adam in ("['embedding']", "['lm_head']", "['final_norm']['scale']", "['layers']['attn_norm']['scale']"):
        assert dense[adam] is None, adam

    # MoE with latent attention (DeepSeek-V3): experts are a stack axis; latent up-projections read the latent.
    mla = _flat(muon_views(_specs("deepseek-v3-671b", layers=4)))
    assert mla["['moe_layers']['mlp']['w_gate']"] == Dims(2, (3,))
    assert mla["['moe_layers']['mlp']['w_down']"] == Dims((2,), 3)
    assert mla["['moe_layers']['attn']['wq_a']"] == Dims(1, (2,))
    assert mla["['moe_layers']['attn']['wkv_b']"] == Dims(1, (2, 3))
    for adam in ("['moe_layers']['attn']['kv_a_norm']['scale']", "['moe_layers']['mlp']['expert_bias']"):
        assert mla[adam] is None, adam

    # gpt-oss: biases (also per expert) and attention sinks stay on AdamW.
    oss = _flat(muon_views(_specs("gpt-oss-120b")))
    for adam in ("['wq_bias']", "['wo_bias']", "['sinks']"):
        assert oss[f"['moe_layers']['attn']{adam}"] is None, adam
    for adam in ("['b_down']", "['b_gate']", "['router_bias']"):
        assert oss[f"['moe_layers']['mlp']{adam}"] is None, adam
    assert oss["['moe_layers']['mlp']['w_up']"] == Dims(2, (3,))


def _as_matrices(x, dims: Dims):
    """[layers, ...] -> {layer: [prod(reduction), prod(output)]}: how Muon must see each layer's slice."""
    reduction = (dims.reduction_axis,) if isinstance(dims.reduction_axis, int) else tuple(dims.reduction_axis)
    output = (dims.output_axis,) if isinstance(dims.output_axis, int) else tuple(dims.output_axis)
    rows = int(np.prod([x.shape[a] for a in reduction]))
    moved = jnp.moveaxis(x, reduction + output, range(1, 1 + len(reduction) + len(output)))
    return {layer: moved[layer].reshape(rows, -1) for layer in range(x.shape[0])}


def test_muon_update_equals_optax_muon_on_each_layer_s_matrix_and_nesterov_adamw_elsewhere():
    cfg = OptimConfig(name="muon", learning_rate=3e-3, warmup_steps=0, grad_clip=0.0, muon_lr_scale=2.0)
    model = load_config(None, ["model.preset=tiny"]).model
    boxed = Transformer(model).init_boxed(jax.random.key(0))
    params, specs = nn.unbox(boxed), nn.get_partition_spec(boxed)
    grads = jax.tree.map(lambda p, i: jax.random.normal(jax.random.key(i), p.shape), params, _index_tree(params))
    tx = make_optimizer(cfg, total_steps=10, logical_specs=specs)
    updates, _ = tx.update(grads, tx.init(params), params)

    views, got = _flat(muon_views(specs)), _flat(updates)
    flat_params, flat_grads = _flat(params), _flat(grads)
    matrices = {n: v for n, v in views.items() if v is not None}
    assert set(matrices) == {f"['layers']['attn']['{w}']" for w in ("wq", "wk", "wv", "wo")} | {
        f"['layers']['mlp']['{w}']" for w in ("w_gate", "w_up", "w_down")
    }
    reference = optax.contrib.muon(
        cfg.learning_rate * cfg.muon_lr_scale,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        consistent_rms=CONSISTENT_RMS,
    )
    for name, dims in matrices.items():
        g2, p2 = _as_matrices(flat_grads[name], dims), _as_matrices(flat_params[name], dims)
        want, _ = reference.update(g2, reference.init(p2), p2)
        for layer, want_layer in want.items():
            np.testing.assert_allclose(_as_matrices(got[name], dims)[layer], want_layer, rtol=2e-4, atol=1e-7)
    # optax's muon gives the rest AdamW with Nesterov momentum, as Muon's own.
    adam = optax.adamw(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, nesterov=True
    )
    for name in set(views) - set(matrices):
        want, _ = adam.update(flat_grads[name], adam.init(flat_params[name]), flat_params[name])
        np.testing.assert_allclose(got[name], want, rtol=1e-6, err_msg=name)


def _index_tree(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(range(len(leaves))))


@pytest.mark.parametrize(
    "override, named",
    [("optim.name=sgd", "optim.name"), ("optim.muon_lr_scale=0", "optim.muon_lr_scale")],
)
def test_bad_optimizer_keys_are_refused_by_name(override, named):
    with pytest.raises(UserError, match=named):
        load_config(None, [override]).check()
