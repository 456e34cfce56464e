"""Data: corpora in many formats -> tokenized, packed, mixed, sharded batches through Grain."""

from analogjax.data.global_batch import to_global_batch
from analogjax.data.packing import packing_efficiency
from analogjax.data.pipeline import BATCH_KEYS, make_batch_dataset, make_batch_iterator, split_document_ids
from analogjax.data.spec import DataConfig, SourceConfig, validate
from analogjax.data.tokenize import check_vocab, tokenizer_for, train_bpe_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DataConfig",
    "SourceConfig",
    "check_vocab",
    "make_batch_dataset",
    "make_batch_iterator",
    "packing_efficiency",
    "split_document_ids",
    "to_global_batch",
    "tokenizer_for",
    "train_bpe_tokenizer",
    "validate",
]
