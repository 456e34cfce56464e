#!/usr/bin/env bash
# The accelerator check, one script for a short lease: bench/gpu_attention.py, bench/step.py (float32 and bfloat16, at
# its own dims and at a batch an accelerator can fill; an 8B teacher and a 1B student in bfloat16), bench/generate.py
# (float32 and bfloat16), bench/vocab_step.py at 131,072 tokens and bench/cache.py: about 7 minutes on an H200 by the
# 2026-12-04 leases' timings. Each JSON line goes to stdout and to $OUT/gpu.jsonl
# (./gpu.jsonl without OUT); a benchmark that fails or outlasts LIMIT seconds is named on stderr and the next one runs.
#
#   OUT=/tmp/gpu bash bench/gpu.sh            # PYTHON=python3 by default; LIMIT=150 seconds per benchmark
set -u
out=${OUT:-.}
py=${PYTHON:-python3}
limit=${LIMIT:-150}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
lines="$out/gpu.jsonl"

bench() {
  echo "# $*" >&2
  local start=$SECONDS
  timeout "$limit" "$py" "$@" | tee -a "$lines"
  echo "# rc=${PIPESTATUS[0]} in $((SECONDS - start)) s" >&2
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
"$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'

bf16=(--set model.dtype=bfloat16 --set teacher.model.dtype=bfloat16)
large=(--set data.global_batch=64 --set data.seq_len=1024)
# An accelerator-sized pair (random weights): Llama 3.2 1B's shape distilled from Llama 3.1 8B's, 4 x 2,048 tokens. The
# bench models are sized for 2 CPU cores and leave a GPU bound by its small kernels (BENCHMARKS.md).
frontier=(--set model.preset=llama3-1b --set teacher.model.preset=llama3-8b)
frontier+=(--set data.global_batch=4 --set data.seq_len=2048)
# The kernels' gradients and the accelerator-sized step first (what decided the GPU defaults), then the rest.
bench bench/gpu_attention.py
bench bench/step.py --repeats 5 "${frontier[@]}" "${bf16[@]}"
bench bench/step.py --repeats 10
bench bench/step.py --repeats 10 "${bf16[@]}"
bench bench/step.py --repeats 10 "${large[@]}"
bench bench/step.py --repeats 10 "${large[@]}" "${bf16[@]}"
bench bench/generate.py
bench bench/generate.py --dtype bfloat16 --on-policy-new-tokens 0
bench bench/generate.py --dtype bfloat16 --batch 64 --on-policy-new-tokens 0
bench bench/vocab_step.py --vocab 131072 --repeats 5 --set data.global_batch=16 --set data.seq_len=1024
bench bench/cache.py --layouts topk64_bf16 --repeats 5
