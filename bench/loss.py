"""Peak memory and time of distillation loss + gradient: fused (chunked, custom VJP) vs plain (full logits).

Each case runs in its own subprocess so peak RSS belongs to that case alone (os.wait4 gives the child's own rusage).
The teacher is a hidden-state TeacherSignal (its hidden states and lm_head), as in the distill step, so the plain
path materialises [tokens, vocab] logits for both models. Objective: forward KL at T = 2 plus 0.5 · CE, on CPU, in
float32 or (`--dtype bfloat16`) with bf16 hidden states (heads stay float32 master copies, as the step passes them).

Reported per case (one JSON line each):
  peak_rss_mb      whole-process peak RSS (inputs, compiled program, runtime, the run itself)
  inputs_rss_mb    RSS once inputs are on the device and the program is compiled, before running
  run_peak_rss_mb  peak RSS while running (VmHWM reset after compiling), so compile-time memory is excluded
  working_mb       run_peak_rss_mb − inputs_rss_mb: what the loss and its gradient need beyond their inputs
  xla_temp_mb      XLA's own temp-buffer size for the compiled program (deterministic, no allocator noise)
  time_s_median    median wall time of loss + gradient after one warm-up run (time_s_min: the fastest run)
  cpu_s_median     median process CPU time of the same runs: on a machine shared with other jobs wall time swings
                   with their load, while CPU time measures the work itself (XLA's threads are all in-process)
and one summary line per vocabulary comparing each fused chunk size with plain. Cases run in rounds (a fresh
subprocess per case per round, cycling through the cases) so a shared machine's drifting load hits all of them alike.

  python bench/loss.py            # vocab 32k and 128k, 2048 tokens, d_model 1024 (a few minutes on 2 cores)
  python bench/loss.py --quick    # small smoke run
  python bench/loss.py --fit-budget-mb 8192    # the most tokens XLA plans within 8 GiB, vocab 131k and 262k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _loss_and_grad(path: str, chunk_size: int):
    """The jitted loss + gradient (w.r.t. the student's hidden states and head) of one case."""
    import jax
    import jax.numpy as jnp

    from analogjax.objective.fused import fused_distill_loss, plain_distill_loss

    loss_fn = {"fused": fused_distill_loss, "plain": plain_distill_loss}[path]

    # Everything is an argument: a closed-over teacher would be a compile-time constant that XLA folds.
    def objective(hidden_, head_, teacher_, targets_, weights_):
        out = loss_fn(
            hidden_,
            head_,
            teacher_,
            targets_,
            weights_,
            kd_terms=(("forward_kl", ()),),
            kd_weights=jnp.array([4.0]),
            ce_weight=0.5,
            temperature=2.0,
            chunk_size=chunk_size,
        )
        return out["loss"], out["kl"]

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def _arguments(vocab: int, tokens: int, d_model: int, abstract: bool = False, dtype: str = "float32") -> tuple:
    """(student hidden, student head, teacher signal, targets, weights); shapes only when `abstract`. Hidden states
    are in the compute `dtype`, heads float32 (master parameters, as the train step passes them)."""
    import jax
    import jax.numpy as jnp

    from analogjax.objective.signal import TeacherSignal

    if abstract:
        f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
        compute = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731
        teacher = TeacherSignal.from_hidden(compute(tokens, d_model), f32(d_model, vocab))
        return (
            compute(tokens, d_model),
            f32(d_model, vocab),
            teacher,
            jax.ShapeDtypeStruct((tokens,), jnp.int32),
            f32(tokens),
        )
    keys = jax.random.split(jax.random.key(0), 6)
    hidden = jax.random.normal(keys[0], (tokens, d_model), jnp.float32).astype(dtype)
    head = jax.random.normal(keys[1], (d_model, vocab), jnp.float32) * d_model**-0.5
    teacher = TeacherSignal.from_hidden(
        jax.random.normal(keys[2], (tokens, d_model), jnp.float32).astype(dtype),
        jax.random.normal(keys[3], (d_model, vocab), jnp.float32) * d_model**-0.5,
    )
    targets = jax.random.randint(keys[4], (tokens,), 0, vocab)
    weights = (jax.random.uniform(keys[5], (tokens,)) > 0.1).astype(jnp.float32)
    return hidden, head, teacher, targets, weights


def largest_fit(path: str, vocab: int, d_model: int, chunk_size: int, budget_mb: float, most: int = 2**20) -> dict:
    """The most tokens (a power of two from 128 up to `most`) whose loss + gradient XLA plans within `budget_mb`:
    the compiled program's arguments, outputs and temporaries (memory_analysis, compile only: nothing runs, so the
    figure is XLA's plan, not the allocator's). The inputs are counted: they are what a step holds for the loss."""
    step = _loss_and_grad(path, chunk_size)
    fits, tokens, planned = None, 128, None
    while tokens <= most:
        analysis = step.lower(*_arguments(vocab, tokens, d_model, abstract=True)).compile().memory_analysis()
        total = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
        if total > budget_mb * 2**20:
            break
        fits, planned = tokens, total
        tokens *= 2
    return {
        "bench": "loss_fit",
        "path": path,
        "vocab": vocab,
        "d_model": d_model,
        "chunk_size": chunk_size if path == "fused" else None,
        "budget_mb": budget_mb,
        "largest_tokens": fits,
        "planned_mb": round(planned / 2**20, 1) if planned is not None else None,
        "search_capped": fits == most,
    }


def run_case(
    path: str, vocab: int, tokens: int, d_model: int, chunk_size: int, repeats: int, dtype: str = "float32"
) -> dict:
    import jax

    step = _loss_and_grad(path, chunk_size)
    arguments = _arguments(vocab, tokens, d_model, dtype=dtype)
    compiled = step.lower(*arguments).compile()
    analysis = compiled.memory_analysis()
    jax.block_until_ready(arguments)
    inputs_kb = _read_status_kb("VmRSS")
    peak_reset = _reset_peak_rss()

    (loss, kl), grads = compiled(*arguments)  # warm-up
    jax.block_until_ready(grads)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        (loss, kl), grads = compiled(*arguments)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    run_peak_kb = _read_status_kb("VmHWM")
    return {
        "bench": "loss",
        "path": path,
        "vocab": vocab,
        "tokens": tokens,
        "d_model": d_model,
        "dtype": dtype,
        "chunk_size": chunk_size if path == "fused" else None,
        "time_s_median": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
        "cpu_times_s": [round(t, 3) for t in cpu_times],
        "inputs_rss_mb": round(inputs_kb / 1024, 1),
        "run_peak_rss_mb": round(run_peak_kb / 1024, 1) if peak_reset else None,
        "working_mb": round((run_peak_kb - inputs_kb) / 1024, 1) if peak_reset else None,
        "xla_temp_mb": round(analysis.temp_size_in_bytes / 2**20, 1) if analysis is not None else None,
        "loss": float(loss),
        "kl": float(kl),
    }


def spawn(case: dict) -> dict:
    """Run one case in a fresh interpreter; attach that child's own peak RSS from os.wait4."""
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(case)]
    environment = dict(os.environ, JAX_PLATFORMS="cpu")  # the figures are for CPU, whatever else is installed
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        return {"bench": "loss", **case, "error": f"child exited with {child.returncode}"}
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    return result


def summarise(results: list[dict]) -> list[dict]:
    lines = []
    for vocab in sorted({r["vocab"] for r in results}):
        plain = next((r for r in results if r["vocab"] == vocab and r["path"] == "plain" and "error" not in r), None)
        if plain is None:
            continue
        for fused in (r for r in results if r["vocab"] == vocab and r["path"] == "fused" and "error" not in r):
            line = {
                "bench": "loss_summary",
                "vocab": vocab,
                "chunk_size": fused["chunk_size"],
                "peak_rss_reduction": round(1 - fused["peak_rss_mb"] / plain["peak_rss_mb"], 3),
                "xla_temp_reduction": round(1 - fused["xla_temp_mb"] / plain["xla_temp_mb"], 3),
                "time_ratio": round(fused["time_s_median"] / plain["time_s_median"], 3),
                "time_ratio_min": round(fused["time_s_min"] / plain["time_s_min"], 3),
                "cpu_time_ratio": round(fused["cpu_s_median"] / plain["cpu_s_median"], 3),
                "loss_rel_diff": abs(fused["loss"] - plain["loss"]) / abs(plain["loss"]),
            }
            if fused["working_mb"] is not None and plain["working_mb"]:
                line["working_memory_reduction"] = round(1 - fused["working_mb"] / plain["working_mb"], 3)
            lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat: a smoke run")
    parser.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (default 32768 131072)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[512, 256, 128], help="fused chunk sizes")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the cases (each a fresh subprocess)")
    parser.add_argument(
        "--fit-budget-mb",
        type=float,
        help="instead of timing: for each vocabulary, the most tokens whose loss + gradient XLA plans within this "
        "many MiB, plain and fused at the first --chunk-sizes (compile only)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the hidden states (the heads stay float32 master copies, as in the train step)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from analogjax.runtime.huge_pages import reexec_with_huge_pages
    from analogjax.runtime.xla_flags import add_cpu_flags

    reexec_with_huge_pages()  # the host allocator the CLI runs with (children inherit it)
    add_cpu_flags()  # the XLA settings the CLI runs with (children inherit them), before JAX starts a backend
    if args.child:
        print(json.dumps(run_case(**json.loads(args.child))), flush=True)
        return
    if args.fit_budget_mb:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        for vocab in args.vocab or [131072, 262144]:
            fits = {
                path: largest_fit(path, vocab, args.d_model, args.chunk_sizes[0], args.fit_budget_mb)
                for path in ("plain", "fused")
            }
            for line in fits.values():
                print(json.dumps(line), flush=True)
            plain, fused = fits["plain"]["largest_tokens"], fits["fused"]["largest_tokens"]
            if plain and fused:
                ratio = {"bench": "loss_fit_summary", "vocab": vocab, "fused_over_plain_tokens": fused / plain}
                print(json.dumps({**ratio, "search_capped": fits["fused"]["search_capped"]}), flush=True)
        return
    if args.quick:
        vocabs, tokens, d_model, repeats, chunk_sizes = args.vocab or [4096], 256, 128, 1, [64]
        args.rounds = 1
    else:
        vocabs, tokens, d_model, repeats = args.vocab or [32768, 131072], args.tokens, args.d_model, args.repeats
        chunk_sizes = args.chunk_sizes
    results = []
    for vocab in vocabs:
        cases = [dict(path="plain", chunk_size=0)] + [dict(path="fused", chunk_size=c) for c in chunk_sizes]
        # Rounds cycle through the cases so that load from other jobs on a shared machine drifts over all of them
        # alike; each case's times from every round are pooled.
        rounds = [
            [
                spawn(dict(case, vocab=vocab, tokens=tokens, d_model=d_model, repeats=repeats, dtype=args.dtype))
                for case in cases
            ]
            for _ in range(args.rounds)
        ]
        for per_round in zip(*rounds):
            result = merge_rounds(list(per_round))
            results.append(result)
            print(json.dumps(result), flush=True)
    for line in summarise(results):
        print(json.dumps(line), flush=True)


def merge_rounds(runs: list[dict]) -> dict:
    """One case's rounds as one line: pooled times (median and min), the largest memory figures."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    merged = dict(runs[0])
    merged["times_s"] = [t for run in runs for t in run["times_s"]]
    merged["time_s_median"] = round(statistics.median(merged["times_s"]), 4)
    merged["time_s_min"] = min(merged["times_s"])
    merged["cpu_times_s"] = [t for run in runs for t in run["cpu_times_s"]]
    merged["cpu_s_median"] = round(statistics.median(merged["cpu_times_s"]), 3)
    for key in ("peak_rss_mb", "inputs_rss_mb", "run_peak_rss_mb", "working_mb", "xla_temp_mb"):
        values = [run[key] for run in runs if run.get(key) is not None]
        merged[key] = max(values) if values else None
    merged["rounds"] = len(runs)
    return merged


if __name__ == "__main__":
    main()
