"""The held-out split as global batches: what every evaluation (training's, fidelity's, the demo's) reads."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import grain
import jax
import numpy as np

from analogjax.data.global_batch import to_global_batch
from analogjax.data.pipeline import make_batch_dataset
from analogjax.data.spec import DataConfig
from analogjax.errors import UserError


def heldout_batches(
    data: DataConfig, *, seed: int, vocab_size: int, sharding, batches: int, documents: bool = False
) -> Iterator:
    """The first `batches` global batches of the held-out split (documents never trained on): the same batches on
    every call. With data.heldout_shuffle_rows the rows are shuffled in windows (a fixed seed), so they come from
    many documents. A split that runs out starts again (its last batch padded with empty rows), so every process runs
    the same number of collective eval steps even when the held-out documents split unevenly across processes.

    With `documents`, yields (batch, documents): documents is numpy int64 [global rows], the held-out document each
    row of the global batch mostly comes from (-1: an empty row), for intervals that resample documents."""
    del seed  # the held-out split does not depend on it: every run is measured on the same rows
    dataset = _heldout_dataset(data, vocab_size, jax.process_index(), jax.process_count())
    for local in itertools.islice(_repeated(dataset), batches):
        labels = local.pop("documents")
        if not documents:
            yield to_global_batch(local, sharding)
            continue
        if jax.process_count() > 1:  # the global batch is the processes' rows in process order (to_global_batch)
            from jax.experimental import multihost_utils

            labels = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
        yield to_global_batch(local, sharding), labels


def _repeated(dataset: grain.IterDataset) -> Iterator[dict]:
    # One epoch at a time (num_epochs=1), not a repeated stream: a window shuffle over a repeated stream would mix a
    # second pass's rows, duplicates of the first's, into the first batches of a split smaller than the window.
    while True:
        empty = True
        for batch in dataset:
            empty = False
            yield batch
        if empty:
            raise UserError("the held-out split gave no tokens: raise data.heldout_fraction or add documents")


# Built once per config and process: opening the sources (tokenizer, file indexes) is the costly part, and a run
# evaluates every `train.eval_every` steps. A fresh iterator over the dataset starts at its first batch.
@functools.lru_cache(maxsize=4)
def _heldout_dataset(data: DataConfig, vocab_size: int, process_index: int, process_count: int) -> grain.IterDataset:
    return make_batch_dataset(
        data,
        split="heldout",
        seed=0,
        vocab_size=vocab_size,
        process_index=process_index,
        process_count=process_count,
        num_epochs=1,
        documents=True,
    )
