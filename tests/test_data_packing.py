"""Packing: rows never mix documents, drop no (input, target) pair, split long documents, resume exactly."""

import collections
import json

import grain
import numpy as np
import pytest

from analogjax.data.packing import PackedRowsIterDataset, packing_efficiency

SEQ_LEN = 16
PAD = 7


def _documents(lengths):
    # Document d holds d*1000, d*1000+1, ...: any token names its document, and every target is its input + 1.
    return [
        {"tokens": (d * 1000 + np.arange(n)).astype(np.int32), "source": d % 3, "epoch": 0, "document": d}
        for d, n in enumerate(lengths)
    ]


def _rows(documents, seq_len=SEQ_LEN):
    ds = grain.MapDataset.source(documents).to_iter_dataset()
    return PackedRowsIterDataset(ds, seq_len=seq_len, pad_id=PAD)


# Lengths 0 and 1 have no pairs; 40 and 100 exceed a row and must be split.
LENGTHS = [5, 1, 40, 0, 3, 16, 17, 2, 100, 9, 30]


def test_a_row_names_the_document_holding_most_of_it():
    for row in _rows(_documents(LENGTHS)):
        real = row["segment_ids"] > 0
        owners, counts = np.unique(row["tokens"][real] // 1000, return_counts=True)
        assert int(row["document"]) == int(owners[np.argmax(counts)])


def test_rows_hold_whole_segments_of_one_document_each():
    rows = list(_rows(_documents(LENGTHS)))
    for row in rows:
        tokens, targets, seg, pos, src = (
            row[k] for k in ("tokens", "targets", "segment_ids", "positions", "source_ids")
        )
        assert all(v.shape == (SEQ_LEN,) and v.dtype == np.int32 for v in (tokens, targets, seg, pos, src))
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1), "a segment must be contiguous"
            doc = tokens[where] // 1000
            assert np.all(doc == doc[0]), "a segment mixed two documents"
            np.testing.assert_array_equal(targets[where], tokens[where] + 1)  # next token of the same document
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            assert np.all(src[where] == doc[0] % 3)
        # Segment ids count up from 1 in order; padding (0) only at the end.
        used = seg > 0
        assert np.all(seg[used] == np.maximum.accumulate(seg[used]))
        assert not np.any(used[np.argmin(used) :]) or used.all()
        assert np.all(tokens[~used] == PAD) and np.all(targets[~used] == PAD)


def test_every_pair_appears_exactly_once_and_rows_are_full_but_the_last():
    rows = list(_rows(_documents(LENGTHS)))
    got = collections.Counter()
    for row in rows:
        used = row["segment_ids"] > 0
        got.update(zip(row["tokens"][used].tolist(), row["targets"][used].tolist()))
    want = collections.Counter()
    for doc in _documents(LENGTHS):
        t = doc["tokens"].tolist()
        want.update(zip(t[:-1], t[1:]))
    assert got == want
    total_pairs = sum(max(n - 1, 0) for n in LENGTHS)
    assert len(rows) == -(-total_pairs // SEQ_LEN)
    assert all(packing_efficiency(r) == 1.0 for r in rows[:-1])
    assert packing_efficiency(rows[-1]) == pytest.approx((total_pairs % SEQ_LEN or SEQ_LEN) / SEQ_LEN)


def test_long_document_is_split_across_rows_with_positions_restarting():
    rows = list(_rows(_documents([50])))
    assert len(rows) == 4  # 49 pairs in rows of 16
    for i, row in enumerate(rows):
        used = row["segment_ids"] > 0
        assert set(row["segment_ids"][used].tolist()) == {1}
        np.testing.assert_array_equal(row["positions"][used], np.arange(used.sum()))
        assert row["tokens"][0] == i * SEQ_LEN


def test_epoch_of_a_row_is_the_latest_epoch_in_it():
    docs = _documents([10, 10])
    docs[1]["epoch"] = 1
    (row,) = list(_rows(docs, seq_len=32))
    assert int(row["epoch"]) == 1


@pytest.mark.parametrize("consumed", [0, 1, 3, 6, 9])
def test_state_restores_mid_document(consumed):
    documents = _documents(LENGTHS)
    it = iter(_rows(documents))
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    rest = [r["tokens"].tolist() for r in it]
    fresh = iter(_rows(documents))
    fresh.set_state(state)
    assert [r["tokens"].tolist() for r in fresh] == rest
    # A state taken right after restoring, before reading, resumes at the same place.
    again = iter(_rows(documents))
    again.set_state(state)
    twice = iter(_rows(documents))
    twice.set_state(again.get_state())
    assert [r["tokens"].tolist() for r in twice] == rest
