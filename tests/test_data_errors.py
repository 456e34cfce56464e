"""Bad input becomes one UserError naming the file (and record where known), never a traceback from deep inside."""

import json

import numpy as np
import pytest

from analogjax.data import DataConfig, SourceConfig, make_batch_iterator, validate
from analogjax.errors import UserError


def _first_batch(*sources, tokenizer="none", vocab_size=1000, **kw):
    defaults = dict(global_batch=2, seq_len=8, heldout_fraction=0.0, read_threads=0)
    defaults.update(kw)
    data = DataConfig(sources=tuple(sources), tokenizer=tokenizer, **defaults)
    return next(make_batch_iterator(data, split="train", seed=0, vocab_size=vocab_size))


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_corrupt_arrayrecord_shard_names_the_file(tmp_path):
    path = tmp_path / "broken.array_record"
    path.write_bytes(b"this is not an array record file" * 10)
    with pytest.raises(UserError, match="broken.array_record"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=259)


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(UserError, match="broken.parquet"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=259)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [json.dumps({"text": "fine " * 20})] * 3 + ["{not json"])
    with pytest.raises(UserError, match=r"c\.jsonl \(line 4\): not valid JSON"):
        for _ in range(20):
            _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=259, global_batch=8)


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [json.dumps({"content": "no text key"})])
    with pytest.raises(UserError, match=r"c\.jsonl \(line 1\): no key 'text'"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=259)


def test_unreadable_path_and_truncated_bin(tmp_path):
    with pytest.raises(UserError, match="no such file or directory: .*missing.jsonl"):
        _first_batch(SourceConfig(path=str(tmp_path / "missing.jsonl")), tokenizer="bytes", vocab_size=259)
    with pytest.raises(UserError, match="no files match"):
        _first_batch(SourceConfig(path=str(tmp_path / "*.parquet")), tokenizer="bytes", vocab_size=259)
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")  # 3 bytes: not whole uint16 tokens
    with pytest.raises(UserError, match="odd.bin: 3 bytes is not a whole number"):
        _first_batch(SourceConfig(path=str(path), dtype="uint16", eod_id=0))


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl holds no documents"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=259)


def test_token_id_beyond_the_vocabulary_names_file_and_record(tmp_path):
    path = tmp_path / "c.bin"
    np.array([1, 2, 3, 0, 4, 5000, 6, 0], np.uint16).tofile(path)
    with pytest.raises(UserError, match=r"c\.bin \(record 1\): token id 5000 is outside .*\[0, 1000\)"):
        _first_batch(SourceConfig(path=str(path), dtype="uint16", eod_id=0), global_batch=1, seq_len=8)


def test_tokenizer_vocabulary_must_agree_with_the_model(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [json.dumps({"text": "hello " * 50})])
    with pytest.raises(UserError, match="data.tokenizer has 259 tokens but the model's vocab_size is 200"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=200)
    with pytest.raises(UserError, match="vocab_size is 32000"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=32000)
    # Padding the embedding table up to a tiling multiple is fine.
    assert _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=512)["tokens"].shape == (2, 8)


def test_prepared_shards_for_another_vocabulary(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "analogjax_data.json").write_text(
        json.dumps({"format": "arrayrecord", "dtype": "uint16", "vocab_size": 8192, "shards": []})
    )
    with pytest.raises(UserError, match="prepared with a 8192-token vocabulary but data.tokenizer .* has 259"):
        _first_batch(SourceConfig(path=str(out)), tokenizer="bytes", vocab_size=259)


def test_corpus_too_small_for_one_batch_names_the_source(tmp_path):
    path = tmp_path / "tiny.jsonl"
    _write_jsonl(path, [json.dumps({"text": "just a few words"})])
    with pytest.raises(UserError, match=r"data.sources\[0\] \(.*tiny.jsonl\): corpus too small for one batch"):
        _first_batch(SourceConfig(path=str(path)), tokenizer="bytes", vocab_size=259, global_batch=8, seq_len=64)


def test_text_source_without_a_tokenizer(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [json.dumps({"text": "words " * 30})])
    with pytest.raises(UserError, match=r'c\.jsonl \(line 1\): holds text but data.tokenizer is "none"'):
        _first_batch(SourceConfig(path=str(path)))


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(seq_len=0), "data.seq_len"),
        (dict(global_batch=-1), "data.global_batch"),
        (dict(heldout_fraction=1.0), "data.heldout_fraction"),
        (dict(sources=()), "data.sources"),
        (dict(sources=(SourceConfig(path="x", format="csv"),)), r"data.sources\[0\].format"),
        (dict(sources=(SourceConfig(path="x", weight=0.0),)), r"data.sources\[0\].weight"),
    ],
)
def test_config_checks_name_the_key(change, key):
    with pytest.raises(UserError, match=key):
        validate(DataConfig(**change), vocab_size=259)


def test_global_batch_must_split_over_processes():
    with pytest.raises(UserError, match=r"data.global_batch \(6\) must be divisible .* \(4\)"):
        validate(DataConfig(global_batch=6), process_count=4)
