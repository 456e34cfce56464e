"""Orbax checkpoints of the student: what is saved, where, and how a run comes back.

A checkpoint step (WORKDIR/checkpoints/<step>/) holds four items:
  params  the student model's parameters alone (what a teacher load, an export or `checkpoint.init_path` reads)
  train   the rest of the train state: step, optimizer state, RNG, hidden-state projections
  data    the Grain iterator's state, one JSON file per process (so a resume sees exactly the next batch)
  meta    the resolved config, the run identity (model and data fingerprints) and provenance (JSON)
The teacher is never written: it never changes, and it is an input of the step, not part of its state.

Resume order (`train.restore_or_init`):
  1. the latest *complete* checkpoint in WORKDIR/checkpoints (params, optimizer, step, RNG and data position);
  2. else `checkpoint.init_path`: the params item of another run's checkpoint (optimizer, step and data start fresh);
  3. else a fresh init from `train.seed`.
Restores target the abstract sharded state (ShapeDtypeStructs carrying shardings), so each array is read straight
onto its devices, on whatever mesh the resuming run uses (it need not be the mesh that saved).

Saves are asynchronous. In a single-process run, `save` only starts copying the state into pinned host memory on
the training thread (an asynchronous device_put that keeps every array's sharding) and reads the data iterator's
position; the loop may donate the state into the next step at once, since the runtime orders that step after the
copy. One writer thread, at the lowest CPU priority, then runs Orbax's save of the host copy: its Python work and
file writes use cycles the step leaves idle instead of delaying it (on a CPU-only host the step keeps every core
busy). A multi-process run uses Orbax's own async save (see `Checkpointer.__init__` for why): `save` returns once
Orbax has copied the device buffers to host memory, and the files are written in Orbax's background threads.
Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it on commit, so a save cut short by a
crash is never a step; it is deleted (with a warning) when the workdir is reopened.

Verified: once a step is committed, the checksums of its files are recorded beside them (runtime/checksums.py; in a
multi-process run each process records its own files, once the step is committed, on a background thread), and a
workdir reopened for training verifies its newest step before anything reads it. A damaged or incomplete step (a
file cut short, zero-filled, a flipped bit, an item missing: a dying disk, a partial copy) is skipped with one
warning line naming it and what was wrong, set aside in `checkpoints/damaged/` (never deleted), and the run resumes
from the newest intact step; if every step is damaged, the run is refused. A step without checksums (written before
they existed, or cut short between its commit and them) cannot be verified and is used as it is.
`analogjax check WORKDIR` verifies every step without changing anything.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from analogjax.errors import UserError
from analogjax.runtime import checksums, storage

ITEMS = ("params", "train", "data", "meta")
TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_DIR = "damaged"  # inside the checkpoint directory; Orbax takes only numbered folders for steps
METRICS_FILE = "metrics.jsonl"
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # how Orbax commits a step on object stores


class NonFiniteError(UserError):
    """A step produced a non-finite loss or gradient under `train.nonfinite=halt`; nothing of it was saved."""


class Checkpointer:
    """The workdir's checkpoint manager: save every `every` steps, keep the latest `keep` (and the best
    `keep_best` by `best_metric`), restore onto any mesh."""

    def __init__(
        self,
        directory: str | Path,
        *,
        every: int = 0,
        keep: int = 3,
        async_save: bool = True,
        keep_best: int = 0,
        best_metric: str = "loss",
        best_mode: str = "min",
        compression: bool = False,
    ):
        self.directory = storage.location(directory)
        self.every = every
        self.best_metric = best_metric
        _discard_partial_saves(self.directory)
        # Before Orbax opens the directory (it reads every step's metadata): damaged newest steps are set aside.
        self._resume_step = newest_intact_step(self.directory, set_aside=True)
        if jax.process_count() > 1:  # every process has verified before process 0's moves change the directory
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint_verified")
        self._saved_since_open = False
        preserve = policies.LatestN(n=keep)
        if keep_best:
            best = policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "max",
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
            preserve = policies.AnyPreservationPolicy([preserve, best])
        # A single process saves on this class's writer thread (see `save`), Orbax synchronously there. With several
        # processes, Orbax's save synchronises them by device collectives (barriers, broadcasts), which must be
        # issued from the training thread in the same order as the step's own on every process: there Orbax's own
        # async save runs, its blocking device-to-host copy on the training thread.
        writer_thread = async_save and jax.process_count() == 1
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve,
            enable_async_checkpointing=async_save and not writer_thread,
            create=True,
            # Leftovers of a save cut short (tmp folders never renamed into a step) are deleted, never restored.
            cleanup_tmp_directories=True,
            # On object stores a rename is a copy: a step is committed by a marker file written last instead.
            temporary_path_class=_commit_marker_class(self.directory),
        )
        # Array items go through PyTreeCheckpointHandler so compression is a choice: zstd shrinks float weights
        # little and its CPU work competes with the training step on hosts whose cores the step uses.
        arrays = ocp.PyTreeCheckpointHandler(use_compression=compression)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "params": arrays,
                "train": arrays,
                "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer", initializer=_lowest_cpu_priority)
            if writer_thread
            else None
        )
        self._pending: Future | None = None
        # Orbax's own async save (multi-process): a step's checksums are recorded once it is known committed, at the
        # next save or wait, on this thread (low priority) so the training thread never reads files back.
        self._checksummer = (
            ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="checkpoint-checksums", initializer=_lowest_cpu_priority
            )
            if options.enable_async_checkpointing
            else None
        )
        self._unrecorded: int | None = None
        self._checksumming: Future | None = None

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest intact step, or None: the one verified when the directory was opened (damaged newer ones were
        set aside with a warning then), or the newest this checkpointer saved since."""
        if self._saved_since_open:
            return max(self.all_steps(), default=None)
        return self._resume_step

    def save(self, step: int, state, data_iterator, meta: dict[str, Any], metrics: dict[str, float] | None = None):
        """Save `state` as `step`. Asynchronous when configured: returns once the copy to host memory is started
        (multi-process: done), and the caller may donate `state` right away. The data iterator's position is read
        now, at the step boundary; `metrics` (the step's logged record) rank the checkpoint for `keep_best`. At most
        one save is in flight: a save waits for the previous one, and raises its error if it failed."""
        arrays = {
            "params": state.params["model"],
            "train": {
                "step": state.step,
                "opt_state": state.opt_state,
                "rng": state.rng,
                "hidden_proj": state.params.get("hidden_proj", {}),
            },
        }
        data = None if data_iterator is None else _IteratorPosition(data_iterator)
        meta = dict(meta, step=step, saved_at=_now())
        ranked = {k: float(v) for k, v in (metrics or {}).items() if k == self.best_metric}
        self._saved_since_open = True
        if self._writer is None:
            self._write(step, arrays, data, meta, ranked)
            return
        self._finish_pending()
        self._pending = self._writer.submit(self._write, step, _copy_to_host(arrays), data, meta, ranked)

    def _write(self, step: int, arrays, data, meta, ranked) -> None:
        items = dict(
            params=ocp.args.PyTreeSave(arrays["params"]),
            train=ocp.args.PyTreeSave(arrays["train"]),
            meta=ocp.args.JsonSave(meta),
        )
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        if self._checksummer is not None:  # Orbax's async save: the previous step is committed once this one starts
            self.manager.wait_until_finished()
            self._record_unrecorded()
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=ranked or None, force=True)
        if self._checksummer is None and _records_checksums(self.directory):  # committed: the files are final
            checksums.write_manifest(self.directory / str(step), jax.process_index(), jax.process_count())
        else:
            self._unrecorded = step

    def _record_unrecorded(self) -> None:
        """Start recording the checksums of the last committed step of Orbax's async save (after waiting for the
        previous recording: one at a time). A step the keep policy has deleted meanwhile needs none."""
        step, self._unrecorded = self._unrecorded, None
        if step is None or self._checksummer is None or not _records_checksums(self.directory):
            return
        self._finish_checksumming()

        def record():
            try:
                checksums.write_manifest(self.directory / str(step), jax.process_index(), jax.process_count())
            except FileNotFoundError:
                pass

        self._checksumming = self._checksummer.submit(record)

    def _finish_checksumming(self) -> None:
        pending, self._checksumming = self._checksumming, None
        if pending is not None:
            pending.result()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def restore(self, step: int, abstract_state, data_iterator) -> Any:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs): arrays land on their devices.
        `data_iterator=None` leaves the data position alone (the caller starts the data afresh)."""
        train_target = {
            "step": abstract_state.step,
            "opt_state": abstract_state.opt_state,
            "rng": abstract_state.rng,
            "hidden_proj": abstract_state.params.get("hidden_proj", {}),
        }
        items = dict(
            params=_restore_onto(abstract_state.params["model"]),
            train=_restore_onto(train_target),
        )
        if data_iterator is not None:
            data_file = (
                self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            )
            if data_file.exists():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:  # saved by another number of processes: their data positions do not map onto ours
                print(
                    f"warning: checkpoint {step} holds no data position for {jax.process_count()} process(es); "
                    "the data order restarts from the beginning",
                    file=sys.stderr,
                )
        where = f"{self.directory / str(step)} does not fit this run's model or optimizer"
        _check_shapes(self.directory / str(step) / "params", abstract_state.params["model"], where)
        _check_shapes(self.directory / str(step) / "train", train_target, where)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None
        train = restored["train"]
        params = {"model": restored["params"]}
        if "hidden_proj" in abstract_state.params:
            params["hidden_proj"] = train["hidden_proj"]
        return abstract_state.replace(step=train["step"], params=params, opt_state=train["opt_state"], rng=train["rng"])

    def meta(self, step: int) -> dict[str, Any]:
        return json.loads((self.directory / str(step) / "meta" / "metadata").read_text())

    def wait(self) -> None:
        """Block until every pending async save is committed with its checksums (or raise its error)."""
        self._finish_pending()
        self.manager.wait_until_finished()
        self._record_unrecorded()
        self._finish_checksumming()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for pool in (self._writer, self._checksummer):
                if pool is not None:
                    pool.shutdown()
            self.manager.close()


class _IteratorPosition:
    """A Grain iterator's state read at the step boundary, for Grain's checkpoint handler to write later (the
    iterator itself moves on while the writer thread works). JSON bytes: the handler's form for non-dataset
    iterators, and the same file a dataset iterator's restore reads."""

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _copy_to_host(arrays):
    """Start copying `arrays` into pinned host memory, each keeping its sharding. Asynchronous: the runtime orders
    any later step that donates the originals after this copy. A backend without pinned host memory gets an
    on-device copy instead (a second copy of the state in device memory until it is written)."""

    def host_copy(x):
        device = next(iter(x.sharding.addressable_devices))
        if "pinned_host" in {m.kind for m in device.addressable_memories()}:
            return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
        return x.copy()

    return jax.tree.map(host_copy, arrays)


def _lowest_cpu_priority() -> None:
    """Run the calling thread (and the threads it starts: Orbax's) at nice 19. A checkpoint can wait; on a host
    whose cores the training step uses, a writer at equal priority delays every parallel op of the step. Linux
    only: there a thread's nice value is its own (elsewhere setpriority would renice the whole process)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def _missing_files(step_dir: epath.Path) -> list[str]:
    """What a complete step folder lacks. Orbax writes these last-ish per item; a step missing any was cut or
    damaged after the fact (a finished save always has them all)."""
    required = [
        "_CHECKPOINT_METADATA",
        "params/_METADATA",
        "params/manifest.ocdbt",
        "train/_METADATA",
        "train/manifest.ocdbt",
        "meta/metadata",
    ]
    if storage.is_remote(step_dir):  # committed by Orbax's marker there, not by a rename
        required.append(COMMIT_MARKER)
    return [name for name in required if not (step_dir / name).exists()]


def step_verdict(step_dir: Path | epath.Path, item: str | None = None) -> checksums.Verdict:
    """Whether a committed step folder holds what was written: every item present, every file its checksum (of
    one item only, if `item` is given). On an object store, completeness only (see `_records_checksums`)."""
    missing = [
        name
        for name in _missing_files(step_dir)
        if item is None or name.startswith(f"{item}/") or name == COMMIT_MARKER
    ]
    if missing:
        return checksums.Verdict("damaged", [f"incomplete: {name} missing" for name in missing])
    if not _records_checksums(step_dir):
        return checksums.Verdict("unverified", ["on an object store: checked for completeness only"])
    return checksums.verify_directory(Path(step_dir), under=item)


def _records_checksums(directory: Path | epath.Path) -> bool:
    """Whether steps under `directory` get checksum manifests. Not on gs:// or s3://: recording them would download
    every file of every step right after uploading it, and verifying would download a whole step again before each
    resume; the object store checks each object's integrity itself (GCS and S3 store a checksum per object and
    verify uploads against it), and a step there is committed by Orbax's marker file, which `_missing_files`
    requires, so a cut-short save is still caught."""
    return not storage.is_remote(directory)


def committed_steps(directory: Path | epath.Path) -> list[int]:
    """The step numbers of a checkpoint directory's committed step folders, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def newest_intact_step(
    directory: str | Path | epath.Path, *, set_aside: bool = False, item: str | None = None
) -> int | None:
    """The newest step of a checkpoint directory that verifies (or has no checksums to verify), or None if it has
    none. Each damaged step newer than it is reported in one warning line and, with `set_aside` (a run that will
    write here), moved into `damaged/` for inspection. A directory whose every step is damaged is a UserError.
    `item`: verify that item of each step only (a reader of the params need not read the optimizer state)."""
    directory = storage.location(directory, "checkpoint directory")
    steps = committed_steps(directory)
    skipped: list[tuple[int, checksums.Verdict]] = []
    for step in reversed(steps):
        verdict = step_verdict(directory / str(step), item)
        if verdict.status == "damaged":
            skipped.append((step, verdict))
            continue
        # Only now that a step to resume from is known are the damaged ones moved: a directory with none intact
        # stays as it is (and is refused below), so a relaunch cannot start afresh over it.
        for bad, bad_verdict in skipped:
            kind = "incomplete" if bad_verdict.problems[0].startswith("incomplete") else "damaged"
            aside = _set_aside(directory, bad) if set_aside else None
            print(
                f"warning: skipping {kind} checkpoint {directory / str(bad)} ({bad_verdict.describe()})"
                + (f"; moved to {aside}" if aside else "")
                + f"; using checkpoint {step}",
                file=sys.stderr,
            )
        return step
    if steps:
        raise UserError(
            f"{directory}: every checkpoint ({', '.join(map(str, steps))}) is damaged; nothing to resume from "
            f"(`analogjax check {directory.parent if directory.name == 'checkpoints' else directory}` says what is "
            "wrong; use another --workdir to start afresh)"
        )
    return None


def _set_aside(directory: epath.Path, step: int) -> epath.Path | None:
    """Move a damaged step into `damaged/` (process 0; a name not yet taken there). None where this process does
    not move it."""
    if jax.process_index() != 0:
        return None
    aside_dir = directory / DAMAGED_DIR
    target, n = aside_dir / str(step), 1
    while target.exists():
        target, n = aside_dir / f"{step}.{n}", n + 1
    storage.move_tree(directory / str(step), target)
    return target


def _discard_partial_saves(directory: epath.Path) -> None:
    """Delete the temporary folders of saves that never committed (Orbax's own cleanup does not catch them all).
    Safe: a workdir has one run, and it has not started saving yet."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for leftover in sorted(directory.glob(f"*{TMP_MARKER}*")):
        print(f"warning: discarding partially written checkpoint {leftover} (a save was interrupted)", file=sys.stderr)
        storage.remove_tree(leftover)


def _commit_marker_class(directory: epath.Path):
    """Orbax's way of committing a step without a rename (its default on gs://; s3:// needs it too), or None for
    its default (a local rename)."""
    return ocp.path.atomicity.CommitFileTemporaryPath if storage.is_remote(directory) else None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@functools.cache
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(mesh) -> dict[str, Any]:
    """Where and with what a checkpoint was made: enough to reproduce or to explain a difference."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "analogjax": pkg("analogjax"),
        "git_commit": _git_commit(),
        "jax": jax.__version__,
        "orbax": pkg("orbax-checkpoint"),
        "grain": pkg("grain"),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh": dict(mesh.shape),
        "host": platform.node(),
    }


def trim_metrics(workdir: str | Path, step: int) -> list[dict[str, Any]]:
    """Drop metrics.jsonl records of steps after `step` (a resume from `step` logs them again); returns the records
    kept. The file is otherwise append-only; rewritten atomically so a crash here loses nothing."""
    path = storage.location(workdir) / METRICS_FILE
    if jax.process_index() != 0 or not path.exists():
        return []
    kept, records, dropped = [], [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            dropped += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
            records.append(record)
        else:
            dropped += 1
    if dropped:
        storage.write_atomic(path, "".join(line + "\n" for line in kept))
    return records


def restore_params(directory: str | Path | epath.Path, abstract_params, step: int | None = None) -> Any:
    """The params item of an analogjax checkpoint directory (its latest complete step unless `step`), restored
    onto `abstract_params` (ShapeDtypeStructs with shardings).

    Used for the teacher and for `checkpoint.init_path`. Read-only: nothing in the directory is created, cleaned or
    deleted. Each array is read straight into its shards on its devices (no host ever holds it whole), whatever mesh
    wrote it.
    """
    directory = storage.location(directory, "checkpoint directory")
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory}")
    # Verified before Orbax opens the directory (it reads every step's metadata).
    if step is None:
        step = newest_intact_step(directory, item="params")
    else:
        verdict = step_verdict(directory / str(step), "params")
        if verdict.status == "damaged":
            raise UserError(f"{directory}: checkpoint {step} is damaged: {verdict.describe()}")
    if step is None:
        raise UserError(f"no complete checkpoint in {directory}")
    manager = ocp.CheckpointManager(
        directory,
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False),
    )
    try:
        where = f"{directory}: checkpoint {step} does not fit this model"
        _check_shapes(directory / str(step) / "params", abstract_params, where)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise UserError(f"{where}: {str(exc).splitlines()[0]}") from None
    finally:
        manager.close()
    return restored["params"]


def _check_shapes(item_dir: epath.Path, abstract: Any, where: str) -> None:
    """Refuse a checkpoint item whose arrays differ from `abstract` in names or shapes, from its metadata alone and
    before any array is read. (Orbax reports a misfit only after it has started reading every array; the reads
    still in flight then call back into a closed event loop at exit and print tracebacks over the error.)"""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        stored_tree = handler.metadata(epath.Path(item_dir))
    except (FileNotFoundError, ValueError, KeyError):
        return  # the restore itself names what is missing
    finally:
        handler.close()

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {
            jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in leaves
            if hasattr(leaf, "shape")
        }

    stored, wanted = shapes(stored_tree), shapes(abstract)
    for key in sorted(stored.keys() | wanted.keys()):
        if key not in stored:
            raise UserError(f"{where}: it has no array {key}")
        if key not in wanted:
            raise UserError(f"{where}: its array {key} has no place in this model")
        if stored[key] != wanted[key]:
            raise UserError(f"{where}: {key} has shape {stored[key]} in the checkpoint, {wanted[key]} here")


def _restore_onto(abstract: Any) -> ocp.args.PyTreeRestore:
    """Restore args that put each array straight onto the sharding its ShapeDtypeStruct carries."""
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
