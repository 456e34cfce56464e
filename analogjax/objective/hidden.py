"""Hidden-state matching: student layer s is projected to the teacher's width and compared with teacher layer t.

One learned linear map per (student layer, teacher layer) pair (TinyBERT-style, no bias), trained with the student.
Its kernel [d_student, d_teacher] carries the logical axes ('embed', 'teacher_embed'), so the mesh rules decide its
sharding like any student parameter.

Per token the pair's loss is either
- "mse": mean over the teacher width of (h_s W − h_t)², or
- "cosine": 1 − cos(h_s W, h_t),
averaged over the pairs. `hidden_loss` returns (Σ_t w_t · that, Σ_t w_t) so means stay exact across shards and steps.
Teacher states get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from analogjax.errors import UserError, check_choice

KINDS = ("mse", "cosine")
PROJECTION_AXES = ("embed", "teacher_embed")
_COSINE_EPS = 1e-8


def projection_name(student_layer: int, teacher_layer: int) -> str:
    return f"student{student_layer}_teacher{teacher_layer}"


def _pairs(layer_map: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    pairs = tuple((int(s), int(t)) for s, t in layer_map)
    if not pairs:
        raise UserError("hidden matching needs a non-empty layer_map of (student layer, teacher layer) pairs")
    if len(set(pairs)) != len(pairs):
        raise UserError(f"layer_map repeats a pair: {list(pairs)}")
    return pairs


def init_projections(layer_map, d_student: int, d_teacher: int, rng: jax.Array, dtype=jnp.float32) -> dict:
    """{name: {"kernel": [d_student, d_teacher]}} with LeCun-normal kernels (variance 1/d_student keeps the scale)."""
    pairs = _pairs(layer_map)
    keys = jax.random.split(rng, len(pairs))
    scale = d_student**-0.5
    return {
        projection_name(s, t): {"kernel": (scale * jax.random.normal(key, (d_student, d_teacher))).astype(dtype)}
        for (s, t), key in zip(pairs, keys)
    }


def projection_logical_axes(layer_map) -> dict:
    """The same tree as `init_projections`, with PartitionSpec('embed', 'teacher_embed') of logical names per kernel."""
    return {projection_name(s, t): {"kernel": PartitionSpec(*PROJECTION_AXES)} for s, t in _pairs(layer_map)}


def _per_token(projected: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    if kind == "mse":
        return jnp.mean(jnp.square(projected - target), axis=-1)
    dot = jnp.sum(projected * target, axis=-1)
    norms_squared = jnp.sum(jnp.square(projected), axis=-1) * jnp.sum(jnp.square(target), axis=-1)
    # rsqrt of a floor, not dot / (|a||b| + eps): no sqrt(0) in the gradient when a state is all zeros (padding).
    return 1.0 - dot * jax.lax.rsqrt(jnp.maximum(norms_squared, _COSINE_EPS**2))


def hidden_loss(proj_params, student_hiddens, teacher_hiddens, weights, layer_map, kind: str):
    """(Σ_t w_t · mean over pairs of the pair loss, Σ_t w_t); hiddens are indexable by layer, each [B, S, D]."""
    check_choice("hidden matching kind", kind, KINDS)
    pairs = _pairs(layer_map)
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.zeros(weights.shape, jnp.float32)
    for s, t in pairs:
        kernel = proj_params[projection_name(s, t)]["kernel"]
        projected = jnp.einsum("...d,de->...e", student_hiddens[s], kernel, preferred_element_type=jnp.float32)
        target = jax.lax.stop_gradient(teacher_hiddens[t]).astype(jnp.float32)
        if projected.shape != target.shape:
            raise UserError(f"layer pair ({s}, {t}): projected student {projected.shape} vs teacher {target.shape}")
        total = total + _per_token(projected, target, kind)
    per_token = total / len(pairs)
    weighted = jnp.where(weights != 0, weights * per_token, 0.0)
    return jnp.sum(weighted), jnp.sum(weights)
