"""`AnalogLM`: any model analogjax runs, as an lm-evaluation-harness model (loglikelihood, loglikelihood_rolling,
generate_until).

Scoring follows lm-eval's own HF model (lm_eval.models.huggingface.HFLM) request by request: the same
context/continuation split (lm-eval's TemplateLM), the same left truncation to the context, the same
log-softmax over the whole output layer, so on the same weights the log-likelihoods are HFLM's. What differs is how
they are computed: rows of about the same length share a batch right-padded to a power of two (padding is segment 0,
seen by nothing), the batch is padded to a fixed number of rows split over the mesh's batch axes, and one program is
compiled per length bucket. Generation is the KV-cached sampler (analogjax.models.sampling), cut at the request's
stop strings as HFLM cuts them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM

from analogjax.models.sampling import bucket

DEFAULT_BATCH = 16  # rows per scoring batch (rounded up to the mesh's batch shards)
DEFAULT_GEN_TOKENS = 256  # HFLM's default max_gen_toks


class TextCodec(Protocol):
    """The model's tokenizer as lm-eval calls it: text ↔ ids, and its BOS/EOS ids."""

    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _score(cfg, params, tokens_bs, targets_bs, segment_ids_bs):
    """Per position: log p(target) under the log-softmax of the whole output layer, and whether it is the argmax."""
    from analogjax.models.transformer import Transformer

    positions = jnp.where(segment_ids_bs > 0, jnp.arange(tokens_bs.shape[1], dtype=jnp.int32)[None, :], 0)
    logits = Transformer(cfg)(params, tokens_bs, segment_ids_bs, positions).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets_bs[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets_bs


@functools.lru_cache(maxsize=16)
def _scorer(cfg):
    """One jitted scorer per model shape, shared by every AnalogLM of that shape: it compiles once per bucket."""
    return jax.jit(functools.partial(_score, cfg))


class AnalogLM(TemplateLM):
    """An analogjax `Model` (models.model.Model: a run's student, hf.load(...), a GGUF file, a teacher) with its
    tokenizer (`codec`), served to lm-eval. `max_length`: the model's context (longer inputs lose their left end, as
    HFLM truncates). `batch_size`: rows per batch; `max_gen_toks`: a generation request's default token budget."""

    def __init__(
        self,
        model,
        codec: TextCodec,
        *,
        max_length: int,
        batch_size: int = DEFAULT_BATCH,
        max_gen_toks: int = DEFAULT_GEN_TOKENS,
        name: str = "analogjax",
    ):
        super().__init__()
        from analogjax import mesh as mesh_lib

        self.model = model
        self.codec = codec
        self.name = name
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        shards = int(np.prod([model.mesh.shape[a] for a in mesh_lib.BATCH_AXES if a in model.mesh.shape]))
        self.rows = -(-max(int(batch_size), 1) // shards) * shards
        self._batch_sharding = mesh_lib.batch_sharding(model.mesh)
        self._scorer = _scorer(model.config)

    # -------------------------------------------------------------------------------------------------------------
    # What TemplateLM asks of a model

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        eos = self.codec.eos_id
        return int(eos) if eos is not None else 0

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: an empty context is conditioned on BOS, else on EOS.
        return int(self.codec.bos_id) if self.codec.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string, add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.codec.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval's results JSON records of the model."""
        cfg = self.model.config
        return {"model_name": self.name, "model_num_layers": cfg.n_layers, "model_d_model": cfg.d_model}

    # -------------------------------------------------------------------------------------------------------------
    # Scoring

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's context/continuation split, without its progress bar (the batches here are few)."""
        return super().loglikelihood(requests, disable_tqdm=True)

    def token_logprobs(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each (inputs, targets) pair of equal length: per-target log-probabilities and argmax hits, computed
        in batches of `self.rows` rows bucketed by length (one compile per bucket)."""
        import flax.linen as nn

        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0, bool))] * len(rows)
        start = 0
        while start < len(order):
            width = bucket(len(rows[order[start]][0]))
            chunk = order[start : start + self.rows]
            tokens = np.zeros((self.rows, width), np.int32)
            targets = np.zeros((self.rows, width), np.int32)
            segments = np.zeros((self.rows, width), np.int32)
            for r, i in enumerate(chunk):
                inputs, wanted = rows[i]
                tokens[r, : len(inputs)], targets[r, : len(inputs)], segments[r, : len(inputs)] = inputs, wanted, 1
            with jax.set_mesh(self.model.mesh), nn.logical_axis_rules(list(self.model.rules)):
                picked, hits = self._scorer(
                    self.model.params, *(jax.device_put(a, self._batch_sharding) for a in (tokens, targets, segments))
                )
            picked, hits = np.asarray(jax.device_get(picked)), np.asarray(jax.device_get(hits))
            for r, i in enumerate(chunk):
                n = len(rows[i][0])
                out[i] = (picked[r, :n], hits[r, :n])
            start += len(chunk)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether every continuation token is the argmax), as HFLM computes it."""
        rows = []
        for _, context, continuation in requests:
            window = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((window[:-1], window[1:]))
        scored = self.token_logprobs(rows)
        results = []
        for (_, _, continuation), (logp, hits) in zip(requests, scored):
            n = len(continuation)
            results.append((float(np.sum(logp[-n:], dtype=np.float64)), bool(np.all(hits[-n:]))))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in disjoint windows of the context, each conditioned on what precedes it
        (lm-eval's rolling windows, as HFLM)."""
        from lm_eval import utils

        windows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for pair in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = utils.make_disjoint_window(pair)
                windows.append((None, context, continuation))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[k] += logp
        return totals

    # -------------------------------------------------------------------------------------------------------------
    # Generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, where the request asks) continuations, cut before the first stop string."""
        from analogjax.models.sampling import generate

        groups: dict[tuple, list[int]] = {}
        parsed = []
        for k, req in enumerate(requests):
            context, gen_kwargs = req.args
            options = dict(gen_kwargs or {})
            until = options.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(options.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 0.0)) if sample else 0.0
            key = (budget, temperature, int(options.pop("top_k", 0) or 0), float(options.pop("top_p", 1.0) or 1.0))
            prompt = self.tok_encode(context)[-max(self.max_length - budget, 1) :]
            parsed.append((prompt, until))
            groups.setdefault(key, []).append(k)
        out = [""] * len(requests)
        for (budget, temperature, top_k, top_p), members in groups.items():
            for start in range(0, len(members), self.rows):
                chunk = members[start : start + self.rows]
                prompts = [parsed[k][0] for k in chunk]
                prompts += [prompts[0]] * (self.rows - len(prompts))  # one batch shape: one compile per bucket
                completions = generate(
                    self.model,
                    prompts,
                    max_new_tokens=budget,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_ids=[self.eot_token_id],
                    max_positions=self.max_length,
                )
                for k, tokens in zip(chunk, completions):
                    text = self.tok_decode([t for t in tokens if t != self.eot_token_id])
                    for stop in parsed[k][1]:
                        if stop:
                            text = text.split(stop)[0]
                    out[k] = text
        return out
