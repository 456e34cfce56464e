"""A model's compute dtype (`model.dtype`): float32, bfloat16, or `auto`, the faster of the two on the machine.

Parameters stay float32 whatever the compute dtype; products take float32 results and sums run in float32
(models/projection.py), so bf16 compute rounds activations, not accumulations.

`auto` is bfloat16 on accelerators (TPU and GPU matrix units run bf16 at several times their float32 rate) and on
CPUs with native bf16 dot instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), where XLA's CPU backend (YNNPACK)
ran bf16 products with float32 results at 2-2.5x its float32 rate (an EPYC with AVX512-BF16, 2 cores: 350-400
against 157-190 GFLOP/s; the demo teacher's forward 0.52 against 0.85 s a batch). Elsewhere it is float32: an
earlier 2-core box without AVX-512 ran bf16 products below its float32 rate (BENCHMARKS.md). So the same config
may compute in another dtype on another machine (its runs then differ in rounding, as float sums of another CPU
do); a run that must be bitwise the same everywhere names its dtype.

`auto` is resolved where the model is traced, after any multi-host start-up (jax.distributed), never when a config
is read: a launcher that reads its config first must not start a JAX backend.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import jax
import jax.numpy as jnp

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; "bf16" is Arm's Features entry


@functools.cache
def cpu_runs_bf16_products(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has native bf16 dot instructions (Linux's /proc/cpuinfo flags; False where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve(name: str, backend: str | None = None) -> str:
    """`name` as a concrete dtype name: float32 and bfloat16 as given, auto by the backend (default: JAX's default
    backend, which starts it) and, on CPU, its instructions."""
    if name != "auto":
        return name
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_runs_bf16_products() else "float32"


def of(name: str):
    """The jnp dtype a model computes in, for its `model.dtype` value."""
    return jnp.bfloat16 if resolve(name) == "bfloat16" else jnp.float32


def product_result():
    """The result dtype a product asks for (preferred_element_type): float32 on CPU, where XLA's backend runs a bf16
    product fast only with a float32 result (a bf16 result: 135-180 against 342-400 GFLOP/s on an AVX512-BF16 CPU);
    None (the operands' dtype) on accelerators, which sum in float32 inside any product, so no float32 result is
    written and converted there. Float32 operands: float32 either way."""
    return jnp.float32 if jax.default_backend() == "cpu" else None


def describe(name: str) -> str:
    """One line for reports: the resolved dtype, and why where `auto` chose it."""
    resolved = resolve(name)
    if name != "auto":
        return resolved
    backend = jax.default_backend()
    has = "with" if resolved == "bfloat16" else "without"
    why = f"{backend} backend" if backend != "cpu" else f"CPU {has} bf16 dot instructions"
    return f"{resolved} (auto: {why}, {platform.machine()})"


__all__ = ["cpu_runs_bf16_products", "describe", "of", "product_result", "resolve"]
