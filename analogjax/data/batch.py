"""The one batch schema: the keys, dtypes and shapes of a batch, from the pipeline through the step.

The pipeline yields exactly BATCH_FIELDS (host numpy, [rows, seq_len]); a teacher cache adds its own per-token
fields (teacher_cache.format.cache_batch_fields); compile-check builds its abstract batch from the same table, so
it compiles the program training runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# key → dtype of a [rows, seq_len] array.
BATCH_FIELDS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),  # 0 = padding; documents packed in a row are 1, 2, ...
    "positions": np.dtype(np.int32),  # position within the token's own document
    "targets": np.dtype(np.int32),  # the next token of the same document
    "loss_mask": np.dtype(np.float32),  # 1.0 where the target counts
    "source_ids": np.dtype(np.int32),  # index of the data source (mixtures), for per-source metrics
}
BATCH_KEYS = tuple(BATCH_FIELDS)


def abstract_batch(rows: int, seq_len: int, sharding, extra: Mapping[str, tuple] | None = None) -> dict:
    """ShapeDtypeStructs of a global batch: BATCH_FIELDS plus `extra` ({key: (dtype, per-token shape)})."""
    import jax

    fields = {key: (dtype, ()) for key, dtype in BATCH_FIELDS.items()} | dict(extra or {})
    return {
        key: jax.ShapeDtypeStruct((rows, seq_len, *tail), dtype, sharding=sharding)
        for key, (dtype, tail) in fields.items()
    }
