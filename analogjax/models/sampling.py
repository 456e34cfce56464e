"""Sampling: prefill plus a KV-cached decode loop, for every model analogjax builds or imports.

Prompts of different lengths share one batch right-padded: row i's prompt fills slots [0, len_i) of its cache,
padding carries segment id 0 (seen by nothing, models/attention.allowed), and row i's j-th new token goes to slot
len_i + j at position len_i + j, overwriting padding. Masking by positions and segment ids, not by slot, makes the
padding invisible and keeps sliding windows exact. The cache is [layers, b, k, t, e] keys and values, scanned over
layers inside the same decoder as training (transformer.Decoder with `cache`), so new families work unchanged.

Decode reads only what is filled, and writes in place. Before, each step scanned the layers with every layer's
[b, p + N, k, e] cache slice as a scan input and its written copy as a scan output: every step read and rewrote the
whole cache (filled or not) and attended over all p + N slots. Now (transformer.Decoder with `span`):
- the whole cache stack rides in the layer scan's carry, and a layer writes its new keys and values as a scatter of
  the new slots into its row of the stack (transformer.write_layer); inside the decode while_loop the carry is one
  buffer, so no copy of the cache is made per step (the compiled HLO shows the scatters on the carried stacks, no
  copy or transpose of a [layers, b, p + N, ...] array);
- the N - 1 decode steps are cut into at most MAX_BLOCKS static length blocks (`decode_blocks`); in a block that
  ends at step `last` every token's slot is < p + last - 1, so attention reads a static slice of the first
  p + last - 1 slots of its layer (transformer.layer_slots) and nothing past it; positions and segment ids are sliced
  alike, so masks, sliding windows, chunks and sinks see exactly the keys they saw before (the slots past the span
  are empty, segment 0, masked anyway): greedy outputs are unchanged. Each block is its own while_loop, so the
  decoder is compiled once per block: few blocks (at least MIN_BLOCK steps each) bound compile time, while the
  average span stays within half a block of the filled length;
- keys and values lie heads before slots, [layers, b, k, t, e]: attention's two products batch over (b, k), so a
  layer's span is read as it lies. With slots first, XLA's CPU dots took a transposed copy of each layer's span for
  each product at every step, the largest cost of a decode step (BENCHMARKS.md, Generate);
- the loop body can run UNROLL decode steps per iteration where a block's length divides (fewer condition checks
  and dispatches per token; a row already done keeps writing pad_id, as before). It is 1 by default: on the CPU it
  gained nothing measurable and each unrolled step is another decoder copy to compile.
Latent attention (models/mla.py) caches latents in the same layout and follows the same protocol.

`sample(...)` is a pure, jittable function (the on-policy step can call it inside its own jit); `generate(...)`
wraps it: it pads the batch to the mesh, buckets the prompt length, and jits once per (shape, options).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from analogjax.errors import UserError
from analogjax.models.config import ModelConfig
from analogjax.runtime import compute_dtype

# Prompt lengths round up to a power of two, at least this: one compile serves many prompt lengths.
MIN_BUCKET = 16
# Decode length buckets (`decode_blocks`): at most this many static blocks, each at least MIN_BLOCK steps long, and
# UNROLL decode steps per while_loop iteration where a block's length allows it. Each block and each unrolled step is
# one more copy of the decoder to compile: at 128 new tokens 8 blocks x 2 unrolled took 3x the compile time of one
# loop, while 1, 2 or 4 unrolled steps decoded within 1% of each other on the CPU (BENCHMARKS.md, Generate), so
# UNROLL stays 1 until an accelerator shows a gain; 4 blocks read on average within 1/8 of the new tokens of what
# is filled.
MAX_BLOCKS = 4
MIN_BLOCK = 16
UNROLL = 1


class Sampling(NamedTuple):
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off. Applied in that order, as transformers does."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    """An empty KV cache: keys and values [layers, b, k, length, e] in the compute dtype (latent attention: its
    latent [layers, b, length, kv_lora_rank] and rotary key [layers, b, length, qk_rope_head_dim] instead,
    models/mla.py); every slot empty (segment id 0), written slots get their token's position and segment id."""
    dtype = compute_dtype.of(cfg.dtype)
    # Heads before slots: attention's products batch over (b, k), so a layer's slice is read as it lies; with slots
    # first XLA copied it transposed, per layer and decode step (BENCHMARKS.md, Generate).
    shape = (cfg.n_layers, batch, cfg.kv_heads, length, cfg.dim_per_head)
    if cfg.mla.enabled:  # latent attention caches the compressed latent and the shared rotary key (models/mla.py)
        from analogjax.models.mla import cache_shapes

        kv = {name: jnp.zeros(s, dtype) for name, s in cache_shapes(cfg, batch, length).items()}
    else:
        kv = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return {
        **kv,
        "positions": jnp.zeros((batch, length), jnp.int32),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
        "index": jnp.zeros((batch,), jnp.int32),
    }


def _constrain(cache: dict) -> dict:
    # Split the cache over the batch axes like every activation; heads stay whole (kv heads rarely divide tensor).
    import flax.linen as nn

    names = {
        "k": (None, "batch", None, "length", None),
        "v": (None, "batch", None, "length", None),
        "latent": (None, "batch", "length", None),
        "k_rope": (None, "batch", "length", None),
        "positions": ("batch", "length"),
        "segment_ids": ("batch", "length"),
        "index": ("batch",),
    }
    return {key: nn.with_logical_constraint(value, names[key]) for key, value in cache.items()}


def filter_logits(logits_bv: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits outside the top k, then outside the smallest set whose probability reaches top_p, set to -inf (the
    most likely token always stays; ties at the threshold stay together)."""
    if top_k and top_k < logits_bv.shape[-1]:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if top_p < 1.0:
        sorted_bv = -jnp.sort(-logits_bv, axis=-1)
        probs = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass before the first token is 0
        threshold = jnp.take_along_axis(sorted_bv, kept - 1, axis=-1)
        logits_bv = jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)
    return logits_bv


def next_token(logits_bv: jax.Array, rng: jax.Array, options: Sampling) -> jax.Array:
    """[b] int32 tokens drawn from float32 logits under `options`."""
    if options.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits_bv / options.temperature, options.top_k, options.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def sample(
    cfg: ModelConfig,
    params,
    prompt_bp: jax.Array,
    lengths_b: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    options: Sampling | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    limit_b: jax.Array | None = None,
    vocab_limit: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Continue right-padded prompts ([b, p] int32, row i's first lengths_b[i] >= 1 tokens real) → (new tokens
    [b, max_new_tokens] int32, pad_id after a row stops; count [b] of new tokens, an EOS included). A row stops
    after an EOS id, after max_new_tokens, or after limit_b[i] tokens (a context bound). With `vocab_limit`, ids at
    or above it are never drawn (an embedding table padded past the tokenizer, or past what a teacher can score).
    Pure and jittable."""
    from analogjax.models.transformer import Transformer, logits

    options = options or Sampling()
    model = Transformer(cfg)
    b, p = prompt_bp.shape
    lengths_b = lengths_b.astype(jnp.int32)
    limit_b = jnp.full((b,), max_new_tokens, jnp.int32) if limit_b is None else jnp.minimum(limit_b, max_new_tokens)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)

    def is_eos(tokens_b):
        return jnp.any(tokens_b[:, None] == eos[None, :], axis=-1)

    def logits_of(hidden_b1d):
        out = logits(params, cfg, hidden_b1d)[:, 0]
        if vocab_limit is not None and vocab_limit < out.shape[-1]:
            out = jnp.where(jnp.arange(out.shape[-1]) < vocab_limit, out, -jnp.inf)
        return out

    cache = _constrain(init_cache(cfg, b, p + max_new_tokens))
    segments = (jnp.arange(p)[None, :] < lengths_b[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    hidden, cache = model.decode(params, prompt_bp, segments, positions, cache)
    last = jnp.take_along_axis(hidden, (lengths_b - 1)[:, None, None], axis=1)  # each row's last real token
    token = next_token(logits_of(last), jax.random.fold_in(rng, 0), options)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    count = jnp.ones((b,), jnp.int32)
    done = is_eos(token) | (count >= limit_b)

    def step_once(state, span):
        step, token, out, done, count, cache = state
        where = lengths_b + step - 1  # the fed token's position, and its slot (<= p + step - 1 < span)
        cache = _constrain({**cache, "index": where})
        hidden, cache = model.decode(
            params, token[:, None], jnp.ones((b, 1), jnp.int32), where[:, None], cache, span=span
        )
        new = next_token(logits_of(hidden), jax.random.fold_in(rng, step), options)
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], step, axis=1)
        count = count + (~done).astype(jnp.int32)
        done = done | is_eos(new) | (count >= limit_b)
        return step + 1, new, out, done, count, cache

    state = (jnp.int32(1), token, out, done, count, cache)
    for first, end in decode_blocks(max_new_tokens):
        # steps [first, end) write slots < p + end - 1, so they read the cache's first p + end - 1 slots only
        span = p + end - 1
        per_iteration = UNROLL if (end - first) % UNROLL == 0 else 1

        def cond(state, end=end):
            step, _, _, done, _, _ = state
            return (step < end) & ~jnp.all(done)

        def body(state, span=span, per_iteration=per_iteration):
            for _ in range(per_iteration):  # several tokens per loop iteration (rows already done write pad_id)
                state = step_once(state, span)
            return state

        state = jax.lax.while_loop(cond, body, state)
    _, _, out, _, count, _ = state
    return out, count


def decode_blocks(max_new_tokens: int) -> list[tuple[int, int]]:
    """The decode steps 1 .. max_new_tokens - 1 cut into at most MAX_BLOCKS static blocks [first, last) of at least
    MIN_BLOCK steps (the last block may be shorter); each block compiles its own loop reading p + last - 1 slots."""
    steps = max_new_tokens - 1
    if steps <= 0:
        return []
    size = max(MIN_BLOCK, -(-steps // MAX_BLOCKS))
    return [(first, min(first + size, max_new_tokens)) for first in range(1, max_new_tokens, size)]


def bucket(length: int) -> int:
    """The padded prompt length compiled for a longest prompt of `length` tokens."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


@functools.lru_cache(maxsize=32)
def _jitted(cfg: ModelConfig, max_new_tokens: int, options: Sampling, eos_ids: tuple[int, ...], pad_id: int):
    return jax.jit(
        functools.partial(sample, cfg, max_new_tokens=max_new_tokens, options=options, eos_ids=eos_ids, pad_id=pad_id)
    )


def check_request(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, options: Sampling, max_positions: int | None, vocab_size: int
) -> None:
    """UserError for any request `generate` cannot serve exactly."""
    options.check()
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        raise UserError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty (no tokens): there is nothing to continue")
        if max_positions is not None and len(prompt) >= max_positions:
            raise UserError(
                f"prompt {i} has {len(prompt)} tokens; the model's context is {max_positions} "
                "positions, leaving no room for a new token"
            )
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise UserError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    max_positions: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) with `model` (a models.model.Model: hf.load(...), a run's
    student); returns each completion's token ids (stopping EOS included). temperature 0 is greedy. With
    `max_positions` (the model's context), prompts must be shorter and rows stop when they reach it."""
    from analogjax import mesh as mesh_lib

    options = Sampling(float(temperature), int(top_k), float(top_p))
    check_request(prompts, max_new_tokens, options, max_positions, model.config.vocab_size)
    n = len(prompts)
    shards = int(np.prod([model.mesh.shape[a] for a in mesh_lib.BATCH_AXES if a in model.mesh.shape]))
    rows = -(-n // shards) * shards  # dummy one-token rows fill the batch to a multiple of the batch shards
    width = bucket(max(len(p) for p in prompts))
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = prompt
        lengths[i] = len(prompt)
    limit = (
        np.full((rows,), max_new_tokens, np.int32)
        if max_positions is None
        else np.minimum(max_new_tokens, max_positions - lengths).astype(np.int32)
    )
    fn = _jitted(model.config, int(max_new_tokens), options, tuple(int(e) for e in eos_ids), 0)
    batch = mesh_lib.batch_sharding(model.mesh)
    import flax.linen as nn

    with jax.set_mesh(model.mesh), nn.logical_axis_rules(list(model.rules)):
        out, count = fn(
            model.params,
            jax.device_put(tokens, batch),
            jax.device_put(lengths, batch),
            jax.random.key(seed),
            limit_b=jax.device_put(limit, batch),
        )
    out, count = np.asarray(jax.device_get(out)), np.asarray(jax.device_get(count))
    return [out[i, : count[i]].tolist() for i in range(n)]
