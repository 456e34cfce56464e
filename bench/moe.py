"""An MoE teacher distilled into bench/step.py's student, timed in the same run as the dense bench step.

The MoE teacher is bench/step.py's teacher (d_model 512, 8 layers, 8 heads) with 8 routed SwiGLU experts of width
768, top-2: its active FFN width (2 × 768) equals the dense teacher's 1536, so both steps have the same model FLOPs
up to the router (analogjax.runtime.flops counts active parameters). Prints one JSON line per step kind (bench/step.py's
fields; MFU on active FLOPs), then one summary line with the ratio of the MoE step's MFU to the dense step's.

    python bench/moe.py [--repeats 10] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MOE_TEACHER = [
    "teacher.model.moe.experts=8",
    "teacher.model.moe.top_k=2",
    "teacher.model.moe.expert_d_ff=768",
]


def main() -> None:
    from step import measure_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    dense = dict(measure_step(args.repeats, args.overrides), measure="dense_teacher")
    print(json.dumps(dense), flush=True)
    moe = dict(measure_step(args.repeats, MOE_TEACHER + args.overrides), bench="moe", measure="moe_teacher_8x_top2")
    print(json.dumps(moe), flush=True)
    print(
        json.dumps(
            {
                "bench": "moe",
                "measure": "summary",
                "mfu_ratio_moe_over_dense": round(moe["mfu"] / dense["mfu"], 3),
                "tokens_per_s_ratio": round(moe["tokens_per_s"] / dense["tokens_per_s"], 3),
                "flops_ratio": round(moe["flops_per_step"] / dense["flops_per_step"], 4),
                "aim": 0.7,
            }
        )
    )


if __name__ == "__main__":
    main()
