"""`analogjax prepare` end to end: a tiny corpus into shards of each format, read back through the pipeline."""

import argparse
import collections
import json

import numpy as np
import pytest

from analogjax.commands import prepare
from analogjax.data import DataConfig, SourceConfig, make_batch_iterator, split_document_ids
from analogjax.data.pipeline import open_sources
from analogjax.errors import UserError

TEXTS = [f"document {i}: " + "word " * (3 + i % 11) + "\n" for i in range(40)]


def _args(*argv):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return parser.parse_args(list(argv))


def _pairs(source, *, tokenizer="bytes", fraction=0.0, split="train"):
    data = DataConfig(
        sources=(source,), tokenizer=tokenizer, global_batch=2, seq_len=16, heldout_fraction=fraction, read_threads=0
    )
    got = collections.Counter()
    for batch in make_batch_iterator(data, split=split, seed=0, vocab_size=259, num_epochs=1):
        used = batch["loss_mask"] > 0
        got.update(zip(batch["tokens"][used].tolist(), batch["targets"][used].tolist()))
    return got


@pytest.mark.parametrize("fmt, workers", [("arrayrecord", 2), ("zarr", 1)])
def test_prepare_then_read_back(tmp_path, capsys, fmt, workers):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "prepared"
    code = prepare.run(
        _args(
            "--input",
            str(corpus),
            "--tokenizer",
            "bytes",
            "--output",
            str(out),
            "--format",
            fmt,
            "--workers",
            str(workers),
            "--shards",
            "3",
        )
    )
    assert code == 0
    tokens = sum(len(t.encode()) + 2 for t in TEXTS)
    assert f"wrote {len(TEXTS)} documents, {tokens} tokens in 3 {fmt} shards" in capsys.readouterr().out
    meta = json.loads((out / "analogjax_data.json").read_text())
    assert meta["format"] == fmt and meta["dtype"] == "uint16" and meta["vocab_size"] == 259

    original = SourceConfig(path=str(corpus))
    prepared = SourceConfig(path=str(out))
    assert _pairs(prepared) == _pairs(original)
    # Preparing keeps each document's identity, so the held-out split is the same documents.
    data = DataConfig(sources=(original, prepared), tokenizer="bytes")
    _, (src_text, src_prepared) = open_sources(data, vocab_size=259)
    for a, b in zip(split_document_ids(src_text, 0.2), split_document_ids(src_prepared, 0.2)):
        np.testing.assert_array_equal(a, b)
    assert _pairs(prepared, fraction=0.2, split="heldout") == _pairs(original, fraction=0.2, split="heldout")


def test_prepare_refuses_bad_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no documents"):
        prepare.run(_args("--input", str(empty), "--tokenizer", "bytes", "--output", str(tmp_path / "o")))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        prepare.run(_args("--input", str(corpus), "--tokenizer", "bytes", "--output", str(tmp_path / "full")))


def test_prepare_through_the_cli(tmp_path, capsys):
    from analogjax import cli

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]))
    out = tmp_path / "out"
    assert (
        cli.main(["prepare", "--input", str(corpus), "--tokenizer", "bytes", "--output", str(out), "--workers", "1"])
        == 0
    )
    assert "wrote 5 documents" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "prepare",
                "--input",
                str(tmp_path / "missing.jsonl"),
                "--tokenizer",
                "bytes",
                "--output",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --input: no such file") and "missing.jsonl" in err[0]
