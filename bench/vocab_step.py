"""The distill step at frontier vocabularies against a hand-rolled one: tokens/s and peak memory (issue #30).

bench/step.py's models (student 256 wide, 4 layers; teacher 512, 8; batch 8 x 256 tokens; float32) with the vocabulary
raised to Llama 3's 131,072 (and Gemma 3's 262,144 on request), two steps of the same work:

- `analogjax`: the library's step (setup.build, as `analogjax distill` runs it): the fused chunked loss, parameters
  born sharded, the state donated.
- `hand_rolled`: what a user writes without it: the same decoder trunks (analogjax.models.transformer.Decoder, so
  the FLOPs are equal), both models' full [batch, seq, vocab] logits, the default objective (forward KL 0.5 + CE
  0.5) from `jax.nn.log_softmax`, `jax.value_and_grad`, the same optax chain (global-norm clipping, AdamW), one
  `jax.jit` donating params and optimizer state.

Each case runs in a subprocess of its own, so its peak resident set (ru_maxrss) is its own: `peak_rss_mb`, and
`inputs_rss_mb` (after the models, optimizer state and batch exist, before the first step) for the working memory
the step adds. Times are medians of `--repeats` steps after compilation and one warm step. The summary line gives
the ratios of one run (the box's speed cancels): `tokens_per_s_ratio` (analogjax / hand-rolled) and
`peak_rss_ratio`.

    python bench/vocab_step.py [--vocab 131072 [262144]] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# bench/step.py: the same models, the same batch, the same timing (importing it adds the CLI's XLA settings)
from step import BENCH_OVERRIDES, synthetic_batch, time_steps  # noqa: E402

CASES = ("analogjax", "hand_rolled")


def _rss_mb() -> float:
    """This process's peak resident set so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_bytes(key: str) -> int | None:
    """The accelerator allocator's figure (`bytes_in_use`, `peak_bytes_in_use`); None where the backend keeps none
    (the CPU's resident set is the measure there)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get(key)


def _config(vocab: int, overrides: list[str]):
    from analogjax.config import load_config

    vocabs = [f"model.vocab_size={vocab}", f"teacher.model.vocab_size={vocab}"]
    return load_config(None, BENCH_OVERRIDES + vocabs + overrides)


def run_analogjax(vocab: int, repeats: int, overrides: list[str]) -> dict:
    import jax

    from analogjax.setup import build

    config = _config(vocab, overrides)
    run = build(config)
    batch = jax.device_put(synthetic_batch(config.data.global_batch, config.data.seq_len, vocab), run.batch_sharding)
    jax.block_until_ready((run.state, run.teacher_params, batch))
    inputs, device_inputs = _rss_mb(), _device_bytes("bytes_in_use")
    times, _ = time_steps(run, batch, repeats)
    return {"config": config, "times": times, "inputs_rss_mb": inputs, "device_inputs_bytes": device_inputs}


def run_hand_rolled(vocab: int, repeats: int, overrides: list[str]) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from analogjax.models.transformer import Decoder

    config = _config(vocab, overrides)
    batch = {
        k: jnp.asarray(v) for k, v in synthetic_batch(config.data.global_batch, config.data.seq_len, vocab).items()
    }
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    student, teacher = Decoder(config.model), Decoder(config.teacher.model)
    s_params = nn.unbox(jax.jit(student.init)(jax.random.key(0), *args))
    t_params = nn.unbox(jax.jit(teacher.init)(jax.random.key(1), *args))
    optim = config.optim
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
    )
    opt_state = tx.init(s_params)

    def full_logits(model, cfg, params):
        hidden = model.apply(params, *args).hidden_bsd
        p = params["params"]
        head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
        return hidden @ head  # [batch, seq, vocab], float32

    def loss_fn(params, teacher_params):
        log_p = jax.nn.log_softmax(jax.lax.stop_gradient(full_logits(teacher, config.teacher.model, teacher_params)))
        log_q = jax.nn.log_softmax(full_logits(student, config.model, params))
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        ce = -jnp.take_along_axis(log_q, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        return jnp.sum((0.5 * kl + 0.5 * ce) * mask) / jnp.sum(mask)  # the default objective's two terms

    def step(params, opt_state, teacher_params):
        loss, grads = jax.value_and_grad(loss_fn)(params, teacher_params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    jax.block_until_ready((s_params, t_params, opt_state))
    inputs, device_inputs = _rss_mb(), _device_bytes("bytes_in_use")
    # Timed exactly as the library's step: bench/step.py's time_steps, on a one-device mesh (nothing to shard).
    run = types.SimpleNamespace(
        state=(s_params, opt_state),
        teacher_params=t_params,
        mesh=jax.make_mesh((1,), ("data",)),
        step_fn=lambda state, teacher_params, _batch: _split(step(*state, teacher_params)),
    )
    times, _ = time_steps(run, batch, repeats)
    return {"config": config, "times": times, "inputs_rss_mb": inputs, "device_inputs_bytes": device_inputs}


def _split(out):
    """(params, opt_state, loss) -> ((params, opt_state), loss): time_steps' (state, metrics)."""
    params, opt_state, loss = out
    return (params, opt_state), loss


def one_case(case: str, vocab: int, repeats: int, overrides: list[str]) -> dict:
    import jax

    got = (run_analogjax if case == "analogjax" else run_hand_rolled)(vocab, repeats, overrides)
    step_s = statistics.median(got["times"])
    data = got["config"].data
    line = {
        "bench": "vocab_step",
        "case": case,
        "vocab": vocab,
        "batch": data.global_batch,
        "seq_len": data.seq_len,
        "tokens_per_s": round(data.global_batch * data.seq_len / step_s, 1),
        "step_s": round(step_s, 4),
        "times_s": [round(t, 4) for t in got["times"]],
        "inputs_rss_mb": round(got["inputs_rss_mb"], 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "repeats": repeats,
        "devices": len(jax.devices()),
        "backend": jax.default_backend(),
    }
    peak = _device_bytes("peak_bytes_in_use")
    if peak is not None:  # an accelerator: its own allocator's peak is the memory that matters
        line |= {"device_inputs_bytes": got["device_inputs_bytes"], "device_peak_bytes": peak}
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config key=value (both cases)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process (the children)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case, args.vocab[0], args.repeats, args.overrides)), flush=True)
        return
    for vocab in args.vocab:
        lines = {}
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--vocab", str(vocab), "--repeats", str(args.repeats)]
            command += [f"--set={override}" for override in args.overrides]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"error: the {case} case at vocab {vocab} failed:\n{out.stderr[-2000:]}")
            line = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(line), flush=True)
            lines[case] = line
        ours, theirs = lines["analogjax"], lines["hand_rolled"]
        summary = {
            "bench": "vocab_step_summary",
            "vocab": vocab,
            "tokens_per_s_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
            "peak_rss_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
            "working_rss_ratio": round(
                (ours["peak_rss_mb"] - ours["inputs_rss_mb"])
                / max(theirs["peak_rss_mb"] - theirs["inputs_rss_mb"], 1e-9),
                3,
            ),
        }
        if "device_peak_bytes" in ours and "device_peak_bytes" in theirs:
            summary["device_peak_ratio"] = round(ours["device_peak_bytes"] / theirs["device_peak_bytes"], 3)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
