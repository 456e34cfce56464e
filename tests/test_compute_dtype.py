"""runtime/compute_dtype: `model.dtype: auto` resolves by the backend and the CPU's bf16 instructions."""

import dataclasses

import jax.numpy as jnp
import pytest

from analogjax.errors import UserError
from analogjax.models import sampling
from analogjax.models.config import ModelConfig
from analogjax.runtime import compute_dtype

EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLDER_X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(EPYC, True), (OLDER_X86, False), (ARM, True), ("", False)])
def test_bf16_dot_instructions_are_read_from_cpuinfo(cpuinfo, native):
    assert compute_dtype.cpu_runs_bf16_products(cpuinfo) is native


def test_auto_is_bf16_on_accelerators_and_on_cpus_with_bf16_dots(monkeypatch):
    for name in ("float32", "bfloat16"):
        assert compute_dtype.resolve(name, backend="tpu") == name == compute_dtype.resolve(name, backend="cpu")
    assert compute_dtype.resolve("auto", backend="tpu") == compute_dtype.resolve("auto", backend="gpu") == "bfloat16"
    monkeypatch.setattr(compute_dtype, "cpu_runs_bf16_products", lambda: True)
    assert compute_dtype.resolve("auto", backend="cpu") == "bfloat16"
    monkeypatch.setattr(compute_dtype, "cpu_runs_bf16_products", lambda: False)
    assert compute_dtype.resolve("auto", backend="cpu") == "float32"
    assert compute_dtype.of("auto") == jnp.float32  # the tests' backend is the CPU
    assert compute_dtype.describe("auto").startswith("float32 (auto: CPU without bf16 dot instructions")


def test_models_compute_in_the_resolved_dtype(monkeypatch):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, dtype="auto")
    for native, want in ((True, jnp.bfloat16), (False, jnp.float32)):
        monkeypatch.setattr(compute_dtype, "cpu_runs_bf16_products", lambda native=native: native)
        assert sampling.init_cache(cfg, 1, 4)["k"].dtype == want
    with pytest.raises(UserError, match="dtype"):
        dataclasses.replace(cfg, dtype="float16").check("model")
