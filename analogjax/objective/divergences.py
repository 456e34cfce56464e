"""Per-token divergences between a teacher and a student distribution over the vocabulary.

Conventions shared by every function here:
- p = softmax(teacher_logits / T) is the teacher, q = softmax(student_logits / T) the student.
- Inputs are logits of shape [..., V]; outputs have the leading shape [...] (one value per token). No T² factor and no
  masking: the objective composition multiplies by weights and folds T² into its coefficients.
- Arithmetic is float32 whatever the input dtype (float64 inputs stay float64, which the tests use for references).
- log-softmax subtracts the row maximum, so |logits| ~ 1e4 is fine.
- -inf logits mean "masked vocabulary entry": the probability is exactly 0 and 0·log 0 counts as 0, so masking the same
  entries in both models changes nothing and gives finite values and finite gradients. If the student puts -inf where
  the teacher has mass, forward KL and soft CE are +inf (log 0 under mass); likewise reverse KL is +inf where the
  teacher is -inf and the student has mass. That is the mathematically right value, never NaN; the gradient of an
  infinite value is not meaningful. JSD, skew KL (alpha in (0, 1]) and TVD stay finite in every case.

Each divergence is written on log-probabilities (`*_from_log_probs`) so that a caller computing several terms on the
same logits (the fused loss) normalises once; the public functions wrap them. Which of them the objective offers, with
which parameters, is decided by the term registry (objective/terms.py), the one list of term kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from analogjax.errors import UserError


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 for bf16/f16/f32 (and integers); float64 stays float64 so references can run in double precision."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def log_softmax(logits: jax.Array, temperature=1.0) -> jax.Array:
    """log softmax(logits / T) in float32; -inf entries stay -inf and get zero gradient."""
    x = logits.astype(compute_dtype(logits)) / temperature
    return jax.nn.log_softmax(x, axis=-1)


def safe_logaddexp(x: jax.Array, y: jax.Array) -> jax.Array:
    """log(e^x + e^y), -inf with zero gradient when both are -inf (where jnp.logaddexp's gradient is NaN)."""
    peak = jax.lax.stop_gradient(jnp.maximum(x, y))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    total = jnp.exp(x - peak) + jnp.exp(y - peak)
    empty = total == 0  # `== 0`, not `<= 0`: a NaN operand must come out NaN, not -inf
    return jnp.where(empty, -jnp.inf, peak + jnp.log(jnp.where(empty, 1.0, total)))


def kl_from_log_probs(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """KL(a‖b) = Σ a (log a − log b) over the last axis, with 0·log 0 = 0 and +inf where b = 0 < a.

    The logs are replaced by 0 where a = 0 before subtracting, so neither the value nor the gradient sees -inf − -inf.
    """
    a = jnp.exp(log_a)
    present = a != 0  # not `a > 0`: a NaN probability must poison the value, never pass as zero mass
    safe_log_a = jnp.where(present, log_a, 0.0)
    safe_log_b = jnp.where(present, log_b, 0.0)
    return jnp.sum(jnp.where(present, a * (safe_log_a - safe_log_b), 0.0), axis=-1)


def _log_mixture(log_a: jax.Array, log_b: jax.Array, weight_a: float) -> jax.Array:
    """log(w·a + (1 − w)·b) for 0 < w < 1, mixed in probability space."""
    return safe_logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, jax.core.Tracer):
        raise UserError(f"{name} must be a static Python number (it selects the formula), got a traced value")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} must lie in [0, 1], got {value}")
    return value


# ---- divergences on log-probabilities: (log_p teacher, log_q student) -> per-token value ----


def forward_kl_from_log_probs(log_p, log_q):
    return kl_from_log_probs(log_p, log_q)


def reverse_kl_from_log_probs(log_p, log_q):
    return kl_from_log_probs(log_q, log_p)


def jsd_from_log_probs(log_p, log_q, beta=0.5):
    beta = _check_unit_interval("jsd beta", beta)
    # The generalized JSD tends to 0 at both ends; TRL defines the ends as forward and reverse KL, and so do we.
    if beta == 0.0:
        return forward_kl_from_log_probs(log_p, log_q)
    if beta == 1.0:
        return reverse_kl_from_log_probs(log_p, log_q)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * kl_from_log_probs(log_p, log_m) + (1.0 - beta) * kl_from_log_probs(log_q, log_m)


def _skew_kl(log_a, log_b, alpha, name):
    """KL(a‖alpha·a + (1−alpha)·b): alpha=0 is plain KL(a‖b), alpha=1 is 0."""
    alpha = _check_unit_interval(f"{name} alpha", alpha)
    if alpha == 0.0:
        return kl_from_log_probs(log_a, log_b)
    if alpha == 1.0:
        return jnp.zeros(log_a.shape[:-1], log_a.dtype)
    return kl_from_log_probs(log_a, _log_mixture(log_a, log_b, alpha))


def skew_kl_from_log_probs(log_p, log_q, alpha=0.1):
    return _skew_kl(log_p, log_q, alpha, "skew_kl")


def skew_reverse_kl_from_log_probs(log_p, log_q, alpha=0.1):
    return _skew_kl(log_q, log_p, alpha, "skew_reverse_kl")


def tvd_from_log_probs(log_p, log_q):
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def soft_ce_from_log_probs(log_p, log_q):
    """−Σ p log q: same gradient as forward KL, value larger by the teacher entropy."""
    p = jnp.exp(log_p)
    present = p != 0  # NaN propagates (see kl_from_log_probs)
    return -jnp.sum(jnp.where(present, p * jnp.where(present, log_q, 0.0), 0.0), axis=-1)


# ---- the public per-token divergences on logits ----


def _on_logits(from_log_probs: Callable[..., jax.Array], doc: str) -> Callable[..., jax.Array]:
    def divergence(student_logits, teacher_logits, *, temperature=1.0, **params):
        log_q = log_softmax(student_logits, temperature)
        log_p = log_softmax(teacher_logits, temperature)
        return from_log_probs(log_p, log_q, **params)

    divergence.__name__ = from_log_probs.__name__.removesuffix("_from_log_probs")
    divergence.__doc__ = doc
    return divergence


forward_kl = _on_logits(forward_kl_from_log_probs, "KL(p‖q) = Σ p (log p − log q), per token.")
reverse_kl = _on_logits(reverse_kl_from_log_probs, "KL(q‖p) = Σ q (log q − log p), per token (mode-seeking).")
jsd = _on_logits(
    jsd_from_log_probs,
    """Generalized Jensen-Shannon divergence (GKD, arXiv 2306.13649), per token.

    m = beta·p + (1 − beta)·q mixed in probability space; value beta·KL(p‖m) + (1 − beta)·KL(q‖m).
    This tends to 0 as beta → 0 or beta → 1, so, following TRL, beta = 0 is *defined* as forward KL(p‖q) and beta = 1
    as reverse KL(q‖p): the formula switches at exactly 0 and 1 (beta is a static Python float in [0, 1]).""",
)
skew_kl = _on_logits(
    skew_kl_from_log_probs,
    "Skew KL (DistiLLM, arXiv 2402.03898): KL(p‖alpha·p + (1 − alpha)·q); alpha = 0 is forward KL, alpha = 1 is 0.",
)
skew_reverse_kl = _on_logits(
    skew_reverse_kl_from_log_probs,
    "Skew reverse KL (DistiLLM): KL(q‖alpha·q + (1 − alpha)·p); alpha = 0 is reverse KL, alpha = 1 is 0.",
)
tvd = _on_logits(tvd_from_log_probs, "Total variation distance ½ Σ |p − q|, per token.")
soft_ce = _on_logits(soft_ce_from_log_probs, "Soft-target cross-entropy −Σ p log q, per token.")

DIVERGENCES: dict[str, Callable[..., jax.Array]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "soft_ce": soft_ce,
}


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Hard-label cross-entropy −log softmax(logits)[target] per token, float32.

    The target logit is picked with a compare-and-sum over the vocabulary instead of a gather, so a vocabulary sharded
    over the tensor mesh axis reduces shard-locally and all-reduces a scalar per token.
    """
    return -pick(log_softmax(logits), targets)


def pick(values: jax.Array, index: jax.Array) -> jax.Array:
    """values[..., index] along the last axis as a masked sum (shard-friendly; -inf elsewhere does not leak)."""
    columns = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    return jnp.sum(jnp.where(columns == index[..., None], values, 0.0), axis=-1)


def argmax_last(values: jax.Array) -> jax.Array:
    """First index of the maximum along the last axis, as two plain reductions (shard-friendly, like jnp.argmax)."""
    columns = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    is_max = values == jnp.max(values, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, columns, values.shape[-1]), axis=-1)
