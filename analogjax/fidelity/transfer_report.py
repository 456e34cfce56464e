"""The transfer report (analogjax.fidelity.transfer's object) in words, tables and plots: transfer.json,
transfer.md, PNGs, and the model card's paragraph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analogjax.fidelity.intervals import format_interval
from analogjax.runtime import figures

TRANSFERRED_AT = 0.5  # recovered at or above this is called "transferred" in words


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """A figure with its 95% interval where the report has one (reports written before intervals have none)."""
    value = row.get(key)
    return "n/a" if value is None else format_interval(value, row.get(f"{key}_ci95"), digits)


def _intervened(report: dict[str, Any]) -> str:
    """Where the stitched forwards and steering ran on fewer eval tokens than the rest: how many (else nothing)."""
    tokens = report.get("intervention_tokens")
    if tokens is None or tokens == report["eval_tokens"]:
        return ""
    return f", of which {tokens:,} also for stitched CE and KL and steering"


def _ce_intervened(report: dict[str, Any]) -> str:
    """The CE on the intervention rows (what the stitched CE compares with), where those are fewer than all."""
    if "teacher_ce_intervened" not in report:
        return ""
    return (
        f"; on the tokens of the stitched CE: teacher {_ci(report, 'teacher_ce_intervened')}, "
        f"analog {_ci(report, 'analog_ce_intervened')}"
    )


def _sci(row: dict[str, Any], key: str) -> str:
    """A small effect (probability mass) with its interval, in scientific notation."""
    value, interval = row.get(key), row.get(f"{key}_ci95")
    if value is None:
        return "n/a"
    if not interval or None in interval:  # none, or too few rows to estimate one ([None, None])
        return f"{value:.2e}"
    return f"{value:.2e} [{interval[0]:.2e}, {interval[1]:.2e}]"


def markdown_table(report: dict[str, Any]) -> str:
    """Three tables: stitching per layer pair, probes per concept, steering per concept (plus skipped concepts); each
    figure with its 95% interval in brackets where the report has one."""
    interval_note = (
        f" Brackets: 95% intervals, {report['method']['intervals']}." if "intervals" in report["method"] else ""
    )
    lines = [
        f"Stitching (held-out tokens: {report['fit_tokens']:,} to fit, {report['eval_tokens']:,} to measure"
        f"{_intervened(report)}; "
        f"teacher CE {_ci(report, 'teacher_ce')}, analog CE {_ci(report, 'analog_ce')} nats/token"
        f"{_ce_intervened(report)}; each segment's first token, the attention sink, left out).{interval_note}",
        "",
        "| analog layer | teacher layer | explained variance (analog→teacher) | (teacher→analog) "
        "| stitched CE | KL(teacher‖stitched) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['analog_layer']} | {s['teacher_layer']} | {_ci(s, 'explained_variance')} | "
        f"{_ci(s, 'teacher_to_analog_explained_variance')} | {_ci(s, 'stitched_ce')} | {_ci(s, 'stitched_kl', 4)} |"
        for s in report["stitch"]
    ]
    i, j = report["concept_layer_pair"]
    if report["probes"]:
        lines += [
            "",
            f"Probes (linear discriminant; analog layer {i}, teacher layer {j}; accuracy on eval tokens):",
            "",
            "| concept | chance | analog | teacher native | transferred | recovered |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {p['concept']} | {p['chance']:.3f} | {_ci(p, 'analog')} | {_ci(p, 'teacher_native')} | "
            f"{_ci(p, 'transferred')} | {_ci(p, 'recovered', 2)} |"
            for p in report["probes"]
        ]
        lines += [
            "",
            f"Steering (added at teacher layer {j}, norm {report['method']['steering_norm']:.3g}; increase "
            "of the marker tokens' probability outside the concept):",
            "",
            "| concept | native | transferred | random | recovered |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['concept']} | {_sci(s, 'native')} | {_sci(s, 'transferred')} | {_sci(s, 'random')} | "
            f"{_ci(s, 'recovered', 2)} |"
            for s in report["steering"]
        ]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['concept']} ({s['reason']})" for s in report["skipped"]) + "."]
    return "\n".join(lines)


def card_paragraph(report: dict[str, Any]) -> str:
    """What transferred and what did not, in plain words (for the model card)."""
    stitch = report["stitch"]
    ev = [s["explained_variance"] for s in stitch]
    best = min(stitch, key=lambda s: s["stitched_ce"])
    words = [
        f"Transfer checks on held-out text ({report['fit_tokens']:,} tokens to fit the maps and probes, "
        f"{report['eval_tokens']:,} others to measure them{_intervened(report)}): an affine map from the analog's "
        "residual stream "
        f"explains {min(ev):.0%}–{max(ev):.0%} of the teacher's at the matched layers. "
        f"The best stitched model (the analog up to its layer {best['analog_layer']}, mapped, then the "
        f"teacher after its layer {best['teacher_layer']}) reaches a next-token loss of "
        f"{best['stitched_ce']:.3f} nats against the "
        f"teacher's {report.get('teacher_ce_intervened', report['teacher_ce']):.3f} and the analog's "
        f"{report.get('analog_ce_intervened', report['analog_ce']):.3f} on the same tokens."
    ]
    for rows, what, native, baseline in (
        (report["probes"], "Linear probes trained on the analog", "probe", "chance"),
        (report["steering"], "Steering directions found on the analog", "direction", "a random direction"),
    ):
        if not rows:
            continue
        good = [r["concept"] for r in rows if r["recovered"] is not None and r["recovered"] >= TRANSFERRED_AT]
        bad = [
            f"{r['concept']} ({r['recovered']:.2f})"
            for r in rows
            if r["recovered"] is not None and r["recovered"] < TRANSFERRED_AT
        ]
        unjudged = [r["concept"] for r in rows if r["recovered"] is None]
        parts = [f"transferred to the teacher for {', '.join(good)}" if good else "transferred for no concept"]
        if bad:
            parts.append(f"did not for {', '.join(bad)}")
        if unjudged:
            parts.append(
                f"cannot be judged for {', '.join(unjudged)}, where the teacher's own {native} does no "
                f"better than {baseline} beyond noise"
            )
        words.append(f"{what} " + "; ".join(parts) + ".")
    if report["probes"]:
        words.append(
            f"(Transferred: recovered ≥ {TRANSFERRED_AT}; recovered is 1 when the analog's method works on "
            "the teacher as well as the teacher's own, 0 when no better than chance or a random direction.)"
        )
    if report["skipped"]:
        words.append("Not measured: " + "; ".join(f"{s['concept']} ({s['reason']})" for s in report["skipped"]) + ".")
    return " ".join(words)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """transfer.json, transfer.md and the plots in `out_dir`; returns the written paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "transfer.json"}
    written["json"].write_text(json.dumps(report, indent=2) + "\n")
    written.update(plot(report, out))
    lines = ["# Transfer from the analog to its teacher", "", card_paragraph(report), "", markdown_table(report), ""]
    lines += [f"![{name}]({path.name})" for name, path in written.items() if path.suffix == ".png"]
    written["md"] = out / "transfer.md"
    written["md"].write_text("\n".join(lines) + "\n")
    return written


def plot(report: dict[str, Any], out: Path) -> dict[str, Path]:
    import numpy as np

    plt = figures.pyplot()

    written = {}
    labels = [f"{s['analog_layer']}↔{s['teacher_layer']}" for s in report["stitch"]]
    xs = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, key, label in (
        (-0.2, "explained_variance", "analog → teacher"),
        (0.2, "teacher_to_analog_explained_variance", "teacher → analog"),
    ):
        ax.bar(
            xs + offset,
            [s[key] for s in report["stitch"]],
            0.4,
            label=label,
            yerr=_error_bars(report["stitch"], key),
            capsize=3,
        )
    ax.set_xticks(xs, labels)
    ax.set(
        xlabel="layer pair (analog↔teacher)", ylabel="explained variance", title="affine maps between residual streams"
    )
    ax.legend()
    written["transfer_explained_variance"] = figures.save(fig, out / "transfer_explained_variance.png")
    if report["probes"]:
        names = [p["concept"] for p in report["probes"]]
        xs = np.arange(len(names))

        def values(rows):
            return [np.nan if r["recovered"] is None else r["recovered"] for r in rows]

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for offset, rows, label in ((-0.2, report["probes"], "probe"), (0.2, report["steering"], "steering")):
            ax.bar(xs + offset, values(rows), 0.4, label=label, yerr=_error_bars(rows, "recovered"), capsize=3)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(xs, names, rotation=30, ha="right")
        ax.set(ylabel="recovered", title="what the analog's methods recover on the teacher")
        ax.legend()
        written["transfer_recovered"] = figures.save(fig, out / "transfer_recovered.png")
    return written


def _error_bars(rows: list[dict[str, Any]], key: str):
    """[2, n] distances from each figure to its 95% interval's ends (0 where a figure has none), or None."""

    def bounded(r) -> bool:  # a figure with both ends of an interval (too few rows give [None, None])
        ci = r.get(f"{key}_ci95")
        return r[key] is not None and bool(ci) and None not in ci

    if not any(bounded(r) for r in rows):
        return None
    out = [[r[key] - r[f"{key}_ci95"][0], r[f"{key}_ci95"][1] - r[key]] if bounded(r) else [0.0, 0.0] for r in rows]
    return [[max(lo, 0.0) for lo, _ in out], [max(hi, 0.0) for _, hi in out]]


def proxy_summary(report: dict[str, Any]) -> dict[str, float | None]:
    """Four numbers per model: mean explained variance (analog → teacher), the best stitched KL, and the mean
    recovered of probes and of steering over the measured concepts (None where nothing was measurable)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {
        "explained_variance": mean([s["explained_variance"] for s in report["stitch"]]),
        "stitched_kl": min(s["stitched_kl"] for s in report["stitch"]),
        "probe_recovered": mean([p["recovered"] for p in report["probes"]]),
        "steering_recovered": mean([s["recovered"] for s in report["steering"]]),
    }


def comparison_table(comparison) -> str:
    """Which model is the better proxy of the teacher. Given comparison entries (transfer_rows.comparison, or
    measure_models' result for "analog" against "baseline"): one line per measure, each model's figure with its 95%
    interval, the interval of the difference and the verdict beyond noise. Given plain {name: report} (reports made
    without per-row sums): a row per model and, per measure, the larger or smaller figure (no noise estimate)."""
    rows = getattr(comparison, "rows", None)
    if isinstance(comparison, dict) and rows is not None and {"analog", "baseline"} <= set(rows):
        from analogjax.fidelity.transfer_rows import comparison as paired

        comparison = paired(rows["analog"], rows["baseline"])
    if isinstance(comparison, dict):
        return _plain_table(comparison)
    width = max([len(e["measure"]) for e in comparison] + [7])
    lines = [
        f"{'measure':<{width}}  {'analog [95% interval]':>28}  {'baseline [95% interval]':>28}  "
        f"{'difference [95% interval]':>28}  documents  better"
    ]
    for e in comparison:
        digits = 4 if "KL" in e["measure"] else 3
        cells = [
            "n/a" if e[key] is None else format_interval(e[key], e[f"{key}_ci95"], digits)
            for key in ("analog", "baseline")
        ]
        diff = e["difference_ci95"]
        cells.append("n/a" if not diff or None in diff else f"[{diff[0]:.{digits}f}, {diff[1]:.{digits}f}]")
        documents = e.get("documents", "-")
        lines.append(
            f"{e['measure']:<{width}}  " + "  ".join(f"{c:>28}" for c in cells) + f"  {documents:>9}  {e['better']}"
        )
    return "\n".join(lines)


def _plain_table(reports: dict[str, dict[str, Any]]) -> str:
    summaries = {name: proxy_summary(r) for name, r in reports.items()}
    measures = (
        ("explained_variance", "explained var.", max),
        ("stitched_kl", "stitched KL", min),
        ("probe_recovered", "probe recovered", max),
        ("steering_recovered", "steering recovered", max),
    )
    lines = [f"{'model':<10}" + "".join(f"{label:>20}" for _, label, _ in measures)]
    for name, summary in summaries.items():
        lines.append(f"{name:<10}" + "".join(f"{_num(summary[key]):>20}" for key, _, _ in measures))
    better = []
    for key, _label, pick in measures:
        known = {name: s[key] for name, s in summaries.items() if s[key] is not None}
        values = set(known.values())
        better.append(
            "n/a" if len(known) < len(summaries) else "tie" if len(values) == 1 else pick(known, key=known.get)
        )
    lines.append(f"{'better':<10}" + "".join(f"{b:>20}" for b in better))
    return "\n".join(lines)
