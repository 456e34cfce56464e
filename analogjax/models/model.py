"""A model with its params on a mesh: a callable `tokens -> logits`, and what `analogjax.hf.save` writes.

`analogjax.hf.load(path)` returns one (read from a Hugging Face folder); a finished training run returns its student
as one (`run_training(...)["student"]`); so `hf.save(hf.load(path), out)` and `hf.save(result["student"], out)` are
one call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from analogjax.models.config import ModelConfig


class Model:
    """`config` (ModelConfig), `params` ({"params": ...} as init_boxed gives, unboxed) placed on `mesh` under
    `rules`, and optionally the tokenizer spec its token ids belong to (a data.tokenizer value)."""

    def __init__(self, config: ModelConfig, params: Any, *, mesh, rules, tokenizer: str | None = None):
        from analogjax.models.transformer import Transformer

        self.config = config
        self.params = params
        self.mesh = mesh
        self.rules = tuple(rules)
        self.tokenizer = tokenizer
        self.model = Transformer(config)
        self._logits = jax.jit(self.model.__call__)

    def __call__(self, tokens_bs, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        """int32 tokens [b, s] → float32 logits [b, s, v] (optional packing: segment ids and positions)."""
        import flax.linen as nn

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
            return self._logits(self.params, jnp.asarray(tokens_bs, jnp.int32), segment_ids_bs, positions_bs)
