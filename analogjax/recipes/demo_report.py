"""What the demo prints and records: the rows' table with 95% intervals, and the comparison of the released analog
with a control, every measure judged beyond noise (fidelity/intervals.py)."""

from __future__ import annotations

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
    directions): fidelity (KL, agreement, CE), the transfer checks when both were measured, and the teacher's
    log-prob of each one's greedy continuations when the demo made them."""
    from analogjax.fidelity import metrics

    entries = metrics.comparison(reports[analog], reports[other])
    if analog in transfers and other in transfers:
        from analogjax.fidelity import transfer

        entries += transfer.comparison(transfers[analog], transfers[other])
    if samples is not None and analog in samples["models"] and other in samples["models"]:
        from analogjax.recipes import demo_samples

        entries.append(demo_samples.comparison(samples, analog, other))
    return entries


def comparison_table(entries: list[dict[str, Any]], analog: str = "analog", other: str = "baseline") -> str:
    """The comparison as a text table: each measure, both figures with their 95% intervals, which is better."""
    width = 40
    lines = [
        f"Is the {label(analog)} a better proxy of the teacher than the {label(other)}? (95% intervals; "
        "better = the paired interval of the difference excludes 0)",
        f"{'measure':<{width}} {label(analog):>26} {label(other):>26}  better",
    ]
    for e in entries:
        name = MEASURE_NAMES.get(e["measure"], e["measure"])[:width]
        lines.append(
            f"{name:<{width}} {format_interval(e['analog'], e['analog_ci95']):>26} "
            f"{format_interval(e['baseline'], e['baseline_ci95']):>26}  {e['better']}"
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
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.get("phase_seconds", {}).items())
    lines.append(f"wall time: {summary['wall_seconds']:.0f} s ({phases})")
    if summary.get("released"):
        lines.append(f"released: {label(summary['released'])}")
    return "\n".join(lines)


# The rows' workdirs that hold their training records, in order: the recipe's analog trained in two phases.
ROW_PHASES = {"analog": ("analog/distill", "analog/on_policy"), "analog_distill": ("analog/distill",)}


def row_curves(workdir, row: str) -> list[dict[str, Any]]:
    """A row's fidelity-curve records (train.curve_points) from its metrics.jsonl, tokens counted over its phases."""
    import json
    from pathlib import Path

    records: list[dict[str, Any]] = []
    offset = {"tokens": 0.0, "flops_student": 0.0, "flops_teacher": 0.0}
    for phase in ROW_PHASES.get(row, (row,)):
        path = Path(workdir) / phase / "metrics.jsonl"
        if not path.is_file():
            continue
        points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [p for p in points if "curve_kl" in p or "curve_ce" in p]
        for p in points:
            records.append({**p, **{k: p.get(k, 0.0) + v for k, v in offset.items()}})
        if points:
            offset = {k: records[-1].get(k, 0.0) for k in offset}
    return records


def plot_rows(workdir, summary: dict, out) -> Any:
    """One figure of every row's held-out KL and agreement against tokens seen (top) and against model FLOPs,
    teacher + student (bottom); returns its path."""
    from analogjax.runtime import figures

    plt = figures.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for row in summary.get("rows", []):
        points = [p for p in row_curves(workdir, row) if "curve_kl" in p]
        if not points:
            continue
        flops = [p["flops_student"] + p["flops_teacher"] for p in points]
        for col, key in enumerate(("curve_kl", "curve_agreement")):
            axes[0][col].plot([p["tokens"] for p in points], [p[key] for p in points], marker=".", label=label(row))
            axes[1][col].plot(flops, [p[key] for p in points], marker=".", label=label(row))
    for col, name in enumerate(("KL(teacher‖model), nats/token", "top-1 agreement with the teacher")):
        axes[0][col].set(xlabel="tokens seen", ylabel=name)
        axes[1][col].set(xlabel="model FLOPs (teacher + student)", ylabel=name, xscale="log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Held-out fidelity during training (a fixed evaluation set)")
    return figures.save(fig, out)
