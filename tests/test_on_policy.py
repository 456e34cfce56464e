"""On-policy distillation: rollout batches mask the prompt, the step's loss equals a float64 reverse-KL reference on
the sampled tokens, a resumed on-policy run is bitwise the uninterrupted one, prompts come from the data (prefix or
chat-templated field), and configs that cannot run are refused."""

import json
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from analogjax import on_policy as op_lib
from analogjax.config import load_config
from analogjax.data.prompts import PromptSet
from analogjax.errors import UserError
from analogjax.models.transformer import Transformer
from analogjax.setup import build
from analogjax.train import run_training

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _corpus(tmp_path, with_prompts: bool, n: int = 48):
    rng = np.random.default_rng(0)
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS, 30))
            record = {"text": text}
            if with_prompts:
                record["prompt"] = f"say {WORDS[i % len(WORDS)]} {i}"
            f.write(json.dumps(record) + "\n")
    return path


def _config(tmp_path, *extra, with_prompts=False):
    corpus = _corpus(tmp_path, with_prompts)
    return load_config(
        None,
        [
            "model.preset=tiny",
            "teacher.model.preset=tiny-teacher",
            f"data.sources=[{{path: {corpus}}}]",
            "data.global_batch=8",
            "data.seq_len=32",
            "data.heldout_fraction=0.1",
            "train.steps=4",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            "optim.warmup_steps=0",
            "checkpoint.every=2",
            "checkpoint.async_save=false",
            "distill.on_policy.fraction=1.0",
            "distill.on_policy.prompt_len=8",
            "distill.on_policy.max_new_tokens=12",
            *extra,
        ],
    )


def test_which_steps_are_on_policy():
    assert [s for s in range(12) if op_lib.is_on_policy(s, 0.25)] == [3, 7, 11]
    assert all(op_lib.is_on_policy(s, 1.0) for s in range(5))
    assert not any(op_lib.is_on_policy(s, 0.0) for s in range(5))
    # The prompts of the k-th on-policy step are the k-th block: consecutive on-policy steps never share one.
    assert [op_lib.on_policy_index(s, 0.25) for s in (3, 7, 11)] == [0, 1, 2]


def test_on_policy_step_masks_the_prompt_and_matches_a_float64_reverse_kl(tmp_path):
    config = _config(tmp_path, "distill.temperature=2.0")
    run = build(config)
    on_policy = op_lib.OnPolicy(run)
    params = jax.device_get(run.state.params["model"])
    with jax.set_mesh(run.mesh):
        batch, seconds, sampled = on_policy.batch(run.state, 0)
        host = jax.device_get(batch)
        _, metrics = on_policy.step_fn(run.state, run.teacher_params, batch)
    metrics = jax.device_get(metrics)
    prompts = on_policy.prompts.batch(0, 8)

    lengths = prompts["prompt_lengths"]
    completion = host["loss_mask"].sum(axis=1).astype(int)
    assert sampled == completion.sum() and seconds > 0 and 1 <= completion.min() and completion.max() <= 12
    for row in range(8):
        n, c = lengths[row], completion[row]
        # Row = prompt ⊕ completion ⊕ padding; loss only where the target is a sampled token.
        np.testing.assert_array_equal(host["tokens"][row, :n], prompts["prompts"][row, :n])
        np.testing.assert_array_equal(np.flatnonzero(host["loss_mask"][row]), np.arange(n - 1, n - 1 + c))
        np.testing.assert_array_equal(host["segment_ids"][row], (np.arange(20) < n + c).astype(int))
        np.testing.assert_array_equal(host["targets"][row, :-1], host["tokens"][row, 1:])

    # Reference: full forwards of student (before the update) and teacher, float64 KL(q_T ‖ p_T) on masked tokens.
    student = np.asarray(Transformer(config.model)(params, host["tokens"], host["segment_ids"], host["positions"]))
    teacher = np.asarray(
        Transformer(config.teacher.model)(
            jax.device_get(run.teacher_params), host["tokens"], host["segment_ids"], host["positions"]
        )
    )

    def log_softmax(x):
        x = x.astype(np.float64) / 2.0
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_q, log_p = log_softmax(student), log_softmax(teacher)
    reverse_kl = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    mask = host["loss_mask"]
    want = (reverse_kl * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["loss"] / metrics["count"], want, rtol=2e-4)
    assert metrics["count"] == mask.sum()
    # The teacher's log-probability of the sampled tokens (the on-policy metric) from the same forward.
    teacher_logp = np.take_along_axis(log_softmax(teacher * 2.0), host["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(
        -metrics["teacher_ce"] / metrics["count"], (teacher_logp * mask).sum() / mask.sum(), rtol=1e-4
    )


def test_on_policy_resume_is_bitwise_and_logs_rollout_metrics(tmp_path):
    # Steps 1 and 2 of 3 are on-policy: the resumed run starts on the second (after a checkpoint at step 2), and the
    # uninterrupted run times that one (its first compiled the rollout).
    config = _config(tmp_path, "distill.on_policy.fraction=0.67", "data.heldout_fraction=0.0", "train.steps=3")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    want = jax.device_get(run_training(config, whole, progress=False)["state"])
    # The resumed workdir is the uninterrupted one as it stood after step 2: its checkpoint, metrics up to it.
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    out = run_training(config, resumed, progress=False)
    final = jax.device_get(out["state"])
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["on_policy_step"] for r in train] == [0.0, 1.0, 1.0]
    last = train[-1]  # the resumed run compiled its first on-policy step here: no timing figures, the rest
    assert 1 <= last["completion_len"] <= 12 and last["teacher_logp"] < 0 and last["student_logp"] < 0
    assert "sampling_share" not in last
    uninterrupted = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in uninterrupted if r.get("step") == 3 and "loss" in r][0]
    assert timed["rollout_tokens_per_s"] > 0 and 0 < timed["sampling_share"] < 1 and 0 < timed["mfu"] < 1


def test_field_prompts_use_the_chat_template_as_transformers_does(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 <>|_/")))}
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.WordLevel({**vocab, "[UNK]": len(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": None})
    )
    config = _config(
        tmp_path,
        f"data.tokenizer={folder / 'tokenizer.json'}",
        "distill.on_policy.prompt_len=64",
        "data.add_bos=false",
        "data.add_eos=false",
        with_prompts=True,
    )
    prompts = PromptSet(config.data, config.distill.on_policy, seed=0, vocab_size=512)
    assert prompts.kinds == ["field"]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=template)
    records = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    for i in range(4):
        tokens, _ = prompts.prompt(i)
        text = reference.decode(tokens)
        assert text.startswith("<|im_start|>user say ") and text.endswith("<|im_start|>assistant ")
        content = text[len("<|im_start|>user ") : text.index("<|im_end|>")]
        messages = [{"role": "user", "content": content}]
        want = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert any(r["prompt"] == content for r in records)
        assert tokens.tolist() == list(want)


def test_prefix_prompts_are_document_starts_and_deterministic(tmp_path):
    config = _config(tmp_path)
    first = PromptSet(config.data, config.distill.on_policy, seed=0, vocab_size=512)
    again = PromptSet(config.data, config.distill.on_policy, seed=0, vocab_size=512)
    assert first.kinds == ["prefix"]
    texts = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    starts = {t.encode()[:7] for t in texts}  # the byte tokenizer: BOS, then a document's first 7 bytes
    batch = first.batch(3, 8)
    np.testing.assert_array_equal(batch["prompts"], again.batch(3, 8)["prompts"])
    assert (batch["prompt_lengths"] == 8).all() and (batch["prompts"][:, 0] == 257).all()
    assert all(bytes(row[1:].tolist()) in starts for row in batch["prompts"])
    # Two processes' rows are the two halves of the global batch.
    halves = [first.batch(3, 8, p, 2)["prompts"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), batch["prompts"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.on_policy.terms=[{kind: ce}]"], "trains it towards itself"),
        (["distill.on_policy.max_new_tokens=30"], "must be at most data.seq_len"),
        (["distill.on_policy.top_p=0"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_on_policy_configs_are_refused(tmp_path, overrides, message):
    with pytest.raises(UserError) as info:
        build(_config(tmp_path, *overrides), init=False)
    assert message in str(info.value)


def test_a_cached_teacher_cannot_score_samples(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(UserError, match="needs a live teacher"):
        op_lib.check(config, types.SimpleNamespace(is_cached=True))


def test_no_prompts_in_the_data_is_one_error_line_on_the_cli(tmp_path):
    corpus = _corpus(tmp_path, with_prompts=False)
    config = tmp_path / "on_policy.yaml"
    config.write_text(
        f"model: {{preset: tiny}}\ndata: {{sources: [{{path: {corpus}}}], seq_len: 64}}\n"
        "distill: {on_policy: {fraction: 0.5, prompts: field}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "analogjax", "distill", "--config", str(config), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "no prompts are available in the data" in lines[-1], proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
