"""CLI commands, one module per verb: each provides add_arguments(parser) and run(args) -> exit status.

Commands that run JAX computations over a run's devices (distill, demo, cache-teacher, eval, export, release) join
a multi-host job the same way: `add_job_arguments` adds the flags, `join_job(args)` joins before the first JAX
computation. prepare (host-only) and compile-check (one process compiles for the whole slice) never join.
"""

from __future__ import annotations


def add_job_arguments(parser) -> None:
    """--coordinator / --num-processes / --process-id (each also read from its environment variable)."""
    from analogjax.runtime import distributed

    distributed.add_arguments(parser)


def join_job(args) -> None:
    """Join the multi-host job this process belongs to, if any: before the first JAX computation creates the
    backends. A single process (nothing given, nothing detected) joins nothing."""
    from analogjax.runtime import distributed

    distributed.initialize(distributed.cluster_from(args))
