"""Hidden-state matching: projections, logical axes, MSE / cosine against NumPy, masking and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType

from analogjax.errors import UserError
from analogjax.objective.hidden import hidden_loss, init_projections, projection_logical_axes

LAYER_MAP = ((1, 3), (2, 5))
D_STUDENT, D_TEACHER, B, S = 8, 12, 2, 5


def make_states(seed=0):
    rng = np.random.default_rng(seed)
    student = [rng.standard_normal((B, S, D_STUDENT)).astype(np.float32) for _ in range(3)]
    teacher = jnp.asarray(rng.standard_normal((6, B, S, D_TEACHER)).astype(np.float32))  # stacked [layers, B, S, D]
    weights = (rng.random((B, S)) > 0.3).astype(np.float32)
    weights[1, -1] = 0.0
    return student, teacher, weights


def test_projection_tree_and_logical_axes():
    params = init_projections(LAYER_MAP, D_STUDENT, D_TEACHER, jax.random.key(0))
    axes = projection_logical_axes(LAYER_MAP)
    assert jax.tree.structure(params) == jax.tree.structure(axes)
    kernels = jax.tree.leaves(params)
    assert all(k.shape == (D_STUDENT, D_TEACHER) and k.dtype == jnp.float32 for k in kernels)
    assert not np.allclose(kernels[0], kernels[1]), "each pair needs its own initialisation"
    assert 0.5 < float(jnp.std(kernels[0])) * np.sqrt(D_STUDENT) < 1.5  # LeCun scale keeps the projected size
    # The logical names resolve through ordinary flax rules to a valid sharding.
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    shardings = nn.logical_to_mesh_sharding(axes, mesh, [("embed", "fsdp"), ("teacher_embed", "tensor")])
    placed = jax.device_put(params, shardings)
    assert jax.tree.leaves(placed)[0].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_matches_numpy(kind):
    params = init_projections(LAYER_MAP, D_STUDENT, D_TEACHER, jax.random.key(1))
    student, teacher, weights = make_states()
    total, count = jax.jit(hidden_loss, static_argnums=(4, 5))(params, student, teacher, weights, LAYER_MAP, kind)
    per_token = np.zeros((B, S))
    for s, t in LAYER_MAP:
        projected = student[s].astype(np.float64) @ np.asarray(params[f"student{s}_teacher{t}"]["kernel"], np.float64)
        target = np.asarray(teacher[t], np.float64)
        if kind == "mse":
            per_token += ((projected - target) ** 2).mean(-1)
        else:
            norms = np.linalg.norm(projected, axis=-1) * np.linalg.norm(target, axis=-1)
            cosine = (projected * target).sum(-1) / norms
            per_token += 1 - cosine
    per_token /= len(LAYER_MAP)
    np.testing.assert_allclose(total, (weights * per_token).sum(), rtol=1e-5)
    assert count == weights.sum()


def test_gradients_reach_student_and_projection_not_teacher():
    params = init_projections(LAYER_MAP, D_STUDENT, D_TEACHER, jax.random.key(2))
    student, teacher, weights = make_states(3)
    student[2][0, 0] = 0.0  # an all-zero state (padding) must not make the cosine gradient NaN

    def total(p, st, te):
        return hidden_loss(p, st, te, weights, LAYER_MAP, "cosine")[0]

    grad_params, grad_student, grad_teacher = jax.grad(total, argnums=(0, 1, 2))(params, student, teacher)
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grad_params))
    assert np.all(np.asarray(grad_student[0]) == 0), "layer 0 is not in the layer map"
    assert np.any(np.asarray(grad_student[1]) != 0) and np.all(np.isfinite(grad_student[2]))
    assert np.all(np.asarray(grad_teacher) == 0)
    masked = weights == 0
    assert np.all(np.asarray(grad_student[1])[masked] == 0), "masked tokens contribute nothing"


def test_perfect_match_is_zero_and_errors():
    params = {"student0_teacher0": {"kernel": jnp.eye(4)}}
    states = [jnp.arange(24.0).reshape(2, 3, 4) + 1.0]
    for kind in ("mse", "cosine"):
        total, count = hidden_loss(params, states, states, jnp.ones((2, 3)), [(0, 0)], kind)
        np.testing.assert_allclose(total, 0.0, atol=1e-5)
        assert count == 6
    with pytest.raises(UserError, match="kind"):
        hidden_loss(params, states, states, jnp.ones((2, 3)), [(0, 0)], "l1")
    with pytest.raises(UserError, match="layer_map"):
        init_projections((), 4, 4, jax.random.key(0))
    with pytest.raises(UserError, match="repeats"):
        projection_logical_axes([(0, 1), (0, 1)])
    with pytest.raises(UserError, match="projected student"):
        hidden_loss(params, states, [jnp.zeros((2, 3, 5))], jnp.ones((2, 3)), [(0, 0)], "mse")
