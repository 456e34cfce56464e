"""Per-token divergences against float64 NumPy references, finite differences, limits and masked vocabularies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analogjax import losses
from analogjax.errors import UserError

# ---- float64 NumPy references, written straight from the definitions (mixtures in probability space) ----


def np_log_softmax(logits, temperature):
    x = np.asarray(logits, np.float64) / temperature
    peak = np.max(x, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return x - peak - np.log(np.sum(np.exp(x - peak), axis=-1, keepdims=True))


def np_kl(log_a, log_b):
    """KL(a‖b) from log-probabilities (so probabilities below float64's range still count), 0·log 0 = 0."""
    with np.errstate(invalid="ignore"):
        terms = np.where(np.isfinite(log_a), np.exp(log_a) * (log_a - log_b), 0.0)
    return terms.sum(-1)


def np_log_mix(log_a, log_b, weight_a):
    """log(w·a + (1 − w)·b), by NumPy's own logaddexp in float64."""
    return np.logaddexp(np.log(weight_a) + log_a, np.log1p(-weight_a) + log_b)


def np_divergence(name, student, teacher, temperature, **params):
    log_p = np_log_softmax(teacher, temperature)
    log_q = np_log_softmax(student, temperature)
    if name == "forward_kl":
        return np_kl(log_p, log_q)
    if name == "reverse_kl":
        return np_kl(log_q, log_p)
    if name == "jsd":
        beta = params["beta"]
        log_m = np_log_mix(log_p, log_q, beta)
        return beta * np_kl(log_p, log_m) + (1 - beta) * np_kl(log_q, log_m)
    if name == "skew_kl":
        return np_kl(log_p, np_log_mix(log_p, log_q, params["alpha"]))
    if name == "skew_reverse_kl":
        return np_kl(log_q, np_log_mix(log_q, log_p, params["alpha"]))
    if name == "tvd":
        return 0.5 * np.abs(np.exp(log_p) - np.exp(log_q)).sum(-1)
    if name == "soft_ce":
        with np.errstate(invalid="ignore"):
            return -np.where(np.isfinite(log_p), np.exp(log_p) * log_q, 0.0).sum(-1)
    raise ValueError(name)


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.6}),
    ("tvd", {}),
    ("soft_ce", {}),
]
TOKENS, VOCAB = 4, 11


@jax.jit
def all_divergences(student, teacher, temperature):
    return [losses.DIVERGENCES[name](student, teacher, temperature=temperature, **params) for name, params in CASES]


def random_logits(seed, scale, masked_fraction):
    """Student and teacher logits (exactly float32-representable) with a shared -inf mask, never a full row."""
    rng = np.random.default_rng(seed)
    student = (rng.standard_normal((TOKENS, VOCAB)) * scale).astype(np.float32)
    teacher = (rng.standard_normal((TOKENS, VOCAB)) * scale).astype(np.float32)
    mask = rng.random((TOKENS, VOCAB)) < masked_fraction
    mask[:, 0] = False
    student[mask] = -np.inf
    teacher[mask] = -np.inf
    return student, teacher


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 5.0, 1e2, 1e4]),
    temperature=st.sampled_from([0.5, 1.0, 2.5]),
    masked_fraction=st.sampled_from([0.0, 0.3]),
)
def test_divergences_match_float64_reference(seed, scale, temperature, masked_fraction):
    student, teacher = random_logits(seed, scale, masked_fraction)
    values = all_divergences(student, teacher, temperature)
    # float32 rounds x/T to ~6e-8 relative, so log-probabilities carry an absolute error proportional to |x|/T.
    atol = 2e-6 * (1.0 + scale / temperature)
    for (name, params), value in zip(CASES, values):
        assert value.shape == (TOKENS,) and value.dtype == jnp.float32
        assert np.all(np.isfinite(value)), (name, value)
        reference = np_divergence(name, student, teacher, temperature, **params)
        np.testing.assert_allclose(value, reference, rtol=1e-4, atol=atol, err_msg=f"{name} {params}")


def test_extreme_logits_are_stable():
    """|logits| = 1e4 with most mass on one entry: softmax must subtract the maximum (no overflow, no NaN)."""
    student = np.array([[1e4, -1e4, 9990.0, 0.0]], np.float32)
    teacher = np.array([[9995.0, 1e4, -1e4, 1e4 - 1.0]], np.float32)
    for (name, params), value in zip(CASES, all_divergences(student, teacher, 1.0)):
        reference = np_divergence(name, student, teacher, 1.0, **params)
        np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-3, err_msg=name)


def test_student_minus_inf_under_teacher_mass_is_inf_not_nan():
    student = np.array([[0.0, -np.inf, 1.0]], np.float32)
    teacher = np.array([[0.0, 2.0, -np.inf]], np.float32)
    values = dict(zip([name + str(params) for name, params in CASES], all_divergences(student, teacher, 1.0)))
    assert np.isposinf(values["forward_kl{}"]).all()
    assert np.isposinf(values["soft_ce{}"]).all()
    assert np.isposinf(values["reverse_kl{}"]).all()  # the student has mass where the teacher is -inf
    for key, value in values.items():
        assert not np.isnan(value).any(), key
        if key.startswith(("jsd", "skew", "tvd")):
            assert np.isfinite(value).all(), key  # mixtures keep every log finite


def np_total(name, student, teacher, temperature, params):
    return np_divergence(name, student, teacher, temperature, **params).sum()


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_gradients_match_finite_differences(temperature):
    student, teacher = random_logits(7, 2.0, 0.25)
    grads = jax.jit(
        lambda s, t: [
            jax.grad(lambda s_: losses.DIVERGENCES[n](s_, t, temperature=temperature, **p).sum())(s) for n, p in CASES
        ]
    )(student, teacher)
    finite = np.isfinite(student)
    step = 1e-6
    for (name, params), grad in zip(CASES, grads):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), name
        assert np.all(grad[~finite] == 0), f"{name}: masked entries must get zero gradient"
        numeric = np.zeros_like(grad, dtype=np.float64)
        base = student.astype(np.float64)
        for i, j in zip(*np.nonzero(finite)):
            plus, minus = base.copy(), base.copy()
            plus[i, j] += step
            minus[i, j] -= step
            numeric[i, j] = (
                np_total(name, plus, teacher, temperature, params) - np_total(name, minus, teacher, temperature, params)
            ) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-5, err_msg=name)


def test_forward_kl_gradient_is_q_minus_p_over_t():
    student, teacher = random_logits(3, 1.5, 0.0)
    temperature = 1.7
    grad = jax.grad(lambda s: losses.forward_kl(s, teacher, temperature=temperature).sum())(student)
    p = np.exp(np_log_softmax(teacher, temperature))
    q = np.exp(np_log_softmax(student, temperature))
    np.testing.assert_allclose(grad, (q - p) / temperature, atol=1e-6)


def test_jsd_ends_are_defined_as_kl_and_the_formula_vanishes_near_them():
    student, teacher = random_logits(11, 2.0, 0.2)
    forward = losses.forward_kl(student, teacher)
    reverse = losses.reverse_kl(student, teacher)
    np.testing.assert_array_equal(losses.jsd(student, teacher, beta=0.0), forward)
    np.testing.assert_array_equal(losses.jsd(student, teacher, beta=1.0), reverse)
    for beta in (1e-6, 1 - 1e-6):  # the generalized JSD → 0 at the ends: hence the switch at exactly 0 and 1
        assert np.all(np.asarray(losses.jsd(student, teacher, beta=beta)) < 1e-4 * np.asarray(forward + reverse) + 1e-6)


def test_skew_alpha_limits():
    student, teacher = random_logits(5, 2.0, 0.2)
    forward = np.asarray(losses.forward_kl(student, teacher))
    reverse = np.asarray(losses.reverse_kl(student, teacher))
    np.testing.assert_array_equal(losses.skew_kl(student, teacher, alpha=0.0), forward)
    np.testing.assert_array_equal(losses.skew_reverse_kl(student, teacher, alpha=0.0), reverse)
    np.testing.assert_allclose(losses.skew_kl(student, teacher, alpha=1e-6), forward, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(losses.skew_reverse_kl(student, teacher, alpha=1e-6), reverse, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(losses.skew_kl(student, teacher, alpha=1.0), 0.0)
    assert np.all(np.asarray(losses.skew_kl(student, teacher, alpha=0.999)) < 1e-2 * forward + 1e-6)


def test_soft_ce_is_forward_kl_plus_teacher_entropy():
    student, teacher = random_logits(13, 3.0, 0.3)
    p = np.exp(np_log_softmax(teacher, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0).sum(-1)
    expected = losses.forward_kl(student, teacher) + entropy
    np.testing.assert_allclose(losses.soft_ce(student, teacher), expected, rtol=1e-5)


def test_low_precision_inputs_compute_in_float32():
    student, teacher = random_logits(17, 3.0, 0.0)
    value = losses.jsd(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16))
    assert value.dtype == jnp.float32
    reference = np_divergence(
        "jsd",
        np.asarray(jnp.asarray(student, jnp.bfloat16), np.float32),
        np.asarray(jnp.asarray(teacher, jnp.bfloat16), np.float32),
        1.0,
        beta=0.5,
    )
    np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-6)


def test_cross_entropy_pick_and_argmax():
    student, _ = random_logits(19, 4.0, 0.3)
    targets = np.array([0, 3, 10, 5], np.int32) % VOCAB
    reference = -np.take_along_axis(np_log_softmax(student, 1.0), targets[:, None], -1)[:, 0]
    value = losses.cross_entropy(jnp.asarray(student, jnp.bfloat16).astype(jnp.float32), targets)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(losses.cross_entropy(student, targets), reference, rtol=1e-5)
    ties = np.array([[1.0, 3.0, 3.0, -np.inf], [-np.inf, 0.0, -1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(losses.argmax_last(ties), np.argmax(ties, -1))
    np.testing.assert_array_equal(losses.argmax_last(student), np.argmax(student, -1))


def test_registry_and_parameter_validation():
    from analogjax.objective import terms

    expected = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "soft_ce"}
    assert set(losses.DIVERGENCES) == expected
    # The registry lists exactly the public divergences (plus labels and hidden-state terms), one record each.
    assert {k for k, t in terms.TERMS.items() if t.family == terms.DIVERGENCE} == expected
    with pytest.raises(UserError, match="unknown divergence"):
        terms.resolve("kl", (), "logits")
    with pytest.raises(UserError, match="takes parameters"):
        terms.resolve("forward_kl", (("beta", 0.5),), "logits")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        terms.resolve("jsd", (("beta", 1.5),), "logits")
    with pytest.raises(UserError, match="static"):
        jax.jit(lambda b: losses.jsd(jnp.zeros((1, 3)), jnp.zeros((1, 3)), beta=b))(0.5)


def test_a_nan_teacher_poisons_every_divergence():
    """A teacher gone NaN must show up in the loss (and so in the non-finite guard), never count as zero mass."""
    student = jnp.asarray([[0.5, -1.0, 2.0, 0.0]])
    teacher = jnp.asarray([[0.1, jnp.nan, 1.0, -2.0]])
    for name, fn in losses.DIVERGENCES.items():
        assert np.isnan(np.asarray(fn(student, teacher))).all(), name
