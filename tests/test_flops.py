"""The peaks MFU is measured against: a known accelerator's datasheet figure for all its devices, a measurement
elsewhere."""

from __future__ import annotations

import types

import jax

from analogjax.runtime import flops


def _fake_devices(monkeypatch, kind: str, count: int) -> None:
    devices = [types.SimpleNamespace(device_kind=kind) for _ in range(count)]
    monkeypatch.setattr(jax, "devices", lambda *args: devices)


def test_a_known_accelerator_is_quoted_at_its_datasheet_peak_times_its_devices(monkeypatch):
    _fake_devices(monkeypatch, "NVIDIA H200", 2)
    assert flops.vendor_peak_flops() == 2 * flops.PEAK_FLOPS["NVIDIA H200"]
    assert flops.peak_flops_per_second() == 2 * flops.PEAK_FLOPS["NVIDIA H200"]
    _fake_devices(monkeypatch, "TPU v5 lite", 8)
    assert flops.vendor_peak_flops() == 8 * 197e12


def test_a_cpu_has_no_datasheet_peak_and_is_measured(monkeypatch):
    assert jax.devices()[0].device_kind == "cpu"
    assert flops.vendor_peak_flops() is None
    monkeypatch.setattr(flops, "measured_matmul_peak", lambda dtype=None: 123.0)
    assert flops.peak_flops_per_second() == 123.0
