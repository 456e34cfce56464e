"""Random access to the documents of one configured source, whatever its format.

Each `DocumentSource` has a length and `source[i]` returns document i: a `str` (text still to tokenize) or a
1-D integer array (token ids). Grain reads them through `MapDataset.source`, so sources must be picklable
(worker processes) and thread-safe (read threads): open handles are created lazily, per process, and
dropped on pickling. Every failure to read names the file and, where known, the record.

Document identity, for the held-out split, is (file name relative to the source root, record number),
hashed by `document_keys`; `analogjax prepare` carries those keys into its shards so the split survives
re-encoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zlib
from collections.abc import Sequence

import numpy as np

from analogjax.data import paths, token_index
from analogjax.data.spec import SourceConfig
from analogjax.errors import UserError
from analogjax.runtime.checksums import array_crc32

CRC_SUFFIX = ".crc32.npy"  # prepared shards: one crc32 per document beside each shard (data/prepare.py)

NUMPY_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32}
# Text files bigger than this become several documents, cut at line ends, so that no single read or
# tokenization call holds a whole book.
MAX_TEXT_DOCUMENT_BYTES = 256 * 1024


class DocumentSource:
    """The documents of one source, concatenated over its files in sorted order."""

    # How messages count records within a file ("line 3" of a JSONL file, "row 7" of a Parquet file).
    _record_word = "record"
    _record_base = 0

    def __init__(self, *, name: str, files: Sequence[str], rel_names: Sequence[str], counts: Sequence[int]):
        self.name = name
        self.files = list(files)
        self.rel_names = list(rel_names)
        self.counts = np.asarray(counts, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        # The vocabulary size the shards were written for, when their metadata says (prepared shards).
        self.vocab_size_hint: int | None = None
        self._stored_keys: np.ndarray | None = None
        # crc32 of each document's token bytes as stored (prepared shards); checked on every read.
        self.document_crcs: np.ndarray | None = None
        self.rewrite_hint = ""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, record number within that file) of document `index`."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, index - int(self._starts[f])

    def where(self, index: int) -> str:
        """The file and record of document `index`, for messages."""
        f, r = self.locate(index)
        return f"{self.files[f]} ({self._record_word} {r + self._record_base})"

    def __getitem__(self, index: int):
        f, r = self.locate(index)
        try:
            value = self._read(f, r)
        except UserError:
            raise
        except Exception as e:  # corrupt shards surface as many exception types; all become one clear line
            raise UserError(f"{self.where(index)}: cannot read ({type(e).__name__}: {e}){self.rewrite_hint}") from None
        if self.document_crcs is not None:
            stored = np.asarray(value)
            if array_crc32(stored.astype(stored.dtype.newbyteorder("<"))) != self.document_crcs[int(index)]:
                raise UserError(
                    f"{self.where(index)}: damaged: the document's tokens differ from what was written "
                    f"(checksum mismatch){self.rewrite_hint}"
                )
        return value

    def _read(self, file_index: int, record: int):
        raise NotImplementedError

    def document_keys(self) -> np.ndarray:
        """A stable uint64 identity per document: stored by prepare, else hashed from (relative name, record)."""
        if self._stored_keys is not None:
            return self._stored_keys
        return hashed_document_keys(self.rel_names, self.counts)

    def __getstate__(self):
        # Open files, readers and memory maps belong to the process that opened them.
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _opened(self, attribute: str, file_index: int, opener):
        """A per-process handle for file `file_index`, created once under the lock."""
        handles = self.__dict__.get(attribute)
        if handles is None or file_index not in handles:
            with self._lock:
                handles = self.__dict__.setdefault(attribute, {})
                if file_index not in handles:
                    handles[file_index] = opener(self.files[file_index])
        return handles[file_index]


def hashed_document_keys(rel_names: Sequence[str], counts: Sequence[int]) -> np.ndarray:
    parts = []
    for name, n in zip(rel_names, counts):
        base = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
        records = np.arange(1, int(n) + 1, dtype=np.uint64)
        parts.append(_mix64(np.uint64(base) + records * np.uint64(0x9E3779B97F4A7C15)))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads nearby inputs over the whole 64-bit range (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """True for the documents held out: those whose key, read as a fraction of 2**64, falls below `fraction`."""
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


# ---------------------------------------------------------------------------------------------- formats


class JsonlSource(DocumentSource):
    """JSON Lines: one document per non-blank line, in `field` (a string or a list of token ids)."""

    def __init__(self, *, name, files, rel_names, field: str):
        starts, lengths, line_numbers = [], [], []
        for path in files:
            data = paths.read_bytes(path)
            buf = np.frombuffer(data, dtype=np.uint8)
            ends = np.flatnonzero(buf == ord("\n"))
            if len(buf) and (not len(ends) or ends[-1] != len(buf) - 1):
                ends = np.append(ends, len(buf))  # a last line without a newline
            begins = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
            sizes = (ends - begins).astype(np.int64)
            keep = sizes > 0
            # Blank lines are not documents; only short lines can be all whitespace often enough to matter.
            for i in np.flatnonzero(keep & (sizes <= 16)):
                if not data[begins[i] : ends[i]].strip():
                    keep[i] = False
            starts.append(begins[keep])
            lengths.append(sizes[keep])
            line_numbers.append(np.flatnonzero(keep))
        super().__init__(name=name, files=files, rel_names=rel_names, counts=[len(s) for s in starts])
        self.field = field
        self._line_starts, self._line_lengths, self._line_numbers = starts, lengths, line_numbers

    def where(self, index: int) -> str:
        f, r = self.locate(index)
        return f"{self.files[f]} (line {int(self._line_numbers[f][r]) + 1})"

    def record(self, index: int) -> dict:
        """Document `index`'s whole JSON object (on-policy prompts read another key of it than `field`)."""
        f, r = self.locate(index)
        raw = _read_range(self, f, int(self._line_starts[f][r]), int(self._line_lengths[f][r]))
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{self.where(index)}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{self.where(index)}: a record must be a JSON object, got {type(obj).__name__}")
        return obj

    def _read(self, file_index, record):
        index = int(self._starts[file_index]) + record
        obj = self.record(index)
        if self.field not in obj:
            raise UserError(f"{self.where(index)}: no key {self.field!r} (set the source's field)")
        return _document_value(obj[self.field], self.where(index))


class ParquetSource(DocumentSource):
    """Parquet: one document per row of column `field` (string, or a list of token ids)."""

    _record_word = "row"
    # Decoded row groups kept per source: shuffled reading revisits a row group many times per epoch.
    _CACHED_ROW_GROUPS = 8

    def __init__(self, *, name, files, rel_names, field: str):
        import pyarrow.parquet as pq

        counts, group_starts = [], []
        for path in files:
            try:
                meta = pq.ParquetFile(_arrow_path(path)[0], filesystem=_arrow_path(path)[1]).metadata
            except Exception as e:
                raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
            if meta.num_columns and field not in meta.schema.to_arrow_schema().names:
                raise UserError(f"{path}: no column {field!r} (set the source's field)")
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            counts.append(sum(sizes))
            group_starts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        super().__init__(name=name, files=files, rel_names=rel_names, counts=counts)
        self.field = field
        self._group_starts = group_starts
        self._open_groups: dict = {}

    def _read(self, file_index, record):
        import pyarrow.parquet as pq

        group = int(np.searchsorted(self._group_starts[file_index], record, side="right")) - 1
        key = (file_index, group)
        with self._lock:  # one decoder per source: pyarrow file objects are not shared across threads
            column = self.__dict__.setdefault("_open_groups", {}).get(key)
            if column is None:
                path, fs = _arrow_path(self.files[file_index])
                table = pq.ParquetFile(path, filesystem=fs).read_row_group(group, columns=[self.field])
                column = table.column(self.field).combine_chunks()
                cache = self._open_groups
                if len(cache) >= self._CACHED_ROW_GROUPS:
                    cache.pop(next(iter(cache)))
                cache[key] = column
        value = column[record - int(self._group_starts[file_index][group])]
        where = f"{self.files[file_index]} (row {record})"
        if hasattr(value, "values") and value.values is not None:  # a list<int> cell
            return _document_value(np.asarray(value.values), where)
        return _document_value(value.as_py(), where)


class ArrayRecordSource(DocumentSource):
    """ArrayRecord: one document per record, UTF-8 text or raw little-endian token ids of `dtype`."""

    def __init__(self, *, name, files, rel_names, tokens: bool, dtype: str | None, stored_keys=None):
        counts = []
        for path in files:
            reader = _array_record_reader(path)
            try:
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:
                raise UserError(f"{path}: not a readable ArrayRecord file ({type(e).__name__}: {e})") from None
        super().__init__(name=name, files=files, rel_names=rel_names, counts=counts)
        self.tokens = tokens
        self.dtype = dtype
        self._stored_keys = stored_keys

    def _read(self, file_index, record):
        reader = self._opened("_open_readers", file_index, _array_record_reader)
        raw = reader.read([record])[0]
        if not self.tokens:
            return raw.decode("utf-8", errors="replace")
        dtype = np.dtype(NUMPY_DTYPES[self.dtype])
        if len(raw) % dtype.itemsize:
            raise UserError(
                f"{self.files[file_index]} (record {record}): {len(raw)} bytes is not a whole number of "
                f"{self.dtype} token ids (wrong dtype, or a text record?)"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<"))


class TokensBinSource(DocumentSource):
    """Flat token files (.bin) split into documents by an offsets index, a Megatron .idx, or an end-of-document id."""

    def __init__(self, *, name, files, rel_names, dtype: str, eod_id: int | None, offsets: str):
        if any("://" in f for f in files):
            raise UserError(f"{files[0]}: tokens_bin reads local files only (use zarr or arrayrecord for remote data)")
        bounds, dtypes = [], []
        for path in files:
            index_path = offsets if offsets else token_index.sidecar_index(path)
            file_dtype = token_index.megatron_dtype(index_path) if index_path.endswith(".idx") else None
            if file_dtype is None:
                if dtype == "auto":
                    raise UserError(
                        f"{path}: the token dtype is unknown: set the source's dtype (uint16, uint32 or int32)"
                    )
                file_dtype = np.dtype(NUMPY_DTYPES[dtype])
            size = os.path.getsize(path)
            if size % file_dtype.itemsize:
                raise UserError(f"{path}: {size} bytes is not a whole number of {file_dtype.name} tokens (corrupt?)")
            n_tokens = size // file_dtype.itemsize
            if index_path:
                starts, ends = token_index.read_offsets(index_path, file_dtype.itemsize, n_tokens, path)
            elif eod_id is not None:
                starts, ends = token_index.split_at_eod(np.memmap(path, dtype=file_dtype, mode="r"), eod_id)
            else:
                raise UserError(
                    f"{path}: no document boundaries: set the source's eod_id, or its offsets (.npy or Megatron .idx)"
                )
            bounds.append((starts, ends))
            dtypes.append(file_dtype)
        super().__init__(name=name, files=files, rel_names=rel_names, counts=[len(s) for s, _ in bounds])
        self._bounds = bounds
        self._dtypes = dtypes

    def _read(self, file_index, record):
        tokens = self._opened(
            "_open_maps", file_index, lambda p: np.memmap(p, dtype=self._dtypes[file_index], mode="r")
        )
        starts, ends = self._bounds[file_index]
        return tokens[int(starts[record]) : int(ends[record])]


class ZarrSource(DocumentSource):
    """Token arrays stored with tensorstore: a store directory holding `tokens` and `offsets` zarr arrays
    (what prepare writes), or a bare 1-D token array split at `eod_id`."""

    def __init__(self, *, name, files, rel_names, eod_id: int | None):
        bounds, keys = [], []
        for path in files:
            tokens_spec, offsets_spec, keys_spec = _zarr_layout(path)
            try:
                if offsets_spec is not None:
                    offsets = np.asarray(_open_zarr(offsets_spec).read().result(), dtype=np.int64)
                    n_tokens = _open_zarr(tokens_spec).shape[0]
                    starts, ends = token_index.validated_offsets(offsets, n_tokens, path)
                elif eod_id is not None:
                    starts, ends = token_index.split_at_eod(np.asarray(_open_zarr(tokens_spec).read().result()), eod_id)
                else:
                    raise UserError(f"{path}: a bare token array needs the source's eod_id to find documents")
                keys.append(None if keys_spec is None else np.asarray(_open_zarr(keys_spec).read().result(), np.uint64))
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{path}: not a readable zarr token store ({type(e).__name__}: {e})") from None
            bounds.append((starts, ends))
        super().__init__(name=name, files=files, rel_names=rel_names, counts=[len(s) for s, _ in bounds])
        self._bounds = bounds
        if keys and all(k is not None for k in keys):
            self._stored_keys = np.concatenate(keys)

    def _read(self, file_index, record):
        tokens = self._opened("_open_arrays", file_index, lambda p: _open_zarr(_zarr_layout(p)[0]))
        starts, ends = self._bounds[file_index]
        return tokens[int(starts[record]) : int(ends[record])].read().result()


class TextFilesSource(DocumentSource):
    """Plain text files: each file one document, files over MAX_TEXT_DOCUMENT_BYTES cut at line ends.

    With a token cache attached (`attach_token_cache`), documents come back as token ids from the cache.
    """

    _record_word = "part"

    def __init__(
        self,
        *,
        name,
        files,
        rel_names,
        sizes: Sequence[int] | None = None,
        max_document_bytes: int = MAX_TEXT_DOCUMENT_BYTES,
    ):
        if sizes is None:
            sizes = [paths.file_size(p) for p in files]
        self.max_document_bytes = max_document_bytes
        super().__init__(
            name=name,
            files=files,
            rel_names=rel_names,
            counts=[max(1, -(-int(s) // max_document_bytes)) for s in sizes],
        )
        self._cache: tuple[str, np.ndarray, np.dtype] | None = None
        self._cuts: dict[int, list[int]] = {}  # a cut file's part boundaries, found once per process

    def read_text(self, file_index: int, record: int) -> str:
        parts = int(self.counts[file_index])
        if parts == 1:
            return paths.read_bytes(self.files[file_index]).decode("utf-8", errors="replace")
        cuts = self._cuts.get(file_index)
        if cuts is None:
            data = paths.read_bytes(self.files[file_index])
            cuts = self._cuts[file_index] = text_cuts(data, self.max_document_bytes, parts)
        # Only this part is read: a book cut in k parts is not read k times per epoch.
        data = _read_range(self, file_index, cuts[record], cuts[record + 1] - cuts[record])
        return data.decode("utf-8", errors="replace")

    def attach_token_cache(self, bin_path: str, offsets: np.ndarray, dtype: np.dtype) -> None:
        if len(offsets) != len(self) + 1:
            raise UserError(f"{bin_path}: token cache holds {len(offsets) - 1} documents, expected {len(self)}")
        self._cache = (bin_path, offsets, np.dtype(dtype))

    def _read(self, file_index, record):
        if self._cache is None:
            return self.read_text(file_index, record)
        bin_path, offsets, dtype = self._cache
        tokens = self._opened("_open_cache", 0, lambda _: np.memmap(bin_path, dtype=dtype, mode="r"))
        index = int(self._starts[file_index]) + record
        return tokens[int(offsets[index]) : int(offsets[index + 1])]


def text_cuts(data: bytes, max_bytes: int, parts: int) -> list[int]:
    """The `parts + 1` boundaries that cut `data` into pieces of about max_bytes, each ending at a line end where
    one is near."""
    cuts = [0]
    for k in range(1, parts):
        newline = data.find(b"\n", k * max_bytes)
        cuts.append(max(cuts[-1], len(data) if newline < 0 else newline + 1))
    cuts.append(len(data))
    return cuts


# ------------------------------------------------------------------------------------------- opening


def open_source(
    config: SourceConfig, *, key: str, name: str, path_key: str = "", format_key: str = ""
) -> DocumentSource:
    """The DocumentSource for one data.sources entry. Not for stdlib.

    Messages name the entry as `key` ("data.sources[2]"), its path and format options as `path_key` and
    `format_key` (default key.path, key.format; a command line passes its flags).
    """
    path_key, format_key = path_key or f"{key}.path", format_key or f"{key}.format"
    root, matched, metadata = paths.expand_source_path(config.path, key=path_key)
    fmt = config.format
    if fmt == "auto":
        fmt = metadata["format"] if metadata else paths.format_from_paths(matched, format_key)
    if metadata:
        return _open_prepared(root, metadata, fmt, config, key=key, name=name)
    if fmt == "zarr":
        matched = _zarr_stores(matched, config.path)
    else:
        matched = [p for p in matched if not paths.is_dir(p)]
        # A directory of mixed files: take the ones of the chosen format.
        if paths.is_dir_path(config.path):
            matched = [p for p in matched if paths.EXTENSION_FORMATS.get(paths.extension(p)) == fmt] or matched
    if not matched:
        raise UserError(f"{path_key}: no {fmt} files in {config.path}")
    rel = [paths.relative(p, root) for p in matched]
    if fmt == "jsonl":
        return JsonlSource(name=name, files=matched, rel_names=rel, field=config.field)
    if fmt == "parquet":
        return ParquetSource(name=name, files=matched, rel_names=rel, field=config.field)
    if fmt == "arrayrecord":
        tokens = config.content == "tokens"
        if tokens and config.dtype == "auto":
            raise UserError(f"{key}.dtype must be set (uint16, uint32 or int32) for token records without metadata")
        return ArrayRecordSource(
            name=name, files=matched, rel_names=rel, tokens=tokens, dtype=None if not tokens else config.dtype
        )
    if fmt == "tokens_bin":
        return TokensBinSource(
            name=name, files=matched, rel_names=rel, dtype=config.dtype, eod_id=config.eod_id, offsets=config.offsets
        )
    if fmt == "zarr":
        return ZarrSource(name=name, files=matched, rel_names=rel, eod_id=config.eod_id)
    if fmt == "text":
        return TextFilesSource(name=name, files=matched, rel_names=rel)
    raise UserError(f"{key}.format {fmt!r} cannot read {config.path}")


def _open_prepared(root: str, metadata: dict, fmt: str, config: SourceConfig, *, key: str, name: str) -> DocumentSource:
    """Shards written by `analogjax prepare`: token ids of a known dtype, with the original document keys."""
    meta_path = paths.join(root, paths.METADATA_FILE)
    try:
        shards = [s["path"] for s in metadata["shards"]]
        dtype = metadata["dtype"]
        vocab_size = int(metadata["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_path}: malformed prepare metadata (missing {e})") from None
    if dtype not in NUMPY_DTYPES:
        raise UserError(f"{meta_path}: unknown dtype {dtype!r}")
    files = [paths.join(root, s) for s in shards]
    hint = (
        f"; prepare the corpus again (`analogjax prepare --input {metadata.get('input')} ...` into a new --output)"
        if "checksums" in metadata
        else ""
    )
    recorded = {name: crc for entry in metadata["shards"] for name, crc in entry.get("files", {}).items()}

    def load(path: str) -> np.ndarray:
        return _load_npy(path, recorded.get(path.rsplit("/", 1)[-1]), hint)

    if fmt == "arrayrecord":
        keys = [paths.join(root, s + ".keys.npy") for s in shards]
        stored = np.concatenate([load(k) for k in keys]) if keys and all(paths.exists(k) for k in keys) else None
        source: DocumentSource = ArrayRecordSource(
            name=name, files=files, rel_names=shards, tokens=True, dtype=dtype, stored_keys=stored
        )
    elif fmt == "zarr":
        source = ZarrSource(name=name, files=files, rel_names=shards, eod_id=None)
    else:
        raise UserError(f"{key}.format is {fmt} but {meta_path} describes {metadata.get('format')} shards")
    source.vocab_size_hint = vocab_size
    if "checksums" in metadata:  # prepared with checksums: every document is verified as it is read
        source.document_crcs = np.concatenate([load(f + CRC_SUFFIX) for f in files]).astype(np.uint32)
        if len(source.document_crcs) != len(source):
            raise UserError(
                f"{root}: damaged: {len(source.document_crcs)} document checksums for {len(source)} documents{hint}"
            )
        source.rewrite_hint = hint
    return source


def _zarr_stores(matched: list[str], configured: str) -> list[str]:
    stores = [p for p in matched if paths.is_dir(p) and paths.looks_like_zarr(p)]
    if not stores and paths.is_dir(configured) and paths.looks_like_zarr(configured):
        stores = [configured]
    return stores


def _zarr_layout(path: str) -> tuple[dict, dict | None, dict | None]:
    """tensorstore specs for (tokens, offsets or None, keys or None) of a store or a bare array at `path`."""
    for name in ("zarr.json", ".zarray"):
        if paths.exists(paths.join(path, name)) and not paths.exists(paths.join(path, "tokens")):
            return _zarr_spec(path), None, None
    tokens = paths.join(path, "tokens")
    offsets = paths.join(path, "offsets")
    keys = paths.join(path, "keys")
    return (
        _zarr_spec(tokens),
        _zarr_spec(offsets) if paths.exists(offsets) else None,
        _zarr_spec(keys) if paths.exists(keys) else None,
    )


def _zarr_spec(path: str) -> dict:
    driver = "zarr" if paths.exists(paths.join(path, ".zarray")) else "zarr3"
    url = path if "://" in path else "file://" + os.path.abspath(path)
    return {"driver": driver, "kvstore": url}


def _open_zarr(spec: dict):
    import tensorstore as ts

    return ts.open(spec, read=True).result()


def _array_record_reader(path: str):
    from array_record.python import array_record_module

    from analogjax.runtime import storage

    # ArrayRecord's reader opens local files only: a shard on a bucket is read from a copy in the local cache.
    path = storage.local_copy(path)
    try:
        # Random access: no readahead, no background threads per reader.
        return array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
    except Exception as e:
        raise UserError(f"{path}: not a readable ArrayRecord file ({type(e).__name__}: {e})") from None


def _document_value(value, where: str):
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise UserError(f"{where}: token ids must be integers (got {value.dtype})")
        return value
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{where}: a token-id list must hold integers only")
        return np.asarray(value, dtype=np.int64)
    raise UserError(f"{where}: expected text or a list of token ids, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------- reading


def _read_range(source: DocumentSource, file_index: int, offset: int, length: int) -> bytes:
    path = source.files[file_index]
    if paths.is_remote(path):
        with paths.open_binary(path) as f:
            f.seek(offset)
            return f.read(length)
    # Open per read: a corpus of thousands of shards must not pin thousands of descriptors.
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _load_npy(path: str, crc: int | None = None, hint: str = "") -> np.ndarray:
    """A .npy file; checked against its recorded crc32 first, if given."""
    data = paths.read_bytes(path)
    if crc is not None and zlib.crc32(data) != crc:
        raise UserError(f"{path}: damaged: its contents differ from what was written (checksum mismatch){hint}")
    try:
        return np.load(io.BytesIO(data))
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e}){hint}") from None


def _arrow_path(path: str):
    if not paths.is_remote(path):
        return path, None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return inner, fs
