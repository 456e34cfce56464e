"""Long context: the sequence split over the `context` mesh axis (keys/values all-gathered) computes exactly what
one device computes — the model's forward and gradient, and a whole distill step (teacher forward, student
forward, fused loss, update)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic import packed_batch

from analogjax import mesh as mesh_lib
from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.models.config import PRESETS
from analogjax.models.transformer import Transformer
from analogjax.setup import build, build_mesh

TINY = load_config(
    None,
    [
        "model.preset=tiny",
        "teacher.model.preset=tiny-teacher",
        "data.global_batch=8",
        "data.seq_len=32",
        "train.steps=10",
        "optim.warmup_steps=0",
        "distill.chunk_size=64",
    ],
)


def _features_and_grad(model, params, batch):
    """((loss, hidden), grad) of one compiled program: the hidden states show how the sequence was split."""

    def loss(p):
        hidden = model.features(p, batch["tokens"], batch["segment_ids"], batch["positions"]).hidden_bsd
        return jnp.sum(hidden * jnp.cos(jnp.arange(hidden.shape[-1]))), hidden

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_context_parallel_forward_and_gradient_equal_unsharded():
    model = Transformer(PRESETS["tiny"])
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 64, 512, seed=3).items()}
    single = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params, _ = mesh_lib.init_sharded(model.init_boxed, jax.random.key(0), single, mesh_lib.STUDENT_RULES)
    import flax.linen as nn

    with jax.set_mesh(single), nn.logical_axis_rules(list(mesh_lib.STUDENT_RULES)):
        (want_loss, _), want_grad = _features_and_grad(model, params, batch)
    mesh = mesh_lib.make_mesh(1, 1, 2, context=4)
    sharded, _ = mesh_lib.init_sharded(model.init_boxed, jax.random.key(0), mesh, mesh_lib.STUDENT_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(mesh_lib.STUDENT_RULES)):
        (got_loss, hidden), got_grad = _features_and_grad(model, sharded, batch)
    assert "context" in str(hidden.sharding.spec[1]), hidden.sharding  # the sequence really is split
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    # Gradients reach ~100 here: float reduction order moves them by ~1e-4 absolute.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4),
        jax.device_get(got_grad),
        jax.device_get(want_grad),
    )


# Adam's first update is lr·g/(|g|+eps): at the default eps (1e-8) that is lr·sign(g), and a gradient within float
# reduction-order noise of 0 flips its parameter by up to 2·lr. With eps=1 ≫ |g| (global norm ~0.5) the update is
# smooth in g, ≈ -lr·g: at lr=1 and no weight decay each parameter's update is (minus) its gradient.
SMOOTH_ADAM = dataclasses.replace(TINY.optim, learning_rate=1.0, eps=1.0, weight_decay=0.0)


def _one_step(config, mesh, batch):
    run = build(config, mesh=mesh)
    params = jax.device_get(run.state.params)  # before the step, which donates the state
    with jax.set_mesh(run.mesh):
        state, metrics = run.step_fn(run.state, run.teacher_params, jax.device_put(batch, run.batch_sharding))
    return params, jax.device_get(state.params), jax.device_get(metrics)


def test_context_parallel_distill_step_equals_single_device():
    config = dataclasses.replace(TINY, optim=SMOOTH_ADAM)
    batch = packed_batch(8, 32, 512, seed=5)
    want_init, want_params, want = _one_step(config, mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batch)
    got_init, got_params, got = _one_step(config, mesh_lib.make_mesh(2, 1, 1, context=4), batch)
    for key in ("loss", "kl", "ce", "teacher_ce", "agreement", "count", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, got_init, want_init)

    # The updates (the gradients, element by element) agree to 0.1% of each tensor's largest: float rounding of the
    # parameters leaves ~1e-5 of that, a gradient reduced over the wrong shards is off by O(1).
    def same_update(init, got, want):
        np.testing.assert_allclose(got - init, want - init, rtol=1e-3, atol=1e-3 * np.abs(want - init).max())

    jax.tree.map(same_update, want_init, got_params, want_params)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mesh.context=4", "data.seq_len=30"], "data.seq_len (30) must be divisible by mesh.context (4)"),
        (["mesh.context=3"], "mesh.context (3) must divide the 8 devices"),
        (["mesh.context=0"], "mesh.context must be positive"),
    ],
)
def test_context_axis_refusals(overrides, message):
    config = load_config(None, ["model.preset=tiny", "data.global_batch=8", "data.seq_len=32", *overrides])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_mesh(config)


def test_compile_check_counts_context_collectives():
    from analogjax.runtime.compile_check import ici_bytes_per_chip
    from analogjax.runtime.flops import param_count

    plain = ici_bytes_per_chip(TINY, {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}, with_teacher=True)
    split = ici_bytes_per_chip(TINY, {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}, with_teacher=True)
    # 2 rows a chip x 32 tokens x 2 kv heads x head dim (16 student, 32 teacher) x k and v x 4 bytes, half of it
    # arriving over a 2-way context axis; student: 2 layers x 3 passes, teacher: 4 layers x 1.
    kv = 2 * 32 * 2 * 2 * 4 * 0.5 * (16 * 2 * 3 + 32 * 4)
    # Student gradients are all-reduced over data x context (4 ways) instead of data (2 ways).
    grads = 2 * (4.0 * param_count(TINY.model) / 2) * (0.75 - 0.5)
    assert split - plain == pytest.approx(kv + grads)
