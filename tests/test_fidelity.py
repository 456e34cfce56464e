"""Fidelity metrics against float64 NumPy references on random logits; linear CKA invariances."""

import math

import jax
import numpy as np
import pytest

from analogjax import fidelity


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(s_logits, t_logits, targets, mask, sources, n_sources):
    """Float64 NumPy: per source (and overall) the fidelity metrics, written directly from their definitions."""
    lq, lp = _log_softmax(s_logits.astype(np.float64)), _log_softmax(t_logits.astype(np.float64))
    q, p = np.exp(lq), np.exp(lp)
    m = 0.5 * (p + q)
    valid = mask > 0

    def metrics(select):
        sel = valid & select
        n = sel.sum()
        fkl = (p * (lp - lq)).sum(-1)[sel].mean()
        rkl = (q * (lq - lp)).sum(-1)[sel].mean()
        jsd = (0.5 * (p * (lp - np.log(m))).sum(-1) + 0.5 * (q * (lq - np.log(m))).sum(-1))[sel].mean()
        s_top, t_top = s_logits.argmax(-1), t_logits.argmax(-1)
        s5 = np.argsort(-s_logits, -1)[..., :5]
        t5 = np.argsort(-t_logits, -1)[..., :5]
        overlap = np.array([[len(set(a) & set(b)) / 5 for a, b in zip(ra, rb)] for ra, rb in zip(s5, t5)])
        s_nll = -np.take_along_axis(lq, targets[..., None], -1)[..., 0][sel].mean()
        t_nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0][sel].mean()

        def ece(probs, top):
            conf, correct = probs.max(-1)[sel], (top == targets)[sel]
            total = 0.0
            for b in range(15):
                in_bin = (conf >= b / 15) & (conf < (b + 1) / 15) if b < 14 else conf >= 14 / 15
                if in_bin.any():
                    total += in_bin.sum() / n * abs(correct[in_bin].mean() - conf[in_bin].mean())
            return total

        return {
            "tokens": int(n),
            "forward_kl": fkl,
            "reverse_kl": rkl,
            "jsd": jsd,
            "top1_agreement": (s_top == t_top)[sel].mean(),
            "top5_overlap": overlap[sel].mean(),
            "student_ppl": math.exp(s_nll),
            "teacher_ppl": math.exp(t_nll),
            "ppl_gap": math.exp(s_nll) - math.exp(t_nll),
            "student_ece": ece(q, s_top),
            "teacher_ece": ece(p, t_top),
        }

    return metrics(np.ones_like(valid)), [metrics(sources == i) for i in range(n_sources)]


def test_metrics_match_float64_reference_and_are_exact_over_batches():
    rng = np.random.default_rng(0)
    b, s, v, n_sources = 6, 10, 23, 3
    # Teacher sharp, student a noisy copy: agreement is neither 0 nor 1 and confidences spread over bins.
    t_logits = (3.0 * rng.standard_normal((b, s, v))).astype(np.float32)
    s_logits = (t_logits + 1.5 * rng.standard_normal((b, s, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, s)).astype(np.int32)
    targets[:, ::2] = t_logits.argmax(-1)[:, ::2]  # some correct next tokens, so accuracies differ from 0
    mask = (rng.random((b, s)) > 0.2).astype(np.float32)
    sources = rng.integers(0, n_sources, (b, s)).astype(np.int32)
    positions = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    step = jax.jit(lambda *a: fidelity.token_sums(*a, n_sources=n_sources, seq_len=s))
    # Accumulated over three batches of two rows: must equal the metrics of all six rows at once.
    total = {}
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        sums = jax.device_get(
            step(s_logits[rows], t_logits[rows], targets[rows], mask[rows], sources[rows], positions[rows])
        )
        for k, val in sums.items():
            total[k] = total.get(k, 0.0) + np.asarray(val, np.float64)
    report = fidelity.finalize(total, ["a", "b", "c"])
    overall, per_source = reference(s_logits, t_logits, targets, mask, sources, n_sources)
    for got, want in [(report["overall"], overall)] + list(zip(report["by_source"].values(), per_source)):
        assert got["tokens"] == want["tokens"]
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-6, err_msg=key)
    # KL by position: mean forward KL of the valid tokens at each position.
    lq, lp = _log_softmax(s_logits.astype(np.float64)), _log_softmax(t_logits.astype(np.float64))
    fkl = (np.exp(lp) * (lp - lq)).sum(-1)
    for pos in range(s):
        sel = mask[:, pos] > 0
        np.testing.assert_allclose(report["kl_by_position"][pos], fkl[sel, pos].mean(), rtol=2e-5)


def test_linear_cka_invariances():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 12)) + 3.0  # an offset: CKA centres
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert fidelity.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert fidelity.linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert fidelity.linear_cka(x, 5.0 * x + 1.0) == pytest.approx(1.0, abs=1e-10)
    unrelated = fidelity.linear_cka(x, rng.standard_normal((200, 7)))
    assert 0.0 < unrelated < 0.3


def test_cka_moments_accumulated_over_batches_equal_the_direct_value():
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((2, 4, 8, 6)).astype(np.float32)  # [layers, b, s, d]
    ys = rng.standard_normal((3, 4, 8, 5)).astype(np.float32)
    ys[1] = np.einsum("bsd,de->bse", xs[0][..., :6], rng.standard_normal((6, 5))).astype(np.float32)
    w = (rng.random((4, 8)) > 0.3).astype(np.float32)
    pairs = [(0, 1), (1, 2)]
    total = {}
    for rows in (slice(0, 2), slice(2, 4)):
        sums = jax.device_get(fidelity.cka_sums(xs[:, rows], ys[:, rows], w[rows], pairs))
        for k, val in sums.items():
            total[k] = total.get(k, 0.0) + np.asarray(val, np.float64)
    for p, (i, j) in enumerate(pairs):
        got = fidelity.cka_from_moments(
            total["n"], total["sx"][i], total["sy"][j], total["sxx"][i], total["syy"][j], total["syx"][p]
        )
        want = fidelity.linear_cka(xs[i][w > 0], ys[j][w > 0])
        assert got == pytest.approx(want, rel=1e-4)
    assert fidelity.linear_cka(xs[0][w > 0], ys[1][w > 0]) > 0.5  # the linearly related pair scores high


def test_default_layer_pairs():
    assert fidelity.default_layer_pairs(2, 4) == ((0, 1), (1, 3))
    assert fidelity.default_layer_pairs(3, 4) == ((0, 0), (1, 2), (2, 3))
    assert fidelity.default_layer_pairs(4, 4) == ((0, 0), (1, 1), (2, 2), (3, 3))


def test_report_files(tmp_path):
    rng = np.random.default_rng(3)
    t = rng.standard_normal((2, 6, 11)).astype(np.float32)
    sums = jax.device_get(
        fidelity.token_sums(
            t + rng.standard_normal(t.shape).astype(np.float32),
            t,
            rng.integers(0, 11, (2, 6)),
            np.ones((2, 6), np.float32),
            np.zeros((2, 6), np.int32),
            np.tile(np.arange(6), (2, 1)),
            n_sources=1,
            seq_len=6,
        )
    )
    report = fidelity.finalize({k: np.asarray(v, np.float64) for k, v in sums.items()}, ["only"])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0, "ce": 2.5}\n{"step": 2, "loss": 1.5, "ce": 2.0}\n')
    written = fidelity.write_report(report, tmp_path / "out", metrics_jsonl=metrics)
    assert {"json", "md", "kl_by_position", "agreement_by_source", "training_curves"} <= set(written)
    assert all(p.stat().st_size > 0 for p in written.values())
    assert "top-1 agreement" in (tmp_path / "out" / "fidelity.md").read_text()
