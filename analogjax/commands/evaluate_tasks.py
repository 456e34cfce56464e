"""`analogjax evaluate-tasks --model SPEC --tasks NAMES [--include-path DIR] [--limit N] [--out FILE]`: lm-eval
tasks for an analogjax run, a HF folder or release bundle, or a GGUF file (analogjax.evals), written as lm-eval's
own results JSON (its `results`, `groups`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`,
`task_hashes`, `config`).

Tasks are lm-eval names (its catalogue, or a folder given with --include-path) or local task YAML files; they are
loaded before the model, so a name lm-eval does not know costs no model load. lm-eval reads datasets through
Hugging Face `datasets`: a catalogue task downloads its data the first time.
"""

from __future__ import annotations

import json
from pathlib import Path

from analogjax.commands import add_job_arguments, join_job
from analogjax.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="a run's workdir or checkpoints directory, a HF folder or bundle, a .gguf file"
    )
    parser.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task names or local task YAML files (e.g. arc_easy)"
    )
    parser.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAML files")
    parser.add_argument("--limit", type=int, default=None, help="examples per task at most (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 16)")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="generation budget per request (default 256)")
    parser.add_argument("--out", default=None, help="results JSON (default: results.json in the working directory)")
    parser.add_argument("--log-samples", action="store_true", help="also write each example's inputs and outputs")
    add_job_arguments(parser)


def run(args) -> int:
    from analogjax.evals import require_lm_harness

    require_lm_harness("evaluate-tasks")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit must be positive, got {args.limit}")
    out = Path(args.out or "results.json")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the results file")
    from analogjax.evals.tasks import load_tasks, run_tasks

    entries = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = load_tasks(entries, include_path=args.include_path, key="--tasks")  # before any model is loaded
    join_job(args)
    from analogjax.evals.load import load_lm

    lm = load_lm(args.model, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
    results = run_tasks(lm, tasks, limit=args.limit)
    write_results(results, out, model=args.model, lm=lm, limit=args.limit, log_samples=args.log_samples)
    for name, _ in tasks.entries.values():
        row = results["results"].get(name) or results.get("groups", {}).get(name, {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{name}: {shown}")
    print(f"wrote {out}")
    return 0


def write_results(results: dict, out: Path, *, model: str, lm, limit, log_samples: bool) -> None:
    """lm-eval's results file (as its EvaluationTracker writes it); the samples, when asked, beside it as JSONL."""
    import jax
    from lm_eval.utils import handle_non_serializable, hash_string

    if jax.process_index() != 0:
        return
    samples = results.pop("samples", {})
    results["task_hashes"] = {
        task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
        for task, rows in samples.items()
    }
    results["config"] = {"model": "analogjax", "model_args": model, **lm.get_model_info(), "limit": limit}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    if log_samples:
        for task, rows in samples.items():
            lines = (json.dumps(r, default=handle_non_serializable, ensure_ascii=False) for r in rows)
            out.with_name(f"{out.stem}_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
