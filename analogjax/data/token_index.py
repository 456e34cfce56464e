"""Document boundaries of flat token streams: offsets arrays, Megatron-LM .idx files, end-of-document ids."""

from __future__ import annotations

import os
import struct

import numpy as np

from analogjax.errors import UserError

# Megatron-LM's indexed dataset (.bin + .idx): header, then version, dtype code, sequence and document counts.
_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


def split_at_eod(tokens: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Document bounds of a flat token stream: each document ends with (and keeps) its end-of-document id."""
    ends = np.flatnonzero(np.asarray(tokens) == eod_id).astype(np.int64) + 1
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return starts, ends


def sidecar_index(bin_path: str) -> str:
    stem = bin_path[: -len(".bin")] if bin_path.endswith(".bin") else bin_path
    for candidate in (stem + ".idx", bin_path + ".idx", stem + ".offsets.npy", bin_path + ".offsets.npy"):
        if os.path.exists(candidate):
            return candidate
    return ""


def megatron_dtype(idx_path: str) -> np.dtype | None:
    with open(idx_path, "rb") as f:
        header = f.read(len(_MEGATRON_MAGIC) + 9)
    if not header.startswith(_MEGATRON_MAGIC):
        return None
    code = header[len(_MEGATRON_MAGIC) + 8]
    if code not in _MEGATRON_DTYPES:
        raise UserError(f"{idx_path}: unsupported Megatron dtype code {code}")
    return np.dtype(_MEGATRON_DTYPES[code])


def read_offsets(index_path: str, itemsize: int, n_tokens: int, bin_path: str):
    if not os.path.exists(index_path):
        raise UserError(f"{bin_path}: offsets index {index_path} does not exist")
    try:
        if index_path.endswith(".npy"):
            offsets = np.load(index_path).astype(np.int64)
            return validated_offsets(offsets, n_tokens, index_path)
        with open(index_path, "rb") as f:
            data = f.read()
        if not data.startswith(_MEGATRON_MAGIC):
            raise UserError(f"{index_path}: not a .npy offsets array nor a Megatron .idx file")
        pos = len(_MEGATRON_MAGIC)
        _version, _code, n_seq, n_doc = struct.unpack_from("<QBQQ", data, pos)
        pos += 8 + 1 + 8 + 8
        lengths = np.frombuffer(data, np.int32, n_seq, pos).astype(np.int64)
        pos += 4 * n_seq
        pointers = np.frombuffer(data, np.int64, n_seq, pos) // itemsize
        pos += 8 * n_seq
        doc_index = np.frombuffer(data, np.int64, n_doc, pos)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{index_path}: unreadable offsets index ({type(e).__name__}: {e})") from None
    # A Megatron document is a run of consecutive sequences [doc_index[d], doc_index[d+1]).
    first, last = doc_index[:-1], doc_index[1:] - 1
    keep = last >= first
    starts = pointers[first[keep]]
    ends = pointers[last[keep]] + lengths[last[keep]]
    if len(ends) and (ends.max() > n_tokens or starts.min() < 0):
        raise UserError(f"{index_path}: document bounds run past the end of {bin_path} (mismatched .idx?)")
    return starts.astype(np.int64), ends.astype(np.int64)


def validated_offsets(offsets: np.ndarray, n_tokens: int, where: str):
    if (
        offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or np.any(np.diff(offsets) < 0)
        or offsets[-1] != n_tokens
    ):
        raise UserError(
            f"{where}: offsets must rise from 0 to the token count {n_tokens} "
            f"(got {len(offsets)} entries ending at {offsets[-1] if len(offsets) else 'nothing'})"
        )
    return offsets[:-1], offsets[1:]
