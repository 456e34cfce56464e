"""Packing documents into fixed-length rows, as a checkpointable Grain transformation.

A document of n tokens is n - 1 (input, next token) pairs. Rows are filled with pairs, document after
document (concatenate-then-split): a document that does not fit is cut, its rest opening the next row, so no
pair is ever dropped and rows are full except at the end of a finite stream. Each piece of a document in a
row is its own segment (ids 1, 2, ... within the row; 0 is padding) with positions counting from 0: attention
never crosses a segment, so a continued document starts afresh, as the model will see it.

Row keys: tokens, targets, segment_ids, positions, source_ids (all int32 [seq_len]), epoch (int32 scalar:
the latest epoch of the documents in it, for the too-small-corpus check) and document (int64 scalar: the id of the
document holding most of the row, for intervals that resample documents).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "source_ids")


class PackedRowsIterDataset(grain.IterDataset):
    """Packs elements {"tokens": int32[n], "source": int, "epoch": int, "document": int} into rows of seq_len
    pairs."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), seq_len=self._seq_len, pad_id=self._pad_id)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._seq_len})"


class PackedRowsIterator(grain.DatasetIterator):
    """State between rows is at most one partly used document: (parent state before it, pairs already used)."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._document: dict | None = None
        self._document_state: Any = None  # the parent's state just before self._document was read
        self._used = 0  # pairs of self._document already placed in rows
        self._resume_used = 0  # after set_state: pairs to skip in the next document read

    def _pairs_left(self) -> int:
        if self._document is None:
            return 0
        return max(len(self._document["tokens"]) - 1 - self._used, 0)

    def _read_document(self) -> None:
        state = self._parent.get_state()
        document = next(self._parent)  # StopIteration ends the stream
        self._document, self._document_state = document, state
        self._used, self._resume_used = self._resume_used, 0

    def __next__(self) -> dict[str, np.ndarray]:
        pieces, filled = [], 0
        while filled < self._seq_len:
            if self._pairs_left() == 0:
                try:
                    self._read_document()
                except StopIteration:
                    break
                continue
            take = min(self._seq_len - filled, self._pairs_left())
            pieces.append((self._document, self._used, take))
            self._used += take
            filled += take
        if not pieces:
            raise StopIteration
        return self._assemble(pieces)

    def _assemble(self, pieces) -> dict[str, np.ndarray]:
        n = self._seq_len
        row = {
            "tokens": np.full(n, self._pad_id, np.int32),
            "targets": np.full(n, self._pad_id, np.int32),
            "segment_ids": np.zeros(n, np.int32),
            "positions": np.zeros(n, np.int32),
            "source_ids": np.zeros(n, np.int32),
        }
        start, epoch, most = 0, 0, 0
        for segment, (document, used, take) in enumerate(pieces, start=1):
            ids = document["tokens"]
            end = start + take
            row["tokens"][start:end] = ids[used : used + take]
            row["targets"][start:end] = ids[used + 1 : used + 1 + take]
            row["segment_ids"][start:end] = segment
            row["positions"][start:end] = self._arange[:take]
            row["source_ids"][start:end] = document["source"]
            epoch = max(epoch, int(document["epoch"]))
            if take > most:
                most, row["document"] = take, np.asarray(document["document"], np.int64)
            start = end
        row["epoch"] = np.asarray(epoch, np.int32)
        return row

    def get_state(self) -> dict[str, Any]:
        if self._pairs_left() > 0:
            return {"parent": self._document_state, "used": int(self._used)}
        return {"parent": self._parent.get_state(), "used": int(self._resume_used)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document, self._document_state = None, None
        self._used = 0
        # The partly used document is read again on the next row, and its used pairs skipped.
        self._resume_used = int(state["used"])

    def __str__(self) -> str:
        return f"PackedRowsIterator(seq_len={self._seq_len})"


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of a batch's positions that hold a real (input, target) pair rather than padding."""
    return float(np.mean(np.asarray(batch["segment_ids"]) > 0))
