"""Where the distill step's time goes: a jax.profiler trace of bench/step.py's step, split by what each op is.

The step is compiled ahead of time; each instruction of XLA's optimised HLO carries JAX's op_name (the transform and
Flax module path it was traced under), and on CPU the profiler records each executed instruction (a "thunk") under
its HLO name. Each thunk's self time (its duration less the thunks nested inside it on its thread, a `while` loop's
body say) goes to one class:

  loss       the fused loss (the step's one custom-VJP function): the student's head products per token chunk,
             log-softmax, the divergences, the teacher's head products for a live teacher
  attention  the models' attention blocks (`.../attn/...`): q, k, v, o projections, scores, softmax, values
  matmul     the models' other matmuls (MLP; the teacher's forward is traced in the same function as the student's)
  optimizer  everything after the gradient: clipping, Adam, the gradient norm, the finite check
  other      the models' remaining ops: norms, RoPE, embedding gathers and scatters, copies and transposes

`matmul_share` is the share of all ops that are dots (or fusions holding one: XLA's CPU backend fuses dots through
YNNPACK, `ynn_fusion.*`), whatever their class. Prints one JSON line: step_s (median of the profiled steps), the
ops' thread-seconds per step, the shares, and the slowest ops. Same dims and overrides as bench/step.py.

    python bench/profile_step.py [--steps 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analogjax.runtime.huge_pages import reexec_with_huge_pages  # noqa: E402
from analogjax.runtime.xla_flags import add_cpu_flags  # noqa: E402

reexec_with_huge_pages()  # the host allocator the CLI runs with (a re-execution where it is not yet set)
add_cpu_flags()  # the XLA settings the CLI runs with, before JAX starts a backend

CLASSES = ("loss", "attention", "matmul", "optimizer", "other")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\b([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^%?([\w.\-]+)\s.*\{\s*$")
_MATMULS = ("dot", "convolution")


def instructions(hlo_text: str) -> dict[str, tuple[bool, str]]:
    """{HLO instruction name: (is a matmul, op_name)} of an optimised HLO module's text: a matmul is a dot or
    convolution, or a fusion whose computation holds one (XLA's CPU backend fuses dots through YNNPACK)."""
    with_matmul, current = set(), None
    found: dict[str, tuple[str, str, str]] = {}
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.group(1), match.group(2)
        if opcode in _MATMULS and current is not None:
            with_matmul.add(current)
        calls, op_name = _CALLS.search(line), _OP_NAME.search(line)
        found[name] = (opcode, calls.group(1) if calls else "", op_name.group(1) if op_name else "")
    return {
        name: (opcode in _MATMULS or callee in with_matmul, op_name)
        for name, (opcode, callee, op_name) in found.items()
    }


def classify(is_matmul: bool, op_name: str) -> str:
    """The class of an op from its JAX op_name: the fused loss is the one custom-VJP function of the step (its ops
    trace as `jvp()/...`, unnamed), the models' ops carry their Flax module path (`jvp(Decoder)/...` forward,
    `transpose(jvp(Decoder))/...` backward; the teacher's forward is in the same differentiated function), and what
    is neither comes after the gradient: the optimizer and the update."""
    if "jvp()" in op_name:
        return "loss"
    if "jvp(" in op_name or "Decoder" in op_name:
        if "/attn/" in op_name:
            return "attention"
        return "matmul" if is_matmul else "other"
    return "optimizer"


def self_times(events: list[dict]) -> dict[str, float]:
    """Σ self time (µs) per event name over complete ("X") events: each event's duration less the events nested in
    it on the same thread."""
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    totals: dict[str, float] = collections.Counter()
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, self time so far]
        for event in thread_events:
            start, end = event["ts"], event["ts"] + event["dur"]
            while stack and stack[-1][0] <= start:
                _, done_name, done_self = stack.pop()
                totals[done_name] += done_self
            if stack:
                stack[-1][2] -= event["dur"]
            stack.append([end, event["name"], event["dur"]])
        for _, name, own in stack:
            totals[name] += own
    return totals


def profile_step(steps: int = 3, overrides: list[str] | None = None) -> dict:
    import jax
    from step import BENCH_OVERRIDES, synthetic_batch

    from analogjax.config import load_config
    from analogjax.setup import build

    config = load_config(None, BENCH_OVERRIDES + list(overrides or []))
    run = build(config)
    batch = jax.device_put(
        synthetic_batch(config.data.global_batch, config.data.seq_len, config.model.vocab_size), run.batch_sharding
    )
    state = run.state
    with jax.set_mesh(run.mesh):
        ops_of = instructions(run.step_fn.lower(state, run.teacher_params, batch).compile().as_text())
        for _ in range(2):  # compile + one warm step
            state, metrics = run.step_fn(state, run.teacher_params, batch)
        jax.block_until_ready(metrics)
        times = []
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            for _ in range(steps):
                t0 = time.perf_counter()
                state, metrics = run.step_fn(state, run.teacher_params, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            jax.profiler.stop_trace()
            trace_file = max(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
            trace = json.loads(gzip.open(trace_file).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = self_times(events)
    per_class: dict[str, float] = dict.fromkeys(CLASSES, 0.0)
    matmul_micros = 0.0
    ops = []
    for name, micros in totals.items():
        if name not in ops_of:  # the runtime's own events (executor, thread pool, Python)
            continue
        is_matmul, op_name = ops_of[name]
        kind = classify(is_matmul, op_name)
        per_class[kind] += micros
        matmul_micros += micros if is_matmul else 0.0
        ops.append((micros, name, kind, is_matmul, op_name.removeprefix("jit(distill_step)/")))
    traced = sum(per_class.values())
    step_s = statistics.median(times)
    ops.sort(reverse=True)
    return {
        "bench": "profile_step",
        "step_s": round(step_s, 4),
        # Thread-seconds of the ops, per step: above step_s where ops of the step ran side by side on both cores.
        "op_thread_s_per_step": round(traced / 1e6 / steps, 4),
        "shares": {kind: round(micros / traced, 3) for kind, micros in per_class.items()} if traced else {},
        "matmul_share": round(matmul_micros / traced, 3) if traced else None,
        "top_ops": [
            {
                "op": name,
                "class": kind,
                "matmul": is_matmul,
                "ms_per_step": round(micros / 1e3 / steps, 1),
                "what": what,
            }
            for micros, name, kind, is_matmul, what in ops[:10]
        ],
        "steps": steps,
        "backend": jax.default_backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(json.dumps(profile_step(args.steps, args.overrides)))


if __name__ == "__main__":
    main()
