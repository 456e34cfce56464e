"""Writing a teacher cache: the live teacher over the exact batches a run consumes, one step's rows per chunk."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from analogjax.config import Config
from analogjax.data.spec import distinct_steps
from analogjax.errors import UserError
from analogjax.models.transformer import softcap_logits
from analogjax.objective.sparse import sample_teacher_tokens
from analogjax.runtime import storage
from analogjax.runtime.metrics_log import Progress
from analogjax.teacher import forward as teacher_forward
from analogjax.teacher_cache.format import (
    PROVENANCE_FILE,
    CacheLayout,
    _differences,
    _np_dtype,
    _Store,
    _write_json_atomically,
    provenance,
    read_provenance,
    row_hashes,
    shared_vocab,
)


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order `to_global_batch` took them."""
    shards: dict[int, Any] = {}
    for shard in x.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def _seq_chunk(batch: int, seq_len: int, chunk_tokens: int) -> int:
    """Positions per chunk of the teacher head: the largest divisor of seq_len keeping batch·chunk ≤ chunk_tokens."""
    best = 1
    for size in range(1, seq_len + 1):
        if seq_len % size == 0 and batch * size <= max(chunk_tokens, batch):
            best = size
    return best


def make_teacher_outputs(
    teacher, layout: CacheLayout, *, temperature: float, vocab_size: int, chunk_tokens: int, seed: int
):
    """fn(teacher_params, batch, step, row_offset) -> {field: [B, S, ...]} for a live `teacher.Teacher`.

    The teacher's logits exist one chunk of positions at a time ([B, c, V]); sampling keys come from (seed, step,
    global row, position), so the samples do not depend on how many processes or devices computed them.
    """
    base_key = jax.random.key(seed)

    def outputs(params, batch, step, row_offset):
        signal = teacher_forward(teacher, params, batch)
        hidden, head = (signal.rows, signal.head) if signal.kind == "hidden" else (None, None)
        logits_bsv = signal.rows if signal.kind == "logits" else None
        b, s = batch["tokens"].shape
        c = _seq_chunk(b, s, chunk_tokens)
        step_key = jax.random.fold_in(base_key, step)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_offset + jnp.arange(b))

        def chunk(j):
            if logits_bsv is None:
                h = jax.lax.dynamic_slice_in_dim(hidden, j * c, c, axis=1)
                logits = softcap_logits(
                    jnp.dot(h, head.astype(h.dtype), preferred_element_type=jnp.float32), teacher.final_softcap
                )
            else:
                logits = jax.lax.dynamic_slice_in_dim(logits_bsv, j * c, c, axis=1).astype(jnp.float32)
            # Only the vocabulary both models share can carry probability (padded columns are -inf, as in the loss).
            columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
            logits = jnp.where(columns < vocab_size, logits, -jnp.inf)
            if layout.kind == "topk":
                values, indices = jax.lax.top_k(logits, layout.k)
                lse = jax.nn.logsumexp(logits / temperature, axis=-1)
                return {
                    "values": values.astype(_np_dtype(layout.values_dtype)),
                    "indices": indices.astype(jnp.int32),
                    "lse": lse,
                }
            positions = j * c + jnp.arange(c)
            keys = jax.vmap(lambda key: jax.vmap(lambda t: jax.random.fold_in(key, t))(positions))(row_keys)
            per_token = jax.vmap(jax.vmap(lambda lg, key: sample_teacher_tokens(lg, layout.k, key, temperature)))
            ids, weights = per_token(logits, keys)
            return {"ids": ids, "weights": weights}

        per_chunk = jax.lax.map(chunk, jnp.arange(s // c))  # [n, B, c, ...]
        return {name: jnp.moveaxis(x, 0, 1).reshape(b, s, *x.shape[3:]) for name, x in per_chunk.items()}

    return outputs


def write_cache(
    config: Config,
    path: str | Path | epath.Path,
    layout: CacheLayout,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    teacher,
    teacher_params,
    mesh,
    process_index: int,
    process_count: int,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the teacher over `batches` (this process's local batches of steps 0, 1, ...) and write its rows.

    Steps already finished by every process are skipped (their batches are still drawn, to stay aligned).
    `stop_after` stops after writing that many steps (a job cut short, for tests). Returns a summary.
    """
    from analogjax import mesh as mesh_lib
    from analogjax.data import to_global_batch

    path = storage.location(path, "teacher.cache")
    vocab = shared_vocab(config)
    layout.check(vocab)
    meta = provenance(config, layout, process_count)
    saved = read_provenance(path)
    if saved is not None and "checksums" not in saved:  # written before checksums: completed without them
        meta.pop("checksums")
    if saved is None:
        if not storage.is_remote(path):  # object stores have no folders (and a mkdir there could create a bucket)
            path.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(path / PROVENANCE_FILE, meta)
    elif saved != meta:
        different = _differences(saved, meta, meta)
        raise UserError(
            f"{path} holds a teacher cache of another configuration (different {', '.join(different)}): "
            "use another path or delete it"
        )
    if jax.process_count() > 1:  # everyone sees the provenance before anyone opens (and maybe creates) arrays
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("teacher_cache_provenance")
    store = _Store(path, meta, create=True)
    # Damaged chunks of finished steps lose their marker: the steps are then written again like unfinished ones.
    damaged = _unmark_damaged(store, process_index) if saved is not None else []
    if jax.process_count() > 1:  # every process has unmarked its damaged chunks before anyone reads the markers
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("teacher_cache_verified")
    finished = store.finished_steps()
    sharding = mesh_lib.batch_sharding(mesh)
    outputs_fn = jax.jit(
        make_teacher_outputs(
            teacher,
            layout,
            temperature=config.distill.temperature,
            vocab_size=vocab,
            chunk_tokens=config.distill.chunk_size,
            seed=config.train.seed,
        ),
        out_shardings=sharding,
    )
    rows = store.rows
    row_offset = process_index * rows
    steps, seq_len = distinct_steps(config.data, config.train.steps), config.data.seq_len
    bar = Progress(steps, int(finished.sum()), "cache-teacher", enabled=progress and process_index == 0)
    written, skipped = [], 0
    # Throughput counts the steps after the first written one: the first includes compiling the teacher.
    timed_start, timed_tokens, pending = None, 0, None

    def flush(step, global_outputs, hashes):
        nonlocal timed_start, timed_tokens
        local = {name: _local_rows(x) for name, x in global_outputs.items()}
        region = np.s_[step, row_offset : row_offset + rows]
        writes = [store.fields[name][region].write(value) for name, value in local.items()]
        writes.append(store.row_hash[region].write(hashes))
        if store.checksum is not None:
            writes.append(store.checksum[step, process_index].write(store.checksums_of({**local, "row_hash": hashes})))
        for w in writes:
            w.result()
        # Data first, marker after: a reader or a restart never takes a half-written step for a finished one.
        store.done[step, process_index].write(np.uint8(1)).result()
        written.append(step)
        bar.update(1)
        if timed_start is None:
            timed_start = time.perf_counter()
        else:
            timed_tokens += hashes.size * seq_len * process_count
            bar.show(tok_s=f"{timed_tokens / (time.perf_counter() - timed_start):.0f}")

    with jax.set_mesh(mesh):
        for step, local_batch in zip(range(steps), batches):
            if finished[step]:
                skipped += 1
                continue
            if stop_after is not None and len(written) + (pending is not None) >= stop_after:
                break
            hashes = row_hashes(local_batch)
            inputs = {k: local_batch[k] for k in ("tokens", "segment_ids", "positions")}
            # Dispatch this step's teacher before writing the previous one's rows: the device never waits on disk.
            current = (
                step,
                outputs_fn(teacher_params, to_global_batch(inputs, sharding), jnp.int32(step), jnp.int32(row_offset)),
                hashes,
            )
            if pending is not None:
                flush(*pending)
            pending = current
        if pending is not None:
            flush(*pending)
    bar.close()
    elapsed = time.perf_counter() - timed_start if timed_start is not None else 0.0
    complete = bool(store.finished_steps().all())
    return {
        "path": str(path),
        "written_steps": written,
        "skipped_steps": skipped,
        "rewritten_damaged_steps": [step for step in damaged if step in written],
        "complete": complete,
        "tokens_per_s": timed_tokens / elapsed if timed_tokens else None,
        "bytes_per_token": layout.bytes_per_token(),
    }


def _unmark_damaged(store: _Store, process_index: int) -> list[int]:
    """Verify this process's chunks of every finished step; clear the marker of each damaged one (with a warning
    line). Returns the damaged steps."""
    done = store.done.read().result()
    damaged = []
    for step in np.flatnonzero(done[:, process_index]):
        problem = store.damage(int(step), process_index)
        if problem:
            print(
                f"warning: teacher cache {store.path}: step {step} is damaged ({problem}); rewriting it",
                file=sys.stderr,
            )
            store.done[int(step), process_index].write(np.uint8(0)).result()
            damaged.append(int(step))
    return damaged


def build_cache(
    config: Config,
    layout: CacheLayout,
    path: str | Path | None = None,
    *,
    mesh=None,
    teacher=None,
    teacher_params=None,
    process_index: int | None = None,
    process_count: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cache the config's teacher over the batches a run of `config` consumes, into `path` (default teacher.cache).

    process_index/process_count default to JAX's; passing them simulates one process of a multi-process job.
    """
    from analogjax.data import make_batch_iterator, validate
    from analogjax.setup import build_mesh
    from analogjax.teacher import load_teacher, source_kind

    path = path or config.teacher.cache
    if not path:
        raise UserError("teacher.cache: set the directory the teacher cache is written to")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    validate(config.data, vocab_size=config.model.vocab_size, process_count=process_count)  # before the teacher loads
    if teacher is None and source_kind(config) == "none":
        raise UserError("distill.terms: the objective uses no teacher, so there is nothing to cache")
    mesh = mesh if mesh is not None else build_mesh(config)
    if teacher is None:
        teacher, teacher_params = load_teacher(config, mesh, live=True)
    batches = make_batch_iterator(
        config.data,
        split="train",
        seed=config.train.seed,
        vocab_size=config.model.vocab_size,
        process_index=process_index,
        process_count=process_count,
    )
    try:
        return write_cache(
            config,
            path,
            layout,
            batches,
            teacher=teacher,
            teacher_params=teacher_params,
            mesh=mesh,
            process_index=process_index,
            process_count=process_count,
            stop_after=stop_after,
            progress=progress,
        )
    finally:
        batches.close()  # data workers stop now, not in exit-time finalizers that print tracebacks after an error
