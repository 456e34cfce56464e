"""Measuring a finished run: its analog against the live teacher, fidelity and transfer, restored and loaded once.

`analogjax eval`, `analogjax transfer` and `analogjax release` all measure through these functions; the run itself is
read through analogjax.run_dir.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analogjax.errors import UserError
from analogjax.run_dir import Student, eval_mesh, load_student, restore_student


def live_teacher(config, mesh):
    """The teacher a measurement compares against: always the live one, whatever the run distilled from (even a
    cache, or nothing for a CE-only baseline)."""
    from analogjax.teacher import live_source_kind, load_teacher

    if live_source_kind(config) == "random":
        raise UserError(
            "the run's config names no teacher.checkpoint, teacher.hf_path or teacher.gguf_path: nothing "
            "to compare with"
        )
    return load_teacher(config, mesh, live=True)


def measure_fidelity(
    student: Student,
    out_dir: str | Path,
    *,
    batches: int | None = None,
    teacher=None,
    teacher_params=None,
    source_names: dict[str, str] | None = None,
    transfer_report: dict | None = None,
    measured: dict | None = None,
    comparison: Sequence[dict] | None = None,
) -> dict[str, Any]:
    """Measure `student` against its teacher and write the fidelity report (fidelity.json/.md, plots) to `out_dir`;
    `source_names` renames its per-source columns (a release publishes the names the lab chose, not those derived
    from paths); `transfer_report` joins the report under `transfer`, `comparison` under `comparison`. `measured`:
    this student's report already measured (metrics.measure_models), written instead of measuring again."""
    from analogjax.fidelity import metrics

    config = student.config
    if measured is not None:
        report = dict(measured)
    else:
        if teacher is None:
            teacher, teacher_params = live_teacher(config, student.mesh)
        report = metrics.measure(
            config, student.params, teacher, teacher_params, student.mesh, batches or config.train.eval_batches
        )
    report["step"] = student.step
    if source_names:
        report["by_source"] = {source_names[name]: v for name, v in report["by_source"].items()}
    if transfer_report is not None:
        report["transfer"] = transfer_report
    if comparison:
        report["comparison"] = list(comparison)
    jsonl = student.workdir / "metrics.jsonl" if student.workdir is not None else None
    metrics.write_report(report, out_dir, metrics_jsonl=jsonl)
    return report


def measure_transfer(student: Student, teacher, teacher_params, *, batches=None, **options) -> dict[str, Any]:
    """The transfer report (stitching, probes, steering) of `student` against the live teacher."""
    from analogjax.fidelity.transfer import measure

    config = student.config
    return measure(
        config,
        student.params,
        teacher,
        teacher_params,
        student.mesh,
        batches=batches or config.train.eval_batches,
        **options,
    )


def fidelity_of_run(
    path: str | Path,
    out_dir: str | Path,
    *,
    config=None,
    batches: int | None = None,
    teacher=None,
    teacher_params=None,
    transfer: bool = False,
    user_concepts=(),
) -> dict[str, Any]:
    """`analogjax eval`: measure a run's student against its teacher; writes fidelity.json/.md and plots. With
    `transfer`, the transfer object joins the report under `transfer`: the teacher is loaded and the analog
    restored once for both, and the report written once."""
    student = load_student(path, config)
    report = None
    if transfer:
        if teacher is None:
            teacher, teacher_params = live_teacher(student.config, student.mesh)
        report = measure_transfer(student, teacher, teacher_params, batches=batches, user_concepts=user_concepts)
    return measure_fidelity(
        student, out_dir, batches=batches, teacher=teacher, teacher_params=teacher_params, transfer_report=report
    )


def transfer_of_run(config, ckpt_dir, step, *, batches=None, **options) -> dict[str, Any]:
    """The transfer report of a run's checkpointed analog (the config's model) against the config's live teacher."""
    mesh = eval_mesh(config)
    student = Student(config, None, step, mesh, restore_student(config, ckpt_dir, mesh, step))
    # A transfer check may run against a random teacher (tests, benchmarks): load_teacher warns about it.
    from analogjax.teacher import load_teacher

    teacher, teacher_params = load_teacher(config, mesh, live=True)
    return measure_transfer(student, teacher, teacher_params, batches=batches, **options)
