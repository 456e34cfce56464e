"""The release gate: what must hold before an analog is published, and the card's release statement that says
whether it did.

Three kinds of gate, each named the way errors, the card and `--override-gate` name it:
- `size_cap`: the analog's parameters as a fraction of the teacher's (counted as the card counts them:
  analogjax.runtime.flops.param_count, total; active beside it for MoE) inside `release.size_cap` (default the
  policy's 0.5%-5%, arXiv 2510.14053);
- `TASK.max_accuracy` (a capability ceiling, e.g. a dual-use set the lab supplies) and `TASK.min_agreement` (a task
  fidelity floor) over `release.tasks`;
- `MEASURE.max` / `MEASURE.min` over any figure of the fidelity report (a dotted path into fidelity.json:
  `overall.forward_kl`, `by_source.NAME.top1_agreement`, `transfer.probes.CONCEPT.recovered`, `tasks.TASK.agreement`).

`check_config` refuses a gate that cannot be judged before any model is loaded; `judge` measures each gate on the
finished report and refuses the release (one `error:` line per failing gate: its name, value and bound) unless the
gate was overridden with a reason, which the statement then records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analogjax.errors import UserError

SIZE_GATE = "size_cap"
# The fidelity report's top-level sections a measure gate may read.
MEASURE_SECTIONS = ("overall", "by_source", "transfer", "tasks", "cka")
TASK_FIELDS = ("analog_accuracy", "teacher_accuracy", "agreement", "n")


class GateRefusal(UserError):
    """The release failed gates that were not overridden: one `error:` line per gate."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("\nerror: ".join(self.lines))  # the CLI prefixes the first line with "error: "


@dataclass(frozen=True)
class GateResult:
    """One gate, judged: its value on this analog, its bound in words, and whether it passed or was overridden."""

    name: str
    value: float | None
    bound: str
    passed: bool
    override: str | None = None  # the reason it was released past (or overridden while passing)

    @property
    def blocks(self) -> bool:
        return not self.passed and self.override is None


def size_figures(config) -> dict[str, Any]:
    """Parameter counts as the card gives them, their ratio, and for MoE the active counts and ratio."""
    from analogjax.runtime.flops import param_count

    student, teacher = param_count(config.model), param_count(config.teacher.model)
    out: dict[str, Any] = {"analog_params": student, "teacher_params": teacher, "ratio": student / teacher}
    if config.model.moe.enabled or config.teacher.model.moe.enabled:
        active_s = param_count(config.model, active=True)
        active_t = param_count(config.teacher.model, active=True)
        out.update(analog_active=active_s, teacher_active=active_t, active_ratio=active_s / active_t)
    return out


def gate_names(release) -> list[str]:
    return [SIZE_GATE, *(g.name for g in release.gates)]


def overrides_of(release, cli: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """gate name -> reason, from release.overrides and then --override-gate/--reason pairs."""
    out = {o.gate: o.reason for o in release.overrides}
    for name, reason in cli:
        if not reason.strip():
            raise UserError(f"--override-gate {name}: --reason is empty; an override needs its reason")
        out[name] = reason
    return out


def check_config(release, *, transfer: bool, overrides: Mapping[str, str]) -> None:
    """Refuse, before any model is loaded, what no measurement can judge: a task gate without tasks, a measure
    outside the report, an override of a gate that does not exist."""
    for i, gate in enumerate(release.gates):
        key = f"release.gates[{i}]"
        if gate.task and not release.tasks:
            raise UserError(f"{key}.task: {gate.task!r} is not in release.tasks (which is empty)")
        if gate.measure:
            head, _, rest = gate.measure.partition(".")
            if head not in MEASURE_SECTIONS or not rest:
                raise UserError(
                    f"{key}.measure: {gate.measure!r} is not a figure of the fidelity report (a dotted path under "
                    f"{', '.join(MEASURE_SECTIONS)}, e.g. overall.forward_kl)"
                )
            if head == "transfer" and not transfer:
                raise UserError(
                    f"{key}.measure: {gate.measure!r} needs the transfer checks, which this release leaves out"
                )
            if head == "tasks" and not release.tasks:
                raise UserError(f"{key}.measure: {gate.measure!r} reads release.tasks, which is empty")
    names = gate_names(release)
    if len(set(names)) != len(names):
        raise UserError(f"release.gates: {sorted({n for n in names if names.count(n) > 1})[0]} is given twice")
    for i, override in enumerate(release.overrides):
        if override.gate not in names:
            raise UserError(
                f"release.overrides[{i}].gate: {override.gate!r} is no gate of this release ({', '.join(names)})"
            )
    for name in overrides:
        if name not in names:
            raise UserError(f"--override-gate {name}: no such gate (this release's gates: {', '.join(names)})")


def check_task_gates(release, task_names: Mapping[str, str]) -> None:
    """Each task a gate names is an entry of release.tasks (as given, or the task name inside a task file);
    `task_names`: entry -> the name lm-eval reports it under."""
    known = set(task_names) | set(task_names.values())
    for i, gate in enumerate(release.gates):
        if gate.task and gate.task not in known:
            raise UserError(
                f"release.gates[{i}].task: {gate.task!r} is not in release.tasks ({', '.join(task_names.values())})"
            )
        if gate.measure.startswith("tasks."):
            parts = gate.measure.split(".")
            if len(parts) != 3 or parts[1] not in known or parts[2] not in TASK_FIELDS:
                raise UserError(
                    f"release.gates[{i}].measure: {gate.measure!r} is not tasks.TASK.FIELD with TASK in "
                    f"release.tasks and FIELD one of {', '.join(TASK_FIELDS)}"
                )


def _lookup(report: dict[str, Any], path: str, key: str) -> float:
    """A number in the report by dotted path; a list is indexed by position or by an element's concept/task name."""
    node: Any = report
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list):
            named = [x for x in node if isinstance(x, dict) and part in (x.get("concept"), x.get("task"))]
            if named:
                node = named[0]
            elif part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
        else:
            node = None
        if node is None:
            raise UserError(f"{key}: {path!r} is not in this release's fidelity report")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise UserError(f"{key}: {path!r} is not a number in the fidelity report")
    return float(node)


def _task_name(gate_task: str, task_names: Mapping[str, str]) -> str:
    return task_names.get(gate_task, gate_task)


def judge(
    release, size: dict[str, Any], report: dict[str, Any], overrides: Mapping[str, str], task_names: Mapping[str, str]
) -> list[GateResult]:
    """Every gate on the measured report. Raises GateRefusal when a gate fails and was not overridden."""
    results: list[GateResult] = []

    def add(name: str, value: float, bound: str, passed: bool) -> None:
        results.append(GateResult(name, value, bound, passed, overrides.get(name)))

    low, high = release.size_cap
    add(SIZE_GATE, size["ratio"], f"{low:.2%} – {high:.2%} of the teacher", low <= size["ratio"] <= high)
    for i, gate in enumerate(release.gates):
        key = f"release.gates[{i}]"
        if gate.task:
            field = "analog_accuracy" if gate.max_accuracy is not None else "agreement"
            value = report.get("tasks", {}).get(_task_name(gate.task, task_names), {}).get(field)
            if value is None:
                raise UserError(f"{key}: task {gate.task!r} has no {field} (its examples give no accuracy or choice)")
        else:
            path = gate.measure
            if path.startswith("tasks."):
                _, task, field = path.split(".")
                path = f"tasks.{_task_name(task, task_names)}.{field}"
            value = _lookup(report, path, f"{key}.measure")
        ceiling = gate.max_accuracy if gate.max_accuracy is not None else gate.max
        floor = gate.min_agreement if gate.min_agreement is not None else gate.min
        if ceiling is not None:
            add(gate.name, value, f"≤ {ceiling:g}", value <= ceiling)
        else:
            assert floor is not None  # ReleaseGate.check: one bound per gate
            add(gate.name, value, f"≥ {floor:g}", value >= floor)
    failing = [r for r in results if r.blocks]
    if failing:
        raise GateRefusal(
            [
                f"release gate {r.name} failed: {_value(r)}, bound {r.bound} "
                f"(release past it with --override-gate {r.name} --reason TEXT)"
                for r in failing
            ]
        )
    return results


def _value(result: GateResult) -> str:
    if result.value is None:
        return "not measured"
    if result.name == SIZE_GATE:
        return f"{result.value:.2%} of the teacher's parameters"
    return f"{result.value:.4g}"


# --------------------------------------------------------------------------------------------------------------------
# The card


def tasks_table(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """The card's table of task fidelity: accuracies, agreement with its 95% interval, examples."""

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    rows = [
        "| task | analog accuracy | teacher accuracy | agreement (95% CI) | examples |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in tasks.items():
        ci = t.get("agreement_ci95")
        agreement = pct(t.get("agreement")) + (f" ({ci[0]:.1%}–{ci[1]:.1%})" if ci else "")
        rows.append(
            f"| {name} | {pct(t.get('analog_accuracy'))} | {pct(t.get('teacher_accuracy'))} | {agreement} | {t['n']} |"
        )
    return "\n".join(rows)


def _divergence_lines(report: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Where the analog departs most from the teacher, worst first: data sources, concepts, tasks."""
    lines = []
    overall = report.get("overall", {})
    if "top1_agreement" in overall:
        lines.append(
            f"- overall: the analog's most likely next token is the teacher's on {overall['top1_agreement']:.1%} of "
            f"held-out tokens (KL {overall['forward_kl']:.3f} nats per token)"
        )
    sources = [(name, s) for name, s in report.get("by_source", {}).items() if "top1_agreement" in s]
    if sources:
        sources.sort(key=lambda x: x[1]["top1_agreement"])
        lines.append(
            "- by data source, least agreement first: "
            + "; ".join(f"{n} {s['top1_agreement']:.1%} (KL {s['forward_kl']:.3f})" for n, s in sources[:limit])
        )
    probes = [p for p in report.get("transfer", {}).get("probes", []) if p.get("recovered") is not None]
    if probes:
        probes.sort(key=lambda p: p["recovered"])
        lines.append(
            "- by concept, least recovered on the teacher first (a probe trained on the analog; 1 = as well as the "
            "teacher's own): " + "; ".join(f"{p['concept']} {p['recovered']:.2f}" for p in probes[:limit])
        )
    tasks = [(n, t) for n, t in report.get("tasks", {}).items() if t.get("agreement") is not None]
    if tasks:
        tasks.sort(key=lambda x: x[1]["agreement"])
        lines.append(
            "- by task, least agreement first: "
            + "; ".join(
                f"{n} {t['agreement']:.1%} agreement"
                + (
                    f" (analog {t['analog_accuracy']:.1%} vs teacher {t['teacher_accuracy']:.1%} accuracy)"
                    if t.get("analog_accuracy") is not None
                    else ""
                )
                for n, t in tasks[:limit]
            )
        )
    return lines


def release_statement(size: Mapping[str, Any], results: Sequence[GateResult], report: Mapping[str, Any]) -> str:
    """The card's first section: the size ratio, each gate with its value, the overrides and their reasons, and
    where the analog diverges most from its teacher."""
    active = (
        f" ({size['analog_active']:,} active per token against the teacher's {size['teacher_active']:,}: "
        f"{size['active_ratio']:.2%})"
        if "active_ratio" in size
        else ""
    )
    lines = [
        "## Release statement",
        "",
        f"The analog has {size['analog_params']:,} parameters, **{size['ratio']:.2%}** of its teacher's "
        f"{size['teacher_params']:,}{active}.",
        "",
        "| gate | value | bound | result |",
        "|---|---:|---|---|",
    ]
    for r in results:
        value = "—" if r.value is None else (f"{r.value:.2%}" if r.name == SIZE_GATE else f"{r.value:.4g}")
        verdict = "passed" if r.passed else "**failed: released by override**"
        lines.append(f"| {r.name} | {value} | {r.bound} | {verdict} |")
    overridden = [r for r in results if r.override is not None]
    lines.append("")
    if overridden:
        lines.append("Overrides, with the lab's reasons:")
        lines.append("")
        lines += [
            f"- **{r.name}** ({'failed' if not r.passed else 'passed; overridden all the same'}): {r.override}"
            for r in overridden
        ]
    else:
        lines.append("No gate was overridden.")
    divergence = _divergence_lines(report)
    if divergence:
        lines += ["", "What was preserved and what was lost (where the analog diverges most from its teacher):", ""]
        lines += divergence
    return "\n".join(lines) + "\n"
