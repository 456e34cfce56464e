"""Data: corpora in many formats -> tokenized, packed, mixed, process-sharded batches through Grain.

Names are imported on first use, so `analogjax prepare` (and its worker processes) need not import Grain and JAX.
"""

import importlib

_EXPORTS = {
    "BATCH_KEYS": "analogjax.data.batch",
    "BATCH_FIELDS": "analogjax.data.batch",
    "abstract_batch": "analogjax.data.batch",
    "heldout_batches": "analogjax.data.heldout",
    "make_batch_dataset": "analogjax.data.pipeline",
    "make_batch_iterator": "analogjax.data.pipeline",
    "split_document_ids": "analogjax.data.pipeline",
    "packing_efficiency": "analogjax.data.packing",
    "to_global_batch": "analogjax.data.global_batch",
    "DataConfig": "analogjax.data.spec",
    "SourceConfig": "analogjax.data.spec",
    "validate": "analogjax.data.spec",
    "distinct_steps": "analogjax.data.spec",
    "check_vocab": "analogjax.data.tokenize",
    "tokenizer_for": "analogjax.data.tokenize",
    "train_bpe_tokenizer": "analogjax.data.tokenize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'analogjax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
