"""From data config to host-local batches: the Grain graph the training loop iterates.

Per source: the document ids of the split -> shuffled per epoch from the seed (train) -> this process's
share (ids process_index, process_index + process_count, ...: disjoint, together the whole epoch) ->
repeated -> read and tokenized in threads -> packed into rows. Training rows from several sources are mixed
by weight (so weights are shares of rows, hence of tokens), then shuffled within windows of data.shuffle_rows
rows when set (a long document's rows no longer fill consecutive batches). Held-out documents of all sources
are read in a fixed order (cut to data.heldout_document_tokens when set), packed together, and shuffled within
windows of data.heldout_shuffle_rows with a fixed seed, so that an evaluation of a few batches reads many documents.
Rows are stacked into [global_batch // process_count, seq_len] batches.

Every step is a Grain transformation, so the iterator's `get_state()` is a small JSON-able dict and
`set_state()` resumes at exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from analogjax.data.batch import BATCH_FIELDS
from analogjax.data.packing import ROW_KEYS, PackedRowsIterDataset
from analogjax.data.sources import DocumentSource, heldout_mask, open_source
from analogjax.data.spec import DataConfig, resolved_cache_dir, source_names, validate
from analogjax.data.stdlib_corpus import cache_tokens, stdlib_source
from analogjax.data.tokenize import (
    AnyTokenizer,
    check_specials,
    check_vocab,
    check_vocab_size,
    encode_document,
    tokenizer_for,
)
from analogjax.errors import UserError

SPLITS = ("train", "heldout")
HELDOUT_SEED = 0x5EED0DD5  # the held-out rows' window shuffle (data.heldout_shuffle_rows), the same for every run
# Documents read ahead per source: enough to keep the read threads busy, bounded because one document can be large.
_READ_AHEAD = 64


def make_batch_iterator(data: DataConfig, **where) -> grain.DatasetIterator:
    """Batches of this process's share of a split: dicts of numpy [global_batch // process_count, seq_len] arrays
    under data.batch.BATCH_KEYS. `where` takes make_batch_dataset's keywords (split, seed, vocab_size, process_index,
    process_count, num_epochs; num_epochs=None repeats forever). Checkpoint with get_state()/set_state(). The train
    split repeats its first data.epoch_steps batches when that is set (EpochIterator)."""
    batches = iter(make_batch_dataset(data, **where))
    if where.get("split") == "train" and data.epoch_steps:
        return EpochIterator(batches, data.epoch_steps)
    return batches


class EpochIterator(grain.DatasetIterator):
    """`batches` read again from their start after every `epoch_steps` batches (data.epoch_steps). The start is the
    iterator's own state before its first batch, so every epoch reproduces the first batch for batch; the state
    (JSON, as Grain's) holds the inner iterator's and how far into the epoch it is, so a resume lands mid-epoch."""

    def __init__(self, batches: grain.DatasetIterator, epoch_steps: int):
        super().__init__(batches)
        self._start = batches.get_state()
        self._epoch_steps = epoch_steps
        self._position = 0

    def __next__(self):
        if self._position == self._epoch_steps:
            self._parent.set_state(self._start)
            self._position = 0
        batch = next(self._parent)
        self._position += 1
        return batch

    def get_state(self) -> dict:
        return {"epoch_position": self._position, "batches": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["batches"])
        self._position = state["epoch_position"]


def make_batch_dataset(
    data: DataConfig,
    *,
    split: str,
    seed: int,
    vocab_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    documents: bool = False,
) -> grain.IterDataset:
    """The Grain dataset behind make_batch_iterator (for callers that want to add their own stages). With
    `documents`, each batch also holds "documents": int64 [rows], the document each row mostly comes from (source id
    × 2**40 + its id in the source; -1 for a padding row)."""
    validate(data, vocab_size=vocab_size, process_count=process_count)
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r} (expected one of {', '.join(SPLITS)})")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is outside [0, {process_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise UserError(f"num_epochs must be positive or None (got {num_epochs})")
    tokenizer, sources = open_sources(data, vocab_size=vocab_size)
    reader_args = dict(
        sources=sources,
        tokenizer=tokenizer,
        add_bos=data.add_bos,
        add_eos=data.add_eos,
        vocab_size=vocab_size,
        max_tokens=data.heldout_document_tokens if split == "heldout" else 0,
    )
    rows_per_batch = data.global_batch // process_count
    read_options = grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=_READ_AHEAD if data.read_threads else 0
    )
    split_ids = [_split_ids(source, data.heldout_fraction, split) for source in sources]

    def packed(refs: MapOfRefs, *, shuffle_seed: int | None) -> grain.IterDataset:
        ds = grain.MapDataset.source(refs)
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed)
        ds = ds[process_index::process_count]
        epoch_length = len(ds)
        ds = ds.repeat(num_epochs).map_with_index(DocumentReader(epoch_length=epoch_length, **reader_args))
        return PackedRowsIterDataset(ds.to_iter_dataset(read_options), seq_len=data.seq_len, pad_id=tokenizer.pad_id)

    if split == "train":
        streams = []
        for source_id, ids in enumerate(split_ids):
            if len(ids) < process_count:
                raise UserError(
                    f"data.sources[{source_id}] ({data.sources[source_id].path}): {len(ids)} training documents "
                    f"cannot give each of {process_count} processes one: the corpus is too small"
                )
            streams.append(packed(MapOfRefs([source_id], [ids]), shuffle_seed=source_seed(seed, source_id)))
        weights = [s.weight for s in data.sources]
        rows = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
        describe = [f"data.sources[{i}] ({s.path})" for i, s in enumerate(data.sources)]
        rows = rows.map_with_index(
            FirstBatchCheck(
                source_descriptions=describe,
                rows_per_batch=rows_per_batch,
                seq_len=data.seq_len,
                worker_count=data.worker_count,
            )
        )
        if data.shuffle_rows > 1:
            # After the mix, so a window holds every source's rows; checkpointable (the state is the window's
            # start in the parent, replayed on restore), and the same seed in every process like source_seed.
            rows = grain.experimental.WindowShuffleIterDataset(
                rows, window_size=data.shuffle_rows, seed=source_seed(seed, len(sources))
            )
    else:
        if sum(len(ids) for ids in split_ids) < process_count:
            raise UserError(
                f"the held-out split has {sum(len(ids) for ids in split_ids)} documents for {process_count} "
                f"processes: raise data.heldout_fraction (now {data.heldout_fraction}) or add documents"
            )
        rows = packed(MapOfRefs(range(len(sources)), split_ids), shuffle_seed=None)
        if data.heldout_shuffle_rows > 1:
            # So the first held-out batches hold rows of many documents rather than the first few documents' rows
            # one after another (an evaluation of a few documents says little of the others). A fixed seed: every
            # run, whatever its train.seed, is measured on the same rows.
            rows = grain.experimental.WindowShuffleIterDataset(
                rows, window_size=data.heldout_shuffle_rows, seed=HELDOUT_SEED
            )

    batches = rows.batch(
        rows_per_batch, drop_remainder=False, batch_fn=BatchStacker(rows_per_batch, data.seq_len, tokenizer.pad_id)
    )
    batches = batches.map(finish_batch_with_documents if documents else finish_batch)
    if data.worker_count > 0:
        _use_default_absl_flags()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
        # Workers hand batches over in shared memory; plain copies free it at once instead of whenever the
        # caller drops the batch (possibly at interpreter exit, after the modules that free it are gone).
        batches = batches.map(_plain_arrays)
    return batches


def open_sources(data: DataConfig, *, vocab_size: int) -> tuple[AnyTokenizer, list[DocumentSource]]:
    """The tokenizer and one DocumentSource per data.sources entry, checked against the model's vocab_size."""
    tokenizer = tokenizer_for(data)
    check_vocab(tokenizer, vocab_size)
    if tokenizer.kind != "none":
        check_specials(tokenizer, add_bos=data.add_bos, add_eos=data.add_eos)
    sources: list[DocumentSource] = []
    for i, (config, name) in enumerate(zip(data.sources, source_names(data))):
        key = f"data.sources[{i}]"
        source: DocumentSource
        if config.path == "stdlib" or config.format == "stdlib":
            source = stdlib_source(name=name)
            if tokenizer.kind == "none":
                raise UserError(f'{key}: the stdlib corpus is text, so data.tokenizer cannot be "none"')
            cache_tokens(source, tokenizer, resolved_cache_dir(data), add_bos=data.add_bos, add_eos=data.add_eos)
        else:
            source = open_source(config, key=key, name=name)
        hint = source.vocab_size_hint
        if hint is not None and tokenizer.vocab_size is not None and hint != tokenizer.vocab_size:
            raise UserError(
                f"{config.path} was prepared with a {hint}-token vocabulary but data.tokenizer "
                f"({data.tokenizer}) has {tokenizer.vocab_size}: prepare it again with this tokenizer"
            )
        if hint is not None and tokenizer.vocab_size is None:
            check_vocab_size(hint, vocab_size, where=f"{config.path} (prepared)")
        if len(source) == 0:
            raise UserError(f"{key}: {config.path} holds no documents (empty corpus)")
        sources.append(source)
    return tokenizer, sources


def _plain_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.array(value, copy=True) for key, value in batch.items()}


def _use_default_absl_flags() -> None:
    """Grain's worker processes read absl flags, which only an absl app parses; outside one, take the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def split_document_ids(source: DocumentSource, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, held-out ids) of a source's documents, by the stable hash of each document's identity."""
    held = heldout_mask(source.document_keys(), heldout_fraction)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _split_ids(source: DocumentSource, fraction: float, split: str) -> np.ndarray:
    train, heldout = split_document_ids(source, fraction)
    return train if split == "train" else heldout


def source_seed(seed: int, source_id: int) -> int:
    """A shuffle seed per source (Grain takes 32 bits), the same in every process so shards stay disjoint."""
    return (int(seed) * 0x9E3779B1 + source_id * 0x85EBCA77 + 0x6A09E667) % 2**32


class MapOfRefs(Sequence):
    """(source id, document id) pairs: the listed sources' ids one after another."""

    def __init__(self, source_ids: Sequence[int], id_arrays: Sequence[np.ndarray]):
        self._sources = np.concatenate([np.full(len(a), s, np.int64) for s, a in zip(source_ids, id_arrays)])
        self._documents = np.concatenate([np.asarray(a, np.int64) for a in id_arrays])

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, index):
        return int(self._sources[index]), int(self._documents[index])


# Document labels (DocumentReader's "document"): source id × this + the document's id in its source.
DOCUMENTS_PER_SOURCE = 2**40


class DocumentReader:
    """(index in the repeated stream, (source id, document id)) -> {"tokens": int32[n], "source", "epoch",
    "document"}."""

    def __init__(self, *, sources, tokenizer, add_bos, add_eos, vocab_size, epoch_length, max_tokens=0):
        self.max_tokens = max_tokens  # > 0: documents cut to their first max_tokens tokens
        self.sources = sources
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.vocab_size = vocab_size
        self.epoch_length = epoch_length

    def __call__(self, index: int, ref: tuple[int, int]) -> dict:
        source_id, document = ref
        source = self.sources[source_id]
        value = source[document]
        if isinstance(value, str):
            if self.tokenizer.kind == "none":
                raise UserError(f'{source.where(document)}: holds text but data.tokenizer is "none"')
            # An empty text is no document at all, not a lone begin/end pair.
            tokens = (
                encode_document(self.tokenizer, value, add_bos=self.add_bos, add_eos=self.add_eos)
                if value
                else np.zeros(0, np.int32)
            )
        else:
            tokens = np.asarray(value)
            if tokens.size:
                low, high = int(tokens.min()), int(tokens.max())
                if low < 0 or high >= self.vocab_size:
                    bad = high if high >= self.vocab_size else low
                    raise UserError(
                        f"{source.where(document)}: token id {bad} is outside the model's vocabulary "
                        f"[0, {self.vocab_size})"
                    )
            tokens = tokens.astype(np.int32)
        return {
            "tokens": tokens[: self.max_tokens] if self.max_tokens else tokens,
            "source": source_id,
            "epoch": index // self.epoch_length,
            "document": source_id * DOCUMENTS_PER_SOURCE + document,
        }


class BatchStacker:
    """Stacks rows into a batch, filling a short last batch (end of a finite stream) with padding rows."""

    def __init__(self, rows_per_batch: int, seq_len: int, pad_id: int):
        self.rows_per_batch = rows_per_batch
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
        missing = self.rows_per_batch - len(rows)
        batch = {}
        # A padding row: pad tokens, segment 0 (no pair), and document -1 (none).
        fills = {"tokens": self.pad_id, "targets": self.pad_id, "document": -1}
        for key in (*ROW_KEYS, "epoch", "document"):
            stacked = np.stack([r[key] for r in rows])
            if missing:
                fill = fills.get(key, 0)
                stacked = np.concatenate([stacked, np.full((missing, *stacked.shape[1:]), fill, stacked.dtype)])
            batch[key] = stacked
        return batch


class FirstBatchCheck:
    """Refuses a corpus that cannot fill one batch in one epoch: the first batch's rows (counted before any row
    shuffle, which may mix epochs on purpose) must all come from the first epoch of their source's documents."""

    def __init__(self, *, source_descriptions, rows_per_batch, seq_len, worker_count):
        self.source_descriptions = source_descriptions
        self.rows_per_batch = rows_per_batch
        self.seq_len = seq_len
        self.worker_count = worker_count

    def __call__(self, index: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if index < self.rows_per_batch and int(row["epoch"]) > 0:
            # The first batch already needed documents of a second epoch: training would repeat them within a step.
            source_id = int(row["source_ids"][0])
            share = f" per worker ({self.worker_count} data workers)" if self.worker_count > 1 else ""
            raise UserError(
                f"{self.source_descriptions[source_id]}: corpus too small for one batch: one epoch of its "
                f"training documents{share} does not fill its share of a {self.rows_per_batch} x {self.seq_len} "
                "batch: add documents or lower data.global_batch / data.seq_len"
            )
        return row


def finish_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds loss_mask and drops the bookkeeping."""
    batch["loss_mask"] = batch["segment_ids"] > 0
    return {key: batch[key].astype(dtype, copy=False) for key, dtype in BATCH_FIELDS.items()}


def finish_batch_with_documents(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """finish_batch, keeping each row's document ("documents")."""
    return finish_batch(batch) | {"documents": batch["document"].astype(np.int64)}
