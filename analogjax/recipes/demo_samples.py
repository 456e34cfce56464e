"""What each model of the demo writes: greedy continuations of held-out prompts, side by side, and the teacher's
mean log-probability of each model's own continuation (how teacher-like its text is, as the teacher judges it).

Prompts are the first `prompt_tokens` tokens of the held-out batches' rows (documents no model trained on; of a row
holding pieces of several documents, the longest piece), so the continuations are not recitations of training rows.
Each prompt keeps the held-out document it comes from: the interval of a model's figure resamples documents
(intervals.DOCUMENT), as prompts cut from one document are not independent.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from analogjax.fidelity import intervals


def heldout_prompts(config, count: int, prompt_tokens: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, documents): the first `prompt_tokens` tokens of the longest piece of each of the first `count` rows
    of the held-out batches whose piece is that long, and the held-out document of each (the row's)."""
    from analogjax.data import heldout_batches

    prompts: list[list[int]] = []
    documents: list[int] = []
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for batch, labels in heldout_batches(
        config.data,
        seed=config.train.seed,
        vocab_size=config.model.vocab_size,
        sharding=sharding,
        batches=config.train.eval_batches,
        documents=True,
    ):
        tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
        for row in range(tokens.shape[0]):
            ids, sizes = np.unique(segments[row][segments[row] > 0], return_counts=True)
            if not len(ids):
                continue
            # The row's label names the document holding most of it: the longest piece (the first of equals).
            piece = tokens[row][segments[row] == ids[np.argmax(sizes)]]
            if len(piece) >= prompt_tokens:
                prompts.append(piece[:prompt_tokens].tolist())
                documents.append(int(labels[row]))
            if len(prompts) == count:
                return prompts, documents
    return prompts, documents


def teacher_logprob(
    teacher_model, prompts: list[list[int]], completions: list[list[int]], documents=None, width: int = 0
) -> dict[str, list[float]]:
    """Per prompt, the teacher's summed log-probability of the completion tokens (after the prompt) and their count:
    {"sum": [...], "count": [...]} (a model's figure is Σ sum / Σ count; a prompt is a row of the bootstrap), and
    with `documents` (one per prompt) intervals.DOCUMENT, so the bootstrap resamples documents. Rows are padded to
    at least `width` tokens: one width for every model's continuations is one compiled teacher forward."""
    width = max([width] + [len(p) + len(c) for p, c in zip(prompts, completions)])
    tokens = np.zeros((len(prompts), width), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    scored = np.zeros(tokens.shape, np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = p + c
        tokens[i, : len(row)] = row
        segments[i, : len(row)] = 1
        positions[i, : len(row)] = np.arange(len(row))
        scored[i, len(p) - 1 : len(row) - 1] = 1.0  # logits at position t score token t + 1
    logits = teacher_model(tokens, jnp.asarray(segments), jnp.asarray(positions))
    targets = np.concatenate([tokens[:, 1:], np.zeros((tokens.shape[0], 1), np.int32)], axis=1)
    # Picked on the device: only [prompts, width] log-probs come back, never the [prompts, width, vocab] logits.
    picked = np.asarray(_picked_log_probs(logits, jnp.asarray(targets)), np.float64)
    out = {"sum": (picked * scored).sum(-1).tolist(), "count": scored.sum(-1).tolist()}
    if documents is not None:
        out[intervals.DOCUMENT] = [float(d) for d in documents]
    return out


@jax.jit
def _picked_log_probs(logits_bsv, targets_bs):
    """log softmax(logits)[target] per position, in float32 (the log-sum-exp's error is far below the figure's
    interval)."""
    log_probs = jax.nn.log_softmax(logits_bsv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets_bs[..., None], axis=-1)[..., 0]


LOGPROB = intervals.ratio("sum", "count")  # the teacher's mean log-prob per completion token


def continuations(
    models: dict[str, Any], tokenizer, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), documents=None
) -> dict[str, Any]:
    """Greedy continuations by every model (name → Model) and the teacher's log-prob of each model's own text, with
    its 95% interval over prompts (over their `documents` where given: one per prompt). models["teacher"] scores
    them all."""
    from analogjax.models.sampling import generate

    out: dict[str, Any] = {"prompts": [tokenizer.decode(p) for p in prompts], "models": {}}
    # Continuations that stop early (end of text) would give each model its own width, and the teacher a compile each
    width = max(len(p) for p in prompts) + max_new_tokens
    for name, model in models.items():
        completions = generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids)
        rows = teacher_logprob(models["teacher"], prompts, completions, documents, width)
        out["models"][name] = {
            "completions": [tokenizer.decode(c) for c in completions],
            "teacher_logprob": intervals.point(LOGPROB, rows),
            "teacher_logprob_ci95": intervals.ci95(LOGPROB, rows),
            "teacher_logprob_rows": rows,
        }
    return out


def comparison(samples: dict[str, Any], analog: str, baseline: str) -> dict[str, Any]:
    """The paired comparison (same prompts) of two models' teacher log-prob of their own continuations."""
    a, b = samples["models"][analog]["teacher_logprob_rows"], samples["models"][baseline]["teacher_logprob_rows"]
    return intervals.compare("teacher log-prob of own greedy continuations", LOGPROB, a, b, higher_is_better=True)


def markdown(samples: dict[str, Any]) -> str:
    """The continuations side by side: one section per prompt, one line per model."""
    lines = [
        "## Samples",
        "",
        "Greedy continuations of held-out prompts; `teacher log-prob` is the teacher's mean "
        "log-probability per token of that model's own continuation.",
        "",
    ]
    names = list(samples["models"])
    lines += ["| model | teacher log-prob |", "|---|---|"]
    lines += [
        f"| {n} | {intervals.format_interval(m['teacher_logprob'], m.get('teacher_logprob_ci95'))} |"
        for n, m in samples["models"].items()
    ]
    for i, prompt in enumerate(samples["prompts"]):
        lines += ["", f"### Prompt {i + 1}", "", "```", prompt, "```", ""]
        for name in names:
            lines += [f"**{name}**:", "", "```", samples["models"][name]["completions"][i], "```", ""]
    return "\n".join(lines) + "\n"


def plain_text(samples: dict[str, Any], width: int = 100) -> str:
    """For the terminal: each prompt, then each model's continuation on one line (newlines shown as ⏎)."""

    def flat(text: str) -> str:
        return text.replace("\n", "⏎")[:width]

    lines = []
    for i, prompt in enumerate(samples["prompts"]):
        lines.append(f"prompt {i + 1}: {flat(prompt)}")
        for name, got in samples["models"].items():
            lines.append(f"  {name:<9} {flat(got['completions'][i])}")
    return "\n".join(lines)
