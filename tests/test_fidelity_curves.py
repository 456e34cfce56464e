"""Per-row held-out sums (several students, one teacher forward) add up to `evaluate`; a CE-only run given a live
eval_teacher measures KL and agreement; the fidelity curve is logged once per point and a resume with it is bitwise;
read_curves and plot_curves read and draw it."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.fidelity.curves import curve_steps, plot_curves, read_curves
from analogjax.setup import build, evaluate, evaluate_rows
from analogjax.teacher import Teacher
from analogjax.train import run_training

ROOT = Path(__file__).resolve().parent.parent


def test_curves_rows_and_eval_teacher(tmp_path):
    # configs/tiny.yaml for 10 steps, as test_cli.py runs it: the suite has compiled these programs already.
    overrides = ["train.steps=10", "train.curve_points=3", "checkpoint.every=5"]
    config = load_config(ROOT / "configs/tiny.yaml", overrides)
    whole = tmp_path / "whole"
    out = run_training(config, whole, progress=False)
    points = read_curves(whole)
    assert [p["step"] for p in points] == curve_steps(10, 3) == [0, 5, 10]
    tokens_per_step = 8 * 64
    assert [p["tokens"] for p in points] == [0, 5 * tokens_per_step, 10 * tokens_per_step]
    for key in ("flops_student", "flops_teacher"):  # the teacher's forward counts too
        assert points[0][key] == 0 < points[1][key] == points[2][key] / 2, key
    for p in points:
        assert {"curve_kl", "curve_agreement", "curve_ce", "curve_teacher_ce"} <= set(p)

    # A resume from step 5 (the last checkpoint removed) logs the points after it, once, with the same values.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "10")
    again = run_training(config, resumed, progress=False)
    assert read_curves(resumed) == points
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "curve_ce" in r] == [0, 5, 10]
    want = jax.tree.leaves(jax.device_get(out["state"]))
    for a, b in zip(jax.tree.leaves(jax.device_get(again["state"])), want):
        np.testing.assert_array_equal(a, b)

    # Per-row sums of two students (host arrays: placed on the run's shardings) against one teacher forward add up to
    # what evaluate reports; the second is the first scaled.
    run, final = out["run"], jax.device_get(out["state"].params["model"])
    students = {"final": final, "scaled": jax.tree.map(lambda x: x * 0.5, final)}
    rows = evaluate_rows(run, students, 2)
    assert list(rows) == ["final", "scaled"]
    assert all(v.shape == (16,) for got in rows.values() for v in got.values())  # 2 batches of 8 rows
    got = rows["final"]
    for key in ("kl", "agreement", "ce", "teacher_ce"):  # the final held-out eval: the same 2 batches
        np.testing.assert_allclose(got[key].sum() / got["count"].sum(), out["heldout"][key], rtol=2e-5, err_msg=key)
    scaled = evaluate(run, students["scaled"], 2)
    np.testing.assert_allclose(rows["scaled"]["kl"].sum() / rows["scaled"]["count"].sum(), scaled["kl"], rtol=2e-5)
    assert not np.array_equal(rows["final"]["kl"], rows["scaled"]["kl"])

    # The curve keeps the teacher's rows of its batch and runs the student against them: its last point is what the
    # per-row step (the teacher's forward inline) measures on that batch.
    inline = evaluate_rows(run, {"final": final}, config.train.curve_batches)["final"]
    for key in ("kl", "agreement", "ce", "teacher_ce"):
        want = inline[key].sum() / inline["count"].sum()
        np.testing.assert_allclose(points[-1][f"curve_{key}"], want, rtol=2e-5, err_msg=key)

    # A CE-only run measures against a live teacher it is given for evaluation (the run's: the same eval program).
    ce_only = load_config(ROOT / "configs/tiny.yaml", ["train.steps=10", "distill.terms=[{kind: ce, weight: 1.0}]"])
    measured = build(ce_only, mesh=run.mesh, init=False, eval_teacher=(run.teacher, run.teacher_params))
    assert measured.teacher is None and measured.eval_teacher is run.teacher
    np.testing.assert_allclose(evaluate(measured, final, 2)["kl"], out["heldout"]["kl"], rtol=1e-6)
    with pytest.raises(UserError, match="eval_teacher"):  # held-out batches carry no cached rows
        build(ce_only, mesh=run.mesh, init=False, eval_teacher=(Teacher(from_batch=dict), None))

    ce_only = [{k: v for k, v in p.items() if k != "curve_kl"} for p in points]
    assert plot_curves({"analog": points, "ce only": ce_only}, tmp_path / "curves.png").stat().st_size > 0
