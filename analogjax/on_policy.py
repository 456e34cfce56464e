"""On-policy distillation: the student samples completions of prompts from the data, the teacher scores every token
of them, and the student minimises a per-token divergence (reverse KL by default) on its own samples (GKD, arXiv
2306.13649; MiniLLM, arXiv 2306.08543). distill.on_policy (config.OnPolicyConfig) says which steps and how.

An on-policy step is two jitted programs on the run's mesh, and the sampled tokens never leave the devices:
1. `rollout`: the current student's params continue this step's prompts (sampling.sample: prefill plus KV-cached
   decode, the student's sharding rules) into a batch of the one batch schema (data.batch.BATCH_FIELDS): row i is
   prompt ⊕ completion ⊕ padding, targets are the next tokens, and loss_mask is 1 exactly where the target is a
   sampled token (the prompt is masked; a sampled EOS counts: the student learns when to stop).
2. the distill step (step.make_distill_step) with the on-policy terms, on that batch: the teacher's forward scores
   exactly the sampled tokens inside the same jitted step as any off-policy step, outside autodiff.
Two programs rather than one so that the loop can time sampling apart from scoring and the update (the metrics
below); the price is one dispatch and one host sync per on-policy step.

Randomness: the sampling key is fold_in(fold_in(TrainState.rng, SALT), step). TrainState.rng is checkpointed and
never advanced, and the step is, so a resumed run samples exactly what an uninterrupted one does; which steps are
on-policy and which prompts they take follow from the step number alone (OnPolicyConfig, data/prompts.py).

Metrics per logged step (means over the on-policy steps of the logging window): completion_len (sampled tokens per
row, EOS included), rollout_tokens_per_s (sampled tokens over sampling time), sampling_share (sampling time over
the window's wall time), teacher_logp (the teacher's mean log-probability, at T=1, of the student's own sampled
tokens: what on-policy distillation raises), student_logp (the student's own, at T=1).
"""

from __future__ import annotations

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from analogjax import mesh as mesh_lib
from analogjax.config import Config
from analogjax.errors import UserError
from analogjax.models.sampling import Sampling, sample
from analogjax.runtime.flops import distill_flops_per_step, forward_flops_per_token

SALT = 0x0F_0011C7  # keeps the sampling stream apart from any other use of TrainState.rng


def is_on_policy(step: int, fraction: float) -> bool:
    """Step `step` (0-based) is on-policy when floor((step + 1)·fraction) > floor(step·fraction): `fraction` of the
    steps, evenly spread (fraction 1: every step; 0.25: steps 3, 7, 11, ...)."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


def on_policy_index(step: int, fraction: float) -> int:
    """How many on-policy steps came before `step`: the index of its prompts."""
    return math.floor(step * fraction)


def shapes(config: Config) -> tuple[int, int]:
    """(prompt tokens, completion tokens) per row of an on-policy batch."""
    op = config.distill.on_policy
    return op.prompt_len, op.new_tokens(config.data.seq_len)


def check(config: Config, teacher) -> None:
    """UserError for an on-policy config this run cannot carry out exactly."""
    op, key = config.distill.on_policy, "distill.on_policy"
    if not op.enabled:
        return
    op.check_fits(config.data.seq_len, key)
    if teacher is None:
        raise UserError(f"{key}.fraction > 0 needs a teacher to score the samples (the objective has none)")
    if teacher.is_cached:
        raise UserError(
            f"{key}.fraction > 0 needs a live teacher: a teacher cache holds scores of the corpus, not of the "
            "student's new samples (unset teacher.cache)"
        )
    if config.mesh.context > 1:
        raise UserError(f"{key}: sampling with the sequence split over mesh.context > 1 is not implemented")


def rollout(
    cfg,
    params,
    prompts_bp: jax.Array,
    lengths_b: jax.Array,
    source_ids_b: jax.Array,
    rng_data: jax.Array,
    step: jax.Array,
    *,
    options: Sampling,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    vocab_limit: int,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """(an on-policy batch [b, prompt_len + max_new_tokens] of BATCH_FIELDS, sampled tokens per row [b]). Pure."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng_data), SALT), step)
    params = jax.lax.stop_gradient(params)
    new_bn, count_b = sample(
        cfg,
        params,
        prompts_bp,
        lengths_b,
        key,
        max_new_tokens=max_new_tokens,
        options=options,
        eos_ids=eos_ids,
        pad_id=pad_id,
        vocab_limit=vocab_limit,
    )
    b, p = prompts_bp.shape
    width = p + max_new_tokens
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    start, end = lengths_b[:, None], (lengths_b + count_b)[:, None]  # completion slots [start, end)
    prompt_part = jnp.pad(prompts_bp, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
    completion_part = jnp.take_along_axis(new_bn, jnp.clip(j - start, 0, max_new_tokens - 1), axis=1)
    tokens = jnp.where(j < start, prompt_part, jnp.where(j < end, completion_part, pad_id)).astype(jnp.int32)
    batch = {
        "tokens": tokens,
        "segment_ids": (j < end).astype(jnp.int32),
        "positions": jnp.broadcast_to(j, (b, width)),
        "targets": jnp.concatenate([tokens[:, 1:], jnp.full((b, 1), pad_id, jnp.int32)], axis=1),
        # Position t predicts token t + 1: the targets that are sampled tokens are those of t in [start - 1, end - 1).
        "loss_mask": ((j >= start - 1) & (j < end - 1)).astype(jnp.float32),
        "source_ids": jnp.broadcast_to(source_ids_b[:, None], (b, width)).astype(jnp.int32),
    }
    return batch, count_b


class OnPolicy:
    """What the loop needs for on-policy steps: which steps, their prompts, the jitted rollout and step."""

    def __init__(self, run, *, process_index: int = 0, process_count: int = 1, prompts=None):
        """`prompts`: anything with data.prompts.PromptSet's `batch` and `tokenizer` (default: the run's data)."""
        from analogjax.data.prompts import PromptSet

        config = run.config  # setup.build has run check(config, teacher)
        op = config.distill.on_policy
        self.config, self.run = config, run
        self.fraction = op.fraction
        self.prompt_len, self.max_new_tokens = shapes(config)
        self.rows = config.data.global_batch
        self.process_index, self.process_count = process_index, process_count
        if prompts is None:
            prompts = PromptSet(config.data, op, seed=config.train.seed, vocab_size=config.model.vocab_size)
        self.prompts = prompts
        tokenizer = self.prompts.tokenizer
        eos = () if tokenizer.eos_id is None else (int(tokenizer.eos_id),)
        vocab_limit = run.on_policy_objective.vocab_size  # the vocabulary student and teacher share (Objective)
        if tokenizer.vocab_size is not None:
            vocab_limit = min(vocab_limit, tokenizer.vocab_size)
        sampling = Sampling(op.temperature, op.top_k, op.top_p)
        mesh, batch_sh = run.mesh, run.batch_sharding
        rep = mesh_lib.replicated(mesh)
        model_cfg = config.model

        def rollout_on_mesh(params, prompts, lengths, source_ids, rng_data, step):
            with nn.logical_axis_rules(list(mesh_lib.STUDENT_RULES)):
                batch, count = rollout(
                    model_cfg,
                    params,
                    prompts,
                    lengths,
                    source_ids,
                    rng_data,
                    step,
                    options=sampling,
                    max_new_tokens=self.max_new_tokens,
                    eos_ids=eos,
                    pad_id=int(tokenizer.pad_id),
                    vocab_limit=vocab_limit,
                )
            return batch, jnp.sum(count)

        params_sh = run.state_shardings.params["model"]
        self.rollout_fn = jax.jit(
            rollout_on_mesh,
            in_shardings=(params_sh, batch_sh, batch_sh, batch_sh, rep, rep),
            out_shardings=(batch_sh, rep),
        )
        self.step_fn = run.on_policy_step_fn  # setup.build jitted it beside the off-policy step
        width = self.prompt_len + self.max_new_tokens
        teacher_cfg = config.teacher.model
        # Model FLOPs of an on-policy step: the distill step's on its rows, plus the student's sampling forward
        # (prefill and decode, each token attending over at most the row's width).
        self.tokens_per_step = self.rows * width
        self.flops_per_step = (
            distill_flops_per_step(config.model, teacher_cfg, self.tokens_per_step, width)
            + forward_flops_per_token(config.model, width) * self.tokens_per_step
        )

    def covers(self, step: int) -> bool:
        return is_on_policy(step, self.fraction)

    def batch(self, state, step: int):
        """(the on-policy batch of `step`, on the devices; seconds spent sampling; sampled tokens): blocks until the
        samples exist, so that sampling is timed apart from the rest of the step."""
        from analogjax.data import to_global_batch

        host = self.prompts.batch(
            on_policy_index(step, self.fraction), self.rows, self.process_index, self.process_count
        )
        prompts = to_global_batch(host, self.run.batch_sharding)
        jax.block_until_ready(state.params)  # the previous step's update: not sampling time
        start = time.perf_counter()
        batch, sampled = self.rollout_fn(
            state.params["model"],
            prompts["prompts"],
            prompts["prompt_lengths"],
            prompts["source_ids"],
            state.rng,
            state.step,
        )
        sampled = int(jax.device_get(sampled))
        return batch, time.perf_counter() - start, sampled


class RolloutWindow:
    """On-policy figures of the loop's logging window. Sampling time is counted when it happens (`seconds`: the
    window's wall time spent sampling); the per-step figures (tokens sampled, the teacher's and student's
    log-probabilities) belong to the on-policy steps logged in the window."""

    def __init__(self, rows: int):
        self.rows = rows
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.steps, self.sampled = 0, 0
        self.timed_seconds, self.timed_sampled = 0.0, 0  # steps whose sampling did not include compiling it
        self.sums: list[dict] = []  # per on-policy step: teacher_ce, ce and count sums (device arrays, read late)

    def add(self, seconds: float, sampled: int, metrics: dict, timed: bool = True) -> None:
        self.steps += 1
        self.sampled += sampled
        if timed:
            self.timed_seconds += seconds
            self.timed_sampled += sampled
        self.sums.append({k: metrics[k] for k in ("teacher_ce", "ce", "count") if k in metrics})

    def record(self, window_seconds: float) -> dict[str, float]:
        """The window's figures (then the caller starts a fresh window). Empty when no on-policy step ran in it."""
        if not self.steps:
            return {}
        sums = jax.device_get(self.sums)
        count = max(sum(float(s["count"]) for s in sums), 1.0)
        out = {"on_policy_steps": float(self.steps), "completion_len": self.sampled / (self.steps * self.rows)}
        if self.timed_seconds > 0 and window_seconds > 0:  # not when the window's only rollout was compiling
            out["rollout_tokens_per_s"] = self.timed_sampled / self.timed_seconds
            out["sampling_share"] = self.seconds / window_seconds
        if all("teacher_ce" in s for s in sums):
            out["teacher_logp"] = -sum(float(s["teacher_ce"]) for s in sums) / count
        out["student_logp"] = -sum(float(s["ce"]) for s in sums) / count
        return out
