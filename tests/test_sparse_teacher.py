"""Top-k treatments against float64 references, the sampled estimator's unbiased gradient, and sparse fused losses."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from analogjax import losses
from analogjax.errors import UserError
from analogjax.objective import sparse, terms
from analogjax.objective.fused import fused_distill_loss, plain_distill_loss
from analogjax.objective.signal import TeacherSignal

# The top-k treatments, as the sparse module defines them (the registry reaches them by these names).
TOPK_FUNCTIONS = {name: getattr(sparse, name) for name in terms.SPARSE_TERMS if name.startswith("topk")}


def np_log_softmax(x, temperature=1.0):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(log_a, log_b):
    return np.where(np.isfinite(log_a), np.exp(log_a) * (log_a - log_b), 0.0).sum(-1)


def np_logsumexp(x):
    peak = x.max(-1, keepdims=True)
    return (peak + np.log(np.exp(x - peak).sum(-1, keepdims=True)))[..., 0]


def np_topk_references(student, teacher, k, temperature):
    ids = np.argsort(-np.asarray(teacher, np.float64), axis=-1, kind="stable")[:, :k]
    take = lambda x: np.take_along_axis(x, ids, -1)  # noqa: E731
    log_p_k = np_log_softmax(take(teacher), temperature)
    renormalized = np_kl(log_p_k, np_log_softmax(take(student), temperature))
    log_q_full, log_p_full = np_log_softmax(student, temperature), np_log_softmax(teacher, temperature)
    gathered = np_kl(log_p_k, take(log_q_full))
    outside = np.ones(student.shape, bool)
    np.put_along_axis(outside, ids, False, -1)
    tail = lambda log_full: np_logsumexp(np.where(outside, log_full, -np.inf))  # noqa: E731  exact in float64
    with np.errstate(divide="ignore"):
        log_p_buckets = np.concatenate([take(log_p_full), tail(log_p_full)[:, None]], -1)
        log_q_buckets = np.concatenate([take(log_q_full), tail(log_q_full)[:, None]], -1)
    return {
        "topk_renormalized": renormalized,
        "topk_gathered": gathered,
        "topk_tail_bucket": np_kl(log_p_buckets, log_q_buckets),
    }


def random_pair(seed, tokens=5, vocab=13, scale=2.0):
    rng = np.random.default_rng(seed)
    return (
        (rng.standard_normal((tokens, vocab)) * scale).astype(np.float32),
        (rng.standard_normal((tokens, vocab)) * scale).astype(np.float32),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_treatments_match_float64_reference(temperature):
    student, teacher = random_pair(1)
    top = sparse.top_k_teacher(teacher, 4, temperature=temperature)
    np.testing.assert_allclose(top.lse, np_logsumexp(np.asarray(teacher, np.float64) / temperature), rtol=1e-6)
    assert top.indices.dtype == jnp.int32 and top.values.shape == (5, 4)
    references = np_topk_references(student, teacher, 4, temperature)

    @jax.jit
    def values_and_grads(s, top):
        return {
            name: jax.value_and_grad(lambda s_: fn(s_, top, temperature=temperature).sum())(s)[1:]
            + (fn(s, top, temperature=temperature),)
            for name, fn in TOPK_FUNCTIONS.items()
        }

    for name, (grad, value) in values_and_grads(student, top).items():
        np.testing.assert_allclose(value, references[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.all(np.isfinite(grad)), name


def test_tail_bucket_survives_a_student_tail_below_float32_epsilon():
    """log(1 − Σ q_k) would be log 0 here; the masked logsumexp keeps the student's tail (~1e-34) exact."""
    _, teacher = random_pair(2)
    top = sparse.top_k_teacher(teacher, 4)
    student = np.full(teacher.shape, -40.0, np.float32)
    np.put_along_axis(student, np.asarray(top.indices), 40.0, -1)
    value = sparse.topk_tail_bucket(student, top)
    reference = np_topk_references(student, teacher, 4, 1.0)["topk_tail_bucket"]
    assert np.all(np.isfinite(value))
    np.testing.assert_allclose(value, reference, rtol=1e-5)


def test_tail_bucket_with_every_id_kept_is_forward_kl_and_bf16_values_stay_finite():
    student, teacher = random_pair(3, vocab=7)
    full = sparse.top_k_teacher(teacher, 7)
    np.testing.assert_allclose(
        sparse.topk_tail_bucket(student, full), losses.forward_kl(student, teacher), rtol=1e-5, atol=1e-6
    )
    grad = jax.grad(lambda s: sparse.topk_tail_bucket(s, full).sum())(student)
    assert np.all(np.isfinite(grad))
    # bf16-rounded cached values can make Σ p_k exceed 1 by an ulp: the teacher tail clamps to 0, never NaN.
    coarse = sparse.top_k_teacher(teacher, 6, values_dtype=jnp.bfloat16)
    assert np.all(np.isfinite(sparse.topk_tail_bucket(student, coarse)))
    with pytest.raises(UserError, match="logsumexp"):
        sparse.topk_tail_bucket(student, coarse._replace(lse=None))


def test_sampling_respects_support_and_weights():
    _, teacher = random_pair(4, tokens=3, vocab=9)
    teacher[:, 2] = -np.inf  # a masked id must never be drawn
    ids, weights = sparse.sample_teacher_tokens(teacher, 64, jax.random.key(0), temperature=1.5)
    assert ids.shape == (3, 64) and ids.dtype == jnp.int32 and weights.dtype == jnp.float32
    assert np.all((np.asarray(ids) >= 0) & (np.asarray(ids) < 9)) and not np.any(np.asarray(ids) == 2)
    np.testing.assert_allclose(weights, 1 / 64, rtol=1e-5)  # proposal = target: plain Monte Carlo
    ids, weights = sparse.sample_teacher_tokens(
        teacher, 64, jax.random.key(1), temperature=1.5, proposal_temperature=4.0, stratified=False
    )
    log_p, log_r = np_log_softmax(teacher, 1.5), np_log_softmax(teacher, 4.0)
    with np.errstate(invalid="ignore"):  # -inf − -inf at the masked id, which is never drawn
        expected = np.exp(np.take_along_axis(log_p - log_r, np.asarray(ids), -1)) / 64
    np.testing.assert_allclose(weights, expected, rtol=1e-5)


@pytest.mark.parametrize("stratified,proposal_temperature", [(True, None), (False, None), (True, 3.0)])
def test_sampled_gradient_is_unbiased_for_forward_kl(stratified, proposal_temperature):
    student, teacher = random_pair(5, tokens=2, vocab=6, scale=1.5)
    temperature, draws = 1.3, 4000

    def one_draw(key):
        ids, weights = sparse.sample_teacher_tokens(
            teacher, 4, key, temperature, proposal_temperature=proposal_temperature, stratified=stratified
        )
        estimate = lambda s: sparse.sampled_kd(s, sparse.SampledTeacher(ids, weights), temperature=temperature)  # noqa
        return jax.grad(lambda s: estimate(s).sum())(student), estimate(student)

    grads, values = jax.jit(jax.vmap(one_draw))(jax.random.split(jax.random.key(42), draws))
    exact = jax.grad(lambda s: losses.forward_kl(s, teacher, temperature=temperature).sum())(student)
    # Unbiased: the mean is within a few standard errors of the exact gradient, for every logit.
    standard_error = np.asarray(grads).std(0) / np.sqrt(draws)
    assert np.all(np.abs(np.asarray(grads).mean(0) - exact) <= 5 * standard_error + 1e-6)
    soft_ce = np.asarray(losses.soft_ce(student, teacher, temperature=temperature))
    assert np.all(np.abs(np.asarray(values).mean(0) - soft_ce) <= 5 * np.asarray(values).std(0) / np.sqrt(draws))


def vocab_sized_collectives(hlo_text, vocab):
    """Gathers/permutes whose result shapes have a V or V/4 (one tensor shard) dimension."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"= (.*?) (all-gather|all-to-all|collective-permute)(-start)?\(", line)
        dims = (
            {int(d) for shape in re.findall(r"\[([\d,]*)\]", match.group(1)) for d in shape.split(",") if d}
            if match
            else set()
        )
        if dims & {vocab, vocab // 4}:
            found.append(line.strip()[:200])
    return found


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_sparse_teachers_in_the_fused_path_sharded(kind):
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    tokens, width, vocab = 32, 16, 200
    keys = jax.random.split(jax.random.key(7), 5)
    teacher_logits = 2.0 * jax.random.normal(keys[0], (tokens, vocab))
    if kind == "topk":
        teacher = sparse.top_k_teacher(teacher_logits, 8, temperature=1.5)
        terms = tuple((name, ()) for name in TOPK_FUNCTIONS)
    else:
        teacher = sparse.SampledTeacher(*sparse.sample_teacher_tokens(teacher_logits, 6, keys[1], 1.5))
        terms = (("sampled_kd", ()),)
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    teacher = TeacherSignal.from_rows(jax.tree.map(lambda x: shard(x, P("data")), teacher))
    hidden = shard(jax.random.normal(keys[2], (tokens, width)), P("data", None))
    head = shard(0.5 * jax.random.normal(keys[3], (width, vocab)), P(None, "tensor"))
    targets = shard(jax.random.randint(keys[4], (tokens,), 0, vocab), P("data"))
    weights = shard((jnp.arange(tokens) % 7 != 0).astype(jnp.float32), P("data"))

    def run(loss_fn):
        def objective(h, w, kd_weights):
            out = loss_fn(
                h,
                w,
                teacher,
                targets,
                weights,
                kd_terms=terms,
                kd_weights=kd_weights,
                ce_weight=0.2,
                temperature=1.5,
                chunk_size=8,
            )
            return out["loss"], out

        return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))

    fused_fn = run(fused_distill_loss).lower(hidden, head, jnp.ones(len(terms))).compile()
    assert vocab_sized_collectives(fused_fn.as_text(), vocab) == []
    plain_fn = run(plain_distill_loss)
    for kd_weights in list(np.eye(len(terms), dtype=np.float32)):
        (fused_loss, fused_metrics), fused_grads = fused_fn(hidden, head, jnp.asarray(kd_weights))
        (plain_loss, plain_metrics), plain_grads = plain_fn(hidden, head, jnp.asarray(kd_weights))
        assert set(fused_metrics) == set(plain_metrics)
        assert ("agreement" in fused_metrics) == (kind == "topk") and "kl" not in fused_metrics
        np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-5)
        for name in plain_metrics:
            np.testing.assert_allclose(fused_metrics[name], plain_metrics[name], rtol=1e-5, err_msg=name)
        for fused_grad, plain_grad in zip(fused_grads, plain_grads):
            error = np.linalg.norm(np.asarray(fused_grad - plain_grad)) / np.linalg.norm(np.asarray(plain_grad))
            assert error < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_fused_topk_objective_matches_float64_reference(temperature):
    """The fused loss with a top-k teacher (every treatment, plus CE on the labels) against float64 NumPy: at T = 1
    the CE shares the treatments' log-softmax, at T ≠ 1 it has its own at T = 1."""
    rng = np.random.default_rng(3)
    tokens, width, vocab, k = 12, 8, 40, 6
    hidden = rng.standard_normal((tokens, width)).astype(np.float32)
    head = (0.7 * rng.standard_normal((width, vocab))).astype(np.float32)
    teacher_logits = (2.0 * rng.standard_normal((tokens, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, tokens).astype(np.int32)
    weights = (np.arange(tokens) % 5 != 0).astype(np.float32)
    teacher = TeacherSignal.from_rows(sparse.top_k_teacher(jnp.asarray(teacher_logits), k, temperature=temperature))
    student_logits = hidden.astype(np.float64) @ head.astype(np.float64)
    references = np_topk_references(student_logits, teacher_logits, k, temperature)
    ce = -np.take_along_axis(np_log_softmax(student_logits), targets[:, None], -1)[:, 0]
    for name in TOPK_FUNCTIONS:
        out = fused_distill_loss(
            jnp.asarray(hidden),
            jnp.asarray(head),
            teacher,
            jnp.asarray(targets),
            jnp.asarray(weights),
            kd_terms=((name, ()),),
            kd_weights=jnp.ones(1),
            ce_weight=0.3,
            temperature=temperature,
            chunk_size=5,
        )
        expected = np.sum(weights * (references[name] + 0.3 * ce))
        np.testing.assert_allclose(float(out["loss"]), expected, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(float(out["ce"]), np.sum(weights * ce), rtol=2e-5, err_msg=name)


def test_sparse_term_validation():
    student, teacher = random_pair(6)
    top = TeacherSignal.from_rows(sparse.top_k_teacher(teacher, 3))
    sampled = TeacherSignal.from_rows(
        sparse.SampledTeacher(*sparse.sample_teacher_tokens(teacher, 2, jax.random.key(0)))
    )
    head = jnp.eye(13)
    common = dict(kd_weights=jnp.ones(1), ce_weight=0.0, temperature=1.0)
    with pytest.raises(UserError, match="does not apply"):
        fused_distill_loss(
            student, head, top, jnp.zeros(5, jnp.int32), jnp.ones(5), kd_terms=(("forward_kl", ()),), **common
        )
    with pytest.raises(UserError, match="does not apply"):
        fused_distill_loss(
            student, head, sampled, jnp.zeros(5, jnp.int32), jnp.ones(5), kd_terms=(("topk_gathered", ()),), **common
        )
    with pytest.raises(UserError, match="no parameters"):
        terms.resolve("topk_gathered", (("alpha", 0.1),), "topk")
