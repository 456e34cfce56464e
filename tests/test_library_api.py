"""The README's bring-your-own-teacher examples (plain JAX, Flax NNX, Equinox) run as printed."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _run_example(name: str, tmp_path, monkeypatch) -> dict:
    block = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, f"README.md lost its {name}"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    namespace = _run_example("library-example", tmp_path, monkeypatch)
    heldout = namespace["result"]["heldout"]
    assert set(heldout) >= {"ce", "teacher_ce", "kl", "agreement"}
    assert namespace["result"]["step"] == 4
    assert (tmp_path / "runs/byo-teacher/metrics.jsonl").exists()


@pytest.mark.parametrize("name, workdir", [("nnx-example", "nnx-teacher"), ("equinox-example", "equinox-teacher")])
def test_readme_framework_teachers_distill(name, workdir, tmp_path, monkeypatch):
    """An NNX and an Equinox model each serve as the teacher: the run distills from them (KL to them is measured)
    and the student can be saved as a HF folder from the run's result."""
    from analogjax import hf

    result = _run_example(name, tmp_path, monkeypatch)["result"]
    assert result["step"] == 2
    assert result["heldout"]["kl"] > 0 and result["heldout"]["teacher_ce"] > 0
    hf.save(result["student"], tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
