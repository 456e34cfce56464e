"""The offline teacher, cached once in zarr through tensorstore: its on-disk format (format.py), its writer
(write.py, `analogjax cache-teacher`) and its reader (read.py, joined to each batch of `analogjax distill`)."""

from analogjax.teacher_cache.format import (
    BATCH_KEYS,
    CacheLayout,
    cache_batch_fields,
    check_run,
    data_bytes_per_token,
    provenance,
    read_provenance,
)
from analogjax.teacher_cache.read import CacheReader, cached_teacher_source, read_arrays, sparse_teacher_from_batch
from analogjax.teacher_cache.write import build_cache, write_cache

__all__ = [
    "BATCH_KEYS",
    "CacheLayout",
    "CacheReader",
    "build_cache",
    "cache_batch_fields",
    "cached_teacher_source",
    "check_run",
    "data_bytes_per_token",
    "provenance",
    "read_arrays",
    "read_provenance",
    "sparse_teacher_from_batch",
    "write_cache",
]
