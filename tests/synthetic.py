"""Synthetic packed batches for step tests: two documents per row, padding at the end."""

import numpy as np


def packed_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, seq)).astype(np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cut, end = rng.integers(2, seq - 3), seq - rng.integers(0, 3)
        segment_ids[row, :cut], segment_ids[row, cut:end] = 1, 2
        positions[row, :cut], positions[row, cut:end] = np.arange(cut), np.arange(end - cut)
    tokens[segment_ids == 0] = 0
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    same_doc = np.zeros_like(tokens, dtype=bool)
    same_doc[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    return {
        "tokens": tokens,
        "segment_ids": segment_ids,
        "positions": positions,
        "targets": targets,
        "loss_mask": same_doc.astype(np.float32),
    }
