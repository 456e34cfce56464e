"""Fidelity curves: how close the student comes to its teacher as training spends tokens and FLOPs.

While a run trains (train.py), it measures held-out KL(teacher‖student), top-1 agreement and CE at
`train.curve_points` evenly spaced steps (step 0, the init, and the last step included) on the first
`train.curve_batches` held-out batches. It uses the run's compiled eval step (the same batch shape as every held-out
evaluation, so nothing compiles per point), holds those batches and the teacher's rows of them (its final hidden
states: the teacher's trunk runs once per run, not once per point) for the whole run, and touches neither the training
RNG nor the data position, so a run with a curve trains bitwise as one without. Each point is one record of
metrics.jsonl:

    {"step", "tokens", "flops_student", "flops_teacher", "curve_kl", "curve_agreement", "curve_ce", "curve_teacher_ce"}

`tokens` and the FLOPs are what training spent up to that step (model FLOPs, runtime/flops.py); KL, agreement and
the teacher's CE need a live teacher for evaluation (the run's own, or `eval_teacher`), else the curve holds CE only.
`read_curves` reads a workdir's points back; `plot_curves` draws several runs on one figure.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax

from analogjax.data import heldout_batches
from analogjax.errors import UserError
from analogjax.runtime import figures
from analogjax.runtime.batch_sums import sum_over_batches
from analogjax.runtime.flops import forward_flops_per_token
from analogjax.runtime.metrics_log import means

MEASURES = ("kl", "agreement", "ce", "teacher_ce")  # what a point keeps of the eval step's means, as curve_<name>
MARK = "curve_ce"  # every point has it (CE needs no teacher): what tells a point from other records

# (tokens, student FLOPs, teacher FLOPs) that training spends on one step.
StepWork = Callable[[int], tuple[int, float, float]]


def curve_steps(total_steps: int, points: int) -> list[int]:
    """The steps measured: `points` evenly spaced over [0, total_steps], both ends included (fewer when steps are
    fewer than points); [] for points = 0."""
    if points <= 0:
        return []
    if points == 1:
        return [total_steps]
    gaps = points - 1
    return sorted({(2 * i * total_steps + gaps) // (2 * gaps) for i in range(points)})  # rounded i·steps/gaps


def step_work(config, *, teacher: bool, on_policy=None, teacher_steps: int | None = None) -> StepWork:
    """The work of each step of a run of `config`: its rows' tokens, the student's model FLOPs (3 forwards: forward
    and backward; an on-policy step adds the sampling forward) and the teacher's forward FLOPs over the same tokens
    when the run distills from one (`teacher`). A run distilled from a teacher cache counts the teacher's forward
    too: the cache was written by running the teacher over exactly these tokens, once, and that cost belongs to the
    budget of the analog. The teacher's FLOPs are those of `teacher.model` in the config (what a bring-your-own
    teacher is not described by). `on_policy`: the run's on_policy.OnPolicy, whose steps train on sampled rows.
    `teacher_steps`: the steps whose teacher forward was run, when later steps read it again (a cache read over
    epochs, data.epoch_steps: the epochs after the first cost no teacher FLOPs)."""
    seq = config.data.seq_len
    tokens = config.data.global_batch * seq
    teacher_model = config.teacher.model
    usual = (
        tokens,
        3 * forward_flops_per_token(config.model, seq) * tokens,
        forward_flops_per_token(teacher_model, seq) * tokens if teacher else 0.0,
    )
    sampled = usual
    if on_policy is not None:
        width, rows_tokens = on_policy.prompt_len + on_policy.max_new_tokens, on_policy.tokens_per_step
        sampled = (
            rows_tokens,
            4 * forward_flops_per_token(config.model, width) * rows_tokens,
            forward_flops_per_token(teacher_model, width) * rows_tokens if teacher else 0.0,
        )

    reread = (usual[0], usual[1], 0.0)

    def work(step: int) -> tuple[int, float, float]:
        if on_policy is not None and on_policy.covers(step):
            return sampled
        return reread if teacher_steps is not None and step >= teacher_steps else usual

    return work


class FidelityCurve:
    """The fidelity curve of one run as the loop drives it: `due(step)` says whether a point is to be measured after
    `step` steps, `measure` measures and logs it.

    A run resumed from step `start` measures the points after it: the point at `start` itself was logged before
    that checkpoint was written, except at step 0 (no checkpoint), which is measured again and logged only if
    metrics.jsonl does not hold it yet (`logged`: the records it kept at the start of this run,
    checkpoint.trim_metrics). `due` depends on `start` alone, so every process of a multi-host run measures (a
    collective) at the same steps; only process 0 reads and writes metrics.jsonl."""

    def __init__(self, run, log, *, start: int, logged: Iterable[Mapping[str, Any]], work: StepWork):
        cfg = run.config.train
        self.run, self.log, self.work = run, log, work
        self._due = {s for s in curve_steps(cfg.steps, cfg.curve_points) if s > start or s == start == 0}
        self._logged = {record.get("step") for record in logged if MARK in record}
        self._batches: list | None = None
        self._teacher_rows: list = []
        self._spent_through, self._spent = 0, (0, 0.0, 0.0)

    def due(self, step: int) -> bool:
        return step in self._due

    def measure(self, step: int, params) -> dict[str, Any]:
        """Measure the student's `params` after `step` steps on the curve's held-out batches; log and return the
        point. Call it under the run's mesh."""
        run = self.run
        if self._batches is None:  # held on the devices for the whole run: read once, never again
            self._batches = list(
                heldout_batches(
                    run.config.data,
                    seed=run.config.train.seed,
                    vocab_size=run.config.model.vocab_size,
                    sharding=run.batch_sharding,
                    batches=run.config.train.curve_batches,
                )
            )
            if not self._batches:
                raise UserError("the held-out split is empty: raise data.heldout_fraction or add documents")
            # The teacher's rows of each batch, computed once: a point runs the student alone (and the teacher's
            # head over the kept rows), not the teacher's trunk again.
            self._teacher_rows = [run.eval_fn.rows(run.eval_teacher_params, batch) for batch in self._batches]
            if run.eval_teacher is None and jax.process_index() == 0:
                print(
                    "note: the fidelity curve holds held-out CE only: evaluation has no live teacher (a cached or "
                    "CE-only run; pass eval_teacher to run_training for KL and agreement)",
                    file=sys.stderr,
                )
        measured = means(
            sum_over_batches(
                lambda batch_rows: run.eval_fn.sums(params, run.eval_teacher_params, *batch_rows),
                zip(self._teacher_rows, self._batches),
            )
        )
        tokens, flops_student, flops_teacher = self._spent_until(step)
        point = {
            "step": step,
            "tokens": tokens,
            "flops_student": flops_student,
            "flops_teacher": flops_teacher,
            **{f"curve_{key}": measured[key] for key in MEASURES if key in measured},
        }
        if step not in self._logged:
            self.log.write(point)
        self._due.discard(step)
        return point

    def _spent_until(self, step: int) -> tuple[int, float, float]:
        """What steps 0 .. step-1 spent, added up once over the run (a resumed run adds its earlier steps first)."""
        if step < self._spent_through:
            self._spent_through, self._spent = 0, (0, 0.0, 0.0)
        tokens, student, teacher = self._spent
        for s in range(self._spent_through, step):
            t, fs, ft = self.work(s)
            tokens, student, teacher = tokens + t, student + fs, teacher + ft
        self._spent_through, self._spent = step, (tokens, student, teacher)
        return self._spent


def read_curves(workdir: str | Path) -> list[dict[str, Any]]:
    """The fidelity curve of a run's workdir: its points from metrics.jsonl, by step (the latest record of a step
    wins); [] when the run logged none."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    points: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if isinstance(record, dict) and MARK in record:
            points[int(record["step"])] = record
    return [points[step] for step in sorted(points)]


_PANELS = (("curve_kl", "KL(teacher‖student)"), ("curve_agreement", "top-1 agreement"), ("curve_ce", "held-out CE"))


def plot_curves(curves: Mapping[str, list[dict[str, Any]]], out_png: str | Path, title: str = "") -> Path:
    """One PNG of several runs' fidelity curves ({row name: read_curves(...)}), one line per row: KL, agreement and
    CE against tokens seen (top) and against training FLOPs, teacher + student (bottom). A measure no row has is
    left out; a row without it (a CE-only curve) is absent from that panel."""
    panels = [(key, label) for key, label in _PANELS if any(key in p for points in curves.values() for p in points)]
    plt = figures.pyplot()
    fig, axes = plt.subplots(2, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 6.4), squeeze=False)
    for column, (key, label) in enumerate(panels):
        for row_name, points in curves.items():
            shown = [p for p in points if key in p]
            if not shown:
                continue
            values = [p[key] for p in shown]
            axes[0][column].plot([p["tokens"] for p in shown], values, marker="o", markersize=3, label=row_name)
            flops = [p["flops_student"] + p["flops_teacher"] for p in shown]
            axes[1][column].plot(flops, values, marker="o", markersize=3, label=row_name)
        axes[0][column].set(xlabel="tokens seen", ylabel=label)
        axes[1][column].set(xlabel="training FLOPs (teacher + student)", ylabel=label)
        for ax in (axes[0][column], axes[1][column]):
            ax.grid(alpha=0.3)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    if panels and curves:
        axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return figures.save(fig, out_png)
