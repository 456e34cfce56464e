"""Checkpoints in process: async save vs donation, restore onto another mesh, the teacher restored sharded and
read-only, partial checkpoints skipped, non-finite steps never saved, the workdir identity guard, and the background
writer (data position of the save's step, lowest priority, failures raised)."""

import json
import os
import shutil
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic import packed_batch

from analogjax import checkpoint as ckpt_lib
from analogjax import mesh as mesh_lib
from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.models.transformer import Transformer
from analogjax.setup import build, build_mesh
from analogjax.step import TrainState
from analogjax.teacher import Teacher, load_teacher
from analogjax.train import _claim_workdir, _guard_workdir, run_training

TINY = [
    "model.preset=tiny",
    "teacher.model.preset=tiny-teacher",
    "data.global_batch=8",
    "data.seq_len=32",
    "train.steps=10",
    "optim.warmup_steps=0",
    "distill.chunk_size=64",
]
CE_ONLY = ["distill.terms=[{kind: ce}]"]


def _abstract(run):
    return run.abstract_state


def _assert_bitwise(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon's state holds optax's MaskedNodes
def test_async_save_survives_donation_and_restores_onto_another_mesh(tmp_path, optimizer):
    config = load_config(None, TINY + CE_ONLY + [f"optim.name={optimizer}"])
    saver = build(config, mesh=mesh_lib.make_mesh(8, 1, 1))
    batch = jax.device_put(packed_batch(8, 32, 512), saver.batch_sharding)
    with jax.set_mesh(saver.mesh):
        state, _ = saver.step_fn(saver.state, None, batch)  # non-trivial optimizer moments
        # Read a device copy: on CPU a host view of `state` itself would pin its buffers and silently stop donation.
        want = jax.device_get(jax.tree.map(jnp.copy, state))
        checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=True)
        checkpointer.save(1, state, None, {"identity": {}})
        # What the loop does next: donate the state into the following step while the files are being written.
        newer, _ = saver.step_fn(state, None, batch)
        jax.block_until_ready(newer)
        assert jax.tree.leaves(state.params)[0].is_deleted(), "the step no longer donates: this test needs it to"
        checkpointer.close()

    # init=False, as a resume builds: the restore target is the abstract state (no fresh state compiled and made).
    loader = build(config, mesh=mesh_lib.make_mesh(1, 2, 4), init=False)
    restored = ckpt_lib.Checkpointer(tmp_path).restore(1, _abstract(loader), None)
    _assert_bitwise(jax.device_get(restored), want)
    assert jax.tree.map(lambda a: a.sharding, restored) == loader.state_shardings
    assert not all(a.sharding.is_fully_replicated for a in jax.tree.leaves(restored.params))


def test_teacher_restores_sharded_and_read_only(tmp_path):
    config = load_config(None, TINY + [f"teacher.checkpoint={tmp_path}"])
    model = Transformer(config.teacher.model)
    # A teacher is any analogjax checkpoint's params item, e.g. a pretraining run saved on data=8.
    params, _ = mesh_lib.init_sharded(
        model.init_boxed, jax.random.key(3), mesh_lib.make_mesh(8, 1, 1), mesh_lib.STUDENT_RULES
    )
    saved = TrainState(step=jnp.int32(7), params={"model": params}, opt_state={}, rng=jnp.zeros(2, jnp.uint32))
    checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(7, saved, None, {"identity": {}})
    checkpointer.close()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    mesh = mesh_lib.make_mesh(1, 2, 4)
    _, teacher_params = load_teacher(config, mesh)
    _assert_bitwise(jax.device_get(teacher_params), jax.device_get(params))
    target = mesh_lib.abstract_sharded(model.init_boxed, mesh, mesh_lib.TEACHER_RULES)
    assert jax.tree.map(lambda a: a.sharding, teacher_params) == jax.tree.map(lambda a: a.sharding, target)
    # Sharded: no device holds a whole embedding table.
    embedding = teacher_params["params"]["embedding"]
    assert embedding.addressable_shards[0].data.size < embedding.size
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, cleaned or deleted

    student_shaped = mesh_lib.abstract_sharded(Transformer(config.model).init_boxed, mesh, mesh_lib.STUDENT_RULES)
    with pytest.raises(UserError, match="does not fit this model"):
        ckpt_lib.restore_params(tmp_path, student_shaped)
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt_lib.restore_params(tmp_path / "7" / "meta", student_shaped)


def _small_state(value: float) -> TrainState:
    return TrainState(
        step=jnp.int32(int(value)),
        params={"model": {"w": jnp.full((4, 8), value)}},
        opt_state={"mu": jnp.full((4, 8), -value)},
        rng=jnp.zeros(2, jnp.uint32),
    )


def test_partial_checkpoints_are_skipped_with_a_warning(tmp_path, capsys):
    checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _small_state(step), None, {"identity": {}})
    checkpointer.close()
    # A save cut short by a crash: Orbax's temporary folder for step 3, never renamed into a step.
    shutil.copytree(tmp_path / "2", tmp_path / f"3{ckpt_lib.TMP_MARKER}")
    os.remove(tmp_path / f"3{ckpt_lib.TMP_MARKER}" / "train" / "manifest.ocdbt")
    # A committed step truncated afterwards (a broken copy, a disk filling up): its train item lost its index.
    os.remove(tmp_path / "2" / "train" / "manifest.ocdbt")

    reopened = ckpt_lib.Checkpointer(tmp_path)
    assert reopened.latest_step() == 1
    err = capsys.readouterr().err
    assert "discarding partially written checkpoint" in err and "skipping incomplete checkpoint" in err
    assert not (tmp_path / f"3{ckpt_lib.TMP_MARKER}").exists()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _small_state(0))
    _assert_bitwise(jax.device_get(reopened.restore(1, abstract, None)), jax.device_get(_small_state(1)))
    reopened.close()


POISON = "~"  # byte 126: the poisoned teacher below answers NaN to any batch containing it


def _poisoned_run(tmp_path, nonfinite: str):
    """A real user's failure: a bring-your-own teacher that overflows to NaN on some inputs."""
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(200):
            text = " ".join(rng.choice(words, rng.integers(3, 12)))
            f.write(json.dumps({"text": text + (POISON if i % 25 == 0 else "")}) + "\n")
    config = load_config(
        None,
        TINY
        + [
            f"data.sources=[{{path: {corpus}}}]",
            "data.heldout_fraction=0.0",
            "data.read_threads=1",
            "train.steps=8",
            "train.log_every=1",
            "checkpoint.every=1",
            "checkpoint.keep=10",
            f"train.nonfinite={nonfinite}",
            "distill.fused=false",
        ],
    )
    model = Transformer(config.teacher.model)
    params, _ = mesh_lib.init_sharded(model.init_boxed, jax.random.key(1), build_mesh(config), mesh_lib.TEACHER_RULES)

    def logits(p, tokens, segment_ids, positions):
        out = model(p, tokens, segment_ids, positions)
        return jnp.where(jnp.any(tokens == ord(POISON)), jnp.nan, out)

    teacher = Teacher(logits=logits, rules=tuple(mesh_lib.TEACHER_RULES), vocab_size=model.cfg.vocab_size)
    return config, teacher, params


def _poisoned_steps(config) -> list[int]:
    from analogjax.data import make_batch_iterator

    iterator = make_batch_iterator(
        config.data,
        split="train",
        seed=config.train.seed,
        vocab_size=config.model.vocab_size,
        process_index=0,
        process_count=1,
    )
    return [
        step
        for step, batch in zip(range(1, config.train.steps + 1), iterator)
        if (batch["tokens"] == ord(POISON)).any()
    ]


def test_nonfinite_halts_or_skips_and_never_reaches_disk(tmp_path):
    config, teacher, teacher_params = _poisoned_run(tmp_path, "halt")
    poisoned = _poisoned_steps(config)
    assert poisoned and poisoned[0] > 1 and len(poisoned) < config.train.steps, poisoned  # a mix of both

    with pytest.raises(ckpt_lib.NonFiniteError, match=f"step {poisoned[0]}"):
        run_training(config, tmp_path / "halt", teacher=teacher, teacher_params=teacher_params, progress=False)
    halted = ckpt_lib.Checkpointer(tmp_path / "halt" / "checkpoints")
    assert halted.all_steps() == list(range(1, poisoned[0]))

    config, teacher, teacher_params = _poisoned_run(tmp_path, "skip")
    result = run_training(config, tmp_path / "skip", teacher=teacher, teacher_params=teacher_params, progress=False)
    assert result["step"] == config.train.steps
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    flagged = [r["step"] for r in records if r.get("nonfinite") == 1.0]
    assert flagged == poisoned
    run = result["run"]
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "skip" / "checkpoints")
    abstract = _abstract(run)
    saved = {s: jax.device_get(checkpointer.restore(s, abstract, None)) for s in checkpointer.all_steps()}
    for step, state in saved.items():
        assert int(state.step) == step
        assert all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.opt_state)))
    for step in poisoned:  # a skipped step kept the previous params and optimizer state exactly
        _assert_bitwise(
            (saved[step].params, saved[step].opt_state), (saved[step - 1].params, saved[step - 1].opt_state)
        )
    clean = next(s for s in range(2, config.train.steps + 1) if s not in poisoned)
    assert not np.array_equal(
        saved[clean].params["model"]["params"]["embedding"], saved[clean - 1].params["model"]["params"]["embedding"]
    )
    checkpointer.close()


def test_workdir_of_another_model_or_data_is_refused_unless_allowed(tmp_path):
    def guard_and_claim(config):  # what run_training does (it claims the workdir once data has flowed)
        if _guard_workdir(tmp_path, config):
            _claim_workdir(tmp_path, config)

    guard_and_claim(load_config(None, TINY))
    guard_and_claim(load_config(None, TINY + ["train.steps=20"]))  # same model and data: a resume
    # Which held-out rows evaluations read changes no training batch: a resume too (and the workdirs written before
    # these keys existed keep their identity).
    evaluation_only = ["data.heldout_shuffle_rows=64", "data.heldout_document_tokens=256"]
    guard_and_claim(load_config(None, TINY + evaluation_only))
    with pytest.raises(UserError, match="different data config"):
        guard_and_claim(load_config(None, TINY + ["data.shuffle_rows=64"]))
    with pytest.raises(UserError, match="different data config"):  # epochs change which batch a step reads
        guard_and_claim(load_config(None, TINY + ["data.epoch_steps=4"]))
    with pytest.raises(UserError, match="different model config.*allow_config_change"):
        guard_and_claim(load_config(None, TINY + ["model.d_ff=128"]))
    with pytest.raises(UserError, match="different data config"):
        guard_and_claim(load_config(None, TINY + ["data.seq_len=64"]))
    guard_and_claim(load_config(None, TINY + ["data.seq_len=64", "checkpoint.allow_config_change=true"]))
    guard_and_claim(load_config(None, TINY + ["data.seq_len=64"]))  # run.json now holds the new config


def test_resume_trims_metrics_after_the_restored_step(tmp_path):
    lines = [{"step": s, "loss": float(s)} for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')
    kept = ckpt_lib.trim_metrics(tmp_path, 4)
    assert kept == lines[:4]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [json.dumps(r) for r in lines[:4]]


def test_background_save_keeps_the_data_position_of_its_step(tmp_path):
    dataset = grain.MapDataset.range(1000).to_iter_dataset()
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = _small_state(3)
    checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=True)
    checkpointer.save(3, state, iterator, {"identity": {}})
    # The loop reads on while the writer thread works; the checkpoint must still hold the position at the save.
    read_after = [next(iterator) for _ in range(5)]
    checkpointer.close()

    resumed = iter(dataset)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = ckpt_lib.Checkpointer(tmp_path).restore(3, abstract, resumed)
    _assert_bitwise(jax.device_get(restored), jax.device_get(state))
    assert [next(resumed) for _ in range(5)] == read_after == [3, 4, 5, 6, 7]


def test_background_save_runs_at_lowest_priority_and_its_failure_is_raised(tmp_path, monkeypatch):
    main_priority = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=True)
    seen = []

    def failing_save(*args, **kwargs):
        seen.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointer.manager, "save", failing_save)
    checkpointer.save(3, _small_state(3), None, {"identity": {}})  # returns: the write happens (and fails) later
    with pytest.raises(OSError, match="No space left"):
        checkpointer.wait()
    [(writer, priority)] = seen
    assert writer != threading.get_native_id(), "the files must be written off the training thread"
    if sys.platform.startswith("linux"):
        assert priority == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_priority, "only the writer"
    checkpointer.save(4, _small_state(3), None, {"identity": {}})  # a later failure is raised by close as well
    with pytest.raises(OSError, match="No space left"):
        checkpointer.close()
