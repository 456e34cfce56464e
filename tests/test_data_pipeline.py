"""The pipeline: batch layout, mixture weights, process shards, resume, held-out split, per-epoch shuffling."""

import json

import numpy as np
import pytest

from analogjax.data import BATCH_KEYS, DataConfig, SourceConfig, make_batch_iterator, split_document_ids
from analogjax.data.pipeline import open_sources

VOCAB = 4096


def _write_corpus(path, n_docs, *, first_doc=0, length=lambda d: 5 + (d * 7) % 23):
    """A tokens_bin corpus whose document d holds d*... : its first token is 4*d + 1, so any row names it."""
    docs = []
    for d in range(first_doc, first_doc + n_docs):
        n = length(d)
        docs.append(np.concatenate([[4 * d + 1], np.full(n - 1, 4 * d + 2)]).astype(np.uint16))
    np.concatenate(docs).tofile(path)
    np.save(str(path)[:-4] + ".offsets.npy", np.concatenate([[0], np.cumsum([len(x) for x in docs])]))
    return docs


def _config(*sources, **kw):
    defaults = dict(tokenizer="none", global_batch=4, seq_len=16, heldout_fraction=0.0, read_threads=0)
    defaults.update(kw)
    return DataConfig(sources=tuple(sources), **defaults)


def _documents_seen(batches):
    """Documents (by their first token) in order of first appearance."""
    seen = []
    for batch in batches:
        starts = batch["tokens"][(batch["positions"] == 0) & (batch["loss_mask"] > 0)]
        seen.extend(int(t) // 4 for t in starts if t % 4 == 1)
    return seen


def test_batch_layout_and_semantics(tmp_path):
    _write_corpus(tmp_path / "c.bin", 30)
    data = _config(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16"))
    batch = next(make_batch_iterator(data, split="train", seed=0, vocab_size=VOCAB))
    assert list(batch) == list(BATCH_KEYS)
    # The one schema (data/batch.py), which compile-check's abstract batch is built from, is what the pipeline yields.
    from analogjax.data.batch import BATCH_FIELDS, abstract_batch

    assert {k: v.dtype for k, v in batch.items()} == BATCH_FIELDS
    abstract = abstract_batch(2, 16, None)
    assert {k: (v.dtype, v.shape) for k, v in abstract.items()} == {k: (d, (2, 16)) for k, d in BATCH_FIELDS.items()}
    for key in BATCH_KEYS:
        assert batch[key].shape == (4, 16)
        assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
    # Targets are the next token within the same segment: here, the first token of a doc is followed by 4d+2.
    used = batch["loss_mask"] > 0
    first = used & (batch["tokens"] % 4 == 1)
    np.testing.assert_array_equal(batch["targets"][first], batch["tokens"][first] + 1)
    np.testing.assert_array_equal(batch["loss_mask"], (batch["segment_ids"] > 0).astype(np.float32))


def test_same_seed_same_batches_and_each_epoch_reshuffled(tmp_path):
    _write_corpus(tmp_path / "c.bin", 40)
    data = _config(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16"))

    def epochs(seed):
        return _documents_seen(make_batch_iterator(data, split="train", seed=seed, vocab_size=VOCAB, num_epochs=2))

    two_epochs = epochs(0)
    assert two_epochs == epochs(0)
    first, second = two_epochs[:40], two_epochs[40:]
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second, "each epoch must be shuffled differently"
    assert epochs(1)[:40] != first


def test_mixture_proportions_follow_weights(tmp_path):
    _write_corpus(tmp_path / "a.bin", 60)
    _write_corpus(tmp_path / "b.bin", 60, first_doc=100)
    data = _config(
        SourceConfig(path=str(tmp_path / "a.bin"), dtype="uint16", weight=3.0),
        SourceConfig(path=str(tmp_path / "b.bin"), dtype="uint16", weight=1.0),
        global_batch=8,
    )
    it = make_batch_iterator(data, split="train", seed=0, vocab_size=VOCAB)
    counts = np.zeros(2)
    for _ in range(50):
        batch = next(it)
        counts += np.bincount(batch["source_ids"][batch["loss_mask"] > 0], minlength=2)
        # source_ids agree with where the tokens came from.
        used = batch["loss_mask"] > 0
        assert np.all((batch["tokens"][used] >= 400) == (batch["source_ids"][used] == 1))
    assert counts[0] / counts.sum() == pytest.approx(0.75, abs=0.03)


def test_two_processes_read_disjoint_shards_whose_union_is_the_epoch(tmp_path):
    _write_corpus(tmp_path / "c.bin", 37)
    data = _config(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16"))
    shards = []
    for process_index in range(2):
        it = make_batch_iterator(
            data, split="train", seed=3, vocab_size=VOCAB, process_index=process_index, process_count=2, num_epochs=1
        )
        batches = list(it)
        assert all(b["tokens"].shape == (2, 16) for b in batches)  # global_batch // process_count rows
        shards.append(_documents_seen(batches))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(37))
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def _two_source_config(tmp_path):
    _write_corpus(tmp_path / "a.bin", 25)
    _write_corpus(tmp_path / "b.bin", 11, first_doc=100, length=lambda d: 30 + d % 5)
    return _config(
        SourceConfig(path=str(tmp_path / "a.bin"), dtype="uint16", weight=2.0),
        SourceConfig(path=str(tmp_path / "b.bin"), dtype="uint16"),
        heldout_fraction=0.2,
    )


@pytest.mark.parametrize("consumed", [1, 7, 30])  # 30 batches crosses several epochs of both sources
def test_resume_from_saved_state_gives_the_identical_remaining_sequence(tmp_path, consumed):
    data = _two_source_config(tmp_path)
    it = make_batch_iterator(data, split="train", seed=5, vocab_size=VOCAB)
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(12)]
    fresh = make_batch_iterator(data, split="train", seed=5, vocab_size=VOCAB)
    fresh.set_state(state)
    for want in rest:
        got = next(fresh)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_row_window_shuffle_breaks_up_long_documents_keeps_the_rows_and_resumes(tmp_path):
    # Documents of ~100-200 tokens: 7-13 rows each, so unshuffled batches of 4 rows mostly hold one document.
    _write_corpus(tmp_path / "c.bin", 24, length=lambda d: 100 + (d * 37) % 101)
    source = SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16")

    def rows(batches):
        return [row.tobytes() for b in batches for row in np.concatenate([b["tokens"], b["segment_ids"]], 1)]

    def one_doc_batches(batches):  # every row's tokens (minus the odd first token) from a single document
        return sum(len({int(t) // 4 for t in b["tokens"][b["loss_mask"] > 0]}) == 1 for b in batches)

    plain = list(make_batch_iterator(_config(source), split="train", seed=2, vocab_size=VOCAB, num_epochs=1))
    data = _config(source, shuffle_rows=32)
    shuffled = list(make_batch_iterator(data, split="train", seed=2, vocab_size=VOCAB, num_epochs=1))
    assert sorted(rows(shuffled)) == sorted(rows(plain))  # the same rows, a permutation within windows
    assert one_doc_batches(plain) > len(plain) // 2 and one_doc_batches(shuffled) < len(shuffled) // 4

    it = make_batch_iterator(data, split="train", seed=2, vocab_size=VOCAB)
    for _ in range(11):  # mid-window: 44 rows consumed of windows of 32
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(20)]
    fresh = make_batch_iterator(data, split="train", seed=2, vocab_size=VOCAB)
    fresh.set_state(state)
    assert rows(next(fresh) for _ in range(20)) == rows(rest)


def test_resume_through_orbax_with_grains_checkpoint_handler(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    data = _two_source_config(tmp_path)
    it = make_batch_iterator(data, split="train", seed=5, vocab_size=VOCAB)
    for _ in range(9):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(9, args=ocp.args.Composite(data_iterator=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    rest = [next(it)["tokens"] for _ in range(5)]
    fresh = make_batch_iterator(data, split="train", seed=5, vocab_size=VOCAB)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(9, args=ocp.args.Composite(data_iterator=grain.checkpoint.CheckpointRestore(fresh)))
    for want in rest:
        np.testing.assert_array_equal(next(fresh)["tokens"], want)


def test_epoch_steps_repeat_the_first_batches_and_resume_mid_epoch(tmp_path):
    """data.epoch_steps=3 over a shuffled stream: batch n is batch n mod 3, and a state saved mid-epoch (through
    JSON, as Grain's checkpoint handler writes it) resumes the same sequence."""
    import dataclasses

    data = _two_source_config(tmp_path)
    plain = make_batch_iterator(data, split="train", seed=5, vocab_size=VOCAB)
    streaming = [next(plain) for _ in range(4)]
    assert not np.array_equal(streaming[3]["tokens"], streaming[0]["tokens"])  # the stream itself moves on
    epochs = dataclasses.replace(data, epoch_steps=3)
    it = make_batch_iterator(epochs, split="train", seed=5, vocab_size=VOCAB)
    seen = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(it.get_state()))
    seen += [next(it) for _ in range(4)]
    for n, batch in enumerate(seen):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(batch[key], streaming[n % 3][key], err_msg=(n, key))
    fresh = make_batch_iterator(epochs, split="train", seed=5, vocab_size=VOCAB)
    fresh.set_state(state)
    for want in seen[4:]:
        np.testing.assert_array_equal(next(fresh)["tokens"], want["tokens"])
    heldout = make_batch_iterator(epochs, split="heldout", seed=5, vocab_size=VOCAB)
    assert "epoch_position" not in heldout.get_state()  # evaluations read the held-out split as it is


def test_heldout_documents_never_appear_in_training(tmp_path):
    data = _two_source_config(tmp_path)
    # A mixture stops with its first exhausted source, so read training long enough to see every epoch through.
    it = make_batch_iterator(data, split="train", seed=0, vocab_size=VOCAB)
    train = set(_documents_seen(next(it) for _ in range(80)))
    heldout_batches = list(make_batch_iterator(data, split="heldout", seed=0, vocab_size=VOCAB, num_epochs=1))
    heldout = _documents_seen(heldout_batches)
    assert heldout and train
    assert not train & set(heldout)
    assert sorted(train | set(heldout)) == list(range(25)) + list(range(100, 111))
    # The same documents, in the same order, whatever the seed; the last batch is padded to full size.
    again = list(make_batch_iterator(data, split="heldout", seed=9, vocab_size=VOCAB, num_epochs=1))
    assert _documents_seen(again) == heldout
    assert all(b["tokens"].shape == (4, 16) for b in heldout_batches)


def test_heldout_split_is_stable_and_near_the_fraction(tmp_path):
    _write_corpus(tmp_path / "c.bin", 2000, length=lambda d: 3)
    data = _config(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16"), heldout_fraction=0.1)
    _, (source,) = open_sources(data, vocab_size=VOCAB)
    train, heldout = split_document_ids(source, 0.1)
    assert len(heldout) / 2000 == pytest.approx(0.1, abs=0.02)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 2000
    # A larger fraction holds out a superset: growing the held-out set never moves a document into training.
    _, heldout_more = split_document_ids(source, 0.2)
    assert set(heldout) <= set(heldout_more)


def test_worker_processes_deliver_the_epoch_and_resume(tmp_path):
    _write_corpus(tmp_path / "c.bin", 24)
    data = _config(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16"), worker_count=2)
    it = make_batch_iterator(data, split="train", seed=0, vocab_size=VOCAB, num_epochs=1)
    try:
        first = next(it)
        state = it.get_state()
        rest = list(it)
    finally:
        it.close()
    assert sorted(_documents_seen([first, *rest])) == list(range(24))
    fresh = make_batch_iterator(data, split="train", seed=0, vocab_size=VOCAB, num_epochs=1)
    try:
        fresh.set_state(state)
        again = list(fresh)
    finally:
        fresh.close()
    assert [b["tokens"].tolist() for b in again] == [b["tokens"].tolist() for b in rest]
    del it, fresh


def test_heldout_rows_shuffled_in_windows_name_their_documents(tmp_path):
    """With data.heldout_shuffle_rows the first held-out batches hold rows of many documents (not the first few
    documents' rows in turn), the same rows whatever the run's seed and on every call, each labelled with its
    document; a split smaller than the window is not filled with a second pass's duplicates before the first pass
    ends."""
    import jax

    from analogjax.data import heldout_batches

    _write_corpus(tmp_path / "c.bin", 400, length=lambda d: 40 + (d * 13) % 50)
    source = SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(seed, batches, **kw):
        data = _config(source, heldout_fraction=0.2, **kw)
        got = heldout_batches(data, seed=seed, vocab_size=VOCAB, sharding=sharding, batches=batches, documents=True)
        return [({k: np.asarray(v) for k, v in b.items()}, d) for b, d in got]

    ordered, shuffled = read(0, 4), read(0, 4, heldout_shuffle_rows=64)
    for batches in (ordered, shuffled):
        for batch, documents in batches:
            real = batch["loss_mask"].sum(1) > 0
            # Every document's tokens are 4d+1 then 4d+2: the label names the document most tokens of the row are from.
            for row in np.flatnonzero(real):
                tokens = batch["tokens"][row][batch["segment_ids"][row] > 0]
                owners, counts = np.unique(tokens // 4, return_counts=True)
                assert documents[row] == owners[np.argmax(counts)]  # source 0: the id is the document's index
    distinct = [len({int(d) for _, ds in batches for d in ds}) for batches in (ordered, shuffled)]
    assert distinct[1] >= 2 * distinct[0]
    again = read(7, 4, heldout_shuffle_rows=64)
    for (a, da), (b, db) in zip(shuffled, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(da, db)
    # The whole split is ~90 rows; a 1,024-row window holds one pass only: its first rows are one pass's, each once.
    data = _config(source, heldout_fraction=0.2)
    one_pass = [b for b in make_batch_iterator(data, split="heldout", seed=0, vocab_size=VOCAB, num_epochs=1)]
    want = sorted(tuple(b["tokens"][r]) for b in one_pass for r in range(4) if b["loss_mask"][r].sum() > 0)
    whole = read(0, len(want) // 4 + 1, heldout_shuffle_rows=1024)
    got = [tuple(b["tokens"][r]) for b, _ in whole for r in range(4) if b["loss_mask"][r].sum() > 0]
    assert sorted(got[: len(want)]) == want
    # Held-out documents cut to their first 20 tokens: 19 (input, next token) pairs of each, the rest never read.
    cut = _config(source, heldout_fraction=0.2, heldout_document_tokens=20)
    pairs = {}
    for batch in make_batch_iterator(cut, split="heldout", seed=0, vocab_size=VOCAB, num_epochs=1):
        for row in range(4):
            for segment in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
                first = int(batch["tokens"][row][batch["segment_ids"][row] == segment][0])
                pairs[first // 4] = pairs.get(first // 4, 0) + int(np.sum(batch["segment_ids"][row] == segment))
    assert pairs and set(pairs.values()) == {19}
