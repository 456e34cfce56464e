"""What the demo prints and records: the rows' table with 95% intervals, and the comparison of the released analog
with a control, every measure judged beyond noise (fidelity/intervals.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analogjax.fidelity.intervals import MEASURE_NAMES, format_interval

LABELS = {
    "analog": "analog",
    "analog_distill": "analog, before on-policy",
    "analog_random": "analog (random init)",
    "pruned_ce": "pruned, CE only",
    "baseline": "baseline",
}


def label(row: str) -> str:
    return LABELS.get(row, row)


def comparison(reports: dict, transfers: dict, samples: dict | None, analog: str, other: str) -> list[dict[str, Any]]:
    """The paired comparisons of row `analog` with row `other` (both measured on the same held-out rows, prompts and
    directions, each interval a bootstrap over the held-out documents they come from): fidelity (KL, agreement, CE),
    the transfer checks when both were measured, and the teacher's log-prob of each one's greedy continuations when
    the demo made them."""
    from analogjax.fidelity import metrics
    from analogjax.fidelity.transfer import Measured

    entries = metrics.comparison(reports[analog], reports[other])
    # transfer.measure_models' result holds each model's per-row sums: paired comparisons of the same eval rows.
    if isinstance(transfers, Measured) and analog in transfers and other in transfers:
        entries += transfers.comparison(analog, other)
    if samples is not None and analog in samples["models"] and other in samples["models"]:
        from analogjax.recipes import demo_samples

        entries.append(demo_samples.comparison(samples, analog, other))
    return entries


def comparison_table(entries: list[dict[str, Any]], analog: str = "analog", other: str = "baseline") -> str:
    """The comparison as a text table: each measure, both figures with their 95% intervals, which is better."""
    width = 40
    lines = [
        f"Is the {label(analog)} a better proxy of the teacher than the {label(other)}? (95% intervals, bootstrap "
        "over held-out documents; better = the paired interval of the difference excludes 0)",
        f"{'measure':<{width}} {label(analog):>26} {label(other):>26}  documents  better",
    ]
    for e in entries:
        name = MEASURE_NAMES.get(e["measure"], e["measure"])[:width]
        lines.append(
            f"{name:<{width}} {format_interval(e['analog'], e['analog_ci95']):>26} "
            f"{format_interval(e['baseline'], e['baseline_ci95']):>26}  {e.get('documents', '-'):>9}  {e['better']}"
        )
    return "\n".join(lines)


def format_table(summary: dict) -> str:
    """Every row's held-out figures against the teacher, with 95% intervals, and the wall time of each phase."""
    rows = summary.get("rows", ["analog", "baseline"])
    with_logprob = any("teacher_logprob_own_samples" in summary.get(n, {}) for n in ["teacher", *rows])
    head = f"{'model':<26} {'params':>11} {'heldout_ce':>22} {'kl_teacher':>22} {'agreement':>22}"
    lines = [head + (f" {'teacher_logp':>22}" if with_logprob else "")]
    for name in ("teacher", *rows):
        s = summary[name]
        cells = [
            format_interval(s[key], s.get(f"{key}_ci95")) if key in s else "-"
            for key in ("heldout_ce", "kl_teacher", "agreement")
        ]
        line = f"{label(name):<26} {s['params']:>11,} " + " ".join(f"{c:>22}" for c in cells)
        if with_logprob:
            logp = s.get("teacher_logprob_own_samples")
            cell = format_interval(logp, s.get("teacher_logprob_own_samples_ci95")) if logp is not None else "-"
            line += f" {cell:>22}"
        lines.append(line)
    if summary.get("tokens_per_run"):
        trained, distinct = summary["tokens_per_run"], summary.get("distinct_tokens_per_run", 0)
        epochs = f", epochs over the first {distinct:,} (data.epoch_steps)" if 0 < distinct < trained else ""
        lines.append(f"training: {trained:,} tokens per row{epochs}")
    if summary.get("compute_dtype"):
        analog, teacher = summary["compute_dtype"]["analog"], summary["compute_dtype"]["teacher"]
        same = analog == teacher
        lines.append(f"compute: {analog} for every model" if same else f"compute: analogs {analog}, teacher {teacher}")
    if summary.get("heldout_documents"):
        tokens = summary[rows[0]].get("heldout_tokens", 0)
        lines.append(
            f"held-out: {tokens:,} tokens of {summary['heldout_documents']} documents (intervals resample documents)"
        )
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.get("phase_seconds", {}).items())
    lines.append(f"wall time: {summary['wall_seconds']:.0f} s ({phases})")
    if summary.get("released"):
        lines.append(f"released: {label(summary['released'])}")
    return "\n".join(lines)


# The rows' workdirs that hold their training records, in order: the recipe's analog trained in two phases.
ROW_PHASES = {"analog": ("analog/distill", "analog/on_policy"), "analog_distill": ("analog/distill",)}
_WORK = ("tokens", "flops_student", "flops_teacher")


def row_curve(workdir: Path, row: str) -> list[dict[str, Any]]:
    """A row's fidelity-curve points (fidelity/curves.py) over its phases, each later phase's tokens and FLOPs
    counted after the earlier ones'."""
    from analogjax.fidelity.curves import read_curves

    points: list[dict[str, Any]] = []
    spent = dict.fromkeys(_WORK, 0.0)
    for phase in ROW_PHASES.get(row, (row,)):
        if not (Path(workdir) / phase / "metrics.jsonl").is_file():
            continue
        got = read_curves(Path(workdir) / phase)
        if points and got and got[0]["step"] == 0:  # a later phase's start is the earlier phase's end
            got = got[1:]
        points += [{**p, **{k: p.get(k, 0.0) + spent[k] for k in _WORK}} for p in got]
        if points:
            spent = {k: points[-1].get(k, 0.0) for k in _WORK}
    return points


def curves(workdir: Path, rows: list[str], out: Path) -> dict[str, Any]:
    """Every row's fidelity curve on one figure (against tokens seen, and against teacher + student FLOPs):
    {"figure": path, "rows": {row: points}} for summary.json."""
    from analogjax.fidelity.curves import plot_curves

    by_row = {label(row): row_curve(workdir, row) for row in rows}
    figure = plot_curves(by_row, out, title="Held-out fidelity to the teacher during training")
    return {"figure": str(figure), "rows": by_row}


def curves_markdown(summary: dict) -> str:
    """The card's section on the curves: where each row stood at each point."""
    lines = [
        "## Fidelity during training",
        "",
        "Held-out KL(teacher‖model) and top-1 agreement on a fixed evaluation batch during training, for the analog "
        "and every control row, against the tokens and model FLOPs (teacher + student) spent. The analog's curve "
        "runs through its recipe's phases in order.",
        "",
        "![fidelity curves](fidelity/curves.png)",
    ]
    return "\n".join(lines) + "\n"
