"""Preemption: notice that the job is about to be taken away, so the loop saves at the next step boundary and exits 0.

Two sources of notice:
  - single process: SIGTERM (what Kubernetes, Slurm and `kill` send), caught by a Python handler that only sets a
    flag; the loop polls it between steps, so a save never races a half-dispatched step.
  - multi-process (after `jax.distributed.initialize`): JAX's preemption sync manager. It already listens for
    SIGTERM (and, on Cloud TPU, maintenance notices) on every host and agrees on one step at which *all* hosts stop,
    which the checkpoint's collective writes need. `reached_preemption_sync_point` must then be called at every
    step by every host; our own SIGTERM handler is not installed there, since it would replace JAX's notifier and
    let one host stop alone.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


def distributed_sync_available() -> bool:
    """True when this process runs under `jax.distributed.initialize` with the preemption service on."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatcher:
    """Context manager: `should_stop(step)` after each step says whether to save now and leave.

    Usage:
        with PreemptionWatcher() as watcher:
            for step in ...:
                ...one step...
                if watcher.should_stop(step + 1):
                    save; break
    """

    def __init__(self, *, use_distributed: bool | None = None):
        self._use_distributed = distributed_sync_available() if use_distributed is None else use_distributed
        self._notice = threading.Event()
        self._previous_handler: Any = None
        self._installed = False
        self.reason: str | None = None

    def __enter__(self) -> PreemptionWatcher:
        # Signal handlers can only be set from the main thread; elsewhere (a notebook worker thread) the loop still
        # runs, it just cannot be preempted gracefully by SIGTERM.
        if not self._use_distributed and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the loop decides when (the next step boundary) and saves from the main flow.
        self._notice.set()

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the loop to save and stop at the next step boundary (what SIGTERM does), e.g. from another thread."""
        self.reason = reason
        self._notice.set()

    def should_stop(self, step: int) -> bool:
        """Whether the run must save at `step` (just completed) and exit. Call once per step, on every host."""
        if self._use_distributed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = self.reason or "preemption notice (JAX preemption sync point)"
                return True
            return False
        if self._notice.is_set():
            self.reason = self.reason or "SIGTERM"
            return True
        return False

    def announce(self, step: int) -> None:
        print(f"preempted ({self.reason}): saved step {step}; relaunch the same command to resume", file=sys.stderr)
