"""Paths of corpora: local files through os, remote ones (gs://, ...) through etils.epath.

Also the expansion of a configured source path (file, glob, directory, prepared directory, zarr store)
into the sorted list of files the source reads, and the format guess from their extensions.
"""

from __future__ import annotations

import glob as globlib
import json
import os

from analogjax.errors import UserError

EXTENSION_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".array_record": "arrayrecord",
    ".arrayrecord": "arrayrecord",
    ".bin": "tokens_bin",
    ".zarr": "zarr",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".py": "text",
}

# Written by `analogjax prepare` next to its shards; its presence makes a directory a prepared source.
METADATA_FILE = "analogjax_data.json"


def is_remote(path: str) -> bool:
    return "://" in path


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def is_dir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def is_dir_path(path: str) -> bool:
    return not any(ch in path for ch in "*?[") and exists(path) and is_dir(path)


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if is_remote(root) else os.path.join(root, name)


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


def relative(path: str, root: str) -> str:
    if is_remote(path):
        return path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/") + "/") else path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root))


def extension(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = []
    for p in parts:
        if any(ch in p for ch in "*?["):
            break
        fixed.append(p)
    root = "/".join(fixed)
    return root or ("/" if pattern.startswith("/") else ".")


def glob_paths(pattern: str) -> list[str]:
    if is_remote(pattern):
        root = glob_root(pattern)
        return [str(p) for p in _epath(root).glob(pattern[len(root) :].lstrip("/"))]
    return [p for p in globlib.glob(pattern, recursive=True)]


def walk_files(root: str) -> list[str]:
    if is_remote(root):
        return [str(p) for p in _epath(root).rglob("*") if not p.is_dir()]
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # A zarr store is one unit, not a tree of chunk files.
        stores = [d for d in dirnames if looks_like_zarr(os.path.join(dirpath, d))]
        out.extend(os.path.join(dirpath, d) for d in stores)
        dirnames[:] = sorted(d for d in dirnames if d not in stores and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return out


def file_size(path: str) -> int:
    return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    try:
        if is_remote(path):
            return _epath(path).read_bytes()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def expand_source_path(path: str, *, key: str) -> tuple[str, list[str], dict | None]:
    """(root that relative names start from, sorted matching paths, prepare's metadata if a prepared directory).

    `key` names the path option in messages.
    """
    if any(ch in path for ch in "*?["):
        root = glob_root(path)
        paths = sorted(glob_paths(path))
        if not paths:
            raise UserError(f"{key}: no files match {path}")
        return root, paths, None
    if not exists(path):
        raise UserError(f"{key}: no such file or directory: {path}")
    if is_dir(path):
        meta_path = join(path, METADATA_FILE)
        if exists(meta_path):
            try:
                metadata = json.loads(read_bytes(meta_path))
            except ValueError as e:
                raise UserError(f"{meta_path}: not valid JSON ({e})") from None
            return path, [], metadata
        if looks_like_zarr(path):
            return parent(path), [path], None
        paths = sorted(walk_files(path))
        if not paths:
            raise UserError(f"{key}: directory {path} is empty")
        return path, paths, None
    return parent(path), [path], None


def format_from_paths(paths: list[str], key: str) -> str:
    """The one format the files' extensions name; `key` names the format option in messages."""
    found = {fmt for p in paths if (fmt := EXTENSION_FORMATS.get(extension(p))) is not None}
    if any(looks_like_zarr(p) for p in paths if is_dir(p)):
        found.add("zarr")
    if len(found) == 1:
        return found.pop()
    if not found:
        raise UserError(
            f"{key}: cannot tell the format of {paths[0]}: set it (jsonl, parquet, arrayrecord, tokens_bin, zarr, text)"
        )
    raise UserError(f"{key}: files of several formats ({', '.join(sorted(found))}): set the format")


def looks_like_zarr(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or any(
        exists(join(path, n)) for n in ("zarr.json", ".zarray", "tokens/zarr.json", "tokens/.zarray")
    )


def open_binary(path: str):
    """A readable binary file object for a local or remote path."""
    return _epath(path).open("rb") if is_remote(path) else open(path, "rb")
