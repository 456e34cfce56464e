"""Tokenizers: bytes, a trained byte-level BPE, specials from tokenizer_config.json, the vocab check."""

import json

import numpy as np
import pytest

from analogjax.data import DataConfig, check_vocab, make_batch_iterator, tokenizer_for, train_bpe_tokenizer
from analogjax.data.tokenize import encode_document, encode_documents, load_tokenizer
from analogjax.errors import UserError

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n", "ünïcödé 🙂"] * 20


def test_bytes_tokenizer_round_trips_and_places_specials():
    tok = tokenizer_for(DataConfig(tokenizer="bytes"))
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    for text in TEXTS[:3]:
        ids = encode_document(tok, text, add_bos=True, add_eos=True)
        assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text  # specials are not bytes: decode drops them
    assert tok.encode("é") == [0xC3, 0xA9]


def test_trained_bpe_round_trips_with_fixed_special_ids(tmp_path):
    path = train_bpe_tokenizer(iter(TEXTS), 300, str(tmp_path / "bpe.json"))
    tok = load_tokenizer(path)
    assert tok.vocab_size == 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in TEXTS[:3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # merges were learned
        assert not {0, 1, 2} & set(ids)
    batch = encode_documents(tok, TEXTS[:3], add_bos=True, add_eos=False)
    for text, ids in zip(TEXTS[:3], batch):
        np.testing.assert_array_equal(ids, [1, *tok.encode(text)])


def test_specials_come_from_a_sibling_tokenizer_config(tmp_path):
    path = train_bpe_tokenizer(iter(TEXTS), 300, str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<eos>"}, "eos_token": "<bos>", "pad_token": None})
    )
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


def test_vocab_check_allows_padding_to_a_tiling_multiple_only():
    tok = load_tokenizer("bytes")
    check_vocab(tok, 259)
    check_vocab(tok, 1024)
    for bad in (258, 1025, 50000):
        with pytest.raises(UserError, match="data.tokenizer has 259 tokens"):
            check_vocab(tok, bad)


def test_missing_or_unreadable_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="no such file .*nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not a tokenizer")
    with pytest.raises(UserError, match="bad.json: not a readable HF tokenizers JSON"):
        load_tokenizer(str(bad))
    model = tmp_path / "m.model"
    model.write_bytes(b"\x00\x01")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="sentencepiece package is not installed"):
            load_tokenizer(str(model))
    else:
        with pytest.raises(UserError, match="m.model: not a readable SentencePiece model"):
            load_tokenizer(str(model))


def test_none_tokenizer_refuses_text():
    tok = load_tokenizer("none")
    assert tok.vocab_size is None and tok.decode([3, 4]) == "3 4"
    with pytest.raises(UserError, match='data.tokenizer is "none"'):
        tok.encode("text")


def test_missing_specials_are_refused_before_any_reading(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "words.json"
    tok.save(str(path))
    data = DataConfig(tokenizer=str(path), add_eos=False, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="has no begin-of-text token: set data.add_bos: false"):
        make_batch_iterator(data, split="train", seed=0, vocab_size=3)
