"""The embedded demo corpus: the Python standard library's own source files, found on this machine.

No download: sysconfig names the directory. Files are taken in sorted relative-path order (so the corpus and
its held-out split are the same on every run), test suites and installed packages are skipped by default,
and files over sources.MAX_TEXT_DOCUMENT_BYTES become several documents.

Tokenizing ~12 MB of code on the fly would cost the demo seconds every epoch, so `cache_tokens` tokenizes it
once (the Rust tokenizer over all cores) into a flat token file plus offsets, keyed by the tokenizer and by the
files' names, sizes and modification times, and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator

import numpy as np

from analogjax.data.sources import MAX_TEXT_DOCUMENT_BYTES, TextFilesSource
from analogjax.data.tokenize import encode_documents
from analogjax.errors import UserError

# Directories that hold test suites (odd, data-heavy code) or third-party packages rather than the library.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
# Tokenize in batches of this many documents: big enough to keep every core busy, small enough for memory.
_ENCODE_BATCH = 128


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(include_tests: bool = False) -> list[str]:
    """Absolute paths of the standard library's .py files, sorted by path relative to its root."""
    root = stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = {"site-packages", "dist-packages", "__pycache__"} if include_tests else _SKIPPED_DIRS
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not found:
        raise UserError(f"no Python source files under {root}: this Python ships without its standard library sources")
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def stdlib_source(name: str = "stdlib", include_tests: bool = False) -> TextFilesSource:
    root = stdlib_root()
    files = stdlib_files(include_tests)
    return TextFilesSource(name=name, files=files, rel_names=[os.path.relpath(p, root) for p in files])


def stdlib_texts(include_tests: bool = False) -> Iterator[str]:
    """Every document's text in corpus order (what the demo trains its BPE on)."""
    source = stdlib_source(include_tests=include_tests)
    for i in range(len(source)):
        yield source[i]


def write_jsonl(out_path: str, include_tests: bool = False) -> int:
    """Writes the corpus as JSON Lines ({"text": ..., "path": ...}); returns the number of documents."""
    source = stdlib_source(include_tests=include_tests)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(source)):
            file_index, part = source.locate(i)
            record = {"text": source[i], "path": source.rel_names[file_index], "part": part}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return len(source)


def cache_tokens(source: TextFilesSource, tokenizer, cache_dir: str, *, add_bos: bool, add_eos: bool) -> str:
    """Tokenizes `source` once into cache_dir (reusing an earlier run's cache) and attaches it; returns the .bin path.

    Empty documents are stored empty (no specials), exactly as tokenizing on the fly treats them.
    """
    identity = {
        "tokenizer": tokenizer.fingerprint,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "max_document_bytes": MAX_TEXT_DOCUMENT_BYTES,
        "files": [[rel, *_size_and_mtime(path)] for rel, path in zip(source.rel_names, source.files)],
    }
    key = hashlib.blake2b(json.dumps(identity).encode(), digest_size=10).hexdigest()
    stem = os.path.join(cache_dir, f"{source.name}-{key}")
    bin_path, offsets_path = stem + ".bin", stem + ".offsets.npy"
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    if not (os.path.exists(bin_path) and os.path.exists(offsets_path)):
        _write_cache(source, tokenizer, bin_path, offsets_path, dtype, add_bos=add_bos, add_eos=add_eos)
    offsets = np.load(offsets_path)
    if offsets[-1] * dtype.itemsize != os.path.getsize(bin_path):
        raise UserError(f"{bin_path}: token cache is truncated or corrupt: delete it and run again")
    source.attach_token_cache(bin_path, offsets, dtype)
    return bin_path


def _write_cache(source, tokenizer, bin_path, offsets_path, dtype, *, add_bos, add_eos) -> None:
    try:
        os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    except OSError as e:
        raise UserError(f"data.cache_dir: cannot create {os.path.dirname(bin_path)} ({e.strerror})") from None
    # Several processes may build the same cache at once: each writes its own temporary files and the
    # atomic renames leave one complete copy.
    suffix = f".tmp{os.getpid()}"
    lengths = []
    with open(bin_path + suffix, "wb") as out:
        for start in range(0, len(source), _ENCODE_BATCH):
            texts = [source[i] for i in range(start, min(start + _ENCODE_BATCH, len(source)))]
            encoded = encode_documents(tokenizer, texts, add_bos=add_bos, add_eos=add_eos)
            for text, ids in zip(texts, encoded):
                ids = ids if text else ids[:0]
                out.write(ids.astype(dtype).tobytes())
                lengths.append(len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    with open(offsets_path + suffix, "wb") as f:
        np.save(f, offsets)
    os.replace(bin_path + suffix, bin_path)
    os.replace(offsets_path + suffix, offsets_path)


def _size_and_mtime(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
