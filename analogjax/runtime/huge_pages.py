"""Transparent huge pages for the host memory of analogjax's own processes (the CLI, bench/), set as they start.

Why: XLA's CPU runtime allocates a program's large temporaries afresh at every execution, and glibc serves blocks that
large with fresh mmap()s, so each execution first touches every 4 KiB page of them again, one page fault each. On the
2-core box (BENCHMARKS.md, "Page faults", 2026-12-04) the demo student's step faulted 71,586 pages a step (~2 µs each
in that VM) and took 0.65 s; with glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35: malloc asks the kernel for
transparent huge pages, 2 MiB, on what it maps) 514 faults and 0.50 s. Only the kernel's THP mode `madvise` (a common
default) needs the tunable: mode `always` gives huge pages already, mode `never` gives none.

glibc reads tunables once, when a process starts, so an entry point whose environment lacks it re-executes itself
with it added: the same interpreter, arguments, process id and environment otherwise, before any command runs. A
library import changes nothing (another codebase's process keeps its own allocator), and a tunable the environment
already names is left as it is (GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
MIN_GLIBC = (2, 35)  # the first glibc with the tunable (older ones ignore it: nothing gained, nothing broken)
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_ENABLED) -> str:
    """The kernel's transparent-huge-page mode, the bracketed word of `path` ('' where the file says none)."""
    try:
        found = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return ""
    return found.group(1) if found else ""


def glibc_version() -> tuple[int, ...]:
    """The running C library's glibc version, () when it is not glibc (musl, macOS, Windows)."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):  # no confstr, or a platform without that name
        return ()
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if name == "glibc" and found else ()


def tunables_with_huge_pages(environ: Mapping[str, str], glibc: tuple[int, ...], mode: str) -> str | None:
    """GLIBC_TUNABLES with huge pages for malloc added, or None where adding them would change nothing (the tunable
    already named, a glibc without it, a THP mode other than madvise)."""
    given = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == TUNABLE for item in given.split(":")):
        return None
    if not glibc or glibc < MIN_GLIBC or mode != "madvise":
        return None
    return f"{given}:{TUNABLE}=1" if given else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
    """Re-execute this process (same interpreter and command line) with huge pages for malloc where that changes
    anything; otherwise return. Call first thing in a process's entry point, never from a library function."""
    if sys.platform != "linux" or not sys.executable:  # an embedded interpreter has no executable to run again
        return
    tunables = tunables_with_huge_pages(os.environ, glibc_version(), thp_mode())
    if tunables is None:
        return
    given = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # not re-executable here: run on with 4 KiB pages (slower, same results)
        if given is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = given


__all__ = ["reexec_with_huge_pages", "tunables_with_huge_pages", "thp_mode", "glibc_version"]
