"""The transfer report (analogjax.fidelity.transfer's object) in words, tables and plots: transfer.json,
transfer.md, PNGs, and the model card's paragraph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analogjax.runtime import figures

TRANSFERRED_AT = 0.5  # recovered at or above this is called "transferred" in words


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Three tables: stitching per layer pair, probes per concept, steering per concept (plus skipped concepts)."""
    lines = [
        f"Stitching (held-out tokens: {report['fit_tokens']:,} to fit, {report['eval_tokens']:,} to measure; "
        f"teacher CE {report['teacher_ce']:.3f}, analog CE {report['analog_ce']:.3f} nats/token):",
        "",
        "| analog layer | teacher layer | explained variance (analog→teacher) | (teacher→analog) "
        "| stitched CE | KL(teacher‖stitched) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['analog_layer']} | {s['teacher_layer']} | {s['explained_variance']:.3f} | "
        f"{s['teacher_to_analog_explained_variance']:.3f} | {s['stitched_ce']:.3f} | {s['stitched_kl']:.4f} |"
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
            f"| {p['concept']} | {p['chance']:.3f} | {p['analog']:.3f} | {p['teacher_native']:.3f} | "
            f"{p['transferred']:.3f} | {_num(p['recovered'], 2)} |"
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
            f"| {s['concept']} | {s['native']:.2e} | {s['transferred']:.2e} | {s['random']:.2e} | "
            f"{_num(s['recovered'], 2)} |"
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
        f"{report['eval_tokens']:,} others to measure them): an affine map from the analog's residual stream "
        f"explains {min(ev):.0%}–{max(ev):.0%} of the teacher's at the matched layers. "
        f"The best stitched model (the analog up to its layer {best['analog_layer']}, mapped, then the "
        f"teacher after its layer {best['teacher_layer']}) reaches a next-token loss of "
        f"{best['stitched_ce']:.3f} nats against the "
        f"teacher's {report['teacher_ce']:.3f} and the analog's {report['analog_ce']:.3f}."
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
    ax.bar(xs - 0.2, [s["explained_variance"] for s in report["stitch"]], 0.4, label="analog → teacher")
    ax.bar(
        xs + 0.2, [s["teacher_to_analog_explained_variance"] for s in report["stitch"]], 0.4, label="teacher → analog"
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
        ax.bar(xs - 0.2, values(report["probes"]), 0.4, label="probe")
        ax.bar(xs + 0.2, values(report["steering"]), 0.4, label="steering")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(xs, names, rotation=30, ha="right")
        ax.set(ylabel="recovered", title="what the analog's methods recover on the teacher")
        ax.legend()
        written["transfer_recovered"] = figures.save(fig, out / "transfer_recovered.png")
    return written


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


def comparison_table(reports: dict[str, dict[str, Any]]) -> str:
    """Which model is the better proxy of the teacher (e.g. {"analog": ..., "baseline": ...}): a row per model
    and, per measure, the better one (higher explained variance and recovered, lower stitched KL)."""
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
