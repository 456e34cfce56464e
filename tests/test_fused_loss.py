"""The fused (chunked, custom-VJP) loss equals the plain one, sharded over data × tensor; it never gathers the vocab."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from analogjax.errors import UserError
from analogjax.objective.fused import chunk_layout, fused_distill_loss, named_kd_terms, plain_distill_loss
from analogjax.objective.signal import TeacherSignal

ALL_TERMS = (
    ("forward_kl", ()),
    ("reverse_kl", ()),
    ("jsd", (("beta", 0.5),)),
    ("jsd", (("beta", 0.0),)),
    ("skew_kl", (("alpha", 0.1),)),
    ("skew_reverse_kl", (("alpha", 0.1),)),
    ("tvd", ()),
    ("soft_ce", ()),
)
N, D, DT, V = 48, 16, 12, 400  # V/4 = 100 matches no other dimension, so vocab-sized collectives are recognisable
CHUNK = 8  # below D, so d head is accumulated in two column blocks by the inner loop


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def make_inputs(n=N, d=D, dt=DT, student_vocab=V, teacher_vocab=V, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    hidden = jax.random.normal(keys[0], (n, d), dtype)
    head = (0.6 * jax.random.normal(keys[1], (d, student_vocab))).astype(dtype)
    teacher = TeacherSignal.from_hidden(
        jax.random.normal(keys[2], (n, dt)), 0.8 * jax.random.normal(keys[3], (dt, teacher_vocab))
    )
    targets = jax.random.randint(keys[4], (n,), 0, min(student_vocab, teacher_vocab) - 8)
    weights = (jax.random.uniform(keys[5], (n,)) > 0.25).astype(jnp.float32) * 1.5
    return hidden, head, teacher, targets, weights


def loss_and_grads(loss_fn, kd_terms, vocab_size=None, chunk_size=CHUNK):
    def objective(hidden, head, teacher, targets, weights, kd_weights, temperature):
        out = loss_fn(
            hidden,
            head,
            teacher,
            targets,
            weights,
            kd_terms=kd_terms,
            kd_weights=kd_weights,
            ce_weight=0.3,
            temperature=temperature,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
        )
        return out["loss"], out

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def assert_same(fused, plain, tolerance=1e-5):
    (fused_loss, fused_metrics), fused_grads = fused
    (plain_loss, plain_metrics), plain_grads = plain
    assert set(fused_metrics) == set(plain_metrics)
    assert relative_error(fused_loss, plain_loss) < tolerance
    for name in plain_metrics:
        assert relative_error(fused_metrics[name], plain_metrics[name]) < tolerance, name
    for which, fused_grad, plain_grad in zip(("d hidden", "d head"), fused_grads, plain_grads):
        assert fused_grad.dtype == plain_grad.dtype
        assert np.all(np.isfinite(np.asarray(fused_grad, np.float32))), which
        assert relative_error(fused_grad, plain_grad) < tolerance, which


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-to-all|collective-permute)(-start)?\(")


def collective_dims(line):
    """The dimensions of every result shape of a gather/permute instruction (empty for other lines)."""
    match = COLLECTIVE.search(line)
    if not match:
        return set()
    return {int(d) for shape in re.findall(r"\[([\d,]*)\]", match.group(1)) for d in shape.split(",") if d}


def vocab_sized_collectives(hlo_text, vocab):
    """Collectives that move whole vocabulary rows: results with a V or V/4 (one tensor shard) dimension."""
    return [line.strip()[:200] for line in hlo_text.splitlines() if collective_dims(line) & {vocab, vocab // 4}]


@pytest.mark.parametrize("form", ["teacher_head", "teacher_logits"])
def test_fused_equals_plain_sharded_for_every_divergence(mesh, form):
    hidden, head, teacher, targets, weights = make_inputs()
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    hidden, targets, weights = shard(hidden, P("data", None)), shard(targets, P("data")), shard(weights, P("data"))
    head = shard(head, P(None, "tensor"))
    if form == "teacher_head":
        teacher = TeacherSignal.from_hidden(
            shard(teacher.rows, P("data", None)), shard(teacher.head, P(None, "tensor"))
        )
        vocab_size = None
    else:  # a bring-your-own teacher's logits; also exercise a padded vocabulary (the last 8 columns unused)
        teacher = TeacherSignal.from_logits(shard(teacher.rows @ teacher.head, P("data", "tensor")))
        vocab_size = V - 8
    temperature = jnp.float32(2.0)
    args = (hidden, head, teacher, targets, weights)
    fused_fn = loss_and_grads(fused_distill_loss, ALL_TERMS, vocab_size)
    plain_fn = loss_and_grads(plain_distill_loss, ALL_TERMS, vocab_size)
    compiled = fused_fn.lower(*args, jnp.zeros(len(ALL_TERMS)), temperature).compile()
    hlo = compiled.as_text()
    assert vocab_sized_collectives(hlo, V) == []
    # Masking padded columns (instead of slicing) keeps the layout: no data moves between vocab shards at all.
    assert not re.search(r"\b(all-gather|collective-permute|all-to-all)(-start)?\(", hlo)

    mixed = np.linspace(0.2, 1.0, len(ALL_TERMS), dtype=np.float32)
    one_hots = list(np.eye(len(ALL_TERMS), dtype=np.float32)) + [mixed]
    for kd_weights in one_hots:
        fused = compiled(*args, jnp.asarray(kd_weights), temperature)
        plain = plain_fn(*args, jnp.asarray(kd_weights), temperature)
        assert_same(fused, plain)
        assert fused[1][1].sharding.is_equivalent_to(head.sharding, 2), "d head must stay vocab-sharded"


def test_fused_equals_plain_under_fsdp():
    """data × fsdp × tensor, head sharded (fsdp, tensor) like the student rules: equal; vocab rows never gathered."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    hidden, head, teacher, targets, weights = make_inputs(seed=4)
    batch = ("data", "fsdp")
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = (
        shard(hidden, P(batch, None)),
        shard(head, P("fsdp", "tensor")),
        TeacherSignal.from_hidden(
            shard(teacher.rows, P(batch, None)), shard(teacher.head, P(("fsdp", "data"), "tensor"))
        ),
        shard(targets, P(batch)),
        shard(weights, P(batch)),
        jnp.array([1.0, 0.5]),
        jnp.float32(1.5),
    )
    terms = (("forward_kl", ()), ("jsd", (("beta", 0.5),)))
    compiled = loss_and_grads(fused_distill_loss, terms).lower(*args).compile()
    for line in compiled.as_text().splitlines():  # the vocabulary dimension itself is never gathered
        assert V not in collective_dims(line), line
    assert_same(compiled(*args), loss_and_grads(plain_distill_loss, terms)(*args))


def test_padded_vocabularies_equal_the_shared_real_vocabulary():
    """Qwen-style padding: both paths on padded heads equal the plain loss on heads cut to the real vocabulary."""
    real = 90
    # Equal padded widths are covered by the sharded logits test; here the teacher is sliced, then -inf padded.
    both_sides = (("reverse_kl", ()), ("jsd", (("beta", 0.5),)))  # terms that read -inf on both sides
    for student_vocab, teacher_vocab, terms in [(96, 104, both_sides), (104, 96, (("forward_kl", ()),))]:
        hidden, head, teacher, targets, weights = make_inputs(
            n=20, student_vocab=student_vocab, teacher_vocab=teacher_vocab, seed=3
        )
        cut_teacher = TeacherSignal.from_hidden(teacher.rows, teacher.head[:, :real])
        kd_weights = jnp.linspace(0.5, 1.5, len(terms))
        (reference_loss, reference_metrics), (reference_dh, reference_dw) = loss_and_grads(plain_distill_loss, terms)(
            hidden, head[:, :real], cut_teacher, targets, weights, kd_weights, 1.5
        )
        for loss_fn in (fused_distill_loss, plain_distill_loss):
            (loss, metrics), (dh, dw) = loss_and_grads(loss_fn, terms, vocab_size=real, chunk_size=8)(
                hidden, head, teacher, targets, weights, kd_weights, 1.5
            )
            assert relative_error(loss, reference_loss) < 1e-5
            for name in reference_metrics:
                assert relative_error(metrics[name], reference_metrics[name]) < 1e-5, name
            assert relative_error(dh, reference_dh) < 1e-5
            assert relative_error(dw[:, :real], reference_dw) < 1e-5
            assert np.all(np.asarray(dw[:, real:]) == 0), "padded columns must get no gradient"


def test_uneven_token_count_static_temperature_and_value_only_path():
    hidden, head, teacher, targets, weights = make_inputs(n=37, student_vocab=64, teacher_vocab=64, seed=5)
    assert chunk_layout(37, 8) == (5, 8, 40)  # 37 is prime: pad to 40 rather than chunks of one token
    terms = (("forward_kl", ()), ("jsd", (("beta", 0.3),)))
    kd_weights = jnp.array([0.7, 1.3])
    fused = loss_and_grads(fused_distill_loss, terms, chunk_size=8)(
        hidden, head, teacher, targets, weights, kd_weights, 1.0
    )
    plain = loss_and_grads(plain_distill_loss, terms)(hidden, head, teacher, targets, weights, kd_weights, 1.0)
    assert_same(fused, plain)
    # Without differentiation the custom VJP's primal runs a loop that computes no gradients; same values.
    value_only = jax.jit(
        lambda *a: fused_distill_loss(
            *a, kd_terms=terms, kd_weights=kd_weights, ce_weight=0.3, temperature=1.0, chunk_size=8
        )
    )(hidden, head, teacher, targets, weights)
    for name, value in value_only.items():
        expected = plain[0][0] if name == "loss" else plain[0][1][name]
        assert relative_error(value, expected) < 1e-5, name


def test_bfloat16_inputs_keep_dtypes_and_stay_close():
    hidden, head, teacher, targets, weights = make_inputs(
        n=32, student_vocab=64, teacher_vocab=64, seed=9, dtype=jnp.bfloat16
    )
    terms = (("reverse_kl", ()),)
    args = (hidden, head, teacher, targets, weights, jnp.ones(1), 1.0)
    (fused_loss, _), (dh, dw) = loss_and_grads(fused_distill_loss, terms, chunk_size=8)(*args)
    (plain_loss, _), (plain_dh, plain_dw) = loss_and_grads(plain_distill_loss, terms)(*args)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16 and fused_loss.dtype == jnp.float32
    assert relative_error(fused_loss, plain_loss) < 1e-5  # float32 inside: only summation order differs
    assert relative_error(dh, plain_dh) < 1e-2 and relative_error(dw, plain_dw) < 1e-2  # bf16 rounding of grads


def test_bfloat16_hidden_with_a_float32_master_head_runs_the_head_in_bfloat16():
    # The train step's case: bf16 hidden states, the float32 parameter as head. The products must run in bf16 with
    # float32 accumulation (as the model's own logits do), not promote the hidden states to float32.
    hidden, head, teacher, targets, weights = make_inputs(n=64, seed=13, dtype=jnp.bfloat16)
    head = head.astype(jnp.float32) + 1e-3  # a master copy with bits bf16 cannot hold
    terms = (("forward_kl", ()),)
    args = (hidden, head, teacher, targets, weights, jnp.ones(1), 1.0)
    fused = loss_and_grads(fused_distill_loss, terms, chunk_size=16)
    (loss, _), (dh, dw) = fused(*args)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    # the same objective on a head rounded to bf16 first: the cast is the only difference from it
    (rounded_loss, _), (_, rounded_dw) = fused(hidden, head.astype(jnp.bfloat16), *args[2:])
    assert relative_error(loss, rounded_loss) < 1e-6
    assert relative_error(dw, rounded_dw.astype(jnp.float32)) < 1e-2
    (plain_loss, _), (_, plain_dw) = loss_and_grads(plain_distill_loss, terms)(*args)
    assert relative_error(loss, plain_loss) < 1e-5 and relative_error(dw, plain_dw) < 1e-2
    hlo = jax.jit(fused).lower(*args).as_text()
    products = [line.split(":")[-1] for line in hlo.splitlines() if "dot_general" in line]
    student_products = [p for p in products if "x12x" not in p]  # the teacher (D = 12) has float32 rows here
    assert len(student_products) == 3, products  # logits, d hidden, d head
    assert all("f32" not in p.split("->")[0] for p in student_products), student_products


def test_metrics_match_numpy_definitions():
    hidden, head, teacher, targets, weights = make_inputs(n=24, student_vocab=32, teacher_vocab=32, seed=11)
    out = jax.jit(
        lambda *a: fused_distill_loss(
            *a,
            kd_terms=(("forward_kl", ()),),
            kd_weights=jnp.array([2.0]),
            ce_weight=0.5,
            temperature=3.0,
            chunk_size=8,
        )
    )(hidden, head, teacher, targets, weights)
    s = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    t = np.asarray(teacher.rows, np.float64) @ np.asarray(teacher.head, np.float64)
    w, y = np.asarray(weights, np.float64), np.asarray(targets)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl = lambda lp, lq: (np.exp(lp) * (lp - lq)).sum(-1)  # noqa: E731
    ce = -np.take_along_axis(log_softmax(s), y[:, None], -1)[:, 0]
    kd = kl(log_softmax(t / 3.0), log_softmax(s / 3.0))
    expected = {
        "ce": (w * ce).sum(),
        "teacher_ce": (w * -np.take_along_axis(log_softmax(t), y[:, None], -1)[:, 0]).sum(),
        "kl": (w * kl(log_softmax(t), log_softmax(s))).sum(),
        "agreement": (w * (s.argmax(-1) == t.argmax(-1))).sum(),
        "weight": w.sum(),
        "kd_terms": np.array([(w * kd).sum()]),
        "loss": 2.0 * (w * kd).sum() + 0.5 * (w * ce).sum(),
    }
    assert set(out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=2e-5, err_msg=name)
    assert named_kd_terms((("jsd", (("beta", 0.5),)), ("tvd", ()))) == ("jsd_beta0.5", "tvd")


def test_teacher_gets_no_gradient_and_ce_only_needs_no_teacher():
    hidden, head, teacher, targets, weights = make_inputs(n=16, student_vocab=32, teacher_vocab=32, seed=2)
    for loss_fn in (fused_distill_loss, plain_distill_loss):
        teacher_grad = jax.grad(
            lambda th: loss_fn(
                hidden,
                head,
                TeacherSignal.from_hidden(th, teacher.head),
                targets,
                weights,
                kd_terms=(("tvd", ()),),
                kd_weights=jnp.ones(1),
                ce_weight=1.0,
                temperature=1.0,
                chunk_size=4,
            )["loss"]
        )(teacher.rows)
        assert np.all(np.asarray(teacher_grad) == 0)
    ce_only = [
        loss_and_grads(fn, ())(hidden, head, None, targets, weights, jnp.zeros(0), 1.0)
        for fn in (fused_distill_loss, plain_distill_loss)
    ]
    assert_same(*ce_only)
    assert set(ce_only[0][0][1]) == {"loss", "ce", "kd_terms", "weight"}


def test_user_errors():
    hidden, head, teacher, targets, weights = make_inputs(n=8, student_vocab=32, teacher_vocab=40)
    kwargs = dict(kd_terms=(("forward_kl", ()),), kd_weights=jnp.ones(1), ce_weight=1.0, temperature=1.0)
    with pytest.raises(UserError, match="vocab_size"):
        fused_distill_loss(hidden, head, teacher, targets, weights, **kwargs)
    with pytest.raises(UserError, match="exceeds"):
        fused_distill_loss(hidden, head, teacher, targets, weights, vocab_size=36, **kwargs)
    with pytest.raises(UserError, match="kd_weights"):
        fused_distill_loss(
            hidden, head, teacher, targets, weights, vocab_size=32, **{**kwargs, "kd_weights": jnp.ones(2)}
        )
    with pytest.raises(UserError, match="need a teacher"):
        fused_distill_loss(hidden, head, None, targets, weights, **kwargs)
    with pytest.raises(UserError, match="chunk_size"):
        chunk_layout(8, 0)
    assert chunk_layout(2048, 512) == (4, 512, 2048)
    assert chunk_layout(100, 512) == (1, 100, 100)
    assert chunk_layout(96, 40) == (3, 32, 96)


def test_final_softcaps_fused_equals_plain_and_capped_logits():
    """Gemma 2's final soft-cap: the fused loss caps student and teacher logits it builds, in value and gradient,
    and equals the loss of the capped logits given directly (the cap is what the models compute)."""
    rng = np.random.default_rng(7)
    n, d, dt, v = 24, 16, 12, 40
    hidden = jnp.asarray(rng.normal(size=(n, d)) * 2, jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    t_hidden = jnp.asarray(rng.normal(size=(n, dt)) * 2, jnp.float32)
    t_head = jnp.asarray(rng.normal(size=(dt, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    weights = jnp.ones((n,), jnp.float32)
    kw = dict(
        kd_terms=(("forward_kl", ()), ("reverse_kl", ())),
        kd_weights=jnp.array([0.5, 0.3]),
        ce_weight=0.2,
        temperature=2.0,
        chunk_size=8,
    )
    caps = (3.0, 5.0)  # (student, teacher): the teacher's cap travels in its signal

    def loss(fn, h, w, caps=(0.0, 0.0)):
        teacher = TeacherSignal.from_hidden(t_hidden, t_head, softcap=caps[1])
        return fn(h, w, teacher, targets, weights, **kw, student_softcap=caps[0])["loss"]

    fused = jax.value_and_grad(lambda h, w: loss(fused_distill_loss, h, w, caps), argnums=(0, 1))
    plain = jax.value_and_grad(lambda h, w: loss(plain_distill_loss, h, w, caps), argnums=(0, 1))
    (fv, fg), (pv, pg) = fused(hidden, head), plain(hidden, head)
    np.testing.assert_allclose(fv, pv, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fg, pg)
    # Reference: identity-head student (hidden = its capped logits) against the teacher's capped logits.
    capped_student = jnp.tanh(hidden @ head / caps[0]) * caps[0]
    capped_teacher = jnp.tanh(t_hidden @ t_head / caps[1]) * caps[1]
    reference = plain_distill_loss(
        capped_student, jnp.eye(v), TeacherSignal.from_logits(capped_teacher), targets, weights, **kw
    )["loss"]
    np.testing.assert_allclose(fv, reference, rtol=1e-5)
    assert not np.isclose(float(fv), float(loss(plain_distill_loss, hidden, head)), rtol=1e-3)
