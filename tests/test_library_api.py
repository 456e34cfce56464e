"""The README's bring-your-own-teacher example runs as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its library example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    heldout = namespace["result"]["heldout"]
    assert set(heldout) >= {"ce", "teacher_ce", "kl", "agreement"}
    assert namespace["result"]["step"] == 4
    assert (tmp_path / "runs/byo-teacher/metrics.jsonl").exists()
