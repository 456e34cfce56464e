"""Sums of a jitted reducer over batches, added on the host in float64.

Held-out evaluation, fidelity, the transfer checks and pruning's importance all measure the same way: a jitted step
returns per-batch sums (float32 on the device, replicated on the mesh, so every process reads the global value) and
the host adds them across batches in float64, so a total does not depend on how the tokens were batched and does
not lose precision as batches accumulate. Dividing by counts is the caller's business (metrics_log.means, ...).
Per-row sums (for intervals over held-out documents, fidelity/intervals.py) are kept apart instead: `rows_over_batches`
concatenates each batch's rows in batch order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np


def sum_over_batches(fn: Callable[..., Any], batches: Iterable[Any], *args: Any) -> dict[str, Any]:
    """Σ over `batches` of fn(*args, batch), a dict of arrays (nested dicts allowed): float64 NumPy arrays of the
    same structure, {} when there are no batches. Each batch's sums are fetched before the next batch is dispatched,
    so no more than one batch's outputs are alive at a time."""
    total: dict[str, Any] = {}
    for batch in batches:
        total = add_sums(total, jax.device_get(fn(*args, batch)))
    return total


def add_sums(total: dict[str, Any], sums: dict[str, Any]) -> dict[str, Any]:
    """total += sums in float64 on the host (nested dicts of arrays); returns `total`."""
    for key, value in sums.items():
        if isinstance(value, dict):
            total[key] = add_sums(total.get(key, {}), value)
        else:
            total[key] = total.get(key, 0.0) + np.asarray(value, np.float64)
    return total


def rows_over_batches(fn: Callable[..., Any], batches: Iterable[Any], *args: Any) -> Any:
    """fn(*args, batch) for each of `batches`, a pytree of per-row arrays (leading axis: the batch's rows), with the
    rows of all batches concatenated in batch order: the same pytree of float64 NumPy arrays, or None when there
    are no batches. Each batch's rows are fetched before the next batch is dispatched, as in `sum_over_batches`."""
    parts = [jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(fn(*args, batch))) for batch in batches]
    if not parts:
        return None
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)
