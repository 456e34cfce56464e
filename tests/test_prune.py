"""Pruning (analogjax/models/prune.py): identity at the teacher's own shape, planted dead units lost first, slicing
equal to an independently masked teacher, sharding-invariant importance, a pruned start far closer to the teacher than a
random one, and the command's refusals."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_env import cpu_env

from analogjax import mesh as mesh_lib
from analogjax.data import to_global_batch
from analogjax.models import prune
from analogjax.models.config import ModelConfig
from analogjax.models.transformer import Transformer
from analogjax.models.transformer import logits as head_logits
from tests.synthetic import packed_batch

LLAMA = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
FAMILIES = {
    "llama": LLAMA,
    "qwen2": dataclasses.replace(LLAMA, qkv_bias=True),
    "qwen3": dataclasses.replace(LLAMA, qk_norm=True),
    # Gemma 2 covers Gemma's options too (tanh-GELU, embedding scale, norm offset, tied embeddings).
    "gemma2": dataclasses.replace(
        LLAMA,
        activation="gelu_tanh",
        embed_scale=True,
        norm_offset=1.0,
        tie_embeddings=True,
        norm_placement="sandwich",
        attn_softcap=50.0,
        final_softcap=30.0,
        query_scalar=8.0,
        sliding_window=4,
        layer_pattern=("sliding", "full"),
    ),
    "olmo2": dataclasses.replace(LLAMA, norm_placement="post", qk_norm=True, qk_norm_scope="all_heads"),
}


def random_params(cfg, mesh, seed=0, scale=1.0):
    """Sharded teacher params with every leaf (norms and biases too) perturbed, so slicing errors show."""
    params, shardings = mesh_lib.init_sharded(
        Transformer(cfg).init_boxed, jax.random.key(seed), mesh, mesh_lib.TEACHER_RULES
    )
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [scale * (x + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return jax.device_put(jax.tree.unflatten(tree, noisy), shardings)


def batches(mesh, vocab, n=1, rows=8, seq=16):
    sharding = mesh_lib.batch_sharding(mesh)
    return [
        to_global_batch(
            {
                k: v
                for k, v in packed_batch(rows, seq, vocab, seed=i).items()
                if k in ("tokens", "segment_ids", "positions")
            },
            sharding,
        )
        for i in range(n)
    ]


def random_importance(cfg):
    rng = np.random.default_rng(1)
    heads = rng.random((cfg.n_layers, cfg.n_heads))
    groups = np.sqrt((heads**2).reshape(cfg.n_layers, cfg.kv_heads, -1).sum(-1))
    return {
        "heads": heads,
        "kv_groups": groups,
        "neurons": rng.random((cfg.n_layers, cfg.d_ff)),
        "channels": rng.random(cfg.d_model),
        "block": rng.random(cfg.n_layers),
    }


def tokens(vocab):
    return jnp.asarray(np.random.default_rng(7).integers(1, vocab, (2, 12)), jnp.int32)


def prune_params(params, teacher, student, mesh):
    imp = prune.gather_importance(teacher, params, batches(mesh, teacher.vocab_size, n=2), mesh, progress=False)
    keep = prune.choose(imp, teacher, student)
    return imp, keep, prune.slice_params(params, teacher, student, keep, mesh)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_at_own_shape_and_slicing_equals_the_masked_teacher(family):
    """At the teacher's own shape pruning is the identity (bit-equal logits). Cutting heads, KV groups, neurons and
    layers (width d_model kept): the student's logits equal the teacher's run with the dropped heads' wo rows and
    neurons' w_down rows zeroed and the dropped layers skipped (OLMo 2 norms q/k over all heads at once, so dropping
    heads changes its norm: identity only)."""
    teacher = FAMILIES[family]
    mesh = mesh_lib.make_mesh(-1, 1, 1, devices=jax.devices()[:1])  # sharding: see the 8-device tests below
    params = random_params(teacher, mesh, seed=3)
    if family in ("gemma2", "olmo2"):  # their norm placements feed the channel importance differently
        imp = prune.gather_importance(teacher, params, batches(mesh, teacher.vocab_size), mesh, progress=False)
    else:  # slicing is checked for any ranking; measured importance: the planted and sharded tests
        imp = random_importance(teacher)
    tok = tokens(teacher.vocab_size)
    model = Transformer(teacher)

    keep = prune.choose(imp, teacher, teacher)
    assert keep["layers"].tolist() == list(range(teacher.n_layers))
    # On the teacher's shardings the same params give bit-identical logits (the student's own rules shard
    # differently, which only reorders float sums).
    same = jax.device_put(
        prune.slice_params(params, teacher, teacher, keep, mesh), jax.tree.map(lambda a: a.sharding, params)
    )
    np.testing.assert_array_equal(np.asarray(model(same, tok)), np.asarray(model(params, tok)))
    if family == "olmo2":
        return

    student = dataclasses.replace(teacher, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=40)
    keep = prune.choose(imp, teacher, student)
    pruned = prune.slice_params(params, teacher, student, keep, mesh)
    group = teacher.n_heads // teacher.kv_heads
    # GQA consistency: every kept query head sits in a kept KV group, the same number per group.
    for heads, groups in zip(keep["heads"], keep["kv_groups"]):
        np.testing.assert_array_equal(
            np.asarray(heads).reshape(len(groups), -1) // group,
            np.repeat(groups[:, None], len(heads) // len(groups), axis=1),
        )
    masked = jax.tree.map(np.array, params)
    layers = masked["params"]["layers"]
    for s, layer in enumerate(keep["layers"]):
        layers["attn"]["wo"][layer, np.setdiff1d(np.arange(teacher.n_heads), keep["heads"][s])] = 0
        layers["mlp"]["w_down"][layer, np.setdiff1d(np.arange(teacher.d_ff), keep["neurons"][s])] = 0

    @jax.jit
    def reference(p, tok):
        x = model.embed(p, tok)
        for layer in keep["layers"]:
            x = model.block(p, int(layer), x)
        return head_logits(p, teacher, model.finish(p, x))

    expected = reference(masked, tok)
    np.testing.assert_allclose(np.asarray(Transformer(student)(pruned, tok)), np.asarray(expected), atol=2e-5)


def test_planted_dead_units_are_pruned_first():
    cfg = LLAMA
    mesh = mesh_lib.make_mesh(-1, 1, 1, devices=jax.devices()[:1])
    params = jax.tree.map(np.array, random_params(cfg, mesh, seed=5))
    p = params["params"]
    p["layers"]["attn"]["wo"][2] = 0  # layer 2 writes nothing: an identity block
    p["layers"]["mlp"]["w_down"][2] = 0
    p["layers"]["attn"]["wv"][0, :, 1] = 0  # layer 0: KV group 1 (heads 2, 3) outputs zeros
    p["layers"]["mlp"]["w_up"][1, :, :8] = 0  # layer 1: neurons 0..7 never fire
    for dead in (3, 5):  # residual channels 3 and 5 stay zero: nothing writes them
        p["embedding"][:, dead] = 0
        p["layers"]["attn"]["wo"][..., dead] = 0
        p["layers"]["mlp"]["w_down"][..., dead] = 0
    student = dataclasses.replace(cfg, n_layers=3, d_model=30, n_heads=2, n_kv_heads=1, d_ff=40)
    imp, keep, _ = prune_params(jax.tree.map(jnp.asarray, params), cfg, student, mesh)
    assert imp["block"][2] < 1e-6 < imp["block"].min(initial=1, where=np.arange(4) != 2)
    assert keep["layers"].tolist() == [0, 1, 3]
    assert keep["kv_groups"][0].tolist() == [0] and keep["heads"][0].tolist() == [0, 1]
    assert keep["neurons"][1].tolist() == list(range(8, 48))
    assert sorted(set(range(32)) - set(keep["channels"].tolist())) == [3, 5]
    assert imp["heads"][0, 2:].max() == 0 and imp["neurons"][1, :8].max() == 0 and imp["channels"][[3, 5]].max() == 0


def test_importance_sharded_on_8_devices_equals_one_device():
    cfg = FAMILIES["qwen3"]
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = mesh_lib.make_mesh(-1, 1, 1 if len(devices) == 1 else 2, devices=devices)
        params = random_params(cfg, mesh, seed=11)
        results.append(prune.gather_importance(cfg, params, batches(mesh, cfg.vocab_size), mesh, progress=False))
    one, eight = results
    assert one["tokens"] == eight["tokens"] > 0
    for key in ("heads", "kv_groups", "neurons", "channels", "block"):
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, atol=1e-7, err_msg=key)


def _corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "pruned", "teacher", "student", "analog", "jax", "mesh"]
    with open(tmp_path / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(200))
    return tmp_path / "corpus.jsonl"


def _config(tmp_path, model, teacher_checkpoint=None, **checkpoint):
    from analogjax.config import Config, from_dict

    raw = {
        "model": model,
        "teacher": {"model": {"preset": "tiny-teacher", "vocab_size": 512}, "checkpoint": teacher_checkpoint},
        "data": {
            "sources": [{"path": str(_corpus(tmp_path))}],
            "tokenizer": "bytes",
            "global_batch": 8,
            "seq_len": 32,
            "heldout_fraction": 0.2,
        },
        "checkpoint": checkpoint,
        "train": {"steps": 2, "eval_batches": 1},
    }
    return from_dict(Config, raw)


def test_pruned_checkpoint_starts_a_run_far_closer_to_the_teacher_than_random(tmp_path):
    """A random teacher written as a checkpoint; the pruned student (full depth, 15/16 of the channels, 5/6 of the
    FFN neurons) starts a run via checkpoint.init_path whose first held-out KL is far below a random init's. (A
    random teacher with large weights is chaotic: any cut, even of FFN neurons alone, is then no better than random;
    at init scale the pruned student keeps most of its function.)"""
    from analogjax.checkpoint import Checkpointer
    from analogjax.release import export_run
    from analogjax.run_dir import run_config
    from analogjax.setup import build, evaluate
    from analogjax.train import restore_or_init

    teacher_cfg = _config(tmp_path, {"like_teacher": {}})
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    teacher_params = random_params(teacher_cfg.teacher.model, mesh, seed=2)
    prune.write_checkpoint(
        tmp_path / "teacher",
        teacher_params,
        teacher_cfg,
        mesh,
        {"teacher_source": {"kind": "random"}, "kept_layers": [0, 1, 2, 3]},
    )
    shape = {"d_model": 120, "head_dim": 32, "d_ff": 320}
    config = _config(tmp_path, {"like_teacher": shape}, str(tmp_path / "teacher"))
    summary = prune.prune_to(config, tmp_path / "pruned", batches=2, progress=False)
    assert summary["kept_layers"] == [0, 1, 2, 3] and Path(summary["plot"]).stat().st_size > 0
    report = json.loads((tmp_path / "pruned" / prune.IMPORTANCE_JSON).read_text())
    assert report["student"]["d_model"] == 120 and len(report["kept_channels"]) == 120
    with pytest.raises(prune.UserError, match="exists"):
        prune.prune_to(config, tmp_path / "pruned", batches=1)

    run_cfg, *_ = run_config(tmp_path / "pruned")  # what eval and export read
    assert run_cfg.model == config.model
    export_run(tmp_path / "pruned", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()

    started = dataclasses.replace(
        config, checkpoint=dataclasses.replace(config.checkpoint, init_path=str(tmp_path / "pruned"))
    )
    run = build(started, mesh=mesh)
    state = restore_or_init(run, Checkpointer(tmp_path / "work" / "checkpoints", async_save=False), None)
    pruned_kl = evaluate(run, state.params["model"], 1)["kl"]
    random_kl = evaluate(run, run.state.params["model"], 1)["kl"]
    assert pruned_kl < 0.4 * random_kl, (pruned_kl, random_kl)


ROOT = Path(__file__).resolve().parent.parent


def _cli(*args):
    env = cpu_env()
    return subprocess.run(
        [sys.executable, "-m", "analogjax", "prune", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["model.like_teacher.d_model=256", "model.like_teacher.head_dim=32"], "larger than the teacher"),
        (["model.like_teacher.n_heads=4", "model.like_teacher.n_kv_heads=1"], "whole KV groups"),
        (["teacher.checkpoint={tmp}/no-such-teacher"], "checkpoint directory not found"),
        (["model.like_teacher.d_model=64"], "head dim"),
        ([], "exists"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, sets, fragment):
    config = tmp_path / "prune.yaml"
    config.write_text(
        "model: {like_teacher: {}}\nteacher: {model: {preset: tiny-teacher}}\ndata: {global_batch: 8, seq_len: 32}\n"
    )
    out = tmp_path / "out"
    if fragment == "exists":
        out.mkdir()
    args = ["--config", str(config), "--out", str(out)]
    for item in sets:
        args += ["--set", item.format(tmp=tmp_path)]
    proc = _cli(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in errors[0], errors[0]
    assert fragment == "exists" or not out.exists()
