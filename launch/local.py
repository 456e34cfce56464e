#!/usr/bin/env python3
"""Rehearse a pod run on one machine: N processes x M fake CPU devices, joined into one JAX job.

    python launch/local.py --processes 2 --devices 4 -- \
        analogjax distill --config configs/pod_rehearsal_cpu.yaml --workdir runs/x

Every process gets the same command and its place through the environment (ANALOGJAX_COORDINATOR,
ANALOGJAX_NUM_PROCESSES, ANALOGJAX_PROCESS_ID), exactly as a pod's hosts do; CPU collectives run over gloo.
Output lines are prefixed with the process index (process 0 is the one that logs). When one process fails, the
others get `--grace` seconds to exit on their own (JAX's heartbeat makes them) and are then terminated, so the
launcher always returns, with the first failing process's exit status.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(
    base: dict[str, str], *, process_id: int, processes: int, devices: int, port: int, heartbeat: int | None
) -> dict[str, str]:
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["ANALOGJAX_COORDINATOR"] = f"127.0.0.1:{port}"
    env["ANALOGJAX_NUM_PROCESSES"] = str(processes)
    env["ANALOGJAX_PROCESS_ID"] = str(process_id)
    if heartbeat is not None:
        env["ANALOGJAX_HEARTBEAT_TIMEOUT"] = str(heartbeat)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def resolve_command(command: list[str]) -> list[str]:
    """`analogjax ...` runs under this interpreter (python -m analogjax) when no analogjax script is on PATH,
    so a virtual environment that is not activated still works."""
    if command and command[0] == "analogjax" and shutil.which("analogjax") is None:
        return [sys.executable, "-m", "analogjax", *command[1:]]
    return command


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()
    stream.close()


def launch(
    command: list[str],
    *,
    processes: int,
    devices: int,
    port: int | None = None,
    grace: float = 150.0,
    heartbeat: int | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run `command` as `processes` cooperating processes; returns 0 or the first non-zero exit status."""
    port = port or free_port()
    command = resolve_command(command)
    procs, pumps = [], []
    for pid in range(processes):
        proc = subprocess.Popen(
            command,
            env=process_env(
                env or os.environ, process_id=pid, processes=processes, devices=devices, port=port, heartbeat=heartbeat
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{pid}] ", sys.stdout), daemon=True)
        pump.start()
        pumps.append(pump)
    status, failed_at = 0, None
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                code = p.poll()
                if code not in (None, 0) and status == 0:
                    status, failed_at = code, time.monotonic()
                    print(
                        f"launch: process {procs.index(p)} exited with status {code}; waiting up to {grace:.0f}s "
                        "for the others",
                        file=sys.stderr,
                    )
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        print(f"launch: terminating process {procs.index(p)}", file=sys.stderr)
                        os.killpg(p.pid, signal.SIGTERM)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        status = 130
    for p in procs:
        code = p.wait()
        if status == 0 and code != 0:
            status = code
    for pump in pumps:
        pump.join(timeout=5)
    # A process killed by a signal reports -N; the shell convention is 128 + N.
    return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- COMMAND [ARGS...]"
    )
    parser.add_argument("--processes", type=int, default=2, help="JAX processes (pretend hosts)")
    parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument(
        "--grace",
        type=float,
        default=150.0,
        help="seconds the others get to exit after one process fails, before termination",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=None,
        help="seconds of silence after which JAX aborts a job with a dead process",
    )
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        parser.error("put the command to run after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("no command after --")
    if args.processes < 1 or args.devices < 1:
        parser.error("--processes and --devices must be positive")
    return launch(
        command,
        processes=args.processes,
        devices=args.devices,
        port=args.port,
        grace=args.grace,
        heartbeat=args.heartbeat_timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
