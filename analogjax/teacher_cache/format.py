"""The offline teacher: its sparse outputs over a run's packed token stream, cached once in zarr through tensorstore.

A cache holds, for every token of the batches a config's run consumes (train.steps batches of the same
`make_batch_iterator(split="train", seed=train.seed)` stream, or data.epoch_steps of them read every epoch), either
- `topk`: the teacher's k largest logits (`values`, bfloat16 or float32), their ids (`indices`, int32) and the
  full-vocabulary logsumexp at the distillation temperature (`lse`, float32; the tail-bucket treatment needs it), or
- `sampled`: s ids drawn from the teacher (`ids`, int32) with importance weights (`weights`, float32) for unbiased
  sampled KD (sparse_teacher.sampled_kd).
Every field is a zarr array [steps, global_batch, seq_len, ...]; one chunk is one step's rows of one process, so
each process writes only its own chunks and never races another on a file. Row r of the global batch is row
r − p·R of process p's local batch (R = global_batch / process_count), exactly how `to_global_batch` concatenates.

A step counts as written only when every process's `done` marker for it is set, and a process sets its marker only
after its data is on disk: a killed job leaves at worst unmarked chunks, which a restart (skipping marked steps)
writes again, and which a reader refuses to use. Each chunk's crc32 is recorded before its marker, in the `checksum`
array [steps, processes, fields] (one small chunk per step and process, like `done`, so processes never write one
file together; provenance.json's `checksums` entry says which fields it covers, in order). A reader verifies every
chunk it reads and refuses a damaged one naming the step; cache-teacher rewrites damaged chunks of finished steps as
it completes unfinished ones. (Caches written before checksums have no such entry and are read unverified.)
`row_hash` (crc32 of each row's tokens and segment ids) lets the reader prove, row by row, that a run's batches are
the cached ones. `provenance.json` beside the arrays records
what the cache was computed from; a run whose tokenizer, corpus, seed, sequence length, packing or batch differ is
refused with a `UserError` naming the difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jax.numpy as jnp
import numpy as np
from etils import epath

from analogjax.config import CACHE_KINDS, Config, fingerprint, to_dict
from analogjax.data.spec import distinct_steps
from analogjax.errors import UserError, check_choice
from analogjax.runtime import storage
from analogjax.runtime.checksums import ALGORITHM, array_crc32

FORMAT_VERSION = 1
PROVENANCE_FILE = "provenance.json"
KINDS = CACHE_KINDS
VALUE_DTYPES = ("bfloat16", "float32")
# zarr v2 compressors; "zstd" is blosc-zstd with byte shuffle (groups the high bytes of ids and values together).
CODECS: dict[str, dict | None] = {
    "raw": None,
    "zstd": {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1},
}
# distill.topk_treatment → the sparse_teacher divergence a forward_kl (or soft_ce) term becomes with a top-k cache.
# Fields added to a batch, per kind: batch key → (array name in the cache).
BATCH_KEYS = {
    "topk": {"teacher_values": "values", "teacher_indices": "indices", "teacher_lse": "lse"},
    "sampled": {"teacher_ids": "ids", "teacher_weights": "weights"},
}
# Bytes of a file read into the teacher-weights hash: whole small files, head and tail of large ones (hashing a
# 140 GB checkpoint in full would cost more than a cache step; names and sizes catch a swapped file too).
_HASH_WHOLE_BELOW = 1 << 20


@dataclass(frozen=True)
class CacheLayout:
    """What is stored per token. k is the number of top-k entries, or of samples for `sampled`."""

    kind: str = "topk"
    k: int = 64
    values_dtype: str = "bfloat16"  # topk values; float32 makes k = vocab an exact dense teacher (tests)
    codec: str = "raw"

    def check(self, vocab_size: int) -> None:
        check_choice("cache kind", self.kind, KINDS)
        check_choice("cache values dtype", self.values_dtype, VALUE_DTYPES)
        check_choice("cache codec", self.codec, CODECS)
        if self.k < 1 or (self.kind == "topk" and self.k > vocab_size):
            raise UserError(f"cache k must lie in [1, {vocab_size}] (the shared vocabulary), got {self.k}")

    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Array name → (zarr dtype, per-token shape)."""
        if self.kind == "topk":
            return {"values": (self.values_dtype, (self.k,)), "indices": ("int32", (self.k,)), "lse": ("float32", ())}
        return {"ids": ("int32", (self.k,)), "weights": ("float32", (self.k,))}

    def bytes_per_token(self) -> int:
        """Uncompressed bytes per token (what the `raw` codec puts on disk)."""
        return sum(np.dtype(_np_dtype(dtype)).itemsize * int(np.prod(shape)) for dtype, shape in self.fields().values())


def _np_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else np.dtype(name)


def cache_batch_fields(layout: CacheLayout) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """What a cache of `layout` adds to each batch: {batch key: (dtype, per-token shape)} (data.batch's schema)."""
    fields = layout.fields()
    return {key: (_np_dtype(fields[name][0]), fields[name][1]) for key, name in BATCH_KEYS[layout.kind].items()}


# ----------------------------------------------------------------------------------------------------------------
# Provenance


def _hash_file_sample(digest, path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _HASH_WHOLE_BELOW:
            digest.update(f.read())
        else:
            digest.update(f.read(_HASH_WHOLE_BELOW // 2))
            f.seek(size - _HASH_WHOLE_BELOW // 2)
            digest.update(f.read())


def path_hash(path: str) -> str:
    """A hash of a file or directory tree: relative names, sizes, and contents (head and tail of large files)."""
    if storage.is_remote(path):
        return f"path:{path}"  # remote (gs://): the name is all we vouch for (hashing would read the teacher)
    root = Path(path)
    if not root.exists():
        return f"path:{path}"  # missing: the name is all we can vouch for
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(root) if file != root else file.name}:{file.stat().st_size}\n".encode())
        _hash_file_sample(digest, file)
    return digest.hexdigest()[:16]


def teacher_identity(config: Config) -> dict[str, str]:
    teacher = config.teacher
    source = teacher.checkpoint or teacher.hf_path or teacher.gguf_path
    # Without a checkpoint the teacher is train.load_teacher's random init from train.seed + 1.
    weights = path_hash(source) if source else f"random-init:seed={config.train.seed + 1}"
    return {"model": fingerprint(teacher.model), "weights": weights}


def tokenizer_identity(tokenizer: str) -> str:
    if tokenizer in ("bytes", "none") or not Path(tokenizer).is_file():
        return tokenizer
    return path_hash(tokenizer)


def shared_vocab(config: Config) -> int:
    return min(config.model.vocab_size, config.teacher.model.vocab_size)


def provenance(config: Config, layout: CacheLayout, process_count: int) -> dict[str, Any]:
    """Everything a cache was computed from, as plain JSON. `check_run` compares a run's against it."""
    data = config.data
    return {
        "format": FORMAT_VERSION,
        "layout": dataclasses.asdict(layout),
        "teacher": teacher_identity(config),
        "tokenizer": {"spec": data.tokenizer, "hash": tokenizer_identity(data.tokenizer)},
        "corpus": {
            "sources": to_dict(data.sources),
            "heldout_fraction": data.heldout_fraction,
            "add_bos": data.add_bos,
            "add_eos": data.add_eos,
            "seed": config.train.seed,
        },
        "seq_len": data.seq_len,
        "global_batch": data.global_batch,
        "packing": {"process_count": process_count, "rows_per_process": data.global_batch // process_count},
        "steps": distinct_steps(config.data, config.train.steps),
        "temperature": config.distill.temperature,
        "vocab_size": shared_vocab(config),
        "checksums": {"algorithm": ALGORITHM, "array": CHECKSUM_ARRAY, "fields": checksummed_fields(layout)},
    }


CHECKSUM_ARRAY = "checksum"


def checksummed_fields(layout: CacheLayout) -> list[str]:
    """The arrays whose chunks the checksum array covers, in the order of its last axis."""
    return [*sorted(layout.fields()), "row_hash"]


# What a difference in each provenance entry means to the user, in the order they are checked.
_MISMATCH = {
    "format": "cache format version",
    "tokenizer": "tokenizer (data.tokenizer)",
    "corpus": "corpus spec or seed (data.sources, data.heldout_fraction, data.add_bos/add_eos, train.seed)",
    "seq_len": "sequence length (data.seq_len)",
    "global_batch": "batch (data.global_batch)",
    "packing": "packing (the number of processes splitting each batch)",
    "vocab_size": "shared vocabulary (model.vocab_size, teacher.model.vocab_size)",
    "teacher": "teacher (teacher.model, teacher.checkpoint or teacher.hf_path)",
}


def _differences(saved: dict, expected: dict, keys: Iterable[str]) -> list[str]:
    return [key for key in keys if saved.get(key) != expected.get(key)]


def _describe(key: str, saved: dict, expected: dict) -> str:
    return f"{_MISMATCH.get(key, key)}: cache has {json.dumps(saved.get(key))}, run has {json.dumps(expected.get(key))}"


def check_run(saved: dict, config: Config, process_count: int, path: str) -> None:
    """Refuse a cache that does not cover this run token for token (UserError naming the first difference)."""
    expected = provenance(config, CacheLayout(**saved["layout"]), process_count)
    for key in _differences(saved, expected, _MISMATCH):
        raise UserError(f"teacher cache {path} does not match this run: different {_describe(key, saved, expected)}")
    steps = distinct_steps(config.data, config.train.steps)
    if saved["steps"] < steps:
        key = "data.epoch_steps" if steps == config.data.epoch_steps else "train.steps"
        raise UserError(
            f"teacher cache {path} covers {saved['steps']} steps but {key} is {steps}: run cache-teacher with the "
            f"longer {key}, or make epochs over the cached steps (data.epoch_steps: {saved['steps']})"
        )
    kind = saved["layout"]["kind"]
    distill = config.distill
    # Raw top-k logits do not depend on the temperature; the logsumexp and the samples do.
    temperature_matters = kind == "sampled" or distill.topk_treatment == "tail_bucket"
    if temperature_matters and (
        distill.temperature != saved["temperature"] or distill.final_temperature not in (None, saved["temperature"])
    ):
        raise UserError(
            f"teacher cache {path} was computed at temperature {saved['temperature']}, the run uses "
            f"distill.temperature {distill.temperature} (final {distill.final_temperature}); a {kind} "
            f"cache{' with the tail_bucket treatment' if kind == 'topk' else ''} needs the same fixed one"
        )


def read_provenance(path: str | Path) -> dict | None:
    file = storage.location(path, "teacher.cache") / PROVENANCE_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def _write_json_atomically(file: epath.Path, value: dict) -> None:
    storage.write_atomic(file, json.dumps(value, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# Storage


def _spec(path: epath.Path, name: str, shape, chunks, dtype: str, codec: str | None) -> dict:
    return {
        "driver": "zarr",
        "kvstore": storage.kvstore(path / name),
        "metadata": {
            "shape": list(shape),
            "chunks": list(chunks),
            "dtype": _zarr_dtype(dtype),
            "compressor": CODECS[codec] if codec else None,
            "fill_value": 0,
        },
    }


def _zarr_dtype(name: str) -> str:
    return {"bfloat16": "bfloat16", "float32": "<f4", "int32": "<i4", "uint32": "<u4", "uint8": "|u1"}[name]


def row_hashes(batch: dict[str, np.ndarray]) -> np.ndarray:
    """crc32 per row of its tokens and segment ids: the identity of a packed row."""
    tokens = np.ascontiguousarray(batch["tokens"], np.int32)
    segments = np.ascontiguousarray(batch["segment_ids"], np.int32)
    return np.array(
        [zlib.crc32(segments[r].tobytes(), zlib.crc32(tokens[r].tobytes())) for r in range(len(tokens))], np.uint32
    )


class _Store:
    """The cache's arrays: one per field, plus row_hash [steps, B] and done [steps, processes]."""

    def __init__(self, path: epath.Path, meta: dict, *, create: bool):
        import tensorstore as ts

        self.path = path
        layout = CacheLayout(**meta["layout"])
        steps, batch, seq = meta["steps"], meta["global_batch"], meta["seq_len"]
        processes, rows = meta["packing"]["process_count"], meta["packing"]["rows_per_process"]
        mode = dict(create=True, open=True) if create else dict(open=True)
        opening = {}  # every field's open starts before any is waited on
        for name, (dtype, per_token) in layout.fields().items():
            spec = _spec(path, name, (steps, batch, seq, *per_token), (1, rows, seq, *per_token), dtype, layout.codec)
            opening[name] = ts.open(spec, **mode)
        self.fields = {name: future.result() for name, future in opening.items()}
        self.row_hash = ts.open(_spec(path, "row_hash", (steps, batch), (1, rows), "uint32", "raw"), **mode).result()
        # One file per marker: processes never rewrite each other's chunks.
        self.done = ts.open(_spec(path, "done", (steps, processes), (1, 1), "uint8", "raw"), **mode).result()
        self.rows = rows
        # Caches written before checksums have none: they are read unverified.
        self.checksummed = meta["checksums"]["fields"] if "checksums" in meta else None
        self.checksum = None
        if self.checksummed is not None:
            shape = (steps, processes, len(self.checksummed))
            spec = _spec(path, CHECKSUM_ARRAY, shape, (1, 1, len(self.checksummed)), "uint32", "raw")
            self.checksum = ts.open(spec, **mode).result()

    def arrays(self) -> dict[str, Any]:
        """Every per-chunk array by name: the fields and row_hash."""
        return {**self.fields, "row_hash": self.row_hash}

    def checksums_of(self, chunks: dict[str, np.ndarray]) -> np.ndarray:
        """The checksum row of one step's chunks of one process ({array name: its rows})."""
        assert self.checksummed is not None
        return np.array([array_crc32(chunks[name]) for name in self.checksummed], np.uint32)

    def damage(self, step: int, process: int, chunks: dict[str, np.ndarray] | None = None) -> str | None:
        """What is wrong with process `process`'s chunks of `step` (read now unless given), or None if they hold
        what was written (or the cache has no checksums)."""
        if self.checksum is None:
            return None
        region = np.s_[step, process * self.rows : (process + 1) * self.rows]
        try:
            if chunks is None:
                chunks = {name: array[region].read().result() for name, array in self.arrays().items()}
            recorded = self.checksum[step, process].read().result()
        except Exception as exc:  # a chunk cut short or not decodable: tensorstore's many errors, one line
            return f"a chunk is unreadable ({str(exc).splitlines()[0][:200]})"
        actual = self.checksums_of(chunks)
        bad = [name for name, a, b in zip(self.checksummed, actual, recorded) if a != b]
        return (
            f"{', '.join(bad)} chunk{'s' if len(bad) > 1 else ''} changed since written (checksum mismatch)"
            if bad
            else None
        )

    def finished_steps(self) -> np.ndarray:
        """[steps] bool: every process's part of the step is on disk."""
        # numpy types all(axis=...) as "a bool or an array"; over axis 1 of a 2-d array it is an array.
        return cast(np.ndarray, self.done.read().result().astype(bool).all(axis=1))


def data_bytes_per_token(path: str | Path | epath.Path) -> float:
    """Bytes on disk of the per-token fields (chunk files, compression included) per cached token."""
    path = storage.location(path, "teacher.cache")
    meta = read_provenance(path)
    if meta is None:
        raise UserError(f"{path} holds no teacher cache")
    tokens = meta["steps"] * meta["global_batch"] * meta["seq_len"]
    total = sum(
        f.stat().length
        for name in CacheLayout(**meta["layout"]).fields()
        for f in (path / name).iterdir()
        if not f.name.startswith(".")
    )
    return total / tokens
