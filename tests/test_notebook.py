"""The Colab notebook runs top to bottom on this machine's CPU at a tiny scale, as a user runs it: the real-teacher
demo (a GGUF teacher: its tokenizer rebuilt from the file, the recipe of pruning → teacher cache → distillation →
on-policy, the controls, evaluation against the live teacher with intervals, transfer checks, samples, the comparison,
the fidelity curves and the release). A tiny random Llama written as a GGUF (tests/test_gguf.py's writer) stands in
for SmolLM2-135M: the same code path, in a minute instead of five."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("gguf")

from test_gguf import D_MODEL, HEADS, KV_HEADS, TEXTS, make_bpe, make_hf_llama, write_gguf  # noqa: E402

from analogjax.models import gguf as gguf_lib  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "colab_demo.ipynb"


def tiny_sets(gguf_path: Path, corpus: Path, vocab: int) -> list[str]:
    """The real demo at toy size: a 1-layer analog of the GGUF teacher's family, 3 steps of 8 x 32, every row and
    measure on (one transfer pair, two samples, four on-policy-phase steps)."""
    return [
        f"gguf_path={gguf_path}",
        "pruned_ce_row=true",
        f"run.data.sources=[{{path: {corpus}}}]",
        "run.data.heldout_fraction=0.2",
        f"run.model.vocab_size={vocab}",
        "run.model.d_model=32",
        "run.model.n_layers=1",
        f"run.model.n_heads={KV_HEADS}",
        f"run.model.n_kv_heads={KV_HEADS}",
        f"run.model.head_dim={D_MODEL // HEADS}",
        "run.model.d_ff=64",
        "run.data.global_batch=8",
        "run.data.seq_len=32",
        "run.train.steps=3",
        "run.train.log_every=1",
        "run.train.eval_batches=1",
        "run.recipe.prune_batches=1",
        "run.recipe.cache_k=8",
        "run.recipe.on_policy_steps=4",  # the demo's fraction (a quarter): step 3, the last, on its own samples
        "run.recipe.on_policy.prompt_len=8",
        "run.recipe.on_policy.max_new_tokens=8",
        "samples=2",
        "sample_prompt_tokens=4",
        "sample_new_tokens=3",
        "transfer_fit_batches=1",
        "transfer_eval_batches=1",
        "transfer_pairs=1",
    ]


def test_notebook_runs_the_real_teacher_demo_on_cpu(tmp_path, monkeypatch):
    bpe = make_bpe()
    gguf_path = write_gguf(tmp_path / "teacher.gguf", make_hf_llama(bpe), bpe, "Q8_0", tied=True)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXTS[i % 3] * (1 + i % 4)}) + "\n" for i in range(200)))
    workdir = tmp_path / "demo"
    monkeypatch.setenv("ANALOGJAX_DEMO_WORKDIR", str(workdir))
    monkeypatch.setenv("ANALOGJAX_DEMO_SET", shlex.join(tiny_sets(gguf_path, corpus, len(bpe[0]))))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel and its demo inherit the test process's 8 fake devices
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [
        "".join(out.get("text", "") for out in cell.get("outputs", []))
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]
    table = next(text for text in outputs if "kl_teacher" in text)
    for name in ("teacher", "analog", "analog (random init)", "pruned, CE only", "baseline", "better proxy"):
        assert name in table, name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["teacher"]["source"] == str(gguf_path)
    assert set(summary["phase_seconds"]) == set(
        "teacher pruned_init teacher_cache distill on_policy analog_random pruned_ce baseline"
        " evaluate transfer samples release".split()
    )
    rows = ["analog", "analog_distill", "analog_random", "pruned_ce", "baseline"]
    assert summary["rows"] == rows and summary["released"] == "analog"
    for name in rows:
        assert summary[name]["kl_teacher"] > 0 and 0 <= summary[name]["agreement"] <= 1
        assert summary[name]["teacher_logprob_own_samples"] < 0
    # The analog's on-policy phase continued it on its own 8-token samples, scored by the live teacher.
    trained = summary["analog"]["on_policy_training"]
    assert 1 <= trained["completion_len"] <= 8 and trained["teacher_logp"] < 0
    # The pruned start is the teacher cut down: the recipe's first phase, with its importance report.
    assert (workdir / "analog" / "pruned_init" / "importance.json").is_file()
    # The demo's cache holds ids sampled from the teacher (recipe.cache_kind), as the card says.
    cache = json.loads((workdir / "analog" / "teacher_cache" / "provenance.json").read_text())["layout"]
    assert (cache["kind"], cache["k"]) == ("sampled", 8)
    assert len(summary["samples"]["prompts"]) == 2 and set(summary["samples"]["models"]) == {"teacher", *rows}
    card = (workdir / "release" / "README.md").read_text()
    assert gguf_lib.gguf_provenance(gguf_path)["sha256"] in card and "teacher cache" in card
    assert "8 ids per token sampled from the teacher" in card
    assert "## Samples" in card and (workdir / "release" / "samples.md").is_file()
    # The transfer checks of analog and baseline, in summary.json and (the analog's) in the card.
    for name in ("analog", "baseline"):
        assert {"layer_pairs", "stitch", "probes", "steering"} <= set(summary[name]["transfer"])
    assert "Do findings on this analog hold on the teacher?" in card
    assert (workdir / "curves.png").stat().st_size > 0


def test_install_cell_installs_the_clone_it_was_opened_from(monkeypatch):
    """Opened from a clone (Jupyter's cwd is notebooks/), the install cell pip-installs that checkout; it names no
    placeholder repository."""
    import importlib.util
    import subprocess

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code" and "pip" in c.source)
    assert "YOUR_ORG" not in cell.source and "git+" not in cell.source
    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "analogjax" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, *a, **k: calls.append(cmd))
    monkeypatch.delenv("ANALOGJAX_SOURCE", raising=False)
    monkeypatch.chdir(NOTEBOOK.parent)
    exec(compile(cell.source, "install-cell", "exec"), {})
    assert len(calls) == 1 and calls[0][-1] == str(NOTEBOOK.parent.parent.resolve())
