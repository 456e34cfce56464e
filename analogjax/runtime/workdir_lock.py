"""One writer per workdir: a run holds WORKDIR/writer.lock while it runs, and a second run on the same workdir is
refused with one `error:` line naming the holder (two runs writing the same checkpoints at once would corrupt both).

The lock is an OS lock (flock) on the file, so it dies with its process: a run killed with -9 leaves the file but not
the lock, and the next run takes it over with a warning naming the run that left it. The file says who holds it
(host, process id, start time, command line). Where the operating system cannot tell (a filesystem shared between
hosts without lock support), the holder's record decides: a holder on this host is stale once its process is gone;
a holder on another host is stale once its heartbeat (the file's modification time, touched every HEARTBEAT_S) is
older than STALE_AFTER_S. A multi-host job locks once: process 0 holds the lock and tells the others whether it got
it (`hold_for_job`).

This module imports no JAX (a lock taken before anything heavy is loaded refuses a second run at once).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from analogjax.errors import UserError

LOCK_FILE = "writer.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirLock:
    """The writer lock of one workdir. `acquire` takes it (or raises a UserError naming the holder); `release`
    gives it back and removes the file (and the folders the lock created, if still empty)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # folders the lock created, deepest first: removed again if left empty
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        self._created = [p for p in (self.workdir, *self.workdir.parents) if not p.exists()]
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = self._lock_file()
        try:
            previous = _read_record(fd)
            if previous:  # the file outlived its run: a crash, a kill -9, a lost host
                if _still_running(previous, time.time() - os.fstat(fd).st_mtime):
                    raise UserError(
                        f"{self.workdir} is in use by another run ({describe(previous)}); wait for it to end or use "
                        f"another --workdir (if that run is dead, delete {self.path})"
                    )
                print(
                    f"warning: {self.workdir}: taking over the lock left by a run that ended without releasing it "
                    f"({describe(previous)})",
                    file=sys.stderr,
                )
            _write_record(fd, _own_record())
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _lock_file(self) -> int:
        """An open descriptor of the lock file, flock'ed by this process."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise UserError(
                    f"{self.workdir} is in use by another run ({describe(holder)}); wait for it to end or use "
                    "another --workdir"
                ) from None
            # The holder may have released (and removed) the file between our open and our flock: then we hold a
            # lock on a file nobody else will look at, and must take the one now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        for folder in self._created:  # a refused run leaves no folder behind; one that wrote something keeps it
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_for_job(workdir: str | os.PathLike, process_index: int, process_count: int) -> Iterator[None]:
    """Hold the workdir's lock for a whole job: process 0 takes it; with several processes, each learns from
    process 0 whether it got it, so a refused job stops on every host (process 0's error names the holder)."""
    if "://" in str(workdir):
        print(f"warning: {workdir}: object storage has no writer lock; make sure one run writes here", file=sys.stderr)
        yield
        return
    lock = WorkdirLock(workdir) if process_index == 0 else None
    error: UserError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as exc:
            error = exc
    if process_count > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if error is None and int(refused):
            error = UserError(f"{workdir} is in use by another run (process 0 of this job names it)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def describe(record: dict | None) -> str:
    """The holder of a lock, for messages."""
    if not record:
        return "holder unknown"
    return (
        f"host {record.get('host')}, process {record.get('pid')}, started {record.get('started')}"
        f"{', running ' + repr(record['command']) if record.get('command') else ''}"
    )


def _still_running(record: dict, heartbeat_age_s: float) -> bool:
    """Whether the run that wrote `record` (whose flock this process just got) may still be running."""
    if record.get("host") != platform.node():
        return heartbeat_age_s < STALE_AFTER_S
    pid = record.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and _process_start(pid) == record.get("process_start")


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot; Linux), to tell it from a later process given its id;
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return -1
        return -1
    # The command name (field 2) may hold spaces and parentheses: fields are counted after its closing one.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _own_record() -> dict:
    return {
        "host": platform.node(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        # Unreadable, yet its flock was free: on this host, that run is gone.
        return {"host": platform.node(), "pid": None, "started": "unknown (unreadable lock file)"}
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
