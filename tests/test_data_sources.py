"""Every source format round-trips a small corpus written here, both read directly and through the pipeline."""

import collections
import json
import os
import struct

import numpy as np

from analogjax.data import DataConfig, SourceConfig, make_batch_iterator
from analogjax.data.sources import open_source
from analogjax.data.stdlib_corpus import cache_tokens, stdlib_files, stdlib_source, write_jsonl
from analogjax.data.tokenize import ByteTokenizer, encode_document

TEXTS = [
    "alpha beta gamma\n",
    "ünïcödé, 日本語 and emoji 🙂",
    "x" * 700,
    "line one\nline two\n",
    "a",
    "",
    "def f(x):\n    return x + 1\n",
    "tail without newline",
]
VOCAB = 1000
TOKEN_DOCS = [np.arange(d * 50, d * 50 + n, dtype=np.int64) % VOCAB for d, n in enumerate([5, 1, 40, 3, 17, 2, 60, 9])]


def _assert_documents(source, expected):
    assert len(source) == len(expected)
    for i, want in enumerate(expected):
        got = source[i]
        if isinstance(want, str):
            assert got == want, source.where(i)
        else:
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=source.where(i))


def _pairs_through_pipeline(source_config, *, tokenizer, vocab_size):
    """The multiset of (input, target) pairs one epoch of the pipeline delivers."""
    data = DataConfig(
        sources=(source_config,), tokenizer=tokenizer, global_batch=2, seq_len=8, heldout_fraction=0.0, read_threads=0
    )
    got = collections.Counter()
    for batch in make_batch_iterator(data, split="train", seed=0, vocab_size=vocab_size, num_epochs=1):
        used = batch["loss_mask"] > 0
        got.update(zip(batch["tokens"][used].tolist(), batch["targets"][used].tolist()))
    return got


def _expected_pairs(documents):
    want = collections.Counter()
    for doc in documents:
        if isinstance(doc, str):
            doc = encode_document(ByteTokenizer(), doc, add_bos=True, add_eos=True) if doc else []
        t = list(map(int, doc))
        want.update(zip(t[:-1], t[1:]))
    return want


def _check(config, expected, *, tokenizer):
    _assert_documents(open_source(config, key="data.sources[0]", name="test"), expected)
    vocab = 259 if tokenizer == "bytes" else VOCAB
    assert _pairs_through_pipeline(config, tokenizer=tokenizer, vocab_size=vocab) == _expected_pairs(expected)


def _write_jsonl(path, values, key):
    with open(path, "w", encoding="utf-8") as f:
        for i, v in enumerate(values):
            f.write(json.dumps({key: v if isinstance(v, str) else v.tolist(), "id": i}, ensure_ascii=False) + "\n")
            if i == 2:
                f.write("\n   \n")  # blank lines are not documents


def test_jsonl_text_and_token_ids_over_a_glob(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", TEXTS[:4], "text")
    _write_jsonl(tmp_path / "b.jsonl", TEXTS[4:], "text")
    _check(SourceConfig(path=str(tmp_path / "*.jsonl")), TEXTS, tokenizer="bytes")
    _write_jsonl(tmp_path / "ids.jsonl", TOKEN_DOCS, "ids")
    _check(SourceConfig(path=str(tmp_path / "ids.jsonl"), field="ids"), TOKEN_DOCS, tokenizer="none")


def test_parquet_text_and_token_columns_over_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "t.parquet", row_group_size=3)
    _check(SourceConfig(path=str(tmp_path / "t.parquet")), TEXTS, tokenizer="bytes")
    pq.write_table(pa.table({"ids": [d.tolist() for d in TOKEN_DOCS]}), tmp_path / "ids.parquet", row_group_size=3)
    _check(SourceConfig(path=str(tmp_path / "ids.parquet"), field="ids"), TOKEN_DOCS, tokenizer="none")


def test_arrayrecord_text_and_token_records(tmp_path):
    from array_record.python import array_record_module

    def write(path, records):
        writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()

    write(tmp_path / "t.array_record", [t.encode() for t in TEXTS])
    _check(SourceConfig(path=str(tmp_path / "t.array_record")), TEXTS, tokenizer="bytes")
    write(tmp_path / "ids.array_record", [d.astype("<u2").tobytes() for d in TOKEN_DOCS])
    _check(
        SourceConfig(path=str(tmp_path / "ids.array_record"), content="tokens", dtype="uint16"),
        TOKEN_DOCS,
        tokenizer="none",
    )


def test_tokens_bin_split_by_eod_id(tmp_path):
    eod = VOCAB - 1
    docs = [np.append(d, eod) for d in TOKEN_DOCS]  # each document keeps its end-of-document token
    np.concatenate(docs).astype(np.uint32).tofile(tmp_path / "c.bin")
    _check(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint32", eod_id=eod), docs, tokenizer="none")


def test_tokens_bin_with_npy_offsets_sidecar(tmp_path):
    np.concatenate(TOKEN_DOCS).astype(np.uint16).tofile(tmp_path / "c.bin")
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in TOKEN_DOCS])])
    np.save(tmp_path / "c.offsets.npy", offsets)  # found next to the .bin without configuration
    _check(SourceConfig(path=str(tmp_path / "c.bin"), dtype="uint16"), TOKEN_DOCS, tokenizer="none")


def test_tokens_bin_with_megatron_idx(tmp_path):
    # Megatron-LM's index: magic, version, dtype code (8 = uint16), counts, lengths, byte pointers, doc index.
    lengths = np.array([len(d) for d in TOKEN_DOCS], np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 2)]).astype(np.int64)
    doc_index = np.arange(len(TOKEN_DOCS) + 1, dtype=np.int64)
    with open(tmp_path / "m.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(lengths), len(doc_index)))
        f.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())
    np.concatenate(TOKEN_DOCS).astype(np.uint16).tofile(tmp_path / "m.bin")
    # The dtype comes from the .idx header: no dtype configured.
    _check(SourceConfig(path=str(tmp_path / "m.bin")), TOKEN_DOCS, tokenizer="none")


def test_zarr_store_and_bare_array(tmp_path):
    import tensorstore as ts

    def write(path, values, dtype):
        arr = ts.open(
            {"driver": "zarr3", "kvstore": "file://" + str(path)},
            create=True,
            dtype=dtype,
            shape=[len(values)],
            chunk_layout=ts.ChunkLayout(chunk_shape=[64]),
        ).result()
        arr.write(values).result()

    store = tmp_path / "corpus.zarr"
    write(store / "tokens", np.concatenate(TOKEN_DOCS).astype(np.uint16), ts.uint16)
    write(store / "offsets", np.concatenate([[0], np.cumsum([len(d) for d in TOKEN_DOCS])]).astype(np.int64), ts.int64)
    _check(SourceConfig(path=str(store)), TOKEN_DOCS, tokenizer="none")

    eod = VOCAB - 1
    docs = [np.append(d, eod) for d in TOKEN_DOCS]
    write(tmp_path / "bare", np.concatenate(docs).astype(np.int32), ts.int32)
    _check(SourceConfig(path=str(tmp_path / "bare"), format="zarr", eod_id=eod), docs, tokenizer="none")


def test_text_files_with_a_large_file_split_at_line_ends(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text(TEXTS[1], encoding="utf-8")
    big = "".join(f"line {i:06d} of a long file\n" for i in range(12000))  # ~324 KB: two parts
    (tmp_path / "docs" / "c.txt").write_text(big)
    source = open_source(SourceConfig(path=str(tmp_path / "docs")), key="k", name="docs")
    assert len(source) == 4
    parts = [source[i] for i in range(4)]
    assert parts[:2] == TEXTS[:2]
    assert parts[2] + parts[3] == big and parts[2].endswith("\n") and len(parts[2]) >= 256 * 1024
    assert _pairs_through_pipeline(
        SourceConfig(path=str(tmp_path / "docs" / "*.txt")), tokenizer="bytes", vocab_size=259
    ) == _expected_pairs([TEXTS[0], parts[2], parts[3]])


def test_stdlib_corpus_is_found_cached_and_matches_on_the_fly_tokenizing(tmp_path):
    files = stdlib_files()
    assert files and all(f.endswith(".py") for f in files)
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in files)
    source = stdlib_source()
    assert source[0] == open(source.files[0], encoding="utf-8", errors="replace").read()[: len(source[0])]
    probes = [0, len(source) // 2, len(source) - 1]
    texts = [source[i] for i in probes]
    tokenizer = ByteTokenizer()
    bin_path = cache_tokens(source, tokenizer, str(tmp_path), add_bos=True, add_eos=True)
    assert os.path.exists(bin_path)
    for i, text in zip(probes, texts):
        want = encode_document(tokenizer, text, add_bos=True, add_eos=True) if text else []
        np.testing.assert_array_equal(np.asarray(source[i]), want)
    # A second run reuses the cache instead of tokenizing again.
    mtime = os.path.getmtime(bin_path)
    again = stdlib_source()
    assert cache_tokens(again, tokenizer, str(tmp_path), add_bos=True, add_eos=True) == bin_path
    assert os.path.getmtime(bin_path) == mtime
    out = tmp_path / "stdlib.jsonl"
    assert write_jsonl(str(out)) == len(source)
    with open(out, encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert first["text"] == texts[0]


def test_stdlib_source_through_the_pipeline(tmp_path):
    data = DataConfig(cache_dir=str(tmp_path), global_batch=4, seq_len=32)
    batch = next(make_batch_iterator(data, split="train", seed=0, vocab_size=259))
    assert batch["tokens"].shape == (4, 32)
    assert batch["loss_mask"].mean() == 1.0


def test_remote_paths_keep_their_scheme():
    # gs:// paths must never pass through os.path (which would turn them into local paths); no network needed.
    from analogjax.data import paths

    assert paths.is_remote("gs://bucket/corpus/a.jsonl") and not paths.is_remote("/data/a.jsonl")
    assert paths.glob_root("gs://bucket/corpus/*/part-*.parquet") == "gs://bucket/corpus"
    assert paths.relative("gs://bucket/corpus/x/a.parquet", "gs://bucket/corpus") == "x/a.parquet"
    assert paths.join("gs://bucket/prepared", "shard-0.array_record") == "gs://bucket/prepared/shard-0.array_record"
    assert paths.parent("gs://bucket/corpus/a.jsonl") == "gs://bucket/corpus"
    assert paths.glob_root("/data/*.jsonl") == "/data" and paths.glob_root("*.jsonl") == "."


def test_a_large_text_file_is_cut_at_line_ends_and_each_part_read_alone(tmp_path):
    from analogjax.data.sources import TextFilesSource

    lines = [f"line {i} " + "x" * (i % 17) + "\n" for i in range(400)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines))
    source = TextFilesSource(name="book", files=[str(path)], rel_names=["book.txt"], max_document_bytes=1000)
    parts = [source[i] for i in range(len(source))]
    assert len(parts) == -(-path.stat().st_size // 1000) > 1
    assert "".join(parts) == path.read_text()
    assert all(part.endswith("\n") for part in parts)
    assert all(len(part.encode()) < 1000 + 40 for part in parts)
    assert parts == [source[i] for i in range(len(source))]  # the cached boundaries give the same parts
