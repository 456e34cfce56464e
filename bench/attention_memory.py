"""HBM per chip of the whole distill step (teacher forward, student forward + fused loss + gradient + update) with
the XLA attention core vs Pallas splash attention, at several sequence lengths, compiled ahead of time for a TPU
slice (libtpu on this CPU machine; nothing runs, nothing is allocated). One JSON line per (seq_len, attention).

The plan is a real config (default: the 32k long-context pod plan); only data.seq_len and both models' attention
kernels change between lines, so the difference between xla and splash at one length is the attention's own
memory: XLA's [heads, s/context, s] float32 scores per layer against splash's tiles.

  python bench/attention_memory.py                                   # 4096, 8192, 32768 on the config's v5p slice
  python bench/attention_memory.py --seq 4096 --kernels splash       # one case
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from analogjax.config import load_config
from analogjax.runtime.compile_check import compile_plan, parse_topology


def case(config_path: str, topology: str | None, seq_len: int, kernel: str) -> dict:
    config = load_config(
        config_path, [f"data.seq_len={seq_len}", f"model.attention={kernel}", f"teacher.model.attention={kernel}"]
    )
    name = topology or config.topology
    start = time.perf_counter()
    line = {
        "bench": "attention_memory",
        "config": config_path,
        "topology": name,
        "seq_len": seq_len,
        "attention": kernel,
        "global_batch": config.data.global_batch,
    }
    try:
        plan = compile_plan(config, parse_topology(name))
    except Exception as error:  # noqa: BLE001 — a plan that does not compile (out of HBM at compile time) is a result
        return {
            **line,
            "compiled": False,
            "error": str(error).splitlines()[0][:300],
            "compile_s": round(time.perf_counter() - start, 1),
        }
    return {
        **line,
        "compiled": True,
        "mesh": plan.mesh_shape,
        "bytes_per_chip": plan.bytes_per_chip,
        "gib_per_chip": round(plan.bytes_per_chip / 2**30, 2),
        "hbm_per_chip": plan.topology.generation.hbm_bytes,
        "temp_bytes": plan.temp_bytes,
        "argument_bytes": plan.argument_bytes,
        "fits": plan.fits,
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pod_llama3.1-8b_to_1b_32k_v5p-64.yaml")
    parser.add_argument("--topology", default=None, help="default: the config's")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--kernels", nargs="+", default=["splash", "xla"], choices=["xla", "splash"])
    args = parser.parse_args(argv)
    for seq_len in args.seq:
        for kernel in args.kernels:
            print(json.dumps(case(args.config, args.topology, seq_len, kernel)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
