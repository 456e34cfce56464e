"""The held-out split as global batches: what every evaluation (training's, fidelity's, the demo's) reads."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grain
import jax

from analogjax.data.global_batch import to_global_batch
from analogjax.data.pipeline import make_batch_dataset
from analogjax.data.spec import DataConfig


def heldout_batches(data: DataConfig, *, seed: int, vocab_size: int, sharding, batches: int) -> Iterator[dict]:
    """The first `batches` global batches of the held-out split (documents never trained on): the same batches on
    every call. The split repeats (num_epochs=None), so every process runs the same number of collective eval steps
    even when the held-out documents split unevenly across processes."""
    dataset = _heldout_dataset(data, seed, vocab_size, jax.process_index(), jax.process_count())
    for _, batch in zip(range(batches), iter(dataset)):
        yield to_global_batch(batch, sharding)


# Built once per config and process: opening the sources (tokenizer, file indexes) is the costly part, and a run
# evaluates every `train.eval_every` steps. A fresh iterator over the dataset starts at its first batch.
@functools.lru_cache(maxsize=4)
def _heldout_dataset(
    data: DataConfig, seed: int, vocab_size: int, process_index: int, process_count: int
) -> grain.IterDataset:
    return make_batch_dataset(
        data,
        split="heldout",
        seed=seed,
        vocab_size=vocab_size,
        process_index=process_index,
        process_count=process_count,
        num_epochs=None,
    )
