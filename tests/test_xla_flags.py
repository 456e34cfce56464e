"""The XLA settings analogjax's processes add for themselves (analogjax/runtime/xla_flags.py)."""

import os

from analogjax.runtime.xla_flags import CPU_FLAGS, add_cpu_flags

NAME = "--xla_cpu_experimental_ynn_fusion_type"


def test_added_where_absent_and_kept_once():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert add_cpu_flags(environ, "0.10.2") == [f"{NAME}={CPU_FLAGS[NAME][0]}"]
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", f"{NAME}=-reduce"]
    assert add_cpu_flags(environ, "0.10.2") == []  # a second call (main() run again, a child process) adds nothing
    assert environ["XLA_FLAGS"].count(NAME) == 1
    empty: dict[str, str] = {}
    add_cpu_flags(empty, "0.10.7")
    assert empty == {"XLA_FLAGS": f"{NAME}=-reduce"}


def test_a_users_own_setting_wins():
    environ = {"XLA_FLAGS": f"{NAME}=dot,reduce"}
    assert add_cpu_flags(environ, "0.10.2") == []
    assert environ["XLA_FLAGS"] == f"{NAME}=dot,reduce"


def test_an_unmeasured_jaxlib_gets_nothing():
    """An unknown flag aborts every JAX process: a jaxlib the flag is not known for runs without it."""
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert add_cpu_flags(environ, "0.11.0") == []
    assert add_cpu_flags(environ, "0.1.0") == []  # a prefix match is on "0.10.", not "0.1"
    assert environ == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_this_session_runs_with_them():
    """conftest adds them like the CLI does (this jaxlib accepted them, or no test would run at all)."""
    assert f"{NAME}=-reduce" in os.environ["XLA_FLAGS"].split()
