"""The data section of the config: where documents come from and how they become batches.

YAML fills these frozen dataclasses (the integrator's loader builds them generically), so fields are plain
scalars, tuples and nested dataclasses only. `validate` checks them and names the offending key in a UserError.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from analogjax.errors import UserError, check_choice

SOURCE_FORMATS = ("auto", "jsonl", "parquet", "arrayrecord", "tokens_bin", "zarr", "text", "stdlib")
SOURCE_CONTENTS = ("auto", "text", "tokens")
TOKEN_DTYPES = ("auto", "uint16", "uint32", "int32")


@dataclass(frozen=True)
class SourceConfig:
    # A file, a glob, a directory (e.g. the output of `analogjax prepare`), a gs:// path, or "stdlib":
    # the Python standard library's own source files on this machine.
    path: str
    # auto | jsonl | parquet | arrayrecord | tokens_bin | zarr | text | stdlib. auto decides from the
    # path: prepare's metadata file, then the file extension.
    format: str = "auto"
    # Mixture weight: the share of training rows (hence of tokens) that come from this source.
    weight: float = 1.0
    # Shown in per-source breakdowns; default derived from the path.
    name: str = ""
    # JSONL key / Parquet column holding each document: a string (text) or a list of token ids.
    field: str = "text"
    # auto | text | tokens: what ArrayRecord records hold (auto: prepare's metadata, else text).
    # JSONL and Parquet decide per value (str is text, a list is token ids).
    content: str = "auto"
    # uint16 | uint32 | int32 for raw token files and token records; auto reads it from prepare's
    # metadata or a Megatron .idx header, and otherwise asks the user to say.
    dtype: str = "auto"
    # tokens_bin / zarr without an offsets index: documents end at this id (kept as each document's last token).
    eod_id: int | None = None
    # tokens_bin: document boundaries as a .npy of offsets (n_docs + 1 entries) or a Megatron .idx file.
    # Default: <file>.idx or <file>.offsets.npy next to the .bin when present.
    offsets: str = ""


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = (SourceConfig(path="stdlib"),)
    # A HF tokenizers .json, a SentencePiece .model, "bytes" (UTF-8 bytes plus pad/bos/eos) or "none"
    # (every source is pre-tokenized).
    tokenizer: str = "bytes"
    global_batch: int = 8
    seq_len: int = 128
    # Added around each text document when it is tokenized; pre-tokenized documents are used as stored.
    add_bos: bool = True
    add_eos: bool = True
    # Documents held out by a stable hash of their identity (file name relative to the source, record
    # number): the same documents whatever the seed, process count or shuffling, never in training.
    heldout_fraction: float = 0.05
    # Grain worker processes per host (0 = read, tokenize and pack in this process).
    worker_count: int = 0
    # Threads per source that read and tokenize documents ahead of packing.
    read_threads: int = 2
    # Training rows shuffled within windows of this many packed rows per process (0 = off: rows follow the
    # shuffled documents in order). Packing keeps a document's rows together, so a long document (a 200 KB
    # source file is ~500 rows of 128 tokens) otherwise fills every batch for many consecutive steps; the
    # window breaks that run at the cost of window x seq_len tokens held per process and read before step 1.
    shuffle_rows: int = 0
    # Training batches repeat after this many (0 = never: the corpus streams on): batch n is batch n mod epoch_steps,
    # so a run makes epochs over the corpus's first epoch_steps batches in the same order (not the corpus's own
    # epochs, which a long run makes too). A teacher cache then covers epoch_steps steps rather than train.steps: the
    # teacher's forward over a batch, most of the cost of cached distillation, is paid once and read every epoch (the
    # demo's cache serves two). The position within the epoch is part of the data's checkpointed state: a run resumes
    # mid-epoch exactly.
    epoch_steps: int = 0
    # The held-out split as evaluations read it (fidelity, curves, samples; the transfer checks cut their own chunks
    # from each held-out document); neither changes a training batch, so a run resumes across them: its rows shuffled
    # within windows of this many rows (0 = off: the documents' rows in turn), with a fixed seed, so every run is
    # measured on the same rows; and its documents cut to their first this many tokens (0 = whole; a cut document has no
    # end-of-text token left to predict). Both let a few batches read many documents rather than the first few, and a
    # few long files (one can hold a third of a split's tokens) not fill them: intervals resample documents
    # (fidelity/intervals.py), so they rest on how many documents the rows come from. Each evaluation reads up to
    # heldout_shuffle_rows x seq_len held-out tokens before its first batch.
    heldout_shuffle_rows: int = 0
    heldout_document_tokens: int = 0
    # Where tokenized corpora are cached (the stdlib corpus); "" = $XDG_CACHE_HOME/analogjax or ~/.cache/analogjax.
    cache_dir: str = ""


def default_source_name(source: SourceConfig) -> str:
    """A short name for breakdowns: the configured name, else the path's last component without extension."""
    if source.name:
        return source.name
    tail = source.path.rstrip("/").rsplit("/", 1)[-1]
    for ch in "*?[":
        if ch in tail:
            # A glob's file pattern says little; its directory names the corpus.
            parent = source.path.rstrip("/").rsplit("/", 2)
            tail = parent[-2] if len(parent) >= 2 else tail
            break
    stem = tail.split(".", 1)[0]
    return stem or tail or "source"


def source_names(data: DataConfig) -> tuple[str, ...]:
    """Names of data.sources in order, made unique by suffixing the position when two collide."""
    names = [default_source_name(s) for s in data.sources]
    return tuple(n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names))


def resolved_cache_dir(data: DataConfig) -> str:
    if data.cache_dir:
        return data.cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "analogjax")


def distinct_steps(data: DataConfig, steps: int) -> int:
    """How many different training batches a run of `steps` steps reads: its steps, or one epoch of them."""
    return min(steps, data.epoch_steps) if data.epoch_steps else steps


def validate(data: DataConfig, *, vocab_size: int | None = None, process_count: int = 1) -> None:
    """Raises UserError naming the first bad key of the data section."""
    if data.seq_len <= 0:
        raise UserError(f"data.seq_len must be positive (got {data.seq_len})")
    if data.global_batch <= 0:
        raise UserError(f"data.global_batch must be positive (got {data.global_batch})")
    if process_count <= 0:
        raise UserError(f"process count must be positive (got {process_count})")
    if data.global_batch % process_count:
        raise UserError(
            f"data.global_batch ({data.global_batch}) must be divisible by the number of processes ({process_count})"
        )
    if not 0.0 <= data.heldout_fraction < 1.0:
        raise UserError(f"data.heldout_fraction must be in [0, 1) (got {data.heldout_fraction})")
    if data.worker_count < 0:
        raise UserError(f"data.worker_count must be >= 0 (got {data.worker_count})")
    if data.read_threads < 0:
        raise UserError(f"data.read_threads must be >= 0 (got {data.read_threads})")
    if data.shuffle_rows < 0:
        raise UserError(f"data.shuffle_rows must be >= 0 (got {data.shuffle_rows})")
    if data.epoch_steps < 0:
        raise UserError(f"data.epoch_steps must be >= 0 (got {data.epoch_steps})")
    if data.heldout_shuffle_rows < 0:
        raise UserError(f"data.heldout_shuffle_rows must be >= 0 (got {data.heldout_shuffle_rows})")
    if data.heldout_document_tokens < 0 or data.heldout_document_tokens == 1:
        raise UserError(
            f"data.heldout_document_tokens must be 0 (whole documents) or at least 2, a token and the next one "
            f"(got {data.heldout_document_tokens})"
        )
    if not data.tokenizer:
        raise UserError('data.tokenizer must be a tokenizer file, "bytes" or "none"')
    if vocab_size is not None and vocab_size <= 0:
        raise UserError(f"model vocab_size must be positive (got {vocab_size})")
    if not data.sources:
        raise UserError("data.sources is empty: name at least one corpus (e.g. path: stdlib)")
    for i, s in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if not s.path:
            raise UserError(f"{key}.path is empty")
        check_choice(f"{key}.format", s.format, SOURCE_FORMATS)
        check_choice(f"{key}.content", s.content, SOURCE_CONTENTS)
        check_choice(f"{key}.dtype", s.dtype, TOKEN_DTYPES)
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise UserError(f"{key}.weight must be a positive number (got {s.weight})")
        if s.eod_id is not None and s.eod_id < 0:
            raise UserError(f"{key}.eod_id must be >= 0 (got {s.eod_id})")
        if not s.field:
            raise UserError(f"{key}.field is empty")
