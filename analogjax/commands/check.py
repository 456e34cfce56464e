"""`analogjax check PATH`: verify a run's workdir (its checkpoints), a checkpoint directory, a teacher cache or
prepared shards against the checksums recorded when they were written.

Prints what is intact, what is damaged and why, and (for checkpoints) the step a resume would use; changes nothing.
Exit status 0 only if everything is intact; 1 if anything is damaged, unfinished or cannot be verified (written
before checksums existed); 2 if PATH is none of these.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a workdir, a checkpoint directory, a teacher cache or shards")


def run(args: argparse.Namespace) -> int:
    from analogjax.errors import UserError

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    from analogjax.data.paths import METADATA_FILE
    from analogjax.teacher_cache.format import PROVENANCE_FILE

    if (path / PROVENANCE_FILE).is_file():
        return _report(_check_cache(path))
    if (path / METADATA_FILE).is_file():
        return _report(_check_shards(path))
    if (path / "checkpoints").is_dir():
        return _report(_check_checkpoints(path / "checkpoints", workdir=path))
    from analogjax.checkpoint import committed_steps

    if committed_steps(path):
        return _report(_check_checkpoints(path, workdir=None))
    raise UserError(
        f"{path} is neither a run's workdir (with checkpoints/), a checkpoint directory, a teacher cache "
        f"(with {PROVENANCE_FILE}) nor prepared shards (with {METADATA_FILE})"
    )


def _report(result: tuple[list[str], bool]) -> int:
    lines, ok = result
    print("\n".join(lines))
    return 0 if ok else 1


def _check_checkpoints(directory: Path, workdir: Path | None) -> tuple[list[str], bool]:
    from analogjax.checkpoint import DAMAGED_DIR, committed_steps, step_verdict
    from analogjax.runtime.workdir_lock import LOCK_FILE, describe

    lines = [f"checkpoints in {directory}:"]
    resume, ok = None, True
    for step in reversed(committed_steps(directory)):
        verdict = step_verdict(directory / str(step))
        if verdict.status == "intact":
            lines.append(f"  step {step}: intact")
        elif verdict.status == "unverified":
            lines.append(f"  step {step}: unverified ({verdict.describe()}; written before checksums or cut short)")
        else:
            lines.append(f"  step {step}: damaged: {verdict.describe(limit=5)}")
        ok = ok and verdict.intact
        if resume is None and verdict.status != "damaged":
            resume = step
    if len(lines) == 1:
        lines.append("  none")
    aside = directory / DAMAGED_DIR
    if aside.is_dir():
        kept = sorted(p.name for p in aside.iterdir())
        lines.append(f"set aside as damaged (kept for inspection, not used): {', '.join(kept)} in {aside}")
    if resume is not None:
        lines.append(f"a resume would use: step {resume}")
    elif committed_steps(directory):
        lines.append("a resume would be refused: every checkpoint is damaged")
    else:
        lines.append("a resume would start afresh: no checkpoint")
    if workdir is not None and (workdir / LOCK_FILE).is_file():
        try:
            holder = json.loads((workdir / LOCK_FILE).read_text())
        except (OSError, ValueError):
            holder = None
        lines.append(f"lock: {workdir / LOCK_FILE} names a writer ({describe(holder)}); a run may be in progress")
    return lines, ok


def _check_cache(path: Path) -> tuple[list[str], bool]:
    import numpy as np

    from analogjax.teacher_cache.format import _Store, read_provenance

    meta = read_provenance(path)
    assert meta is not None
    store = _Store(path, meta, create=False)
    done = store.done.read().result().astype(bool)
    steps, processes = done.shape
    lines = [f"teacher cache {path}: {steps} steps x {processes} process(es)"]
    unfinished = sorted({int(s) for s in np.flatnonzero(~done.all(axis=1))})
    damaged = []
    if store.checksum is None:
        lines.append("  unverified: written before checksums (nothing to verify against)")
    else:
        for step, process in zip(*np.nonzero(done)):
            problem = store.damage(int(step), int(process))
            if problem:
                damaged.append(int(step))
                lines.append(f"  step {step} (process {process}'s rows): damaged: {problem}")
    intact = steps - len(unfinished) - len(set(damaged) - set(unfinished))
    lines.append(f"  {intact} step(s) intact, {len(set(damaged))} damaged, {len(unfinished)} unfinished")
    if damaged or unfinished:
        lines.append("  `analogjax cache-teacher` with the cache's config rewrites damaged steps and finishes the rest")
    return lines, store.checksum is not None and not damaged and not unfinished


def _check_shards(path: Path) -> tuple[list[str], bool]:
    from analogjax.data.prepare import verify_shards

    return verify_shards(str(path))
