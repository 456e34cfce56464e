"""Reading a teacher cache: each process's rows of a step, checked against the run, joined to its batch."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from analogjax.config import Config
from analogjax.data.spec import distinct_steps
from analogjax.errors import UserError
from analogjax.objective.sparse import SampledTeacher, TopKTeacher
from analogjax.runtime import storage
from analogjax.teacher_cache.format import BATCH_KEYS, CacheLayout, _Store, check_run, read_provenance, row_hashes


def sparse_teacher_from_batch(batch: dict[str, jax.Array]) -> TopKTeacher | SampledTeacher:
    """The cached teacher rows of a (global, sharded) batch, tokens flattened like the student's hidden states."""

    def flat(x):
        return x.reshape(-1, *x.shape[2:])

    if "teacher_values" in batch:
        return TopKTeacher(flat(batch["teacher_values"]), flat(batch["teacher_indices"]), flat(batch["teacher_lse"]))
    return SampledTeacher(flat(batch["teacher_ids"]), flat(batch["teacher_weights"]))


def cached_teacher_source(config: Config, *, check: bool = True):
    """(batch -> sparse teacher, shared vocabulary, CacheLayout) of the config's teacher.cache, checked against the
    run unless `check` is false: what teacher.load_teacher wraps as a cached Teacher (nothing of the teacher is in
    memory)."""
    saved = read_provenance(config.teacher.cache)
    if saved is None:
        raise UserError(f"teacher.cache: {config.teacher.cache} holds no teacher cache (run cache-teacher first)")
    if check:
        check_run(saved, config, jax.process_count(), config.teacher.cache)
    return sparse_teacher_from_batch, saved["vocab_size"], CacheLayout(**saved["layout"])


class CacheReader:
    """This process's rows of the cache, step by step, checked against the run and prefetched one step ahead."""

    def __init__(self, config: Config, *, process_index: int | None = None, process_count: int | None = None):
        path = config.teacher.cache
        self.path = storage.location(path, "teacher.cache")
        saved = read_provenance(self.path)
        if saved is None:
            raise UserError(f"teacher.cache: {path} holds no teacher cache (run cache-teacher first)")
        self.process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        check_run(saved, config, process_count, path)
        self.store = _Store(self.path, saved, create=False)
        # A run making epochs (data.epoch_steps) reads batch `step mod epoch_steps` at `step`, and its cached rows.
        self.distinct = distinct_steps(config.data, config.train.steps)
        self._wraps = self.distinct < config.train.steps  # after the last cached step comes step 0 again
        unfinished = np.flatnonzero(~self.store.finished_steps()[: self.distinct])
        if unfinished.size:
            raise UserError(
                f"teacher cache {path} is incomplete: step {int(unfinished[0])} (and "
                f"{unfinished.size - 1} more) not finished; run cache-teacher again to complete it"
            )
        self.keys = BATCH_KEYS[saved["layout"]["kind"]]
        self._prefetched: tuple[int, dict] | None = None

    def _start(self, step: int) -> dict:
        start = self.process_index * self.store.rows
        region = np.s_[step, start : start + self.store.rows]
        reads = {key: self.store.fields[name][region].read() for key, name in self.keys.items()}
        reads["row_hash"] = self.store.row_hash[region].read()
        return reads

    def add_to(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` (this process's rows of step `step`) with the cached teacher arrays added."""
        step %= self.distinct
        reads = self._prefetched[1] if self._prefetched and self._prefetched[0] == step else self._start(step)
        if step + 1 < self.distinct or self._wraps:  # no read ahead past a run's last step
            upcoming = (step + 1) % self.distinct
            self._prefetched = (upcoming, self._start(upcoming))
        try:
            arrays = {key: future.result() for key, future in reads.items()}
        except Exception as exc:  # a chunk cut short or not decodable: tensorstore's many errors, one line
            raise self.damaged(step, f"a chunk is unreadable ({str(exc).splitlines()[0][:200]})") from None
        chunks = {name: arrays[key] for key, name in self.keys.items()}
        problem = self.store.damage(step, self.process_index, {**chunks, "row_hash": arrays["row_hash"]})
        if problem:
            raise self.damaged(step, problem)
        cached_hash = arrays.pop("row_hash")
        mismatch = np.flatnonzero(cached_hash != row_hashes(batch))
        if mismatch.size:
            row = self.process_index * self.store.rows + int(mismatch[0])
            raise UserError(
                f"teacher cache {self.path}: step {step}, row {row} holds other tokens than this run's "
                "batch: the corpus files changed since the cache was written; rebuild the cache"
            )
        return {**batch, **{key: np.asarray(value) for key, value in arrays.items()}}

    def damaged(self, step: int, problem: str) -> UserError:
        return damaged_cache_error(self.path, step, problem)


def damaged_cache_error(path: str | Path, step: int, problem: str) -> UserError:
    """The one line a damaged cache step gets: where, what, and the command that rewrites it."""
    return UserError(
        f"teacher cache {path}: step {step} is damaged: {problem}; run `analogjax cache-teacher` again with this "
        f"run's config (and --out {path} if it is not teacher.cache) to rewrite it"
    )


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a cache, whole (for tests and inspection of small caches)."""
    path = storage.location(path, "teacher.cache")
    store = _Store(path, read_provenance(path), create=False)
    arrays = {name: array.read().result() for name, array in store.fields.items()}
    return {**arrays, "row_hash": store.row_hash.read().result(), "done": store.done.read().result()}
