"""Tokenize a corpus once into shards that training reads without a tokenizer in the loop (`prepare_corpus`;
the command is commands/prepare.py).

The input is any source the pipeline reads (JSONL, Parquet, ArrayRecord, text files, tokens_bin, zarr, or
"stdlib"). Documents are cut into contiguous ranges, one shard each, written in parallel by worker processes.
The output directory holds the shards, each document's identity key (so the held-out split is unchanged by
preparing) and analogjax_data.json, which lets `path: <output>` be used as a source with format auto.

Verified: each shard has a `<shard>.crc32.npy` beside it, the crc32 of every document's token bytes as stored, which
the reader checks for each document it reads; analogjax_data.json records the crc32 of that file and of the keys
file, checked when the shards are opened. `analogjax check DIR` verifies every document (`verify_shards`).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import queue
import shutil
import tempfile
import zlib

import numpy as np

from analogjax.data.paths import METADATA_FILE
from analogjax.data.sources import CRC_SUFFIX, DocumentSource, open_source
from analogjax.data.spec import SourceConfig
from analogjax.data.tokenize import encode_documents, load_tokenizer
from analogjax.errors import UserError
from analogjax.runtime import storage
from analogjax.runtime.checksums import ALGORITHM, array_crc32
from analogjax.runtime.metrics_log import Progress

FORMATS = ("arrayrecord", "zarr")
# Documents tokenized per call: the Rust tokenizer parallelises within a batch.
_ENCODE_BATCH = 64
# Tokens written to a zarr array per tensorstore write, and its chunk size (≈1 MiB of uint16).
_ZARR_CHUNK = 1 << 19


def prepare_corpus(args: argparse.Namespace) -> dict:
    """Write the shards and analogjax_data.json for the options of `analogjax prepare` (see commands/prepare.py);
    returns the metadata written."""
    if args.workers <= 0:
        raise UserError(f"--workers must be positive (got {args.workers})")
    if args.shards < 0:
        raise UserError(f"--shards must be positive (got {args.shards})")
    storage.check_reachable(args.output, "--output")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size is None:
        raise UserError('--tokenizer "none" cannot prepare a corpus: name a tokenizer file or "bytes"')
    source = _open_input(args)
    if len(source) == 0:
        raise UserError(f"--input {args.input}: no documents (empty corpus)")
    source[0]  # a wrong --field or --input-format fails here, before any shard, folder or progress bar
    output = storage.location(args.output, "--output")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {args.output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"--output {args.output} is not empty: choose a new directory")
    if not storage.is_remote(output):  # object stores have no folders
        output.mkdir(parents=True, exist_ok=True)

    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    shard_count = min(args.shards or args.workers, len(source))
    bounds = np.linspace(0, len(source), shard_count + 1).astype(np.int64)
    suffix = ".array_record" if args.format == "arrayrecord" else ".zarr"
    keys = source.document_keys()
    tasks = [
        dict(
            source=source,
            tokenizer_spec=args.tokenizer,
            path=str(output / name),
            start=int(a),
            stop=int(b),
            keys=keys[a:b],
            format=args.format,
            dtype=dtype,
            vocab_size=tokenizer.vocab_size,
            add_bos=args.add_bos,
            add_eos=args.add_eos,
        )
        for a, b, name in zip(
            bounds[:-1], bounds[1:], (f"shard-{i:05d}-of-{shard_count:05d}{suffix}" for i in range(shard_count))
        )
    ]
    results = _run_tasks(tasks, workers=min(args.workers, shard_count), total=len(source))

    documents = sum(r["documents"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    metadata = {
        "format": args.format,
        "dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": args.tokenizer,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "add_bos": args.add_bos,
        "add_eos": args.add_eos,
        "input": args.input,
        "documents": documents,
        "tokens": tokens,
        "shards": [
            {
                "path": t["path"].rsplit("/", 1)[-1],
                "documents": r["documents"],
                "tokens": r["tokens"],
                "files": r["files"],
            }
            for t, r in zip(tasks, results)
        ],
        "checksums": {"algorithm": ALGORITHM, "documents": f"<shard>{CRC_SUFFIX}"},
    }
    # Written last, in one piece: its presence makes the folder a prepared source.
    storage.write_atomic(output / METADATA_FILE, json.dumps(metadata, indent=2))
    return metadata


def _open_input(args) -> DocumentSource:
    if args.input == "stdlib":
        from analogjax.data.stdlib_corpus import stdlib_source

        return stdlib_source()
    config = SourceConfig(path=args.input, format=args.input_format, field=args.field)
    return open_source(config, key="--input", name="input", path_key="--input", format_key="--input-format")


def _run_tasks(tasks: list[dict], *, workers: int, total: int) -> list[dict]:
    # A terminal gets the bar; logs get the command's closing line.
    progress = Progress(total, desc="prepare", unit="doc", enabled=True)
    try:
        if workers == 1:
            return [_write_shard(task, progress.update) for task in tasks]
        # spawn, not fork: the parent may hold JAX or tokenizer threads, which do not survive a fork.
        context = multiprocessing.get_context("spawn")
        updates = context.Queue()
        with context.Pool(workers, initializer=_init_worker, initargs=(updates,)) as pool:
            pending = pool.map_async(_write_shard_in_worker, tasks)
            while not pending.ready():
                _drain(updates, progress, timeout=0.2)
            _drain(updates, progress, timeout=0)
            return pending.get()
    finally:
        progress.close()


def _drain(updates, progress, *, timeout: float) -> None:
    try:
        progress.update(updates.get(timeout=timeout) if timeout else updates.get_nowait())
        while True:
            progress.update(updates.get_nowait())
    except queue.Empty:
        pass


_worker_updates = None


def _init_worker(updates) -> None:
    global _worker_updates
    _worker_updates = updates


def _write_shard_in_worker(task: dict) -> dict:
    return _write_shard(task, _worker_updates.put)


def _write_shard(task: dict, report) -> dict:
    """Tokenizes documents [start, stop) of the source into one shard; returns its document and token counts."""
    source, dtype = task["source"], np.dtype(task["dtype"])
    tokenizer = load_tokenizer(task["tokenizer_spec"])
    writer = _ArrayRecordShard(task["path"]) if task["format"] == "arrayrecord" else _ZarrShard(task["path"], dtype)
    documents = tokens = 0
    crcs: list[int] = []
    for batch_start in range(task["start"], task["stop"], _ENCODE_BATCH):
        indices = range(batch_start, min(batch_start + _ENCODE_BATCH, task["stop"]))
        values = [source[i] for i in indices]
        texts = [v for v in values if isinstance(v, str)]
        encoded = iter(encode_documents(tokenizer, texts, add_bos=task["add_bos"], add_eos=task["add_eos"]))
        for index, value in zip(indices, values):
            if isinstance(value, str):
                ids = next(encoded) if value else np.zeros(0, np.int32)
            else:
                ids = np.asarray(value)
            if ids.size and (ids.min() < 0 or ids.max() >= task["vocab_size"]):
                raise UserError(
                    f"{source.where(index)}: token id {int(ids.max())} is outside the tokenizer's "
                    f"vocabulary [0, {task['vocab_size']})"
                )
            stored = ids.astype(dtype.newbyteorder("<"))
            writer.add(stored)
            crcs.append(array_crc32(stored))
            documents += 1
            tokens += len(ids)
        report(len(indices))
    writer.close(task["keys"])
    crc_file = io.BytesIO()
    np.save(crc_file, np.asarray(crcs, np.uint32))
    storage.location(task["path"] + CRC_SUFFIX).write_bytes(crc_file.getvalue())  # a local path or an object
    # The side files are read whole when the shards are opened: their own checksums are checked then.
    side = [task["path"] + CRC_SUFFIX] + ([task["path"] + ".keys.npy"] if task["format"] == "arrayrecord" else [])
    files = {f.rsplit("/", 1)[-1]: zlib.crc32(storage.location(f).read_bytes()) for f in side}
    return {"documents": documents, "tokens": tokens, "files": files}


def verify_shards(root: str) -> tuple[list[str], bool]:
    """Read every document of prepared shards and check it against its checksum: (report lines, all intact)."""
    metadata = json.loads((storage.location(root) / METADATA_FILE).read_text())
    lines = [f"prepared shards in {root}: {len(metadata.get('shards', []))} shard(s)"]
    if "checksums" not in metadata:
        return lines + ["  unverified: prepared before checksums (nothing to verify against)"], False
    try:
        source: DocumentSource = open_source(SourceConfig(path=root), key="check", name="check")
    except UserError as exc:
        return lines + [f"  damaged: {exc}"], False
    damaged: dict[str, list[str]] = {}
    for index in range(len(source)):
        try:
            source[index]
        except UserError as exc:
            shard = source.rel_names[source.locate(index)[0]]
            damaged.setdefault(shard, []).append(str(exc))
    for shard in (s["path"] for s in metadata["shards"]):
        problems = damaged.get(shard)
        if problems:
            more = f" (and {len(problems) - 1} more damaged documents)" if len(problems) > 1 else ""
            lines.append(f"  {shard}: damaged: {problems[0]}{more}")
        else:
            lines.append(f"  {shard}: intact")
    if damaged:
        lines.append(
            f"  prepare the corpus again (`analogjax prepare --input {metadata.get('input')} ...` into a new"
            " --output) to replace the damaged shards"
        )
    return lines, not damaged


class _ArrayRecordShard:
    """One record per document: its token ids as little-endian bytes; identity keys in a .keys.npy beside it.
    ArrayRecord writes local files: a shard bound for an object store is written to a local temporary file first
    and uploaded whole when closed."""

    def __init__(self, path: str):
        from array_record.python import array_record_module

        self.path = path
        self._local = _local_staging(path, ".array_record") if storage.is_remote(path) else path
        # group_size:1 makes every record individually addressable, which shuffled reading needs.
        self._writer = array_record_module.ArrayRecordWriter(self._local, "group_size:1")

    def add(self, ids: np.ndarray) -> None:
        self._writer.write(ids.astype(ids.dtype.newbyteorder("<")).tobytes())

    def close(self, keys: np.ndarray) -> None:
        self._writer.close()
        index = io.BytesIO()
        np.save(index, np.asarray(keys, np.uint64))
        if self._local != self.path:
            with open(self._local, "rb") as src, storage.location(self.path).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            os.remove(self._local)
        storage.location(self.path + ".keys.npy").write_bytes(index.getvalue())


def _local_staging(path: str, suffix: str) -> str:
    """A local temporary file for a shard bound for an object store (named after it, for a reader of `ls`)."""
    fd, local = tempfile.mkstemp(prefix=path.rsplit("/", 1)[-1] + ".", suffix=suffix)
    os.close(fd)
    return local


class _ZarrShard:
    """A store with zarr3 arrays tokens (flat), offsets (documents + 1) and keys; tokens staged in a raw file."""

    def __init__(self, path: str, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        if storage.is_remote(path):  # tokens are staged on the local disk, the arrays written to the bucket
            self._staging_path = _local_staging(path, ".staging.bin")
        else:
            os.makedirs(path, exist_ok=True)
            self._staging_path = os.path.join(path, ".staging.bin")
        self._staging = open(self._staging_path, "wb")
        self._lengths: list[int] = []

    def add(self, ids: np.ndarray) -> None:
        self._staging.write(ids.tobytes())
        self._lengths.append(len(ids))

    def close(self, keys: np.ndarray) -> None:
        import tensorstore as ts

        self._staging.close()
        flat = (
            np.memmap(self._staging_path, dtype=self.dtype, mode="r")
            if os.path.getsize(self._staging_path)
            else np.zeros(0, self.dtype)
        )
        offsets = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)]).astype(np.int64)

        def create(name, dtype, shape):
            spec = {"driver": "zarr3", "kvstore": storage.kvstore(f"{self.path.rstrip('/')}/{name}")}
            chunk = [max(1, min(shape[0], _ZARR_CHUNK))]
            return ts.open(
                spec, create=True, dtype=dtype, shape=shape, chunk_layout=ts.ChunkLayout(chunk_shape=chunk)
            ).result()

        tokens = create("tokens", ts.dtype(self.dtype.name), [len(flat)])
        for start in range(0, len(flat), _ZARR_CHUNK):
            stop = min(start + _ZARR_CHUNK, len(flat))  # tensorstore does not clip slices at the end
            tokens[start:stop].write(np.asarray(flat[start:stop])).result()
        create("offsets", ts.int64, [len(offsets)]).write(offsets).result()
        create("keys", ts.uint64, [len(keys)]).write(np.asarray(keys, np.uint64)).result()
        del flat
        os.remove(self._staging_path)
