"""Tokens/s the data pipeline delivers, next to the tokens/s the training step consumes.

    python bench/data.py [--seconds 3] [--global-batch 16] [--seq-len 128] [--workdir /tmp/analogjax-bench-data]

Corpus: the embedded stdlib corpus with the demo's ~8k byte-level BPE (trained here once, then reused).
Measurements, one JSON line each:
  pipeline_pretokenized  the stdlib source (tokenized once into the cache, then read from it)
  pipeline_on_the_fly    the same documents as JSONL text, tokenized inside the pipeline (read threads)
  pipeline_on_the_fly_workers  as above with Grain worker processes
  step                   bench/step.py's measure_step()
and a summary line with the ratio of the slowest pipeline figure to the step's (goal: >= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from analogjax.data import DataConfig, SourceConfig, make_batch_iterator, packing_efficiency
from analogjax.data.stdlib_corpus import stdlib_texts, write_jsonl
from analogjax.data.tokenize import train_bpe_tokenizer

BPE_VOCAB = 8192


def measure_pipeline(data: DataConfig, *, seconds: float, vocab_size: int) -> dict:
    """Steady-state tokens/s of make_batch_iterator (the first batch, which pays for start-up, is timed apart)."""
    start = time.perf_counter()
    it = make_batch_iterator(data, split="train", seed=0, vocab_size=vocab_size)
    try:
        next(it)
        first_batch_s = time.perf_counter() - start
        batches, efficiency, begin = 0, 0.0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            batch = next(it)
            efficiency += packing_efficiency(batch)
            batches += 1
        elapsed = time.perf_counter() - begin
    finally:
        it.close()
    tokens = batches * data.global_batch * data.seq_len
    return {
        "tokens_per_s": round(tokens / elapsed),
        "batches": batches,
        "first_batch_s": round(first_batch_s, 3),
        "packing_efficiency": round(efficiency / max(batches, 1), 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per pipeline figure")
    parser.add_argument("--global-batch", type=int, default=16)  # the demo's shape
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", default="/tmp/analogjax-bench-data")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)

    bpe = os.path.join(args.workdir, f"stdlib-bpe{BPE_VOCAB}.json")
    if not os.path.exists(bpe):
        begin = time.perf_counter()
        train_bpe_tokenizer(stdlib_texts(), BPE_VOCAB, bpe)
        emit({"measure": "bpe_training", "vocab_size": BPE_VOCAB, "seconds": round(time.perf_counter() - begin, 2)})
    jsonl = os.path.join(args.workdir, "stdlib.jsonl")
    if not os.path.exists(jsonl):
        write_jsonl(jsonl)

    shape = dict(global_batch=args.global_batch, seq_len=args.seq_len)
    common = dict(tokenizer=bpe, cache_dir=os.path.join(args.workdir, "cache"), **shape)
    cases = [
        ("pipeline_pretokenized", DataConfig(sources=(SourceConfig(path="stdlib"),), **common)),
        ("pipeline_on_the_fly", DataConfig(sources=(SourceConfig(path=jsonl),), read_threads=2, **common)),
        ("pipeline_on_the_fly_workers", DataConfig(sources=(SourceConfig(path=jsonl),), worker_count=2, **common)),
    ]
    figures = {}
    for name, data in cases:
        result = measure_pipeline(data, seconds=args.seconds, vocab_size=BPE_VOCAB)
        figures[name] = result["tokens_per_s"]
        emit({"measure": name, **shape, "read_threads": data.read_threads, "worker_count": data.worker_count, **result})

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step import measure_step  # bench/step.py: the step this pipeline must keep fed

    step = measure_step()
    emit({"measure": "step", **step})
    slowest = min(figures.values())
    emit(
        {
            "measure": "summary",
            "step_tokens_per_s": step["tokens_per_s"],
            "slowest_pipeline_tokens_per_s": slowest,
            "pipeline_over_step": round(slowest / step["tokens_per_s"], 1),
            "goal": 10,
        }
    )
    return 0


def emit(record: dict) -> None:
    print(json.dumps({"bench": "data", **record}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
