"""`analogjax --help` and `analogjax prepare` (a host-only command) never import JAX or its libraries: help is instant
and preparing a corpus works on a machine without an accelerator stack. Checked from `python -X importtime`, which
every process reports on stderr, including the worker processes `prepare` spawns (multiprocessing passes -X on)."""

import subprocess
import sys

HEAVY = {"jax", "jaxlib", "flax", "optax", "orbax"}


def _run(*args, cwd):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "analogjax", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _imported(stderr: str) -> tuple[set[str], int]:
    """(the modules imported, the number of processes that reported) from -X importtime's lines:
    `import time: <self us> | <cumulative us> | <indent><module>`, each process starting with a header line."""
    modules, processes = set(), 0
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        name = line.split("|")[-1].strip()
        if name == "imported package":
            processes += 1
        else:
            modules.add(name)
    return modules, processes


def _heavy(modules: set[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & HEAVY)


def test_help_imports_no_jax(tmp_path):
    for args in (("--help",), ("prepare", "--help"), ("demo", "--help")):
        modules, _ = _imported(_run(*args, cwd=tmp_path).stderr)
        assert "analogjax.cli" in modules  # the parse worked: the check saw the CLI's own imports
        assert not _heavy(modules), (args, _heavy(modules))


def test_prepare_and_its_workers_import_no_jax(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: a few words of plain text\n")
    proc = _run(
        "prepare",
        "--input",
        str(corpus / "*.txt"),
        "--tokenizer",
        "bytes",
        "--output",
        str(tmp_path / "shards"),
        "--workers",
        "2",
        cwd=tmp_path,
    )
    assert "wrote 4 documents" in proc.stdout
    modules, processes = _imported(proc.stderr)
    assert processes >= 3, "expected the parent and two workers to report their imports"
    assert "analogjax.data.prepare" in modules
    assert not _heavy(modules), _heavy(modules)


def test_reading_and_refusing_a_config_imports_no_jax(tmp_path):
    """`analogjax config` resolves and checks a config (the objective's terms included, by the term registry)
    without JAX; so a refused config costs no JAX start-up either."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {steps: 3}\ndistill: {terms: [{kind: jsd, beta: 0.3}, {kind: ce}]}\n")
    modules, _ = _imported(_run("config", "--config", str(config), cwd=tmp_path).stderr)
    assert "analogjax.config" in modules and not _heavy(modules), _heavy(modules)
    for bad, message in (("train.steps=x", "error: train.steps"), ("distill.terms=[{kind: kl}]", "unknown loss term")):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "analogjax", "config", "--config", str(config), "--set", bad],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not _heavy(_imported(proc.stderr)[0])
