"""Huge pages for the host allocator of analogjax's own processes (analogjax/runtime/huge_pages.py)."""

import os
import subprocess
import sys

from analogjax.runtime.huge_pages import TUNABLE, glibc_version, thp_mode, tunables_with_huge_pages


def test_added_only_where_it_changes_something():
    new = (2, 36)
    assert tunables_with_huge_pages({}, new, "madvise") == f"{TUNABLE}=1"
    # other tunables are kept, in order
    given = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert tunables_with_huge_pages(given, new, "madvise") == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    # a user's own setting wins, including the opt-out
    assert tunables_with_huge_pages({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, new, "madvise") is None
    assert tunables_with_huge_pages({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=2"}, new, "madvise") is None
    # a glibc without the tunable, a C library that is not glibc, a kernel that gives huge pages anyway or never
    assert tunables_with_huge_pages({}, (2, 34), "madvise") is None
    assert tunables_with_huge_pages({}, (), "madvise") is None
    assert tunables_with_huge_pages({}, new, "always") is None
    assert tunables_with_huge_pages({}, new, "never") is None
    assert tunables_with_huge_pages({}, new, "") is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    assert thp_mode(enabled) == "madvise"
    enabled.write_text("[always] madvise never\n")
    assert thp_mode(enabled) == "always"
    assert thp_mode(tmp_path / "absent") == ""


def test_an_entry_point_re_executes_itself_once():
    """A real process: the same pid and command line after the re-execution, the tunable in its environment, and
    no second re-execution. Where this machine's glibc or kernel make it pointless, the process is left alone."""
    code = (
        "import os, sys\n"
        "print('start', os.getpid(), flush=True)\n"
        "from analogjax.runtime.huge_pages import reexec_with_huge_pages\n"
        "reexec_with_huge_pages()\n"
        "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code, "an-argument"], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    runs = [line for line in out if line.startswith("run")]
    assert len(runs) == 1 and "['an-argument']" in runs[0]
    expected = tunables_with_huge_pages({}, glibc_version(), thp_mode()) if sys.platform == "linux" else None
    if expected is None:
        assert len(starts) == 1 and TUNABLE not in runs[0]
    else:
        assert len(starts) == 2 and {s.split()[1] for s in starts} == {runs[0].split()[1]}  # exec keeps the pid
        assert f"{TUNABLE}=1" in runs[0]


def test_a_process_that_cannot_re_execute_runs_on(monkeypatch):
    """execv failing (no permission, a vanished interpreter) leaves the process running with its environment as it
    was, never half-changed."""
    from analogjax.runtime import huge_pages

    def refuse(*_):
        raise PermissionError("not here")

    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(huge_pages.os, "execv", refuse)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    huge_pages.reexec_with_huge_pages()
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    huge_pages.reexec_with_huge_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
