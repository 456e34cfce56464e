"""`analogjax prepare --input GLOB --tokenizer FILE --output DIR [--format arrayrecord|zarr] [--workers N]`.

Tokenizes a corpus once into shards (data/prepare.py). A host-only command: it never joins a multi-host job (each
host may prepare its own corpus; the shards' document keys keep the held-out split the same).
"""

from __future__ import annotations

import argparse
import os

from analogjax.data.prepare import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, help='the corpus: a file, glob or directory in any source format, or "stdlib"'
    )
    parser.add_argument(
        "--input-format",
        default="auto",
        help="the input's format when its extension does not say (jsonl, parquet, text, ...)",
    )
    parser.add_argument("--field", default="text", help="JSONL key / Parquet column holding the text")
    parser.add_argument("--tokenizer", required=True, help='a HF tokenizer .json, a SentencePiece .model, or "bytes"')
    parser.add_argument("--output", required=True, help="directory for the shards (created; must be empty)")
    parser.add_argument("--format", choices=FORMATS, default="arrayrecord", help="shard format (default arrayrecord)")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1)),
        help="parallel worker processes (default: all cores)",
    )
    parser.add_argument("--shards", type=int, default=0, help="number of shards (default: one per worker)")
    parser.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not begin documents with BOS")
    parser.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not end documents with EOS")


def run(args: argparse.Namespace) -> int:
    from analogjax.data.prepare import prepare_corpus

    meta = prepare_corpus(args)
    print(
        f"wrote {meta['documents']} documents, {meta['tokens']} tokens in {len(meta['shards'])} {meta['format']} "
        f"shards to {args.output}"
    )
    return 0
