"""compile-check: slice names → chip grids, the ICI count, and a real AOT compile for a v5e-8 through libtpu."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analogjax.config import load_config
from analogjax.errors import UserError
from analogjax.runtime.compile_check import GIB, Plan, ici_bytes_per_chip, parse_topology
from analogjax.runtime.flops import distill_flops_per_step, param_count

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize(
    "name, chips, libtpu_name, hosts",
    [
        ("v4-8", 4, "v4:2x2x1", 1),
        ("v4-32", 16, "v4:2x2x4", 4),
        ("v5p-256", 128, "v5:4x4x8", 32),
        ("v5e-8", 8, "v5e:2x4", 1),
        ("v5litepod-64", 64, "v5e:8x8", 16),
        ("v6e-256", 256, "v6e:16x16", 64),
    ],
)
def test_slice_names(name, chips, libtpu_name, hosts):
    topology = parse_topology(name)
    assert (topology.chips, topology.libtpu_name, topology.hosts) == (chips, libtpu_name, hosts)


@pytest.mark.parametrize(
    "name, message",
    [
        ("v4-7", "even"),
        ("v5e-48", "not a standard"),
        ("h100-8", "TPU slice name"),
        ("v5p", "TPU slice name"),
    ],
)
def test_bad_slice_names(name, message):
    with pytest.raises(UserError, match=message):
        parse_topology(name)


def test_ici_bytes_follow_the_sharding_rules():
    config = load_config(None, ["model.preset=tiny", "teacher.model.preset=tiny-teacher"])
    student, teacher = 4.0 * param_count(config.model), 4.0 * param_count(config.teacher.model)
    got = ici_bytes_per_chip(config, {"data": 2, "fsdp": 4, "tensor": 1}, with_teacher=True)
    # Student: gathered forward and backward plus a reduce-scatter over fsdp (3 x 3/4), then an all-reduce of its
    # quarter over data (2 x 1/2); teacher: one gather over all 8 chips (7/8).
    want = student * 0.75 * 3 + 2 * (student / 4) * 0.5 + teacher * 7 / 8
    assert got == pytest.approx(want)
    assert ici_bytes_per_chip(config, {"data": 1, "fsdp": 1, "tensor": 1}, with_teacher=True) == 0


@pytest.mark.parametrize("dispatch", ["exchange_tokens", "gather_weights"])
def test_ici_bytes_of_an_moe_teacher_follow_its_dispatch(dispatch):
    """exchange_tokens: the routed experts are gathered over data only (their embed dim), and each MoE layer
    all-gathers the fsdp group's tokens and reduce-scatters float32 outputs; gather_weights: every weight over all."""
    moe = ["experts=4", "top_k=2", "expert_d_ff=48", f"dispatch={dispatch}"]
    config = load_config(
        None,
        ["model.preset=tiny", "teacher.model.preset=tiny-teacher", "data.global_batch=16", "data.seq_len=32"]
        + [f"teacher.model.moe.{m}" for m in moe],
    )
    dense = load_config(None, ["model.preset=tiny", "teacher.model.preset=tiny-teacher"])
    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    student = ici_bytes_per_chip(dense, mesh, with_teacher=False)
    teacher = config.teacher.model
    routed = teacher.n_layers * 4 * 3 * teacher.d_model * 48
    others = 4.0 * (param_count(teacher) - routed)
    if dispatch == "gather_weights":
        want = student + (others + 4.0 * routed) * 7 / 8
    else:
        tokens = 16 / 8 * 32  # rows per chip x seq_len
        exchange = teacher.n_layers * 3 * tokens * teacher.d_model * (4 + 4)
        want = student + others * 7 / 8 + 4.0 * routed / 4 * 1 / 2 + exchange
    assert ici_bytes_per_chip(config, mesh, with_teacher=True) == pytest.approx(want)


def test_fit_and_roofline_arithmetic():
    plan = Plan(
        topology=parse_topology("v5e-8"),
        mesh_shape={"data": 8, "fsdp": 1, "tensor": 1},
        argument_bytes=6 * GIB,
        output_bytes=3 * GIB,
        alias_bytes=3 * GIB,
        temp_bytes=9 * GIB,
        code_bytes=0,
        xla_flops_per_chip=1e12,
        xla_bytes_accessed_per_chip=1e9,
        model_flops_per_step=8 * 197e12,
        recompute_flops_per_step=0.0,
        ici_bytes_per_chip=0.0,
        tokens_per_step=1000,
    )
    assert plan.bytes_per_chip == 15 * GIB and plan.fits  # donated outputs do not count twice
    assert plan.step_seconds == pytest.approx(1.0)  # 197 TFLOP per chip at 197 TFLOP/s
    assert plan.mfu == pytest.approx(1.0)
    bigger = Plan(**{**plan.__dict__, "temp_bytes": 11 * GIB})
    assert not bigger.fits


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'analogjax[tpu]')")
def test_compile_check_on_a_v5e_8(tmp_path):
    """The real distill step, compiled for 8 v5e chips with no TPU here: the last line is the JSON record."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {preset: tiny}\nteacher: {model: {preset: tiny-teacher}}\n"
        "data: {global_batch: 16, seq_len: 64}\nmesh: {data: 4, fsdp: 2, tensor: 1}\ntopology: v5e-8\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "analogjax", "compile-check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["topology"] == "v5e-8" and record["chips"] == 8
    assert record["mesh"] == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
    assert record["fits"] is True and 0 < record["bytes_per_chip"] < record["hbm_per_chip"] == 16 * GIB
    cfg = load_config(config)
    assert record["flops_per_step"] == distill_flops_per_step(cfg.model, cfg.teacher.model, 16 * 64, 64)
    assert record["xla_flops_per_step"] > 0 and 0 < record["roofline_mfu_bound"] <= 1
    assert "memory per chip" in done.stdout and "XLA cost analysis" in done.stdout


def test_topology_is_required(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\n")
    done = subprocess.run(
        [sys.executable, "-m", "analogjax", "compile-check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: no topology")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("pod_*.yaml")), ids=lambda p: p.name
)
def test_pod_configs_name_a_slice_their_mesh_fills(path):
    """Every pod config loads, names its target slice, and its mesh uses exactly that slice's chips. (The full
    compile of the large ones takes minutes; their compile-check records are in launch/README.md.)"""
    from analogjax.mesh import mesh_shape

    config = load_config(path)
    topology = parse_topology(config.topology)
    data, fsdp, tensor = mesh_shape(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, topology.chips, config.mesh.context
    )
    assert config.data.global_batch % (data * fsdp) == 0
    assert config.data.seq_len % config.mesh.context == 0
