"""The offline teacher: its sparse outputs over a run's packed token stream, cached once in zarr through tensorstore.

A cache holds, for every token of the batches a config's run consumes (train.steps batches of the same
`make_batch_iterator(split="train", seed=train.seed)` stream), either
- `topk`: the teacher's k largest logits (`values`, bfloat16 or float32), their ids (`indices`, int32) and the
  full-vocabulary logsumexp at the distillation temperature (`lse`, float32; the tail-bucket treatment needs it), or
- `sampled`: s ids drawn from the teacher (`ids`, int32) with importance weights (`weights`, float32) for unbiased
  sampled KD (sparse_teacher.sampled_kd).
Every field is a zarr array [steps, global_batch, seq_len, ...]; one chunk is one step's rows of one process, so
each process writes only its own chunks and never races another on a file. Row r of the global batch is row
r − p·R of process p's local batch (R = global_batch / process_count), exactly how `to_global_batch` concatenates.

A step counts as written only when every process's `done` marker for it is set, and a process sets its marker only
after its data is on disk: a killed job leaves at worst unmarked chunks, which a restart (skipping marked steps)
writes again, and which a reader refuses to use. `row_hash` (crc32 of each row's tokens and segment ids) lets the
reader prove, row by row, that a run's batches are the cached ones. `provenance.json` beside the arrays records
what the cache was computed from; a run whose tokenizer, corpus, seed, sequence length, packing or batch differ is
refused with a `UserError` naming the difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from analogjax.config import Config, fingerprint, to_dict
from analogjax.errors import UserError, check_choice
from analogjax.sparse_teacher import SampledTeacher, TopKTeacher, sample_teacher_tokens

FORMAT_VERSION = 1
PROVENANCE_FILE = "provenance.json"
KINDS = ("topk", "sampled")
VALUE_DTYPES = ("bfloat16", "float32")
# zarr v2 compressors; "zstd" is blosc-zstd with byte shuffle (groups the high bytes of ids and values together).
CODECS: dict[str, dict | None] = {
    "raw": None,
    "zstd": {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1},
}
# distill.topk_treatment → the sparse_teacher divergence a forward_kl (or soft_ce) term becomes with a top-k cache.
TREATMENTS = {"tail_bucket": "topk_tail_bucket", "gathered": "topk_gathered", "renormalized": "topk_renormalized"}
# Fields added to a batch, per kind: batch key → (array name in the cache).
BATCH_KEYS = {
    "topk": {"teacher_values": "values", "teacher_indices": "indices", "teacher_lse": "lse"},
    "sampled": {"teacher_ids": "ids", "teacher_weights": "weights"},
}
# Bytes of a file read into the teacher-weights hash: whole small files, head and tail of large ones (hashing a
# 140 GB checkpoint in full would cost more than a cache step; names and sizes catch a swapped file too).
_HASH_WHOLE_BELOW = 1 << 20


@dataclass(frozen=True)
class CacheLayout:
    """What is stored per token. k is the number of top-k entries, or of samples for `sampled`."""

    kind: str = "topk"
    k: int = 64
    values_dtype: str = "bfloat16"  # topk values; float32 makes k = vocab an exact dense teacher (tests)
    codec: str = "raw"

    def check(self, vocab_size: int) -> None:
        check_choice("cache kind", self.kind, KINDS)
        check_choice("cache values dtype", self.values_dtype, VALUE_DTYPES)
        check_choice("cache codec", self.codec, CODECS)
        if self.k < 1 or (self.kind == "topk" and self.k > vocab_size):
            raise UserError(f"cache k must lie in [1, {vocab_size}] (the shared vocabulary), got {self.k}")

    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Array name → (zarr dtype, per-token shape)."""
        if self.kind == "topk":
            return {"values": (self.values_dtype, (self.k,)), "indices": ("int32", (self.k,)), "lse": ("float32", ())}
        return {"ids": ("int32", (self.k,)), "weights": ("float32", (self.k,))}

    def bytes_per_token(self) -> int:
        """Uncompressed bytes per token (what the `raw` codec puts on disk)."""
        return sum(np.dtype(_np_dtype(dtype)).itemsize * int(np.prod(shape)) for dtype, shape in self.fields().values())


def _np_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else np.dtype(name)


# ----------------------------------------------------------------------------------------------------------------
# Provenance


def _hash_file_sample(digest, path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _HASH_WHOLE_BELOW:
            digest.update(f.read())
        else:
            digest.update(f.read(_HASH_WHOLE_BELOW // 2))
            f.seek(size - _HASH_WHOLE_BELOW // 2)
            digest.update(f.read())


def path_hash(path: str) -> str:
    """A hash of a file or directory tree: relative names, sizes, and contents (head and tail of large files)."""
    root = Path(path)
    if not root.exists():
        return f"path:{path}"  # remote (gs://) or missing: the name is all we can vouch for
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(root) if file != root else file.name}:{file.stat().st_size}\n".encode())
        _hash_file_sample(digest, file)
    return digest.hexdigest()[:16]


def teacher_identity(config: Config) -> dict[str, str]:
    teacher = config.teacher
    source = teacher.checkpoint or teacher.hf_path or teacher.gguf_path
    # Without a checkpoint the teacher is train.load_teacher's random init from train.seed + 1.
    weights = path_hash(source) if source else f"random-init:seed={config.train.seed + 1}"
    return {"model": fingerprint(teacher.model), "weights": weights}


def tokenizer_identity(tokenizer: str) -> str:
    if tokenizer in ("bytes", "none") or not Path(tokenizer).is_file():
        return tokenizer
    return path_hash(tokenizer)


def shared_vocab(config: Config) -> int:
    return min(config.model.vocab_size, config.teacher.model.vocab_size)


def provenance(config: Config, layout: CacheLayout, process_count: int) -> dict[str, Any]:
    """Everything a cache was computed from, as plain JSON. `check_run` compares a run's against it."""
    data = config.data
    return {
        "format": FORMAT_VERSION,
        "layout": dataclasses.asdict(layout),
        "teacher": teacher_identity(config),
        "tokenizer": {"spec": data.tokenizer, "hash": tokenizer_identity(data.tokenizer)},
        "corpus": {"sources": to_dict(data.sources), "heldout_fraction": data.heldout_fraction,
                   "add_bos": data.add_bos, "add_eos": data.add_eos, "seed": config.train.seed},
        "seq_len": data.seq_len,
        "global_batch": data.global_batch,
        "packing": {"process_count": process_count, "rows_per_process": data.global_batch // process_count},
        "steps": config.train.steps,
        "temperature": config.distill.temperature,
        "vocab_size": shared_vocab(config),
    }


# What a difference in each provenance entry means to the user, in the order they are checked.
_MISMATCH = {
    "format": "cache format version",
    "tokenizer": "tokenizer (data.tokenizer)",
    "corpus": "corpus spec or seed (data.sources, data.heldout_fraction, data.add_bos/add_eos, train.seed)",
    "seq_len": "sequence length (data.seq_len)",
    "global_batch": "batch (data.global_batch)",
    "packing": "packing (the number of processes splitting each batch)",
    "vocab_size": "shared vocabulary (model.vocab_size, teacher.model.vocab_size)",
    "teacher": "teacher (teacher.model, teacher.checkpoint or teacher.hf_path)",
}


def _differences(saved: dict, expected: dict, keys: Iterable[str]) -> list[str]:
    return [key for key in keys if saved.get(key) != expected.get(key)]


def _describe(key: str, saved: dict, expected: dict) -> str:
    return f"{_MISMATCH.get(key, key)}: cache has {json.dumps(saved.get(key))}, run has {json.dumps(expected.get(key))}"


def check_run(saved: dict, config: Config, process_count: int, path: str) -> None:
    """Refuse a cache that does not cover this run token for token (UserError naming the first difference)."""
    expected = provenance(config, CacheLayout(**saved["layout"]), process_count)
    for key in _differences(saved, expected, _MISMATCH):
        raise UserError(f"teacher cache {path} does not match this run: different {_describe(key, saved, expected)}")
    if saved["steps"] < config.train.steps:
        raise UserError(f"teacher cache {path} covers {saved['steps']} steps but train.steps is {config.train.steps}: "
                        "run cache-teacher with the longer train.steps")
    kind = saved["layout"]["kind"]
    distill = config.distill
    check_choice("distill.topk_treatment", distill.topk_treatment, TREATMENTS)
    # Raw top-k logits do not depend on the temperature; the logsumexp and the samples do.
    temperature_matters = kind == "sampled" or distill.topk_treatment == "tail_bucket"
    if temperature_matters and (distill.temperature != saved["temperature"] or
                                distill.final_temperature not in (None, saved["temperature"])):
        raise UserError(f"teacher cache {path} was computed at temperature {saved['temperature']}, the run uses "
                        f"distill.temperature {distill.temperature} (final {distill.final_temperature}); a {kind} "
                        f"cache{' with the tail_bucket treatment' if kind == 'topk' else ''} needs the same fixed one")
    for i, term in enumerate(distill.terms):
        if term.kind not in ("ce", "forward_kl", "soft_ce"):
            raise UserError(f"distill.terms[{i}].kind: {term.kind} needs the teacher's full outputs; a teacher cache "
                            "supports forward_kl (or soft_ce) and ce")


def read_provenance(path: str | Path) -> dict | None:
    file = Path(path) / PROVENANCE_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def _write_json_atomically(file: Path, value: dict) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    os.replace(tmp, file)


# ----------------------------------------------------------------------------------------------------------------
# Storage


def _spec(path: Path, name: str, shape, chunks, dtype: str, codec: str | None) -> dict:
    return {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(path / name)},
        "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(dtype),
                     "compressor": CODECS[codec] if codec else None, "fill_value": 0},
    }


def _zarr_dtype(name: str) -> str:
    return {"bfloat16": "bfloat16", "float32": "<f4", "int32": "<i4", "uint32": "<u4", "uint8": "|u1"}[name]


def row_hashes(batch: dict[str, np.ndarray]) -> np.ndarray:
    """crc32 per row of its tokens and segment ids: the identity of a packed row."""
    tokens = np.ascontiguousarray(batch["tokens"], np.int32)
    segments = np.ascontiguousarray(batch["segment_ids"], np.int32)
    return np.array([zlib.crc32(segments[r].tobytes(), zlib.crc32(tokens[r].tobytes())) for r in range(len(tokens))],
                    np.uint32)


class _Store:
    """The cache's arrays: one per field, plus row_hash [steps, B] and done [steps, processes]."""

    def __init__(self, path: Path, meta: dict, *, create: bool):
        import tensorstore as ts

        self.path = path
        layout = CacheLayout(**meta["layout"])
        steps, batch, seq = meta["steps"], meta["global_batch"], meta["seq_len"]
        processes, rows = meta["packing"]["process_count"], meta["packing"]["rows_per_process"]
        mode = dict(create=True, open=True) if create else dict(open=True)
        self.fields = {}
        for name, (dtype, per_token) in layout.fields().items():
            spec = _spec(path, name, (steps, batch, seq, *per_token), (1, rows, seq, *per_token), dtype, layout.codec)
            self.fields[name] = ts.open(spec, **mode)
        self.fields = {name: future.result() for name, future in self.fields.items()}
        self.row_hash = ts.open(_spec(path, "row_hash", (steps, batch), (1, rows), "uint32", "raw"), **mode).result()
        # One file per marker: processes never rewrite each other's chunks.
        self.done = ts.open(_spec(path, "done", (steps, processes), (1, 1), "uint8", "raw"), **mode).result()
        self.rows = rows

    def finished_steps(self) -> np.ndarray:
        """[steps] bool: every process's part of the step is on disk."""
        return self.done.read().result().astype(bool).all(axis=1)


def data_bytes_per_token(path: str | Path) -> float:
    """Bytes on disk of the per-token fields (chunk files, compression included) per cached token."""
    path = Path(path)
    meta = read_provenance(path)
    tokens = meta["steps"] * meta["global_batch"] * meta["seq_len"]
    total = sum(f.stat().st_size for name in CacheLayout(**meta["layout"]).fields()
                for f in (path / name).iterdir() if not f.name.startswith("."))
    return total / tokens


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order `to_global_batch` took them."""
    shards = {}
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


def make_teacher_outputs(teacher, layout: CacheLayout, *, temperature: float, vocab_size: int, chunk_tokens: int,
                         seed: int):
    """fn(teacher_params, batch, step, row_offset) -> {field: [B, S, ...]} for a `step.Teacher`.

    The teacher's logits exist one chunk of positions at a time ([B, c, V]); sampling keys come from (seed, step,
    global row, position), so the samples do not depend on how many processes or devices computed them.
    """
    base_key = jax.random.key(seed)

    def outputs(params, batch, step, row_offset):
        import flax.linen as nn

        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        with nn.logical_axis_rules(list(teacher.rules)):
            if teacher.features is not None:
                feats, head = teacher.features(params, tokens, seg, pos, False)
                hidden, logits_bsv = feats.hidden_bsd, None
            else:
                logits_bsv = teacher.logits(params, tokens, seg, pos)
        b, s = tokens.shape
        c = _seq_chunk(b, s, chunk_tokens)
        step_key = jax.random.fold_in(base_key, step)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_offset + jnp.arange(b))

        def chunk(j):
            if logits_bsv is None:
                h = jax.lax.dynamic_slice_in_dim(hidden, j * c, c, axis=1)
                logits = jnp.dot(h, jax.lax.stop_gradient(head), preferred_element_type=jnp.float32)
            else:
                logits = jax.lax.dynamic_slice_in_dim(logits_bsv, j * c, c, axis=1).astype(jnp.float32)
            # Only the vocabulary both models share can carry probability (padded columns are -inf, as in the loss).
            columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
            logits = jnp.where(columns < vocab_size, logits, -jnp.inf)
            if layout.kind == "topk":
                values, indices = jax.lax.top_k(logits, layout.k)
                lse = jax.nn.logsumexp(logits / temperature, axis=-1)
                return {"values": values.astype(_np_dtype(layout.values_dtype)), "indices": indices.astype(jnp.int32),
                        "lse": lse}
            positions = j * c + jnp.arange(c)
            keys = jax.vmap(lambda key: jax.vmap(lambda t: jax.random.fold_in(key, t))(positions))(row_keys)
            per_token = jax.vmap(jax.vmap(lambda lg, key: sample_teacher_tokens(lg, layout.k, key, temperature)))
            ids, weights = per_token(logits, keys)
            return {"ids": ids, "weights": weights}

        per_chunk = jax.lax.map(chunk, jnp.arange(s // c))  # [n, B, c, ...]
        return {name: jnp.moveaxis(x, 0, 1).reshape(b, s, *x.shape[3:]) for name, x in per_chunk.items()}

    return outputs


def write_cache(config: Config, path: str | Path, layout: CacheLayout, batches: Iterable[dict[str, np.ndarray]], *,
                teacher, teacher_params, mesh, process_index: int, process_count: int, stop_after: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run the teacher over `batches` (this process's local batches of steps 0, 1, ...) and write its rows.

    Steps already finished by every process are skipped (their batches are still drawn, to stay aligned).
    `stop_after` stops after writing that many steps (a job cut short, for tests). Returns a summary.
    """
    from tqdm import tqdm

    from analogjax import mesh as mesh_lib
    from analogjax.data import to_global_batch

    path = Path(path)
    vocab = shared_vocab(config)
    layout.check(vocab)
    meta = provenance(config, layout, process_count)
    saved = read_provenance(path)
    if saved is None:
        path.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(path / PROVENANCE_FILE, meta)
    elif saved != meta:
        different = _differences(saved, meta, meta)
        raise UserError(f"{path} holds a teacher cache of another configuration (different {', '.join(different)}): "
                        "use another path or delete it")
    if jax.process_count() > 1:  # everyone sees the provenance before anyone opens (and maybe creates) arrays
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("teacher_cache_provenance")
    store = _Store(path, meta, create=True)
    finished = store.finished_steps()
    sharding = mesh_lib.batch_sharding(mesh)
    outputs_fn = jax.jit(
        make_teacher_outputs(teacher, layout, temperature=config.distill.temperature, vocab_size=vocab,
                             chunk_tokens=config.distill.chunk_size, seed=config.train.seed),
        out_shardings=sharding,
    )
    rows = store.rows
    row_offset = process_index * rows
    steps, seq_len = config.train.steps, config.data.seq_len
    bar = tqdm(total=steps, initial=int(finished.sum()), desc="cache-teacher", dynamic_ncols=True,
               disable=not progress or process_index != 0)
    written, skipped = [], 0
    # Throughput counts the steps after the first written one: the first includes compiling the teacher.
    timed_start, timed_tokens, pending = None, 0, None

    def flush(step, global_outputs, hashes):
        nonlocal timed_start, timed_tokens
        local = {name: _local_rows(x) for name, x in global_outputs.items()}
        region = np.s_[step, row_offset:row_offset + rows]
        writes = [store.fields[name][region].write(value) for name, value in local.items()]
        writes.append(store.row_hash[region].write(hashes))
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
            bar.set_postfix(tok_s=f"{timed_tokens / (time.perf_counter() - timed_start):.0f}")

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
            current = (step, outputs_fn(teacher_params, to_global_batch(inputs, sharding), jnp.int32(step),
                                        jnp.int32(row_offset)), hashes)
            if pending is not None:
                flush(*pending)
            pending = current
        if pending is not None:
            flush(*pending)
    bar.close()
    elapsed = time.perf_counter() - timed_start if timed_start is not None else 0.0
    complete = bool(store.finished_steps().all())
    return {"path": str(path), "written_steps": written, "skipped_steps": skipped, "complete": complete,
            "tokens_per_s": timed_tokens / elapsed if timed_tokens else None,
            "bytes_per_token": layout.bytes_per_token()}


def build_cache(config: Config, layout: CacheLayout, path: str | Path | None = None, *, mesh=None, teacher=None,
                teacher_params=None, process_index: int | None = None, process_count: int | None = None,
                stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Cache the config's teacher over the batches a run of `config` consumes, into `path` (default teacher.cache).

    process_index/process_count default to JAX's; passing them simulates one process of a multi-process job.
    """
    from analogjax import train
    from analogjax.data import make_batch_iterator, validate

    path = path or config.teacher.cache
    if not path:
        raise UserError("teacher.cache: set the directory the teacher cache is written to")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    validate(config.data, vocab_size=config.model.vocab_size, process_count=process_count)  # before the teacher loads
    mesh = mesh if mesh is not None else train.build_mesh(config)
    if teacher is None:
        live = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, cache=None))
        teacher, teacher_params = train.load_teacher(live, mesh)
        if teacher is None:
            raise UserError("distill.terms: the objective uses no teacher, so there is nothing to cache")
    batches = make_batch_iterator(config.data, split="train", seed=config.train.seed,
                                  vocab_size=config.model.vocab_size, process_index=process_index,
                                  process_count=process_count)
    return write_cache(config, path, layout, batches, teacher=teacher, teacher_params=teacher_params, mesh=mesh,
                       process_index=process_index, process_count=process_count, stop_after=stop_after,
                       progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def sparse_teacher_from_batch(batch: dict[str, jax.Array]) -> TopKTeacher | SampledTeacher:
    """The cached teacher rows of a (global, sharded) batch, tokens flattened like the student's hidden states."""
    def flat(x):
        return x.reshape(-1, *x.shape[2:])

    if "teacher_values" in batch:
        return TopKTeacher(flat(batch["teacher_values"]), flat(batch["teacher_indices"]), flat(batch["teacher_lse"]))
    return SampledTeacher(flat(batch["teacher_ids"]), flat(batch["teacher_weights"]))


def cached_teacher(config: Config):
    """A `step.Teacher` whose outputs arrive with the batch: nothing of the teacher is in memory."""
    from analogjax import mesh as mesh_lib
    from analogjax.step import Teacher

    saved = read_provenance(config.teacher.cache)
    if saved is None:
        raise UserError(f"teacher.cache: {config.teacher.cache} holds no teacher cache (run cache-teacher first)")
    check_run(saved, config, jax.process_count(), config.teacher.cache)
    return Teacher(from_batch=sparse_teacher_from_batch, rules=mesh_lib.TEACHER_RULES, vocab_size=saved["vocab_size"])


class CacheReader:
    """This process's rows of the cache, step by step, checked against the run and prefetched one step ahead."""

    def __init__(self, config: Config, *, process_index: int | None = None, process_count: int | None = None):
        path = config.teacher.cache
        self.path = Path(path)
        saved = read_provenance(self.path)
        if saved is None:
            raise UserError(f"teacher.cache: {path} holds no teacher cache (run cache-teacher first)")
        self.process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        check_run(saved, config, process_count, path)
        self.store = _Store(self.path, saved, create=False)
        unfinished = np.flatnonzero(~self.store.finished_steps()[: config.train.steps])
        if unfinished.size:
            raise UserError(f"teacher cache {path} is incomplete: step {int(unfinished[0])} (and "
                            f"{unfinished.size - 1} more) not finished; run cache-teacher again to complete it")
        self.keys = BATCH_KEYS[saved["layout"]["kind"]]
        self._prefetched: tuple[int, dict] | None = None

    def _start(self, step: int) -> dict:
        start = self.process_index * self.store.rows
        region = np.s_[step, start:start + self.store.rows]
        reads = {key: self.store.fields[name][region].read() for key, name in self.keys.items()}
        reads["row_hash"] = self.store.row_hash[region].read()
        return reads

    def add_to(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` (this process's rows of step `step`) with the cached teacher arrays added."""
        reads = self._prefetched[1] if self._prefetched and self._prefetched[0] == step else self._start(step)
        if step + 1 < self.store.done.shape[0]:
            self._prefetched = (step + 1, self._start(step + 1))
        arrays = {key: future.result() for key, future in reads.items()}
        cached_hash = arrays.pop("row_hash")
        mismatch = np.flatnonzero(cached_hash != row_hashes(batch))
        if mismatch.size:
            row = self.process_index * self.store.rows + int(mismatch[0])
            raise UserError(f"teacher cache {self.path}: step {step}, row {row} holds other tokens than this run's "
                            "batch: the corpus files changed since the cache was written; rebuild the cache")
        return {**batch, **{key: np.asarray(value) for key, value in arrays.items()}}


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a cache, whole (for tests and inspection of small caches)."""
    path = Path(path)
    store = _Store(path, read_provenance(path), create=False)
    arrays = {name: array.read().result() for name, array in store.fields.items()}
    return {**arrays, "row_hash": store.row_hash.read().result(), "done": store.done.read().result()}


__all__ = ["CacheLayout", "CacheReader", "build_cache", "write_cache", "cached_teacher", "check_run", "read_arrays",
           "data_bytes_per_token", "provenance", "read_provenance", "sparse_teacher_from_batch", "TREATMENTS"]
