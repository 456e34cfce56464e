"""Where metrics go: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard, and the user's screen (a
progress bar on a terminal, plain lines otherwise). Process 0 only.

Progress is every command's progress display (distill, prune, cache-teacher, prepare); prepare runs without JAX, so
this module imports JAX only where MetricsLog needs it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class MetricsLog:
    """WORKDIR/metrics.jsonl (appended to; on an object store, rewritten whole: see storage.ObjectFile) and
    WORKDIR/tensorboard. The workdir may be a local folder or a gs:// / s3:// URL."""

    def __init__(self, workdir: str | Path, filename: str = "metrics.jsonl", tensorboard: bool = True):
        import jax

        from analogjax.runtime import storage

        self.enabled = jax.process_index() == 0
        root = storage.location(workdir)
        self.path = root / filename
        self._tb = None
        self._object: storage.ObjectFile | None = None
        if self.enabled:
            if storage.is_remote(root):
                self._object = storage.ObjectFile(self.path)
                storage.register_tensorboard_writers()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(root / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self._object is not None:
            self._object.write(line.encode())
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        """Make every record written so far durable (on an object store, writes are batched: call before a
        checkpoint, so a resume from it finds its steps' records)."""
        if self._object is not None:
            self._object.flush()

    def close(self) -> None:
        if self._object is not None:
            self._object.close()
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


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise (CI logs, files, pipes) no redraws at all: one plain line per
    `note`d record, and nothing for `update` and `show` (the command prints its own closing line), so a log never
    fills with carriage-return redraws. `enabled=False` (--no-progress, or not process 0) shows nothing."""

    _SHOWN = ("loss", "kl", "ce", "tokens_per_s", "eval_ce", "eval_kl")

    def __init__(
        self,
        total: int | None,
        initial: int = 0,
        desc: str = "",
        *,
        enabled: bool,
        unit: str = "it",
        stream=None,
    ):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total, self.desc = total, desc
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """The items, the bar advancing by one as each is finished with (when the next one is asked for)."""
        for item in items:
            yield item
            self.update()

    def show(self, **values: str) -> None:
        """Values beside the bar (a terminal only: they are not worth a line of their own in a log)."""
        if self.bar is not None:
            self.bar.set_postfix(values)

    def note(self, step: int, record: dict[str, Any]) -> None:
        """A logged record: the bar's postfix on a terminal, a line otherwise."""
        if not self.enabled:
            return
        shown = {k: record[k] for k in self._SHOWN if isinstance(record.get(k), (int, float))}
        if self.bar is not None:
            self.show(**{k: f"{v:.4g}" for k, v in shown.items() if k in ("loss", "tokens_per_s")})
            return
        values = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        print(f"{self.desc} step {step}/{self.total} {values}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
