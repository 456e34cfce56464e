"""lm-eval tasks: named ones (lm-eval's own catalogue, or folders given with --include-path) and local task files,
loaded before any model is (a name lm-eval does not know, or a file it cannot parse, is one error line), then run
for one model or compared between the analog and the teacher on the same examples.

A local task file is a lm-eval task YAML; its relative `data_files` are read relative to the file's folder (lm-eval
itself reads them relative to the working directory), so a task and its data travel together.

`task_fidelity(analog, teacher, tasks)` is the release's task report: per task, each model's accuracy (the task's
first accuracy-like metric, per example), the per-example agreement (same choice for multiple choice, same answer
for generation, same greedy verdict for loglikelihood) with its 95% Wilson interval, and the examples' count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analogjax.errors import UserError

FEWSHOT_SEED = 1234  # lm-eval's default (simple_evaluate's fewshot_random_seed)
# The per-example metric reported as a task's accuracy: the first of these the task computes.
ACCURACY_METRICS = ("acc", "exact_match", "em", "acc_norm", "f1", "mcc")


def is_task_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


@dataclass
class LoadedTasks:
    """The tasks lm-eval built (its TaskManager.load result) and, per entry as the user named it, its report name
    and the leaf tasks it stands for (a group stands for its subtasks)."""

    loaded: dict
    entries: dict[str, tuple[str, list[str]]]  # entry -> (report name, leaf task names)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries.values()]


@contextlib.contextmanager
def quiet():
    """lm-eval and Hugging Face datasets without their progress bars and INFO/WARNING logs: what a user sees is what
    analogjax says. lm-eval's per-task request loop offers no switch for its bar, so its module's tqdm is replaced
    for the duration."""
    import functools
    import logging

    import datasets
    import lm_eval.api.task as task_module

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    original = task_module.tqdm
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


def _task_manager(include_path: str | None, need_catalogue: bool):
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise UserError(f"--include-path: no such folder {include_path}")
    # lm-eval's own catalogue takes seconds to index: only when a name needs it.
    return TaskManager(include_path=include_path, include_defaults=need_catalogue)


def load_tasks(entries: Sequence[str], *, include_path: str | None = None, key: str = "--tasks") -> LoadedTasks:
    """Build every task of `entries` (names or task YAML files); UserError naming `key` and the entry for one
    lm-eval does not know or cannot build."""
    if not entries:
        raise UserError(f"{key}: no tasks given")
    for entry in entries:
        if is_task_file(entry) and not Path(entry).is_file():
            raise UserError(f"{key}: no such task file {entry}")
    names = [e for e in entries if not is_task_file(e)]
    manager = _task_manager(include_path, need_catalogue=bool(names) and not _all_local(names, include_path))
    loaded: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    found: dict[str, tuple[str, list[str]]] = {}
    for entry in entries:
        try:
            with quiet():
                one = _load_one(manager, entry)
        except UserError:
            raise
        except Exception as e:  # lm-eval raises KeyError, ValueError, yaml and datasets errors alike
            what = "cannot build task file" if is_task_file(entry) else "lm-eval cannot load task"
            raise UserError(f"{key}: {what} {entry!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        for part in ("tasks", "groups", "group_map"):
            loaded[part].update(one.get(part, {}))
        leaves = sorted(one["tasks"])
        if not leaves:
            raise UserError(f"{key}: {entry!r} names no task")
        name = entry if not is_task_file(entry) else (next(iter(one.get("groups", {})), None) or leaves[0])
        found[entry] = (str(name), leaves)
    return LoadedTasks(loaded, found)


def _load_one(manager, entry: str) -> dict:
    if is_task_file(entry):
        path = Path(entry).absolute()
        with contextlib.chdir(path.parent):  # relative data_files are the file's neighbours
            return manager.load([str(path)])
    return manager.load([entry])


def _all_local(names: Sequence[str], include_path: str | None) -> bool:
    """Whether every name is a task or group of the --include-path folder alone."""
    if not include_path:
        return False
    known = set(_task_manager(include_path, need_catalogue=False).all_tasks)
    return all(n in known for n in names)


def prepare(tasks: LoadedTasks) -> dict:
    """lm-eval's task dict, set up as simple_evaluate sets it up: zero-shot unless a task says otherwise, the
    default few-shot seed (so two models see the same few-shot examples)."""
    for task in tasks.loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return tasks.loaded


def run_tasks(lm, tasks: LoadedTasks, *, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's evaluate() of `lm` on `tasks` with per-example samples (no bootstrap: the release computes its own
    intervals)."""
    from lm_eval.evaluator import evaluate

    with quiet():
        results = evaluate(lm=lm, task_dict=prepare(tasks), limit=limit or None, bootstrap_iters=0, log_samples=True)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


# --------------------------------------------------------------------------------------------------------------------
# Comparing two models on the same examples


def _prediction(sample: dict[str, Any], output_type: str):
    """What the model chose on one example: a choice index, a generated answer, a greedy verdict, or None."""
    resps = sample["filtered_resps"]
    if output_type == "multiple_choice":
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
        return int(max(range(len(lls)), key=lambda i: lls[i]))
    if output_type == "generate_until":
        return resps[0] if isinstance(resps, list) else resps
    if output_type == "loglikelihood":
        first = resps[0] if isinstance(resps, list) else resps
        return bool(first[1]) if isinstance(first, (list, tuple)) else None
    return None  # loglikelihood_rolling: a perplexity, no choice to agree on


def _accuracy_metric(sample: dict[str, Any]) -> str | None:
    for name in ACCURACY_METRICS:
        if name in sample:
            return name
    return next((m for m in sample.get("metrics", []) if isinstance(sample.get(m), (int, float))), None)


def _by_doc(samples: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for s in samples:
        out.setdefault(int(s["doc_id"]), s)  # a task with several filters logs each example once per filter
    return out


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (sound at 0 and 1 and for few examples, unlike p ± 2se)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def compare(analog: dict[str, Any], teacher: dict[str, Any], tasks: LoadedTasks) -> dict[str, dict[str, Any]]:
    """Per entry of `tasks`: both models' accuracy and their per-example agreement, pooled over a group's subtasks."""
    report: dict[str, dict[str, Any]] = {}
    for name, leaves in tasks.entries.values():
        n = agree = judged = 0
        correct = {"analog": 0.0, "teacher": 0.0}
        metric = None
        kinds = set()
        for leaf in leaves:
            output_type = tasks.loaded["tasks"][leaf].get_config("output_type")
            kinds.add(output_type)
            mine, theirs = _by_doc(analog["samples"].get(leaf, [])), _by_doc(teacher["samples"].get(leaf, []))
            for doc in sorted(set(mine) & set(theirs)):
                a, t = mine[doc], theirs[doc]
                n += 1
                metric = metric or _accuracy_metric(a)
                if metric is not None:
                    correct["analog"] += float(a.get(metric, 0.0))
                    correct["teacher"] += float(t.get(metric, 0.0))
                pa, pt = _prediction(a, output_type), _prediction(t, output_type)
                if pa is not None and pt is not None:
                    judged += 1
                    agree += int(pa == pt)
        entry: dict[str, Any] = {
            "n": n,
            "metric": metric,
            "output_type": "/".join(sorted(kinds)),
            "analog_accuracy": correct["analog"] / n if n and metric else None,
            "teacher_accuracy": correct["teacher"] / n if n and metric else None,
            "agreement": agree / judged if judged else None,
            "agreement_ci95": list(wilson_interval(agree, judged)) if judged else None,
            "subtasks": leaves if leaves != [name] else [],
        }
        report[name] = entry
    return report


def task_fidelity(analog_lm, teacher_lm, tasks: LoadedTasks, *, limit: int | None = None) -> dict[str, Any]:
    """The release's `tasks` report: `analog_lm` and `teacher_lm` (AnalogLM) on the same examples of `tasks`."""
    analog = run_tasks(analog_lm, tasks, limit=limit)
    teacher = run_tasks(teacher_lm, tasks, limit=limit)
    return compare(analog, teacher, tasks)
