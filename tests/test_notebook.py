"""The Colab notebook runs top to bottom on this machine's CPU (tiny overrides), table and loss curve included."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from test_demo import TOY_SETS  # noqa: E402

from analogjax.data.spec import DataConfig, resolved_cache_dir  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "colab_demo.ipynb"

# The toy demo's settings: the notebook's demo compiles the programs test_demo's and test_release's demos compile.
TINY = [
    *TOY_SETS,
    # Reuse the tokenized-corpus cache the other tests fill instead of one inside the workdir.
    f"run.data.cache_dir={resolved_cache_dir(DataConfig())}",
]


def test_notebook_executes_on_cpu(tmp_path, monkeypatch):
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
    for name in ("teacher", "analog", "baseline"):
        assert name in table
    assert (workdir / "summary.json").exists()
    assert (workdir / "loss_curves.png").stat().st_size > 0


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
