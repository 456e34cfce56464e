"""analogjax models in lm-evaluation-harness: on the same weights, AnalogLM scores what lm-eval's own HF model
scores (log-likelihoods of a local multiple-choice task, rolling log-likelihoods, greedy generations), and
`analogjax evaluate-tasks` writes lm-eval's results JSON."""

import json
from pathlib import Path

import numpy as np
import pytest

TASK = Path(__file__).parent / "tasks" / "tiny_choice.yaml"


def test_analog_lm_scores_as_lm_evals_hf_model_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import flax
    import jax
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from analogjax import cli
    from analogjax.evals import load_lm
    from analogjax.evals.tasks import load_tasks, run_tasks
    from analogjax.models import hf
    from analogjax.models.config import ModelConfig
    from analogjax.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64)
    params = jax.device_get(flax.linen.unbox(jax.jit(Transformer(cfg).init_boxed)(jax.random.key(1))))
    folder = tmp_path / "hf"
    hf.save_params(params, cfg, folder, tokenizer="bytes", max_positions=32)

    # Ours through the CLI: lm-eval's results JSON, and each example's responses beside it.
    out = tmp_path / "results.json"
    args = ["evaluate-tasks", "--model", str(folder), "--tasks", str(TASK), "--out", str(out), "--log-samples"]
    assert cli.main([*args, "--batch-size", "8"]) == 0
    assert "tiny_choice: acc,none " in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written["results"]["tiny_choice"]) >= {"acc,none", "alias"} and written["n-samples"]["tiny_choice"]
    ours = [json.loads(line) for line in (tmp_path / "results_samples_tiny_choice.jsonl").read_text().splitlines()]

    reference = HFLM(pretrained=str(folder), batch_size=4, device="cpu", dtype="float32")
    theirs = run_tasks(reference, load_tasks([str(TASK)]))["samples"]["tiny_choice"]
    ours_ll = [r[0] for s in sorted(ours, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    theirs_ll = [r[0] for s in sorted(theirs, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    assert len(ours_ll) == len(theirs_ll) == 18
    np.testing.assert_allclose(ours_ll, theirs_ll, rtol=1e-5, atol=1e-4)
    assert written["results"]["tiny_choice"]["acc,none"] == pytest.approx(np.mean([s["acc"] for s in theirs]))

    # A text longer than the 32-token context (rolling windows), and a greedy continuation cut at a stop string.
    lm = load_lm(str(folder), batch_size=8)
    text = "def value return alpha beta gamma delta for x in range self None True False " * 2
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    np.testing.assert_allclose(lm.loglikelihood_rolling(rolling), reference.loglikelihood_rolling(rolling), rtol=1e-5)
    greedy = [Instance("generate_until", {}, ("def value", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    assert lm.generate_until(greedy) == reference.generate_until(greedy)
