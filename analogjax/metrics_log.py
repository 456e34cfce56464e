"""Where metrics go: WORKDIR/metrics.jsonl (one object per logged step) and TensorBoard. Process 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax


class MetricsLog:
    def __init__(self, workdir: str | Path, filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / filename
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def means(sums: dict[str, Any], count_key: str = "count") -> dict[str, float]:
    """Per-token means from (sum, count) metrics; scalars that are not sums (grad_norm) pass through."""
    count = float(sums[count_key])
    out = {}
    for key, value in sums.items():
        if key == count_key:
            continue
        out[key] = float(value) if key in PER_STEP else float(value) / max(count, 1.0)
    return out


PER_STEP = ("grad_norm", "nonfinite")  # already per-step values, not sums over tokens
