"""`analogjax demo` end to end at toy size, and the shipped configs stay loadable and in sync."""

import json
from pathlib import Path

from analogjax.config import load_config
from analogjax.demo import DemoConfig, load_demo_config
from test_cli import analogjax

ROOT = Path(__file__).resolve().parent.parent

TOY = ["--set", "teacher_steps=6", "--set", "run.train.steps=6", "--set", "tokenizer_vocab=0",
       "--set", "run.model.vocab_size=259", "--set", "run.teacher.model.vocab_size=259",
       "--set", "run.data.seq_len=32", "--set", "run.data.global_batch=8", "--set", "run.train.eval_batches=2",
       "--set", "run.train.log_every=3"]


def test_toy_demo_writes_summary_and_table(tmp_path):
    proc = analogjax("demo", "--workdir", str(tmp_path), "--no-progress", *TOY, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("teacher", "analog", "baseline"):
        assert summary[name]["params"] > 0 and summary[name]["heldout_ce"] > 0
    for name in ("analog", "baseline"):
        assert summary[name]["kl_teacher"] >= 0 and 0 <= summary[name]["agreement"] <= 1
    assert summary["analog"]["params"] < summary["teacher"]["params"]
    assert summary["wall_seconds"] > 0
    assert "analog" in proc.stdout and "kl_teacher" in proc.stdout
    for phase in ("teacher", "analog", "baseline"):
        assert (tmp_path / phase / "metrics.jsonl").exists()
    # The demo ends with the release bundle: a HF folder, its model card and the fidelity report.
    bundle = tmp_path / "release"
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json", "fidelity/fidelity.json",
                 "fidelity/fidelity.md", "fidelity/cka.png"):
        assert (bundle / name).exists(), name
    fidelity = json.loads((bundle / "fidelity" / "fidelity.json").read_text())
    assert abs(fidelity["overall"]["forward_kl"] - summary["analog"]["kl_teacher"]) < 1e-3


def test_demo_yaml_is_the_embedded_default():
    assert load_demo_config(str(ROOT / "configs/demo.yaml"), []) == DemoConfig()


def test_every_shipped_config_loads():
    paths = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo.yaml")
    # An empty configs/ must fail here, not pass vacuously: these are the configs README and launch/ name.
    assert {"tiny.yaml", "pod_rehearsal_cpu.yaml"} <= {p.name for p in paths}
    for path in paths:
        load_config(path)


def test_default_token_cache_is_inside_the_test_session_tmp():
    """Tests never write to the user's home: the token cache's default lies under the session's temporary root."""
    import os
    import tempfile

    from analogjax.data.spec import DataConfig, resolved_cache_dir

    assert os.path.realpath(resolved_cache_dir(DataConfig())).startswith(os.path.realpath(tempfile.gettempdir()))
