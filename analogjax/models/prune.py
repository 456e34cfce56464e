"""Start the analog from its teacher: structured pruning by activation importance (Minitron, arXiv 2407.14679).

`prune_to(config, out_dir)` measures the teacher's activations on calibration batches of the run's own data
pipeline (the training split, the exact batches a run of `config` reads first), ranks every prunable unit, cuts the
teacher's params down to the config's `model` shape and writes an analogjax checkpoint (step 0) that
`checkpoint.init_path=DIR`, `analogjax eval --checkpoint DIR` and `analogjax export --checkpoint DIR` read, plus
importance.json / importance.npz / importance.png.

Importance (activation based, what Minitron found best):
- attention heads: the L2 norm over head_dim of each head's attention output (before the output projection);
- FFN neurons: the magnitude |a| of each neuron's activation (the input of w_down: act(x·w_gate)·(x·w_up));
- embedding channels: the magnitude of each channel of every RMSNorm over the model width (the blocks' norms, whose
  input is the residual stream, and the final norm), summed over those norms;
- KV groups: the L2 norm of their query heads' importances (a group is kept or dropped whole);
- layers (depth): block importance BI = 1 − cos(x_in, x_out), the residual stream entering and leaving the block,
  averaged over every valid token (not the loss increase when the layer is skipped).
Aggregation (Minitron's best, "mean over sequence, L2 over batch"): per row, the mean over its valid tokens
(segment_ids > 0; a packed row's documents together); over rows, the L2 norm: importance = sqrt(Σ_rows mean²).
Sums of squares and cosine sums are what is accumulated, so batches simply add. They are jitted sums over the
*global* batch, replicated on the mesh: each process feeds its own rows (`to_global_batch`), XLA adds every
process's rows in the reduction, and every process reads the same totals. Nothing of the teacher leaves its
shards: the teacher is restored sharded, the forward runs block by block on the mesh, and slicing is one jit whose
outputs are born in the student's shardings.

Slicing keeps order everywhere (kept indices ascending): channels are one global choice (the residual stream is
shared), heads and neurons are chosen per layer; depth keeps the layers with the highest BI in order, and with a
per-layer attention pattern (Gemma 2/3: sliding/full) picks, by dynamic programming, the highest-importance ordered
subset whose attention kinds are exactly the student's pattern. Query heads keep whole GQA groups: the student's
KV groups are the teacher's most important groups, each keeping its `n_heads / n_kv_heads` most important query
heads. Every parameter is cut by its logical axis names (embed/norm: channels, heads, kv_heads, mlp: neurons,
layers), which covers every family of models/hf/ (Llama, Mistral, Qwen2 biases, Qwen3 and OLMo 2 q/k norms,
Gemma sandwich norms, Phi-3); an axis this module does not know (e.g. MoE experts) is refused, and MoE teachers
and attention sinks (gpt-oss) are refused before any calibration (`check_target`). Head dim, vocabulary,
tokenizer and family stay the teacher's. Gemma's embedding scale sqrt(d_model) changes with width: an untied
embedding is rescaled by sqrt(d_teacher / d_student) so the kept channels start the residual stream with the
teacher's values; a tied one is left alone (rescaling it would scale the logits too).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from analogjax.errors import UserError
from analogjax.models.config import SIZE_FIELDS, ModelConfig
from analogjax.runtime import figures, storage
from analogjax.runtime.batch_sums import sum_over_batches
from analogjax.runtime.metrics_log import Progress

IMPORTANCE_JSON = "importance.json"
IMPORTANCE_NPZ = "importance.npz"
IMPORTANCE_PLOT = "importance.png"
DEFAULT_BATCHES = 16

# Logical axes of a parameter → what pruning cuts along it.
_CHANNEL_AXES = ("embed", "norm")
_PER_LAYER_AXES = {"heads": "heads", "kv_heads": "kv_groups", "mlp": "neurons"}
_KEPT_AXES = ("vocab", "head_dim", "layers")
# RMSNorms over the model width inside a block (their outputs give the channel importance).
_WIDTH_NORMS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")


# ----------------------------------------------------------------------------------------------------------------
# Shapes


def check_target(teacher: ModelConfig, student: ModelConfig) -> None:
    """Refuse a student that is not a smaller copy of the teacher: another family, vocabulary or head size, any
    dimension larger than the teacher's, or query heads that do not fill whole KV groups of the teacher; and, before
    any calibration, teachers with parts pruning cannot cut yet (latent attention, experts, attention sinks)."""
    if teacher.mla.enabled:
        raise UserError(
            "teacher.model.mla: pruning a multi-head latent attention teacher (DeepSeek-V3, Kimi K2) is not "
            "supported: cutting heads and width out of its latent projections (wq_b, wkv_b) and latent ranks is "
            "not implemented; distil into a like_teacher analog from a fresh init instead"
        )
    if teacher.moe.enabled:
        raise UserError(
            f"prune: the teacher is a mixture of experts (model.moe.experts={teacher.moe.experts}); pruning cuts "
            "heads, neurons, channels and layers, and has no importance or cut for experts yet: start the analog "
            "from scratch instead"
        )
    if teacher.attn_sinks:
        raise UserError(
            "prune: the teacher has attention sinks (gpt-oss's model.attn_sinks); pruning does not rank or cut "
            "heads together with their sink logits yet: start the analog from scratch instead"
        )
    for f in dataclasses.fields(ModelConfig):
        if f.name in SIZE_FIELDS or f.name == "preset":
            continue
        if getattr(student, f.name) != getattr(teacher, f.name):
            raise UserError(
                f"model.{f.name} is {getattr(student, f.name)!r} but the teacher's is "
                f"{getattr(teacher, f.name)!r}: a pruned student keeps the teacher's family, vocabulary "
                "and tokenizer (use model.like_teacher with size fields only)"
            )
    if student.dim_per_head != teacher.dim_per_head:
        raise UserError(
            f"model: head dim {student.dim_per_head} differs from the teacher's {teacher.dim_per_head}: "
            f"pruning keeps whole heads (set model.like_teacher.head_dim: {teacher.dim_per_head})"
        )
    sizes = {
        "n_layers": (student.n_layers, teacher.n_layers),
        "d_model": (student.d_model, teacher.d_model),
        "n_heads": (student.n_heads, teacher.n_heads),
        "n_kv_heads": (student.kv_heads, teacher.kv_heads),
        "d_ff": (student.d_ff, teacher.d_ff),
    }
    for name, (small, large) in sizes.items():
        if small > large:
            raise UserError(f"model.{name} ({small}) is larger than the teacher's ({large}): pruning only removes")
    group_s, group_t = student.n_heads // student.kv_heads, teacher.n_heads // teacher.kv_heads
    if group_s > group_t:
        raise UserError(
            f"model: {student.n_heads} query heads over {student.kv_heads} KV heads is {group_s} per KV "
            f"group, but the teacher's groups have {group_t}: pruned heads must stay in whole KV groups "
            f"of the teacher (at most {group_t} query heads per KV head)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Importance


def make_importance_step(cfg: ModelConfig, rules):
    """A pure function (teacher params, batch) -> importance sums of one global batch (see the module docstring)."""
    from analogjax.models.transformer import Block, RMSNorm, Transformer, layer_data

    model = Transformer(cfg)
    per_layer = layer_data(cfg)

    def width_norm(module, method_name):
        return isinstance(module, RMSNorm) and module.name in _WIDTH_NORMS

    def step(params, batch):
        seg = batch["segment_ids"]
        valid = (seg > 0).astype(jnp.float32)
        per_row = 1.0 / jnp.maximum(valid.sum(axis=1), 1.0)  # [b]: mean over each row's valid tokens

        def row_mean_sq(a_bsx):  # Σ_rows (mean over the row's tokens)² → [x]
            mean = jnp.einsum("bs...,bs->b...", a_bsx.astype(jnp.float32), valid)
            mean = mean * per_row.reshape((-1,) + (1,) * (mean.ndim - 1))
            return jnp.sum(mean * mean, axis=0)

        tree = params.get("params", params)
        with nn.logical_axis_rules(list(rules)):
            x = model.embed(params, batch["tokens"])

            def body(x_bsd, xs):
                layer_params, row = xs
                (y_bsd, _), state = Block(cfg).apply(
                    {"params": layer_params},
                    x_bsd,
                    seg,
                    batch["positions"],
                    row,
                    mutable=["intermediates"],
                    capture_intermediates=width_norm,
                )
                found = state["intermediates"]
                channels = sum(
                    row_mean_sq(jnp.abs(found[name]["__call__"][0])) for name in _WIDTH_NORMS if name in found
                )
                heads = jnp.linalg.norm(found["attn"]["heads_out"][0].astype(jnp.float32), axis=-1)
                x32, y32 = x_bsd.astype(jnp.float32), y_bsd.astype(jnp.float32)
                cos = jnp.sum(x32 * y32, -1) * jax.lax.rsqrt(
                    jnp.maximum(jnp.sum(x32 * x32, -1) * jnp.sum(y32 * y32, -1), 1e-30)
                )
                sums = {
                    "heads": row_mean_sq(heads),
                    "neurons": row_mean_sq(jnp.abs(found["mlp"]["hidden"][0])),
                    "channels": channels,
                    "cos": jnp.sum(cos * valid),
                }
                return y_bsd, sums

            rows = None if per_layer is None else jax.tree.map(jnp.asarray, per_layer)
            x, sums = jax.lax.scan(body, x, (tree["layers"], rows))
            final = model.finish(params, x)
        return {
            "heads_sq": sums["heads"],
            "neurons_sq": sums["neurons"],
            "channels_sq": sums["channels"].sum(0) + row_mean_sq(jnp.abs(final)),
            "cos_sum": sums["cos"],
            "tokens": valid.sum(),
            "rows": jnp.sum(valid.sum(1) > 0),
        }

    return step


def gather_importance(
    cfg: ModelConfig, params, batches, mesh, *, total: int | None = None, progress: bool = True
) -> dict[str, np.ndarray]:
    """Importance sums over an iterable of global batches (already on `mesh`), then the importances themselves:
    heads [L, h], kv_groups [L, k], neurons [L, f], channels [d], block [L] (BI), plus rows and tokens."""
    from analogjax import mesh as mesh_lib

    fn = jax.jit(make_importance_step(cfg, mesh_lib.TEACHER_RULES), out_shardings=mesh_lib.replicated(mesh))
    bar = Progress(total, desc="prune: importance", unit="batch", enabled=progress and jax.process_index() == 0)
    inputs = ({k: batch[k] for k in ("tokens", "segment_ids", "positions")} for batch in bar.track(batches))
    try:
        with jax.set_mesh(mesh):
            acc = sum_over_batches(fn, inputs, params)
    finally:
        bar.close()
    if not acc or acc["tokens"] == 0:
        raise UserError("prune: the calibration batches hold no tokens (check data.sources)")
    heads = np.sqrt(acc["heads_sq"])
    group = cfg.n_heads // cfg.kv_heads
    return {
        "heads": heads,
        "kv_groups": np.sqrt(acc["heads_sq"].reshape(cfg.n_layers, cfg.kv_heads, group).sum(-1)),
        "neurons": np.sqrt(acc["neurons_sq"]),
        "channels": np.sqrt(acc["channels_sq"]),
        "block": 1.0 - acc["cos_sum"] / acc["tokens"],
        "rows": int(acc["rows"]),
        "tokens": int(acc["tokens"]),
    }


def calibration_batches(config, mesh, batches: int):
    """The first `batches` global batches of the run's training split (what a run of `config` reads first)."""
    from analogjax import mesh as mesh_lib
    from analogjax.data import make_batch_iterator, to_global_batch

    iterator = make_batch_iterator(
        config.data,
        split="train",
        seed=config.train.seed,
        vocab_size=config.teacher.model.vocab_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    sharding = mesh_lib.batch_sharding(mesh)
    for _, batch in zip(range(batches), iterator):
        yield to_global_batch({k: batch[k] for k in ("tokens", "segment_ids", "positions")}, sharding)


# ----------------------------------------------------------------------------------------------------------------
# What to keep


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, ascending (ties: the earlier index)."""
    order = np.argsort(-scores, kind="stable")[:n]
    return np.sort(order)


def choose_layers(block: np.ndarray, teacher_kinds, student_kinds) -> np.ndarray:
    """The ordered subset of teacher layers with the highest total block importance whose attention kinds equal the
    student's layer by layer (dynamic programming; with one kind, simply the top n in order)."""
    n_t, n_s = len(teacher_kinds), len(student_kinds)
    best = np.full((n_t + 1, n_s + 1), -np.inf)
    best[:, 0] = 0.0
    for i in range(1, n_t + 1):
        for j in range(1, min(i, n_s) + 1):
            take = best[i - 1, j - 1] + block[i - 1] if teacher_kinds[i - 1] == student_kinds[j - 1] else -np.inf
            best[i, j] = max(best[i - 1, j], take)
    if not np.isfinite(best[n_t, n_s]):
        raise UserError(
            f"model.n_layers={n_s}: no ordered subset of the teacher's layers has the student's attention "
            f"pattern {list(student_kinds)}"
        )
    kept, j = [], n_s
    for i in range(n_t, 0, -1):  # walk back, preferring to skip a layer when skipping is as good
        if j and best[i, j] != best[i - 1, j]:
            kept.append(i - 1)
            j -= 1
    return np.asarray(kept[::-1], np.int32)


def _layer_signature(cfg: ModelConfig) -> tuple:
    """What a kept teacher layer must share with the student layer it becomes: the attention kind, and whether it
    has RoPE (Llama 4's NoPE layers) where the model has NoPE layers."""
    if not any(cfg.layer_nope):
        return cfg.layer_kinds
    return tuple(f"{kind}+nope" if nope else kind for kind, nope in zip(cfg.layer_kinds, cfg.layer_nope))


def choose(importance: dict[str, np.ndarray], teacher: ModelConfig, student: ModelConfig) -> dict[str, np.ndarray]:
    """Kept indices: channels [d_s], layers [L_s], and per kept layer heads [L_s, h_s], kv_groups [L_s, k_s],
    neurons [L_s, f_s] (teacher indices, ascending)."""
    check_target(teacher, student)
    layers = choose_layers(importance["block"], _layer_signature(teacher), _layer_signature(student))
    group_t, group_s = teacher.n_heads // teacher.kv_heads, student.n_heads // student.kv_heads
    heads, groups = [], []
    for layer in layers:
        kept_groups = _top(importance["kv_groups"][layer], student.kv_heads)
        per_head = importance["heads"][layer].reshape(teacher.kv_heads, group_t)
        heads.append(np.concatenate([g * group_t + _top(per_head[g], group_s) for g in kept_groups]))
        groups.append(kept_groups)
    neurons = [_top(importance["neurons"][layer], student.d_ff) for layer in layers]
    return {
        "channels": _top(importance["channels"], student.d_model),
        "layers": layers,
        "heads": np.asarray(heads, np.int32),
        "kv_groups": np.asarray(groups, np.int32),
        "neurons": np.asarray(neurons, np.int32),
    }


# ----------------------------------------------------------------------------------------------------------------
# Slicing


def slice_params(params, teacher: ModelConfig, student: ModelConfig, keep: dict[str, np.ndarray], mesh):
    """The teacher's params cut to the student's shape (one jit; outputs born in the student's shardings)."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    check_target(teacher, student)
    key = jax.random.key(0)
    names = nn.get_partition_spec(jax.eval_shape(Transformer(teacher).init_boxed, key))
    target = mesh_lib.abstract_sharded(Transformer(student).init_boxed, mesh, mesh_lib.STUDENT_RULES)
    embed_factor = (
        math.sqrt(teacher.d_model / student.d_model) if teacher.embed_scale and not teacher.tie_embeddings else 1.0
    )

    def cut(path, w, spec):
        axes = tuple(spec)
        where = jax.tree_util.keystr(path)
        for name in axes:
            if name not in _CHANNEL_AXES + _KEPT_AXES + tuple(_PER_LAYER_AXES):
                raise UserError(f"prune: parameter {where} has a {name!r} axis, which pruning does not support")
        if "layers" in axes:
            if axes.index("layers") != 0:
                raise UserError(f"prune: parameter {where} is not stacked over layers on its first axis")
            w = jnp.take(w, keep["layers"], axis=0)
        for axis, name in enumerate(axes):
            if name in _CHANNEL_AXES:
                w = jnp.take(w, keep["channels"], axis=axis)
            elif name in _PER_LAYER_AXES:
                if "layers" not in axes:
                    raise UserError(f"prune: parameter {where} has a {name!r} axis outside the layer stack")
                index = jnp.asarray(keep[_PER_LAYER_AXES[name]])
                w = jax.vmap(lambda wl, il, a=axis - 1: jnp.take(wl, il, axis=a))(w, index)
        if where.endswith("['embedding']"):
            w = w * jnp.asarray(embed_factor, w.dtype)
        return w

    def cut_all(p):
        return jax.tree_util.tree_map_with_path(cut, p, names)

    shapes = jax.eval_shape(cut_all, params)
    # jaxlib ships no stub for its PyTreeDef, which mypy then sees as an unresolved type without a `!=`.
    if jax.tree.structure(shapes) != jax.tree.structure(target) or any(  # type: ignore[operator]
        a.shape != b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(target))
    ):
        raise UserError("prune: the cut teacher params do not match the student's parameter tree")
    shardings = jax.tree.map(lambda a: a.sharding, target)
    with jax.set_mesh(mesh):
        return jax.jit(cut_all, out_shardings=shardings)(params)


# ----------------------------------------------------------------------------------------------------------------
# The command's work


def prune_to(
    config,
    out_dir: str | Path,
    *,
    batches: int = DEFAULT_BATCHES,
    mesh=None,
    teacher_params=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune the config's teacher to the config's `model` shape into `out_dir` (which must not exist): a step-0
    analogjax checkpoint of the student (meta holds `config`), importance.json/.npz and importance.png.
    `teacher_params` (sharded on `mesh`) replaces loading the config's teacher. Returns the summary."""
    from analogjax.setup import build_mesh
    from analogjax.teacher import live_source_kind, load_teacher

    out = storage.location(out_dir, "--out")
    if out.exists():
        raise UserError(f"--out {out} exists: prune never overwrites; choose a new directory")
    if batches <= 0:
        raise UserError("--batches must be positive")
    teacher_cfg, student_cfg = config.teacher.model, config.model
    check_target(teacher_cfg, student_cfg)
    if mesh is None:
        mesh = build_mesh(config)
    if teacher_params is None:
        _, teacher_params = load_teacher(config, mesh, live=True)
    importance = gather_importance(
        teacher_cfg, teacher_params, calibration_batches(config, mesh, batches), mesh, total=batches, progress=progress
    )
    keep = choose(importance, teacher_cfg, student_cfg)
    student_params = slice_params(teacher_params, teacher_cfg, student_cfg, keep, mesh)
    source = {
        "kind": live_source_kind(config),
        "checkpoint": config.teacher.checkpoint,
        "hf_path": config.teacher.hf_path,
    }
    report = importance_report(importance, keep, teacher_cfg, student_cfg, batches, source)
    write_checkpoint(out, student_params, config, mesh, report)
    if jax.process_index() == 0:
        (out / IMPORTANCE_JSON).write_text(json.dumps(report, indent=1) + "\n")
        arrays = io.BytesIO()  # numpy writes local files only; the bytes go wherever `out` is
        np.savez(
            arrays,
            **{k: v for k, v in importance.items() if isinstance(v, np.ndarray)},
            **{f"kept_{k}": v for k, v in keep.items()},
        )
        (out / IMPORTANCE_NPZ).write_bytes(arrays.getvalue())
        plot_importance(importance, keep, out / IMPORTANCE_PLOT)
    return {
        "out": str(out),
        "plot": str(out / IMPORTANCE_PLOT),
        "importance": str(out / IMPORTANCE_JSON),
        "kept_layers": keep["layers"].tolist(),
        "rows": importance["rows"],
        "tokens": importance["tokens"],
    }


def write_checkpoint(out: Path, params, config, mesh, report: dict) -> None:
    """`out` as a checkpoint directory of one step (0): the student's params item, a train item holding the step,
    and meta with the resolved config, run identity and provenance (what release.run_config reads)."""
    import orbax.checkpoint as ocp

    from analogjax.checkpoint import provenance
    from analogjax.config import run_identity, to_dict

    meta = {
        "config": to_dict(config),
        "identity": run_identity(config),
        "provenance": provenance(mesh),
        "step": 0,
        "pruned_from": {"teacher": report["teacher_source"], "kept_layers": report["kept_layers"]},
    }
    arrays = ocp.PyTreeCheckpointHandler()
    manager = ocp.CheckpointManager(
        out,
        options=ocp.CheckpointManagerOptions(create=True),
        item_handlers={"params": arrays, "train": arrays, "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        step = jax.device_put(jnp.int32(0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        manager.save(
            0,
            args=ocp.args.Composite(
                params=ocp.args.PyTreeSave(params),
                train=ocp.args.PyTreeSave({"step": step}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        manager.wait_until_finished()
    finally:
        manager.close()


def importance_report(
    importance, keep, teacher: ModelConfig, student: ModelConfig, batches: int, source: dict
) -> dict[str, Any]:
    """importance.json: what was measured, how, and what was kept (full neuron arrays are in importance.npz)."""
    kept_layer = {int(t): s for s, t in enumerate(keep["layers"])}

    def rounded(a):
        return [round(float(v), 6) for v in a]

    def mass(scores, kept):  # share of the L2 importance mass that the kept units carry
        return round(float(np.sum(scores[kept] ** 2) / max(np.sum(scores**2), 1e-30)), 6)

    layers = []
    for layer in range(teacher.n_layers):
        row = {
            "layer": layer,
            "kind": teacher.layer_kinds[layer],
            "block_importance": round(float(importance["block"][layer]), 6),
            "kept_as": kept_layer.get(layer),
            "heads": rounded(importance["heads"][layer]),
            "kv_groups": rounded(importance["kv_groups"][layer]),
            "neurons_quantiles": rounded(np.quantile(importance["neurons"][layer], [0, 0.1, 0.5, 0.9, 1])),
        }
        if layer in kept_layer:
            s = kept_layer[layer]
            row.update(
                kept_heads=keep["heads"][s].tolist(),
                kept_kv_groups=keep["kv_groups"][s].tolist(),
                kept_neuron_mass=mass(importance["neurons"][layer], keep["neurons"][s]),
                kept_head_mass=mass(importance["heads"][layer], keep["heads"][s]),
            )
        layers.append(row)
    shape = ("n_layers", "d_model", "n_heads", "kv_heads", "d_ff", "dim_per_head")
    return {
        "method": {
            "name": "Minitron activation importance (arXiv 2407.14679)",
            "aggregation": "per row the mean over its valid tokens, L2 over rows (sqrt of the sum of squares)",
            "heads": "L2 norm over head_dim of each head's attention output before the output projection",
            "kv_groups": "L2 norm of the group's query-head importances",
            "neurons": "|activation| at the input of w_down",
            "channels": "|output| of every RMSNorm over the model width (block norms and the final norm), summed",
            "block_importance": "1 - cos(x_in, x_out) of the residual stream, mean over valid tokens",
        },
        "teacher_source": source,
        "teacher": {k: getattr(teacher, k) for k in shape},
        "student": {k: getattr(student, k) for k in shape},
        "batches": batches,
        "rows": importance["rows"],
        "tokens": importance["tokens"],
        "kept_layers": keep["layers"].tolist(),
        "kept_channels": keep["channels"].tolist(),
        "kept_channel_mass": mass(importance["channels"], keep["channels"]),
        "channels": rounded(importance["channels"]),
        "layers": layers,
    }


def plot_importance(importance, keep, path: Path) -> None:
    """The per-layer importance profile: block importance, head importance, neuron quantiles; channels sorted."""
    plt = figures.pyplot()
    n_layers = len(importance["block"])
    kept = np.zeros(n_layers, bool)
    kept[keep["layers"]] = True
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.bar(range(n_layers), importance["block"], color=np.where(kept, "tab:blue", "lightgray"))
    ax.set(title="block importance 1 − cos(x_in, x_out) (gray: dropped)", xlabel="teacher layer")
    ax = axes[0, 1]
    im = ax.imshow(importance["heads"].T, aspect="auto", origin="lower", cmap="viridis")
    for s, layer in enumerate(keep["layers"]):
        ax.scatter(np.full(len(keep["heads"][s]), layer), keep["heads"][s], marker="x", color="white", s=12)
    fig.colorbar(im, ax=ax)
    ax.set(title="head importance (x: kept)", xlabel="teacher layer", ylabel="head")
    ax = axes[1, 0]
    q = np.quantile(importance["neurons"], [0.1, 0.5, 0.9], axis=1)
    ax.fill_between(range(n_layers), q[0], q[2], alpha=0.3, label="10–90%")
    ax.plot(range(n_layers), q[1], marker="o", label="median")
    ax.set(title="FFN neuron importance per layer", xlabel="teacher layer")
    ax.legend()
    ax = axes[1, 1]
    ordered = np.sort(importance["channels"])[::-1]
    ax.plot(ordered)
    ax.axvline(len(keep["channels"]) - 0.5, color="tab:red", linestyle="--", label="kept | dropped")
    ax.set(title="embedding channel importance (sorted)", xlabel="rank", yscale="log")
    ax.legend()
    figures.save(fig, path)
