"""Distillation loss on the student's lm_head without ever holding [tokens, vocab] logits.

`fused_distill_loss` walks over token chunks with lax.scan and holds only [chunk, V] logits (student and teacher) at a
time. Because the loss is a scalar, the forward loop also computes d loss / d logits for the chunk and turns it into the
chunk's share of d student_hidden and d student_head right away (the Liger trick); the custom VJP's backward only scales
those by the incoming cotangent. So the fused path costs the same matmuls as the plain one (student forward, two
gradient matmuls, teacher forward) and its memory does not grow with the number of tokens.

`plain_distill_loss` is the same objective on full logits with ordinary autodiff: the reference for the tests, the
baseline for bench/loss.py and a fallback.

Both return *sums* (the caller divides by the global Σ weights):
  loss        Σ_t w_t (Σ_i kd_weights[i] · div_i(t) + ce_weight · ce(t))   (differentiable w.r.t. student only)
  kd_terms    [n_terms] Σ_t w_t div_i(t) at the given temperature
  ce          Σ w · student hard-label cross-entropy at T = 1
  weight      Σ w
and, for live teachers (full logits: a hidden-state + head signal or a logits one):
  teacher_ce  Σ w · teacher cross-entropy at T = 1
  kl          Σ w · KL(teacher‖student) at T = 1 (a diagnostic, independent of the kd terms)
  agreement   Σ w · [argmax student == argmax teacher]
A top-k signal also gives `agreement` (its top-1 id); sparse teachers give no teacher_ce or kl (they need full logits).
teacher=None is allowed with no kd terms (a CE-only baseline).

Sharding: everything is plain jnp under jit, so GSPMD partitions it. With student_head [D, V] sharded over `tensor` on
V and tokens over `data`, each chunk's logits are [data, tensor]-sharded; log-softmax, target pick (a masked sum, not a
gather) and argmax (two reductions) reduce shard-locally and all-reduce per-token scalars. Chunks take every
n_chunks-th token, so each chunk spans all data shards evenly; `chunk_size` counts tokens across all data shards.
Costs to know: d student_head is summed over the batch shards once per chunk (an all-reduce of [block, V/tensor] per
d_model block) instead of once per step; with an fsdp axis, GSPMD gathers each chunk's d logits over fsdp (tokens
only: the vocabulary stays sharded) to update the head gradient's blocks.

Memory: about eight [chunk, V] float32 arrays live at once, plus the [D, V] float32 head-gradient accumulator (the
gradient itself). The head gradient is accumulated in blocks of at most `chunk` d_model columns so that no second
[V, D] temporary exists (XLA's dot cannot accumulate into its output).

Tied embeddings: pass embed.T as student_head. The products run on the head's [V, D] layout, so embed.T.T cancels
under jit: neither the embedding nor its gradient is transposed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from analogjax.errors import UserError
from analogjax.models.projection import outer_sum
from analogjax.objective import divergences as losses
from analogjax.objective.signal import TeacherSignal
from analogjax.objective.terms import resolve


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one objective: resolved kd terms and how to read the teacher."""

    teacher_kind: str  # "dense" (a live signal: hidden + head, or logits), "topk", "sampled", "none"
    terms: tuple[Callable[..., jax.Array], ...]
    vocab_size: int | None
    temperature_is_one: bool
    # Final logit soft-caps, cap·tanh(logits / cap), 0 = none (Gemma 2 caps at 30). Applied to the logits the
    # objective sees, before masking, so the custom VJP's d logits carries the tanh's derivative.
    student_softcap: float = 0.0
    teacher_softcap: float = 0.0


class _Coefficients(NamedTuple):
    kd_weights: jax.Array  # [n_terms]
    ce_weight: jax.Array
    temperature: jax.Array


def _prepare(
    student_head,
    teacher: TeacherSignal | None,
    targets,
    weights,
    kd_terms,
    kd_weights,
    ce_weight,
    temperature,
    vocab_size,
    student_softcap=0.0,
):
    """Validate the static structure and split the teacher's signal into row-aligned arrays and an optional head."""
    kd_terms = tuple(kd_terms)
    teacher_softcap = 0.0
    terms: tuple[Callable[..., jax.Array], ...]
    if teacher is None:  # CE only (pretraining or a baseline): the same loss without a teacher
        if kd_terms:
            raise UserError(f"kd terms {[name for name, _ in kd_terms]} need a teacher")
        kind, teacher_rows, teacher_head, terms = "none", None, None, ()
    else:
        terms = tuple(resolve(name, params, teacher.kind) for name, params in kd_terms)
        kind = "dense" if teacher.is_live else teacher.kind
        teacher_rows, teacher_head, teacher_softcap = teacher.token_rows(), teacher.head, teacher.softcap
    if kind == "dense":
        teacher_width = (teacher_head if teacher_head is not None else teacher_rows).shape[-1]
        student_width = student_head.shape[-1]
        if vocab_size is None and teacher_width != student_width:
            raise UserError(
                f"teacher vocabulary {teacher_width} != student vocabulary {student_width}; set vocab_size to the "
                "shared real vocabulary when they differ only by padding"
            )
        if vocab_size is not None and vocab_size > min(teacher_width, student_width):
            raise UserError(f"vocab_size {vocab_size} exceeds a model's vocabulary ({teacher_width}, {student_width})")
    kd_weights = jnp.asarray(kd_weights, jnp.float32).reshape(-1)
    if kd_weights.shape[0] != len(terms):
        raise UserError(f"kd_weights has {kd_weights.shape[0]} entries for {len(terms)} kd terms")
    temperature_is_one = isinstance(temperature, (int, float)) and float(temperature) == 1.0
    spec = _Spec(kind, terms, vocab_size, temperature_is_one, float(student_softcap), float(teacher_softcap))
    coefficients = _Coefficients(kd_weights, jnp.asarray(ce_weight, jnp.float32), jnp.asarray(temperature, jnp.float32))
    rows = (jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32), teacher_rows)
    return spec, rows, teacher_head, coefficients


def _mask_columns(logits: jax.Array, vocab_size: int | None) -> jax.Array:
    """Columns >= vocab_size become -inf: exactly the same math as slicing them off (their probability is 0 and
    0·log 0 = 0), but a vocabulary sharded over `tensor` keeps its layout, where a slice would reshard every chunk."""
    if vocab_size is None or vocab_size == logits.shape[-1]:
        return logits
    columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(columns < vocab_size, logits, -jnp.inf)


def _to_width(teacher_logits: jax.Array, width: int) -> jax.Array:
    """Slice or -inf-pad the teacher's logits to the student's width; the student side is never resized, so only the
    gradient-free teacher pays for resharding when padded vocabularies differ."""
    teacher_width = teacher_logits.shape[-1]
    if teacher_width > width:
        return teacher_logits[..., :width]
    if teacher_width < width:
        pad = [(0, 0)] * (teacher_logits.ndim - 1) + [(0, width - teacher_width)]
        return jnp.pad(teacher_logits, pad, constant_values=-jnp.inf)
    return teacher_logits


def _weighted_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    """Σ w·v where w ≠ 0, so a masked token with an infinite or undefined value cannot turn the sum into NaN."""
    return jnp.sum(jnp.where(weights != 0, weights * values, 0.0))


def _objective(spec: _Spec, student_logits, targets, weights, teacher_rows, teacher_head, coefficients):
    """(loss sum, metric sums) for a block of tokens; student_logits [n, Vs] float32 carry the only gradient."""
    student_logits = _mask_columns(_softcap(student_logits, spec.student_softcap), spec.vocab_size)
    teacher_rows = jax.lax.stop_gradient(teacher_rows)
    temperature = coefficients.temperature
    metrics: dict[str, jax.Array] = {}
    if spec.teacher_kind == "dense":
        if teacher_head is None:
            teacher_logits = teacher_rows.astype(losses.compute_dtype(teacher_rows))
        else:
            teacher_logits = _logits(teacher_rows, jax.lax.stop_gradient(teacher_head))
            teacher_logits = _softcap(teacher_logits, spec.teacher_softcap)  # a logits teacher applied its own
        teacher_logits = _mask_columns(_to_width(teacher_logits, student_logits.shape[-1]), spec.vocab_size)
        log_q = losses.log_softmax(student_logits, temperature)
        log_p = losses.log_softmax(teacher_logits, temperature)
        log_q1 = log_q if spec.temperature_is_one else losses.log_softmax(student_logits)
        log_p1 = log_p if spec.temperature_is_one else losses.log_softmax(teacher_logits)
        per_term = [term(log_p, log_q) for term in spec.terms]
        student_ce = -losses.pick(log_q1, targets)
        agree = losses.argmax_last(student_logits) == losses.argmax_last(teacher_logits)
        metrics["teacher_ce"] = _weighted_sum(weights, -losses.pick(log_p1, targets))
        metrics["kl"] = _weighted_sum(weights, losses.kl_from_log_probs(log_p1, log_q1))
        metrics["agreement"] = _weighted_sum(weights, agree.astype(jnp.float32))
    else:
        # One log-softmax serves the sparse terms and, at T = 1, the CE as well, as in the live branch above.
        log_q = losses.log_softmax(student_logits, temperature)
        per_term = [term(log_q, teacher_rows, temperature) for term in spec.terms]
        log_q1 = log_q if spec.temperature_is_one else losses.log_softmax(student_logits)
        student_ce = -losses.pick(log_q1, targets)
        if spec.teacher_kind == "topk":
            teacher_top1 = losses.pick(teacher_rows.indices, losses.argmax_last(teacher_rows.values))
            agree = losses.argmax_last(student_logits) == teacher_top1
            metrics["agreement"] = _weighted_sum(weights, agree.astype(jnp.float32))
    kd_sums = jnp.stack([_weighted_sum(weights, value) for value in per_term]) if per_term else jnp.zeros((0,))
    ce_sum = _weighted_sum(weights, student_ce)
    loss = jnp.sum(coefficients.kd_weights * kd_sums) + coefficients.ce_weight * ce_sum
    metrics.update(kd_terms=kd_sums, ce=ce_sum, weight=jnp.sum(weights))
    return loss, jax.lax.stop_gradient(metrics)


def _softcap(logits: jax.Array, cap: float) -> jax.Array:
    return jnp.tanh(logits / cap) * cap if cap else logits


def _logits(hidden, head):
    """Float32 logits from products in the hidden states' (compute) dtype, as the models' own logits and the fused
    path compute them (student and live teacher): a float32 master head is cast, never the hidden states promoted."""
    return jnp.dot(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _student_logits_vd(hidden, head_vd):
    """hidden [n, D] · head_vd [V, D]ᵀ: the same logits as `_logits` from the head's [V, D] layout."""
    return jnp.einsum("nd,vd->nv", hidden, head_vd, preferred_element_type=jnp.float32)


def _head_gradient(d_logits, hidden):
    """d head in its [V, D] layout for one chunk: d_logitsᵀ · hidden, accumulated in float32."""
    if d_logits.dtype.itemsize >= 4:
        return jnp.einsum("nv,nd->vd", d_logits, hidden, preferred_element_type=jnp.float32)
    # Below 32 bits the same product carries a unit axis. XLA's CPU backend folds a transpose into a dot that
    # contracts the rows of d logits, and YNNPACK (its fast bf16 dots) takes no such dot, so XLA upcast both operands
    # and ran it in float32 (95 ms at [256 x 49,152]ᵀ x [256 x 256] on an AVX512-BF16 box, float32 itself 76 ms).
    # Through the unit axis d logitsᵀ is written out once and the dot runs in bf16: 46 ms. Accelerators lay the
    # operands out themselves; the axis costs them nothing.
    return outer_sum(d_logits, hidden)


def plain_distill_loss(
    student_hidden,
    student_head,
    teacher,
    targets,
    weights,
    *,
    kd_terms,
    kd_weights,
    ce_weight,
    temperature,
    vocab_size=None,
    chunk_size=512,
    student_softcap=0.0,
) -> dict[str, jax.Array]:
    """The fused objective on materialised [N, V] logits with plain autodiff (chunk_size is accepted and unused)."""
    del chunk_size
    spec, (targets, weights, teacher_rows), teacher_head, coefficients = _prepare(
        student_head,
        teacher,
        targets,
        weights,
        kd_terms,
        kd_weights,
        ce_weight,
        temperature,
        vocab_size,
        student_softcap,
    )
    logits = _logits(student_hidden, student_head)
    loss, metrics = _objective(spec, logits, targets, weights, teacher_rows, teacher_head, coefficients)
    return {"loss": loss, **metrics}


def chunk_layout(num_tokens: int, chunk_size: int) -> tuple[int, int, int]:
    """(n_chunks, chunk, padded_tokens): prefer a chunk count that divides the tokens (no padding), else pad."""
    if chunk_size < 1:
        raise UserError(f"chunk_size must be positive, got {chunk_size}")
    if num_tokens <= chunk_size:
        return 1, num_tokens, num_tokens
    fewest = math.ceil(num_tokens / chunk_size)
    for n_chunks in range(fewest, 2 * fewest + 1):
        if num_tokens % n_chunks == 0:
            return n_chunks, num_tokens // n_chunks, num_tokens
    chunk = math.ceil(num_tokens / fewest)
    return fewest, chunk, fewest * chunk


def _block_size(rows: int, largest: int) -> int:
    """Rows per block of the head-gradient loop: the largest divisor of `rows` not above `largest`; one block (a
    [D, V] temporary, like plain autodiff) when no divisor is within 4x, rather than many tiny matmuls."""
    largest = max(1, min(rows, largest))
    for size in range(largest, 0, -1):
        if rows % size == 0 and 4 * size >= largest:
            return size
    return rows


def _chunk_view(x: jax.Array, n_chunks: int, chunk: int, padded: int) -> jax.Array:
    """[N, ...] -> [chunk, n_chunks, ...]: chunk k holds rows k, k + n_chunks, ... (spans every data shard)."""
    if padded != x.shape[0]:
        x = jnp.pad(x, [(0, padded - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(chunk, n_chunks, *x.shape[1:])


def _from_chunk_outputs(y: jax.Array, num_tokens: int) -> jax.Array:
    """Scan outputs [n_chunks, chunk, ...] back to token order [N, ...]."""
    y = jnp.swapaxes(y, 0, 1)
    return y.reshape(-1, *y.shape[2:])[:num_tokens]


def fused_distill_loss(
    student_hidden,
    student_head,
    teacher,
    targets,
    weights,
    *,
    kd_terms,
    kd_weights,
    ce_weight,
    temperature,
    vocab_size=None,
    chunk_size=512,
    student_softcap=0.0,
) -> dict[str, jax.Array]:
    """Chunked distillation loss; equal to plain_distill_loss in value and gradient. See the module docstring.

    student_hidden [N, D] (final-normed, any float dtype); student_head [D, V]; teacher: a TeacherSignal (hidden +
    head, logits, top-k or sampled rows; its tokens, flattened, are the N rows) or None; targets [N] int32; weights
    [N] float32 (0 = ignore). kd_terms is a static tuple of (name, params_tuple) resolved by the term registry for
    the signal's kind; kd_weights [n_terms], ce_weight and temperature may be traced. vocab_size: use columns
    [0, vocab_size) of both models when their vocabularies differ only by padding. chunk_size counts tokens across
    all data shards. student_softcap: the student's final logit soft-cap (0 = none); the teacher's travels in its
    signal (logits built from its hidden states are capped here, a logits teacher caps its own).
    """
    spec, rows, teacher_head, coefficients = _prepare(
        student_head,
        teacher,
        targets,
        weights,
        kd_terms,
        kd_weights,
        ce_weight,
        temperature,
        vocab_size,
        student_softcap,
    )
    num_tokens = student_hidden.shape[0]
    n_chunks, chunk, padded = chunk_layout(num_tokens, chunk_size)
    hidden_dtype, head_dtype = student_hidden.dtype, student_head.dtype
    # d head's column blocks: [V, block] temporaries no larger than a chunk's [chunk, V] logits
    head_block = _block_size(student_head.shape[0], chunk)

    def run(hidden, head, inputs, with_grad: bool):
        row_inputs, teacher_head_, coefficients_ = inputs
        views = jax.tree.map(lambda x: _chunk_view(x, n_chunks, chunk, padded), (hidden, row_inputs))
        # The products run on the head in its [V, D] embedding layout. On CPU (XLA's dots want row-major operands)
        # d head as [V, D] is a faster product than as [D, V] (measured ~1.3x at [256 x 256] x [256 x 49,152]), and
        # a tied head is the embedding itself: embed.T.T cancels, so neither the head nor its gradient is transposed.
        # All three products take operands in the hidden states' dtype (the compute dtype), as the model's own logits
        # do, and accumulate in float32: a float32 master head is cast once per step and d logits before the two
        # backward products. Mixed operands would promote to float32 (the bf16 head then ran at float32's rate, and
        # trained on other logits than the model evaluates); in float32 the casts are no-ops.
        head_vd = head.T.astype(hidden.dtype)

        def chunk_objective(logits, row_inputs_k):
            targets_k, weights_k, teacher_k = row_inputs_k
            return _objective(spec, logits, targets_k, weights_k, teacher_k, teacher_head_, coefficients_)

        def body(carry, k):
            hidden_k, row_inputs_k = jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, k, 1, False), views)
            loss_sum, metric_sums, d_head = carry
            logits = _student_logits_vd(hidden_k, head_vd)
            if not with_grad:
                loss, metrics = chunk_objective(logits, row_inputs_k)
                return (loss_sum + loss, jax.tree.map(jnp.add, metric_sums, metrics), d_head), None
            loss, pullback, metrics = jax.vjp(lambda s: chunk_objective(s, row_inputs_k), logits, has_aux=True)
            (d_logits,) = pullback(jnp.ones((), loss.dtype))
            d_logits = d_logits.astype(hidden_k.dtype)
            d_hidden_k = jnp.einsum("nv,vd->nd", d_logits, head_vd, preferred_element_type=jnp.float32)

            # d head is added in column blocks by a loop: the temporary is one [V, block] product like the chunk's
            # logits, not a second [V, D] array beside the accumulator (XLA's dot cannot accumulate in place, and
            # unrolled blocks get their matmuls hoisted together by the scheduler). Blocks split d_model, never the
            # vocabulary, which may be sharded over `tensor`.
            def add_block(b, d_head_):
                start = b * head_block
                hidden_cols = jax.lax.dynamic_slice_in_dim(hidden_k, start, head_block, axis=1)
                d_block = _head_gradient(d_logits, hidden_cols)
                current = jax.lax.dynamic_slice_in_dim(d_head_, start, head_block, axis=1)
                return jax.lax.dynamic_update_slice_in_dim(d_head_, current + d_block, start, 1)

            n_blocks = head_vd.shape[1] // head_block
            if n_blocks == 1:  # one product, added whole: add_block(0, ·)'s full-width slices measured ~5% slower
                d_head = d_head + _head_gradient(d_logits, hidden_k)
            else:
                d_head = jax.lax.fori_loop(0, n_blocks, add_block, d_head)
            metric_sums = jax.tree.map(jnp.add, metric_sums, metrics)
            return (loss_sum + loss, metric_sums, d_head), d_hidden_k.astype(jnp.float32)

        first_rows = jax.tree.map(lambda v: v[:, 0], views)
        metric_shapes = jax.eval_shape(lambda h, r: chunk_objective(_student_logits_vd(h, head_vd), r)[1], *first_rows)
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        d_head0 = jnp.zeros(head_vd.shape, jnp.float32) if with_grad else None
        init = (jnp.zeros((), jnp.float32), zero_metrics, d_head0)
        (loss, metrics, d_head), d_hidden = jax.lax.scan(body, init, jnp.arange(n_chunks))
        if with_grad:
            d_hidden = _from_chunk_outputs(d_hidden, num_tokens)
            d_head = d_head.T  # back to the caller's [D, V]; cancels against a tied head's embed.T
        return loss, metrics, d_hidden, d_head

    @jax.custom_vjp
    def fused(hidden, head, inputs):
        loss, metrics, _, _ = run(hidden, head, inputs, with_grad=False)
        return loss, metrics

    def fused_forward(hidden, head, inputs):
        loss, metrics, d_hidden, d_head = run(hidden, head, inputs, with_grad=True)
        return (loss, metrics), (d_hidden, d_head)

    def fused_backward(residuals, cotangents):
        d_hidden, d_head = residuals
        loss_cotangent = cotangents[0]  # metrics carry no gradient
        return (
            (loss_cotangent * d_hidden).astype(hidden_dtype),
            (loss_cotangent * d_head).astype(head_dtype),
            None,  # teacher, targets, weights and coefficients get no gradient
        )

    fused.defvjp(fused_forward, fused_backward)
    loss, metrics = fused(student_hidden, student_head, (rows, teacher_head, coefficients))
    return {"loss": loss, **metrics}


def named_kd_terms(kd_terms) -> tuple[str, ...]:
    """The metric names for the entries of `kd_terms` sums, e.g. ('forward_kl', 'jsd_beta0.5')."""
    names = []
    for name, params in kd_terms:
        suffix = "".join(f"_{key}{value}" for key, value in params)
        names.append(name + suffix)
    return tuple(names)


__all__ = ["fused_distill_loss", "plain_distill_loss", "chunk_layout", "named_kd_terms"]
