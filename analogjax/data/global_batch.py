"""The one place data crosses into JAX: host-local numpy batches become global, sharded jax.Arrays."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


def to_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays laid out by `sharding`.

    `sharding` is one jax.sharding.Sharding for every key (the usual [batch, seq] NamedSharding with the batch
    dimension over the data-parallel mesh axes) or a mapping from key to Sharding. Each process passes its
    own [global_batch // process_count, seq_len] rows; the global batch is their concatenation in process order.
    """
    out = {}
    for key, local in batch.items():
        key_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
        out[key] = jax.make_array_from_process_local_data(key_sharding, np.asarray(local))
    return out
