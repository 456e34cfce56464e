"""Sparse teachers: the k largest teacher logits per token, or tokens sampled from the teacher.

Both are row-aligned arrays with a leading token axis ([N, k], [N, s], [N]), so a cache can store each field as one
[tokens, k] tensorstore array chunked along tokens and slice any batch back out. Neither needs [N, V] teacher logits at
loss time; the student side still sees full-vocabulary logits (the fused loss chunks them over tokens).

Top-k treatments (the projects that distill from top-k disagree, so each is named):
- `topk_renormalized`: softmax over the k entries for the teacher *and* for the student's logits gathered at the same
  ids; KL between the two k-way distributions. Ignores how much mass the student puts outside the k ids.
- `topk_gathered`: teacher renormalised over k; student full-vocabulary log-softmax gathered at the k ids;
  Σ p_k (log p_k − log q_k). Pushes the student's mass onto the k ids (value ≥ 0, = 0 iff q equals p_k on the k ids).
- `topk_tail_bucket`: a (k+1)-th bucket holds the mass outside the k ids, 1 − Σ p_k for the teacher (from its
  full-vocabulary logsumexp, `TopKTeacher.lse`) and the student's mass outside the ids; KL over the k+1 buckets.
  `lse` must be logsumexp(teacher_logits / T) at the temperature the loss uses (`top_k_teacher` computes it).
  A teacher tail below 16 float32 ulps of Σ p_k ≈ 1 (about 2e-6) is rounding noise and counts as 0.

Sampled KD (Anshumann et al. 2025, arXiv 2503.16870): top-k is a biased estimate of the full distribution; sampling
ids from a proposal r with importance weights p/r is unbiased. `sample_teacher_tokens` draws s ids per token and
weights w_j = p(id_j) / (s · r(id_j)); `sampled_kd` = −Σ_j w_j log q(id_j) is an unbiased estimate of the soft
cross-entropy −Σ p log q, so its expected gradient w.r.t. the student logits is exactly forward KL's, (q − p)/T. The
weights are deliberately not renormalised per token: self-normalisation would bias the gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from analogjax.errors import UserError
from analogjax.objective import divergences as losses


class TopKTeacher(NamedTuple):
    values: jax.Array  # [N, k] raw teacher logits (bf16 or f32), any order
    indices: jax.Array  # [N, k] int32 vocabulary ids, distinct within a row
    lse: jax.Array | None = None  # [N] float32 logsumexp(teacher_logits / T) over the full vocabulary


class SampledTeacher(NamedTuple):
    ids: jax.Array  # [N, s] int32 sampled vocabulary ids (repeats allowed)
    weights: jax.Array  # [N, s] float32 importance weights p / (s · r)


def top_k_teacher(teacher_logits: jax.Array, k: int, *, temperature=1.0, values_dtype=None) -> TopKTeacher:
    """The k largest logits per token, their ids and the full logsumexp at `temperature` (for the tail bucket)."""
    values, indices = jax.lax.top_k(teacher_logits, k)
    lse = jax.nn.logsumexp(teacher_logits.astype(losses.compute_dtype(teacher_logits)) / temperature, axis=-1)
    return TopKTeacher(values.astype(values_dtype or values.dtype), indices.astype(jnp.int32), lse)


def _gather(values: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take_along_axis(values, ids, axis=-1)


def _teacher_log_probs_over_k(teacher: TopKTeacher, temperature) -> jax.Array:
    return losses.log_softmax(teacher.values, temperature)


def topk_renormalized_from_log_probs(log_q, teacher: TopKTeacher, *, temperature=1.0):
    """`topk_renormalized` from the student's log-probabilities at `temperature` (log_softmax(logits / T)): the
    k-way softmax of log q at the ids equals that of the logits / T (a row's shift cancels)."""
    log_p = _teacher_log_probs_over_k(teacher, temperature)
    return losses.kl_from_log_probs(log_p, losses.log_softmax(_gather(log_q, teacher.indices)))


def topk_gathered_from_log_probs(log_q, teacher: TopKTeacher, *, temperature=1.0):
    log_p = _teacher_log_probs_over_k(teacher, temperature)
    return losses.kl_from_log_probs(log_p, _gather(log_q, teacher.indices))


_TAIL_RESOLUTION = math.log(16 * float(jnp.finfo(jnp.float32).eps))  # ≈ log 1.9e-6


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − e^x) for x ≤ 0, accurate at both ends (Mächler 2012); -inf at x = 0 with a finite gradient path."""
    x = jnp.minimum(x, 0.0)  # bf16-rounded cached values can make Σ p_k exceed 1 by an ulp
    near_zero = x > -0.6931471805599453
    safe_near = jnp.where(near_zero & (x < 0), x, -1.0)
    safe_far = jnp.where(near_zero, -1.0, x)
    value = jnp.where(near_zero, jnp.log(-jnp.expm1(safe_near)), jnp.log1p(-jnp.exp(safe_far)))
    return jnp.where(x == 0, -jnp.inf, value)


def _masked_logsumexp(values: jax.Array, masked: jax.Array) -> jax.Array:
    """logsumexp over entries where `masked` is False; -inf (zero gradient) when none remain."""
    kept = jnp.where(masked, -jnp.inf, values)
    peak = jax.lax.stop_gradient(jnp.max(kept, axis=-1, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = jnp.sum(jnp.exp(kept - peak), axis=-1)
    empty = total == 0  # `== 0`: a NaN entry must come out NaN, not -inf
    return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, total)) + peak[..., 0])


def _membership_mask(shape, ids: jax.Array) -> jax.Array:
    """Boolean [..., V] mask, True at `ids` [..., k]; a scatter, O(tokens·k) rather than O(tokens·k·V) compares."""
    flat_ids = ids.reshape(-1, ids.shape[-1])
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    return jnp.zeros((flat_ids.shape[0], shape[-1]), bool).at[rows, flat_ids].set(True).reshape(shape)


def topk_tail_bucket_from_log_probs(log_q, teacher: TopKTeacher, *, temperature=1.0):
    """`topk_tail_bucket` from the student's log-probabilities at `temperature` (log_softmax(logits / T))."""
    if teacher.lse is None:
        raise UserError("topk_tail_bucket needs the teacher's full-vocabulary logsumexp (TopKTeacher.lse)")
    log_p_k = teacher.values.astype(jnp.float32) / temperature - teacher.lse[..., None]
    log_p_tail = _log1mexp(jax.nn.logsumexp(log_p_k, axis=-1))
    # 1 − Σ p_k is only known to float32 rounding of Σ p_k ≈ 1 (a few ulps); a smaller tail is noise, and noise
    # against a student with no tail at all (k = V, or a masked vocabulary) would read as an infinite divergence.
    log_p_tail = jnp.where(log_p_tail < _TAIL_RESOLUTION, -jnp.inf, log_p_tail)
    log_q_k = _gather(log_q, teacher.indices)
    # The student's tail is a logsumexp over the ids *not* in the top-k (a scatter-built mask), not log(1 − Σ q_k):
    # the subtraction loses everything once the student's tail drops below float32 epsilon.
    in_top_k = _membership_mask(log_q.shape, teacher.indices)
    log_q_tail = _masked_logsumexp(log_q, in_top_k)
    log_p_buckets = jnp.concatenate([log_p_k, log_p_tail[..., None]], axis=-1)
    log_q_buckets = jnp.concatenate([log_q_k, log_q_tail[..., None]], axis=-1)
    return losses.kl_from_log_probs(log_p_buckets, log_q_buckets)


def sample_teacher_tokens(
    teacher_logits: jax.Array,
    num_samples: int,
    rng: jax.Array,
    temperature=1.0,
    *,
    proposal_temperature=None,
    stratified: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Draw `num_samples` ids per token from r = softmax(logits / proposal_temperature) (default: the target p itself).

    Returns (ids [N, s] int32, weights [N, s] float32) with weights = p(id) / (s · r(id)), p = softmax(logits / T).
    stratified=True draws one uniform per stratum [j/s, (j+1)/s) of the inverse CDF: each draw's stratum is fixed but
    the sum over strata still has expectation p, with lower variance than i.i.d. draws; False gives i.i.d. draws.
    Works row by row (inverse CDF), so a cache builder can run it on teacher-logit chunks.
    """
    log_p = losses.log_softmax(teacher_logits, temperature)
    log_r = log_p if proposal_temperature is None else losses.log_softmax(teacher_logits, proposal_temperature)
    cdf = jnp.cumsum(jnp.exp(log_r), axis=-1)
    lead = teacher_logits.shape[:-1]
    uniform = jax.random.uniform(rng, (*lead, num_samples), dtype=cdf.dtype)
    if stratified:
        uniform = (jnp.arange(num_samples, dtype=cdf.dtype) + uniform) / num_samples
    # Scaling by the row total keeps every draw strictly inside the CDF's range, so an id with r = 0 (a flat CDF step)
    # is never chosen even when float32 rounding leaves the total short of 1.
    targets = uniform * cdf[..., -1:]
    flat_cdf = cdf.reshape(-1, cdf.shape[-1])
    flat_targets = targets.reshape(-1, num_samples)
    ids = jax.vmap(lambda row, u: jnp.searchsorted(row, u, side="right"))(flat_cdf, flat_targets)
    ids = jnp.minimum(ids, cdf.shape[-1] - 1).reshape(*lead, num_samples).astype(jnp.int32)
    log_ratio = _gather(log_p, ids) - _gather(log_r, ids)
    weights = jnp.where(jnp.isfinite(log_ratio), jnp.exp(log_ratio), 0.0) / num_samples
    return ids, weights.astype(jnp.float32)


def sampled_kd_from_log_probs(log_q, teacher: SampledTeacher, *, temperature=1.0):
    """−Σ_j w_j log q(id_j): unbiased for the soft CE −Σ p log q; expected gradient = forward KL's gradient.
    `log_q`: the student's log-probabilities at `temperature`."""
    del temperature  # already in log_q
    log_q_at_ids = _gather(log_q, teacher.ids)
    weights = teacher.weights.astype(log_q_at_ids.dtype)
    return -jnp.sum(jnp.where(weights != 0, weights * log_q_at_ids, 0.0), axis=-1)


# The same treatments on student logits [..., V]: log_softmax(logits / T) first. The fused loss calls the
# `*_from_log_probs` forms above with the one log-softmax it shares with the CE and the metrics.


def _on_logits(from_log_probs, student_logits, teacher, temperature):
    return from_log_probs(losses.log_softmax(student_logits, temperature), teacher, temperature=temperature)


def topk_renormalized(student_logits, teacher: TopKTeacher, *, temperature=1.0):
    return _on_logits(topk_renormalized_from_log_probs, student_logits, teacher, temperature)


def topk_gathered(student_logits, teacher: TopKTeacher, *, temperature=1.0):
    return _on_logits(topk_gathered_from_log_probs, student_logits, teacher, temperature)


def topk_tail_bucket(student_logits, teacher: TopKTeacher, *, temperature=1.0):
    return _on_logits(topk_tail_bucket_from_log_probs, student_logits, teacher, temperature)


def sampled_kd(student_logits, teacher: SampledTeacher, *, temperature=1.0):
    return _on_logits(sampled_kd_from_log_probs, student_logits, teacher, temperature)
