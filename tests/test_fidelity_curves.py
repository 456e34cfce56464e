"""Per-row held-out sums (several students, one teacher forward) add up to `evaluate`; a CE-only run given a live
eval_teacher measures KL and agreement; the fidelity curve is logged once per point, survives a resume, and leaves
training bitwise unchanged; read_curves and plot_curves read and draw it."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from analogjax import mesh as mesh_lib
from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.fidelity.curves import curve_steps, plot_curves, read_curves
from analogjax.setup import build, evaluate, evaluate_rows
from analogjax.teacher import Teacher
from analogjax.train import run_training

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo crates".split()


def _config(tmp_path, *extra):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 40)))}) + "\n")
    return load_config(
        None,
        [
            "model.preset=tiny",
            "teacher.model.preset=tiny-teacher",
            f"data.sources=[{{path: {corpus}}}]",
            "data.global_batch=8",
            "data.seq_len=32",
            "data.heldout_fraction=0.2",
            "distill.chunk_size=64",
            "optim.warmup_steps=0",
            "train.log_every=1",
            "train.eval_batches=2",
            "checkpoint.every=2",
            "checkpoint.async_save=false",
            *extra,
        ],
    )


def _bigram_teacher(vocab: int = 512):
    """A live teacher that costs next to nothing to compile: logits from a table indexed by the current token."""
    table = np.random.default_rng(1).normal(0, 2, (vocab, vocab)).astype(np.float32)
    return Teacher(logits=lambda params, tokens, seg, pos: params[tokens], vocab_size=vocab), table


def test_rows_of_several_students_add_up_to_evaluate(tmp_path):
    config = _config(tmp_path, "train.steps=2")
    teacher, table = _bigram_teacher()
    run = build(config, teacher, table, mesh=mesh_lib.make_mesh(4, 2, 1))
    # Host arrays are placed on the run's shardings; the second student is the first scaled.
    first = jax.device_get(run.state.params["model"])
    students = {"a": first, "b": jax.tree.map(lambda x: x * 0.5, first)}
    rows = evaluate_rows(run, students, 2)
    assert list(rows) == ["a", "b"]
    for name, params in students.items():
        got = rows[name]
        assert got["count"].shape == (16,) and all(v.shape == (16,) for v in got.values())
        want = evaluate(run, params, 2)
        for key in ("kl", "agreement", "ce", "teacher_ce"):
            np.testing.assert_allclose(got[key].sum() / got["count"].sum(), want[key], rtol=2e-5, err_msg=key)
    assert not np.array_equal(rows["a"]["kl"], rows["b"]["kl"])
    with pytest.raises(UserError, match="eval_teacher"):  # held-out batches carry no cached rows
        build(config, teacher, table, mesh=run.mesh, init=False, eval_teacher=(Teacher(from_batch=dict), None))


def test_curve_points_logged_once_across_a_resume_and_training_unchanged(tmp_path):
    """A CE-only run given a live eval_teacher: its curve and final held-out eval measure KL and agreement."""
    config = _config(tmp_path, "train.steps=4", "train.curve_points=3", "distill.terms=[{kind: ce, weight: 1.0}]")
    eval_teacher = _bigram_teacher()
    whole = tmp_path / "whole"
    out = run_training(config, whole, progress=False, eval_teacher=eval_teacher)
    points = read_curves(whole)
    assert [p["step"] for p in points] == curve_steps(4, 3) == [0, 2, 4]
    tokens_per_step = 8 * 32
    assert [p["tokens"] for p in points] == [0, 2 * tokens_per_step, 4 * tokens_per_step]
    assert points[0]["flops_student"] == 0 < points[1]["flops_student"] < points[2]["flops_student"]
    assert all(p["flops_teacher"] == 0 for p in points)  # no teacher signal in training
    for p in points:
        assert {"curve_kl", "curve_agreement", "curve_ce", "curve_teacher_ce"} <= set(p)
    assert out["heldout"]["kl"] > 0  # the final held-out eval measured against the eval teacher too

    # A resume from step 2 (the last checkpoint removed) logs the points after it, once, with the same values.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    again = run_training(config, resumed, progress=False, eval_teacher=eval_teacher)
    assert read_curves(resumed) == points
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "curve_ce" in r] == [0, 2, 4]
    want = jax.tree.leaves(jax.device_get(out["state"]))
    for a, b in zip(jax.tree.leaves(jax.device_get(again["state"])), want):
        np.testing.assert_array_equal(a, b)

    # Without a curve the run trains bitwise the same.
    none = dataclasses.replace(config, train=dataclasses.replace(config.train, curve_points=0))
    bare = run_training(none, tmp_path / "bare", progress=False, eval_teacher=eval_teacher)
    for a, b in zip(jax.tree.leaves(jax.device_get(bare["state"])), want):
        np.testing.assert_array_equal(a, b)
    assert read_curves(tmp_path / "bare") == []

    ce_only = [{k: v for k, v in p.items() if k != "curve_kl"} for p in points]
    assert plot_curves({"analog": points, "ce only": ce_only}, tmp_path / "curves.png").stat().st_size > 0
