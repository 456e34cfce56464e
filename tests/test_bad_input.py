"""The bad-input battery: every mistake a user can make, per command, run as the user runs it.

Each case is a real subprocess (`python -m analogjax ...`) in its own empty folder, and must end with exit status 2,
exactly one line on stderr, starting with `error:` and naming the fragment given, no `Traceback` anywhere (from any
thread or teardown), and no file changed outside that folder. The shared inputs (a tiny trained run, its HF export,
a teacher cache, corpora, tokenizers, configs) are made once per module through the library API; the cases of one
command run in parallel, and one test per command reports every failing case at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from subprocess_env import cpu_env

from analogjax.config import load_config

WORKERS = 3
RANDOM_TEACHER = "the teacher is randomly initialised"  # a real warning, earned by configs with no teacher given
GOOD = """\
model: {preset: tiny}
teacher: {model: {preset: tiny-teacher}}
data: {sources: [{path: CORPUS}], tokenizer: bytes, global_batch: 8, seq_len: 32, heldout_fraction: 0}
distill: {chunk_size: 64}
optim: {warmup_steps: 0}
checkpoint: {async_save: false}
train: {steps: 2, log_every: 1, eval_batches: 1}
"""


@dataclass
class Case:
    name: str
    args: list[str]
    fragment: str  # must appear in the error line
    # Warnings the case's input earns (and the user asked for, e.g. a random teacher): fragments of allowed lines.
    warnings: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Inputs every case may read (and none may change): made once, through the library API."""
    from analogjax.models import hf
    from analogjax.teacher_cache import CacheLayout, build_cache
    from analogjax.train import run_training

    root = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "value", "None", "for"]
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 80)))}) + "\n" for _ in range(200))
    )
    (root / "empty.jsonl").write_text("")
    (root / "two_docs.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (root / "garbage_tokenizer.json").write_bytes(b"\x00\x01 not a tokenizer {")
    (root / "bad.yaml").write_text("model: {preset: tiny\n")
    (root / "list.yaml").write_text("- model\n- teacher\n")
    (root / "typo.yaml").write_text(GOOD.replace("CORPUS", str(corpus)) + "trian: {steps: 3}\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)))
    good = root / "good.yaml"
    good.write_text(GOOD.replace("CORPUS", str(corpus)))
    config = load_config(good)

    result = run_training(config, root / "run", progress=False)
    hf.save(result["student"], root / "hf")
    for name, edit in {
        "hf_no_config": None,
        "hf_bert": {"architectures": ["BertModel"], "model_type": "bert"},
        "hf_wrong_shape": {"intermediate_size": 256},
    }.items():
        shutil.copytree(root / "hf", root / name)
        if edit is None:
            (root / name / "config.json").unlink()
        else:
            cfg = json.loads((root / name / "config.json").read_text())
            (root / name / "config.json").write_text(json.dumps({**cfg, **edit}))
    cache_cfg = load_config(good, [f"teacher.cache={root / 'cache'}"])
    build_cache(cache_cfg, CacheLayout(kind="topk", k=8), progress=False)
    (root / "not_a_cache").mkdir()
    (root / "empty_checkpoints" / "checkpoints").mkdir(parents=True)
    (root / "a_file").write_text("a file where a folder belongs\n")
    (root / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 12)  # a header cut short
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("someone's work\n")
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_case(case: Case, shared: Path, cases_dir: Path) -> str | None:
    """None if the case failed as it must, else what went wrong."""
    cwd = cases_dir / case.name
    cwd.mkdir(parents=True)
    args = [a.replace("{shared}", str(shared)) for a in case.args]
    env = cpu_env(XDG_CACHE_HOME=str(cwd / ".cache"), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "analogjax", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        check=False,
    )
    lines = [
        line
        for line in proc.stderr.strip().splitlines()
        if not (line.startswith("warning:") and any(w in line for w in case.warnings))
    ]
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}")
    if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
        problems.append("a traceback")
    if len(lines) != 1 or not lines[0].startswith("error:"):
        problems.append(f"{len(lines)} stderr lines, not one error: line")
    elif case.fragment not in lines[0]:
        problems.append(f"the error does not name {case.fragment!r}")
    if not problems:
        return None
    return f"{case.name} ({' '.join(args)}): {'; '.join(problems)}\n    stderr: {proc.stderr[-1500:]!r}"


def run_battery(cases: list[Case], shared: Path, tmp_path: Path) -> None:
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    before = _snapshot(shared)
    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [f for f in pool.map(lambda c: _run_case(c, shared, tmp_path / "cases"), cases) if f]
    after = _snapshot(shared)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        failures.append(f"files outside the commands' own output changed: {changed[:10]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


GOOD_CFG = ["--config", "{shared}/good.yaml"]


def test_config(shared, tmp_path):
    run_battery(
        [
            Case("unknown_key", ["config", *GOOD_CFG, "--set", "train.stepz=3"], "unknown config key: train.stepz"),
            Case("unknown_key_in_file", ["config", "--config", "{shared}/typo.yaml"], "unknown config key: trian"),
            Case("wrong_type", ["config", *GOOD_CFG, "--set", "train.steps=many"], "train.steps"),
            Case(
                "wrong_type_bool",
                ["config", *GOOD_CFG, "--set", "checkpoint.async_save=maybe"],
                "checkpoint.async_save",
            ),
            Case("malformed_yaml", ["config", "--config", "{shared}/bad.yaml"], "malformed YAML"),
            Case("binary_file", ["config", "--config", "{shared}/binary.yaml"], "binary.yaml"),
            Case("top_level_list", ["config", "--config", "{shared}/list.yaml"], "must be a mapping"),
            Case("missing_file", ["config", "--config", "no/such.yaml"], "config file not found"),
            Case("config_is_a_folder", ["config", "--config", "{shared}/full"], "config file not found"),
            Case("set_without_value", ["config", *GOOD_CFG, "--set", "train.steps"], "--set expects key=value"),
            Case("set_malformed_value", ["config", *GOOD_CFG, "--set", "data.sources=[{path: x"], "data.sources"),
            Case("set_into_a_value", ["config", *GOOD_CFG, "--set", "train.steps.every=3"], "is not a section"),
            Case("unknown_preset", ["config", *GOOD_CFG, "--set", "model.preset=huge"], "unknown preset 'huge'"),
            Case("heads_not_dividing", ["config", *GOOD_CFG, "--set", "model.n_heads=3"], "model.n_heads"),
            Case(
                "kv_heads_not_dividing",
                ["config", *GOOD_CFG, "--set", "teacher.model.n_kv_heads=3"],
                "teacher.model.n_kv_heads",
            ),
            Case("negative_steps", ["config", *GOOD_CFG, "--set", "train.steps=-1"], "train.steps must be positive"),
            Case("bad_choice", ["config", *GOOD_CFG, "--set", "train.nonfinite=maybe"], "train.nonfinite"),
            Case("unknown_loss_kind", ["config", *GOOD_CFG, "--set", "distill.terms=[{kind: l2}]"], "distill.terms"),
            Case("unknown_flag", ["config", *GOOD_CFG, "--explian"], "unrecognized arguments"),
        ],
        shared,
        tmp_path,
    )


def test_distill(shared, tmp_path):
    def distill(*more, workdir="w"):
        return ["distill", *GOOD_CFG, "--workdir", workdir, "--no-progress", *more]

    run_battery(
        [
            Case("batch_not_divisible", distill("--set", "data.global_batch=12"), "data.global_batch"),
            Case("heldout_cut_negative", distill("--set", "data.heldout_document_tokens=-5"), "document_tokens"),
            Case("epoch_steps_negative", distill("--set", "data.epoch_steps=-1"), "data.epoch_steps must be >= 0"),
            Case("mesh_too_large", distill("--set", "mesh.data=16"), "16 devices"),
            Case("corpus_missing", distill("--set", "data.sources=[{path: missing.jsonl}]"), "missing.jsonl"),
            Case("corpus_empty", distill("--set", "data.sources=[{path: {shared}/empty.jsonl}]"), "empty.jsonl"),
            Case(
                "corpus_too_small",
                distill("--set", "data.sources=[{path: {shared}/two_docs.jsonl}]", "--set", "data.heldout_fraction=0"),
                "two_docs.jsonl",
                warnings=(RANDOM_TEACHER,),
            ),  # found by the first batch, once the run is built
            # Found by a data worker process: Grain's workers are stopped before exit, so they print nothing.
            Case(
                "corpus_field_missing_in_workers",
                distill(
                    "--set", "data.worker_count=2", "--set", "data.sources=[{path: {shared}/corpus.jsonl, field: body}]"
                ),
                "no key 'body'",
                warnings=(RANDOM_TEACHER,),
            ),
            Case(
                "tokenizer_missing", distill("--set", "data.tokenizer=missing_tokenizer.json"), "missing_tokenizer.json"
            ),
            Case(
                "tokenizer_garbage",
                distill("--set", "data.tokenizer={shared}/garbage_tokenizer.json"),
                "garbage_tokenizer.json",
            ),
            # The case: a teacher checkpoint of another shape than teacher.model (one head count off).
            Case(
                "teacher_checkpoint_wrong_shape",
                distill(
                    "--set",
                    "teacher.checkpoint={shared}/run/checkpoints",
                    "--set",
                    "teacher.model={preset: tiny, n_heads: 2}",
                ),
                "does not fit this model",
            ),
            Case(
                "teacher_checkpoint_missing",
                distill("--set", "teacher.checkpoint=no_such_run"),
                "checkpoint directory not found",
            ),
            Case(
                "teacher_checkpoint_empty",
                distill("--set", "teacher.checkpoint={shared}/empty_checkpoints"),
                "no complete checkpoint",
            ),
            Case(
                "init_path_wrong_shape",
                distill("--set", "checkpoint.init_path={shared}/run/checkpoints", "--set", "model.d_ff=128"),
                "does not fit this model",
                warnings=(RANDOM_TEACHER,),
            ),
            Case("hf_missing", distill("--set", "teacher.hf_path=no_such_model"), "no_such_model"),
            Case("hf_no_config_json", distill("--set", "teacher.hf_path={shared}/hf_no_config"), "config.json"),
            Case(
                "hf_unsupported_architecture",
                distill("--set", "teacher.hf_path={shared}/hf_bert"),
                "unsupported architecture",
            ),
            Case("hf_wrong_tensor_shape", distill("--set", "teacher.hf_path={shared}/hf_wrong_shape"), "shape"),
            Case("cache_not_a_cache", distill("--set", "teacher.cache={shared}/not_a_cache"), "holds no teacher cache"),
            Case(
                "cache_does_not_match",
                distill("--set", "teacher.cache={shared}/cache", "--set", "train.steps=3"),
                "covers 2 steps",
            ),
            Case(
                "cache_other_data",
                distill("--set", "teacher.cache={shared}/cache", "--set", "train.seed=1"),
                "does not match this run",
            ),
            Case("workdir_is_a_file", distill(workdir="{shared}/a_file"), "not a directory"),
            Case(
                "workdir_of_another_config",
                distill("--set", "model.d_ff=128", workdir="{shared}/run"),
                "different model config",
            ),
        ],
        shared,
        tmp_path,
    )


def test_demo(shared, tmp_path):
    run_battery(
        [
            Case("unknown_key", ["demo", "--set", "run.trian.steps=1"], "run.trian"),
            Case("bad_value", ["demo", "--set", "teacher_steps=0"], "teacher_steps"),
            Case("wrong_type", ["demo", "--set", "tokenizer_vocab=big"], "tokenizer_vocab"),
            Case("missing_config", ["demo", "--config", "nowhere.yaml"], "config file not found"),
            Case("workdir_is_a_file", ["demo", "--workdir", "{shared}/a_file"], "a_file"),
        ],
        shared,
        tmp_path,
    )


def test_prepare(shared, tmp_path):
    def prepare(input_="{shared}/corpus.jsonl", tokenizer="bytes", output="out", *more):
        return ["prepare", "--input", input_, "--tokenizer", tokenizer, "--output", output, "--workers", "1", *more]

    run_battery(
        [
            Case("input_missing", prepare("missing.jsonl"), "missing.jsonl"),
            Case("input_empty", prepare("{shared}/empty.jsonl"), "empty.jsonl"),
            Case("input_field_missing", prepare("{shared}/corpus.jsonl", "bytes", "out", "--field", "body"), "body"),
            Case("tokenizer_missing", prepare(tokenizer="no_tokenizer.json"), "no_tokenizer.json"),
            Case("tokenizer_garbage", prepare(tokenizer="{shared}/garbage_tokenizer.json"), "garbage_tokenizer.json"),
            Case("output_not_empty", prepare(output="{shared}/full"), "full"),
            Case("output_is_a_file", prepare(output="{shared}/a_file"), "a_file"),
            Case("bad_format", prepare("{shared}/corpus.jsonl", "bytes", "out", "--format", "csv"), "--format"),
        ],
        shared,
        tmp_path,
    )


def test_cache_teacher(shared, tmp_path):
    def cache(*more):
        return ["cache-teacher", *GOOD_CFG, "--no-progress", *more]

    run_battery(
        [
            Case("no_destination", cache(), "teacher.cache"),
            Case("k_too_large", cache("--out", "c", "--k", "100000"), "cache k", warnings=(RANDOM_TEACHER,)),
            Case(
                "no_teacher_in_objective",
                cache("--out", "c", "--set", "distill.terms=[{kind: ce}]"),
                "nothing to cache",
            ),
            Case(
                "teacher_checkpoint_wrong_shape",
                cache("--out", "c", "--set", "teacher.checkpoint={shared}/run/checkpoints"),
                "does not fit this model",
            ),
            Case("config_error", cache("--out", "c", "--set", "data.seq_len=0"), "data.seq_len"),
            Case(
                "corpus_field_missing_in_workers",
                cache(
                    "--out",
                    "c",
                    "--set",
                    "data.worker_count=2",
                    "--set",
                    "data.sources=[{path: {shared}/corpus.jsonl, field: body}]",
                ),
                "no key 'body'",
                warnings=(RANDOM_TEACHER,),
            ),
            Case(
                "out_holds_another_cache",
                cache("--out", "{shared}/cache", "--set", "train.seed=1"),
                "another configuration",
                warnings=(RANDOM_TEACHER,),
            ),
        ],
        shared,
        tmp_path,
    )


def test_eval(shared, tmp_path):
    def evaluate(*more):
        return ["eval", *GOOD_CFG, *more]

    run_battery(
        [
            Case("checkpoint_missing", evaluate("--checkpoint", "nowhere"), "nowhere"),
            Case("checkpoint_not_a_run", evaluate("--checkpoint", "{shared}/full"), "neither a run's workdir"),
            Case("checkpoint_empty", evaluate("--checkpoint", "{shared}/empty_checkpoints"), "no complete checkpoint"),
            Case("model_differs", evaluate("--checkpoint", "{shared}/run", "--set", "model.d_ff=128"), "another shape"),
            Case("batches_zero", evaluate("--checkpoint", "{shared}/run", "--batches", "0"), "--batches"),
        ],
        shared,
        tmp_path,
    )


def test_export(shared, tmp_path):
    run_battery(
        [
            Case("out_not_empty", ["export", "--checkpoint", "{shared}/run", "--out", "{shared}/full"], "not empty"),
            Case(
                "out_is_a_file", ["export", "--checkpoint", "{shared}/run", "--out", "{shared}/a_file"], "not a folder"
            ),
            Case("checkpoint_missing", ["export", "--checkpoint", "nowhere", "--out", "o"], "nowhere"),
            Case(
                "checkpoint_empty",
                ["export", "--checkpoint", "{shared}/empty_checkpoints", "--out", "o"],
                "no complete checkpoint",
            ),
            Case("bad_dtype", ["export", "--checkpoint", "{shared}/run", "--out", "o", "--dtype", "int8"], "--dtype"),
        ],
        shared,
        tmp_path,
    )


def test_release(shared, tmp_path):
    run_battery(
        [
            Case(
                "out_is_a_file", ["release", "--checkpoint", "{shared}/run", "--out", "{shared}/a_file"], "not a folder"
            ),
            Case("out_not_empty", ["release", "--checkpoint", "{shared}/run", "--out", "{shared}/full"], "not empty"),
            Case("checkpoint_missing", ["release", "--checkpoint", "nowhere", "--out", "o"], "nowhere"),
            Case(
                "checkpoint_not_a_run",
                ["release", "--checkpoint", "{shared}/hf", "--out", "o"],
                "neither a run's workdir",
            ),
        ],
        shared,
        tmp_path,
    )


def test_compile_check(shared, tmp_path):
    run_battery(
        [
            Case("unknown_topology", ["compile-check", *GOOD_CFG, "--topology", "v9-999"], "v9-999"),
            Case("malformed_topology", ["compile-check", *GOOD_CFG, "--topology", "v5p"], "v5p"),
            Case("no_topology", ["compile-check", *GOOD_CFG], "no topology"),
            Case("config_error", ["compile-check", *GOOD_CFG, "--set", "topology=7"], "topology"),
        ],
        shared,
        tmp_path,
    )


def test_gguf_teachers(shared, tmp_path):
    run_battery(
        [
            Case(
                "gguf_missing",
                ["distill", *GOOD_CFG, "--set", "teacher.gguf_path=nowhere.gguf", "--no-progress"],
                "nowhere.gguf",
            ),
            Case(
                "gguf_truncated",
                ["distill", *GOOD_CFG, "--set", "teacher.gguf_path={shared}/truncated.gguf", "--no-progress"],
                "truncated.gguf",
            ),
            Case(
                "gguf_and_hf_both",
                [
                    "distill",
                    *GOOD_CFG,
                    "--set",
                    "teacher.gguf_path={shared}/truncated.gguf",
                    "--set",
                    "teacher.hf_path={shared}/hf",
                    "--no-progress",
                ],
                "not both",
            ),
        ],
        shared,
        tmp_path,
    )


def test_generate(shared, tmp_path):
    def generate(*more):
        return ["generate", "--checkpoint", "{shared}/run", "--prompt", "def f(x):", *more]

    run_battery(
        [
            Case("max_new_tokens_zero", generate("--max-new-tokens", "0"), "--max-new-tokens"),
            Case("top_p_above_one", generate("--top-p", "1.5"), "top_p"),
            Case("top_k_negative", generate("--top-k", "-1"), "top_k"),
            Case("temperature_negative", generate("--temperature", "-0.5"), "temperature"),
            Case("prompt_longer_than_context", generate("--prompt", "x" * 200), "context"),
            Case("checkpoint_missing", ["generate", "--checkpoint", "nowhere", "--prompt", "a"], "nowhere"),
            Case("hf_unsupported", ["generate", "--hf", "{shared}/hf_bert", "--prompt", "a"], "BertModel"),
            Case("no_source", ["generate", "--prompt", "a"], "--checkpoint"),
        ],
        shared,
        tmp_path,
    )


def test_prune(shared, tmp_path):
    def prune(*more, out="pruned"):
        return ["prune", *GOOD_CFG, "--out", out, "--no-progress", *more]

    run_battery(
        [
            Case("out_exists", prune(out="{shared}/full"), "exists"),
            Case("head_dim_differs", prune(), "head dim"),
            Case("larger_than_teacher", prune("--set", "model={preset: tiny-teacher, n_layers: 8}"), "larger"),
            Case("heads_not_in_whole_groups", prune("--set", "model={preset: tiny-teacher, n_kv_heads: 1}"), "KV"),
            Case(
                "teacher_unloadable",
                prune("--set", "model={preset: tiny-teacher, n_layers: 2}", "--set", "teacher.checkpoint=nowhere"),
                "nowhere",
            ),
            Case("batches_zero", prune("--batches", "0"), "--batches"),
        ],
        shared,
        tmp_path,
    )
