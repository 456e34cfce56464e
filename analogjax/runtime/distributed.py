"""Multi-host runs: every host (or every rehearsal process) runs the same program; JAX joins them into one job.

How a process learns its place, first match wins:
  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` on the command line, or the environment
     variables ANALOGJAX_COORDINATOR, ANALOGJAX_NUM_PROCESSES, ANALOGJAX_PROCESS_ID (CPU and GPU clusters, the
     local rehearsal launcher, SLURM scripts that prefer to be explicit);
  2. detected: on a TPU VM (a Google PCI device is attached) or inside a multi-task SLURM allocation,
     `jax.distributed.initialize()` asks the platform (TPU metadata server, SLURM variables) for all three;
  3. otherwise one process, no distributed runtime at all.

Roles: every process computes, reads its own share of the data and writes its shards of every checkpoint;
only process 0 logs, shows progress and writes reports (`is_main`).

Failure: the coordination service exchanges heartbeats with every process. When a process dies, the service (or,
if the coordinator itself died, each client) notices within `heartbeat_timeout_s` and JAX aborts the surviving
processes, so a pod whose worker was preempted exits non-zero instead of hanging in a collective forever. The pod
launcher then relaunches the whole job from its last checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from analogjax.errors import UserError

ENV_COORDINATOR = "ANALOGJAX_COORDINATOR"
ENV_NUM_PROCESSES = "ANALOGJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ANALOGJAX_PROCESS_ID"
ENV_HEARTBEAT = "ANALOGJAX_HEARTBEAT_TIMEOUT"

# JAX's own default: long enough to ride out a slow checkpoint write or a garbage-collection pause on a busy host.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
# How long process 0 waits for every other process to connect (hosts of a pod boot at different speeds).
DEFAULT_INIT_TIMEOUT_S = 300

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor on a TPU VM


@dataclass(frozen=True)
class Cluster:
    """Where this process stands in a multi-process job. coordinator None = let JAX detect the platform's values."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S

    @property
    def detected(self) -> bool:
        return self.coordinator is None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags of `analogjax distill` (each also readable from its environment variable)."""
    group = parser.add_argument_group("multi-host (default: detected on TPU pods and SLURM, else one process)")
    group.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help=f"address of process 0's coordination service (env {ENV_COORDINATOR})",
    )
    group.add_argument(
        "--num-processes", type=int, default=None, metavar="N", help=f"processes in the job (env {ENV_NUM_PROCESSES})"
    )
    group.add_argument(
        "--process-id", type=int, default=None, metavar="I", help=f"this process's index, 0..N-1 (env {ENV_PROCESS_ID})"
    )
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=None,
        metavar="SECONDS",
        help="abort when another process is silent this long "
        f"(env {ENV_HEARTBEAT}, default {DEFAULT_HEARTBEAT_TIMEOUT_S})",
    )


def cluster_from(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The job this process belongs to, from flags (which win) and the environment; None = a single process."""
    environ = os.environ if environ is None else environ

    def pick(flag: str, env: str, cast=str):
        value = getattr(args, flag, None) if args is not None else None
        if value is not None:
            return value
        text = environ.get(env, "").strip()
        if not text:
            return None
        try:
            return cast(text)
        except ValueError:
            raise UserError(f"{env}={text!r} is not an integer") from None

    coordinator = pick("coordinator", ENV_COORDINATOR)
    num_processes = pick("num_processes", ENV_NUM_PROCESSES, int)
    process_id = pick("process_id", ENV_PROCESS_ID, int)
    heartbeat = pick("heartbeat_timeout", ENV_HEARTBEAT, int) or DEFAULT_HEARTBEAT_TIMEOUT_S
    if heartbeat <= 0:
        raise UserError(f"--heartbeat-timeout must be positive, got {heartbeat}")

    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [name for name, v in given.items() if v is None]
        if missing:
            raise UserError(
                f"{missing[0]} is required with the other multi-host flags (or set "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together)"
            )
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
            raise UserError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes < 1:
            raise UserError(f"--num-processes must be positive, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        return Cluster(coordinator, num_processes, process_id, heartbeat)
    if detected_platform(environ) is not None:
        return Cluster(None, None, None, heartbeat)
    return None


def detected_platform(environ: Mapping[str, str] | None = None) -> str | None:
    """'tpu' on a TPU VM, 'slurm' inside a multi-task SLURM step, else None. Reads files and variables only."""
    environ = os.environ if environ is None else environ
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return "slurm"
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return "tpu"
        except OSError:
            continue
    return None


def initialize(cluster: Cluster | None) -> None:
    """Join the job before any JAX computation (backends are created at the first one). None: nothing to do."""
    if cluster is None:
        return
    import jax  # here, not at the top: `analogjax --help` builds every command's flags and must stay fast

    if jax.distributed.is_initialized():
        return
    # CPU processes exchange collectives over TCP through gloo; named explicitly so a changed JAX default can
    # never silently leave N rehearsal processes as N separate one-process jobs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if cluster.detected:
            jax.distributed.initialize(
                heartbeat_timeout_seconds=cluster.heartbeat_timeout_s, initialization_timeout=cluster.init_timeout_s
            )
        else:
            jax.distributed.initialize(
                cluster.coordinator,
                cluster.num_processes,
                cluster.process_id,
                heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
                initialization_timeout=cluster.init_timeout_s,
            )
    except (RuntimeError, ValueError) as exc:  # unreachable coordinator, a timed-out peer, an undetectable platform
        where = "the detected cluster" if cluster.detected else f"coordinator {cluster.coordinator}"
        raise UserError(f"could not join the multi-process job at {where}: {str(exc).splitlines()[0]}") from None


def is_main() -> bool:
    """True in the one process that logs, shows progress and writes reports."""
    import jax

    return jax.process_index() == 0
