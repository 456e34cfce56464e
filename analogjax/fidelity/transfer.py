"""Transfer checks: does what is found on the analog hold on the teacher?

Three measurements, after Chen, Merullo, Stolfo & Pavlick (arXiv 2506.06609) and Oozeer et al. (arXiv 2503.04429):
1. Stitching. For each layer pair (analog layer i ↔ teacher layer j; default: equal fractions of depth, as for CKA)
   affine maps both ways between the residual streams after block i and block j, fitted by ridge regression
   (λ = MAP_RIDGE × the mean variance of the input) on fit tokens. On eval tokens: the explained variance of each
   map (1 − SSE / total variance about the eval mean) and the stitched model (analog embed → blocks 0..i → map →
   teacher blocks j+1.. → final norm → head): its next-token CE and KL(teacher‖stitched).
2. Probes, at one layer pair (`concept_pair`, default the middle one, rounding towards the input: the last
   pair's teacher layer feeds the head directly): per concept a linear discriminant (LDA with the class priors,
   covariance shrunk by PROBE_SHRINKAGE; deterministic, closed form from moments) on the analog; the same on the
   teacher (native); the analog's probe applied to teacher activations through the teacher → analog map
   (transferred). Accuracy on eval tokens; chance = the majority class rate there;
   recovered = (transferred − chance) / (native − chance).
3. Steering, at the same pair: per concept the analog's difference of means (positive − negative tokens) carried by
   the analog → teacher map's linear part; the teacher's own difference of means (native); RANDOM_DRAWS Gaussian
   directions, one set shared by every concept (a random direction's effect on a concept's markers does not depend
   on which concept is measured, and one forward gives the marker mass of every concept). Each is scaled to
   STEER_SCALE × the teacher layer's mean residual norm (the same norm for all: half the typical residual is a
   clear push that leaves the stream dominated by the text itself) and added to the teacher's residual after block
   j at every position. Effect = the mean increase of the teacher's next-token probability of the concept's
   concepts.MARKERS marker tokens (those whose rate right after concept tokens most exceeds their rate after other
   tokens, counted on fit rows) over eval positions outside the concept; recovered = (transferred − random) /
   (native − random), random = the mean effect of the random directions.

Every figure carries a 95% interval (`*_ci95`, analogjax.fidelity.intervals): the eval pass returns per-row sums
(one row: one chunk of one eval document), and a percentile bootstrap resamples the eval documents (a document's
rows together: chunks of one document are not independent). Steering's random baseline
has a second source of noise, the random directions themselves: each bootstrap draw also resamples the
RANDOM_DRAWS directions with replacement (independently of the rows; analogjax.fidelity.transfer_rows), so its
interval, and those of recovered, hold both the spread over text and the spread over random directions. Recovered is
null ("cannot be judged") where the teacher's own method does not beat its baseline beyond noise: by more than two
standard errors of an accuracy at chance (probes) or the spread of the random directions' effects (steering), and
with a 95% interval of native − baseline above zero.

Budgets: the maps and probes are fitted on `fit_batches` global batches of fit rows, the eval pass runs on
`eval_batches` batches of eval rows, and its interventions (stitched forwards and steering: the teacher's upper
layers once per pair and direction, the expensive part) on `intervention_batches` of them (default: all) and on
every row of a user concept's texts (those rows run first; the held-out ones follow round-robin over their
documents). Explained variance, probe accuracies and CE need plain forwards only, so they are measured on every eval
row, the stitched CE and KL and steering on the intervention rows; `batches` alone is the older form (that many
batches of rows, about half of them fit rows). Several models of one shape are measured in one pass
(`measure_models`): each batch's teacher forward, the native and random steering directions and the native probes
are computed once and shared; per model only its own forward, stitched forwards and carried directions run. A
concept's steering directions run as one batched forward (stacked on the batch axis, STEER_CHUNK_ELEMENTS logits at
a time), not one after another.

SINK: each segment's first token is in no statistic or measure: its residual is the attention sink (Sun et al.,
arXiv 2402.17762, "massive activations"; at SmolLM2-135M's layer 22, ~75x the median norm and 97% of the variance),
which would decide the maps, explained variances, differences of means and steering norm alone. Stitched forwards
keep the teacher's own state there (a function of the first token alone), which no map of the other tokens gives.

Data route: the packed held-out batches carry token ids only, and the concepts need character offsets, so the
checks tokenize the held-out documents' text themselves (concepts.labelled_rows: one document chunk per row, the
same tokenizer and specials as the pipeline) and split them by document: held-out document k is a fit document when
k is even, an eval document when odd; tokenizing stops once both budgets are filled. Every process builds the same
rows and feeds its share of each global batch; moments and per-row sums are computed by jitted steps over the whole
global batch (a replicated output), so the results are the same on one host or many. The fit pass sums its
statistics over batches (float32 per batch on the device, float64 across batches on the host: memory does not grow
with the fit tokens); the eval pass keeps one small vector of sums per eval row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from analogjax.errors import UserError
from analogjax.fidelity import concepts as concepts_lib
from analogjax.fidelity import transfer_rows
from analogjax.fidelity.intervals import DOCUMENT
from analogjax.fidelity.transfer_fit import (  # noqa: F401 (the closed-form fits, public here too)
    MAP_RIDGE,
    PROBE_SHRINKAGE,
    concept_moments,
    difference_of_means,
    explained_variance,
    fit_affine,
    fit_probe,
    moments,
    reversed_moments,
)
from analogjax.fidelity.transfer_report import (  # noqa: F401 (the report's public names, here with the measurement)
    card_paragraph,
    comparison_table,
    markdown_table,
    proxy_summary,
    write_report,
)
from analogjax.fidelity.transfer_rows import (  # noqa: F401 (public here too)
    RANDOM_DRAWS,
    TransferRows,
    comparison,
    recovered,
)
from analogjax.runtime.batch_sums import add_sums

STEER_SCALE = 0.5
# Steered logits materialised at once (rows × positions × vocabulary per chunk of directions): ~0.5 GiB of float32.
STEER_CHUNK_ELEMENTS = 2**27


def steered_mass(rest_fn, h_bsd, directions_kd, markers_cv, chunk: int | None = None):
    """[b, k, s, C]: the marker mass of every concept (markers_cv: one 0/1 row per concept) after adding each
    direction to the residual `h_bsd` at every position. The directions run stacked on the batch axis, `chunk` at a
    time (all at once by default). rest_fn(h, rows): residual [rows·b, s, d] → logits, where `rows` says how many
    copies of the batch h stacks (b-major: copy r of batch row i is row i·rows + r), for the caller's segment ids
    and positions."""
    b, s, d = h_bsd.shape
    k = directions_kd.shape[0]
    chunk = max(1, min(chunk or k, k))
    n_chunks = -(-k // chunk)
    chunk = -(-k // n_chunks)  # as even as can be: the padded directions are wasted forwards
    pad = n_chunks * chunk - k
    dirs = jnp.concatenate([directions_kd, jnp.zeros((pad, d), directions_kd.dtype)]).reshape(n_chunks, chunk, d)

    def one(dirs_cd):
        h = (h_bsd[:, None] + dirs_cd[None, :, None, :].astype(h_bsd.dtype)).reshape(b * chunk, s, d)
        logits = rest_fn(h, chunk).astype(jnp.float32)
        probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        return (probs @ markers_cv.T).reshape(b, chunk, s, -1)

    out = one(dirs[0])[None] if n_chunks == 1 else jax.lax.map(one, dirs)  # [n, b, chunk, s, C]
    return jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * chunk, s, -1)[:, :k]


def steering_sums(rest_fn, h_bsd, directions_kd, concept_k, markers_cv, outside_bsc):
    """Σ over positions outside each direction's concept of (marker probability steered − unsteered), and the
    count. rest_fn: residual after the steered layer → logits [b, s, v]; all directions in one batched forward (one
    compiled program, also when called outside jit)."""

    def rest(h, rows):
        return rest_fn(h)

    @jax.jit
    def sums(h_bsd, directions_kd, concept_k, markers_cv, outside_bsc):
        zero = jnp.zeros_like(directions_kd[:1])
        mass = steered_mass(rest, h_bsd, jnp.concatenate([zero, directions_kd]), markers_cv)  # b 1+k s C
        diff = jnp.take(mass[:, 1:] - mass[:, :1], concept_k, axis=-1)  # b k s k'
        diff = jnp.diagonal(diff, axis1=1, axis2=3)  # b s k: each direction's own concept
        outside = jnp.take(outside_bsc, concept_k, axis=-1)
        return jnp.sum(diff * outside, (0, 1)), outside.sum((0, 1))

    return sums(h_bsd, directions_kd, concept_k, markers_cv, outside_bsc)


# The whole check: analog params + teacher → the report object ---------------------------------------------------


class Measured(dict):
    """{name: transfer report} of `measure_models`, with each model's per-row sums in `rows` (TransferRows: the
    same eval rows in the same order for every model), for `comparison`."""

    rows: dict[str, TransferRows]

    def comparison(self, analog: str = "analog", baseline: str = "baseline") -> list[dict[str, Any]]:
        """The paired comparison entries of two of the measured models (transfer_rows.comparison)."""
        return comparison(self.rows[analog], self.rows[baseline])


def measure(
    config,
    student_params,
    teacher,
    teacher_params,
    mesh,
    *,
    batches: int | None = None,
    fit_batches: int | None = None,
    eval_batches: int | None = None,
    intervention_batches: int | None = None,
    user_concepts: Sequence[concepts_lib.UserConcept] = (),
    pairs: Sequence[tuple[int, int]] | None = None,
    concept_pair: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Stitching, probe and steering transfer of `student_params` (config.model) to the teacher (the one-model
    form of `measure_models`; the same budgets). Returns the `transfer` report object."""
    return measure_models(
        config,
        {"analog": student_params},
        teacher,
        teacher_params,
        mesh,
        batches=batches,
        fit_batches=fit_batches,
        eval_batches=eval_batches,
        intervention_batches=intervention_batches,
        user_concepts=user_concepts,
        pairs=pairs,
        concept_pair=concept_pair,
    )["analog"]


def measure_models(
    config,
    students,
    teacher,
    teacher_params,
    mesh,
    *,
    batches: int | None = None,
    fit_batches: int | None = None,
    eval_batches: int | None = None,
    intervention_batches: int | None = None,
    user_concepts: Sequence[concepts_lib.UserConcept] = (),
    pairs: Sequence[tuple[int, int]] | None = None,
    concept_pair: tuple[int, int] | None = None,
) -> Measured:
    """The transfer reports of several analogs of config.model's shape ({name: params}) against one teacher, on the
    same rows, layer pairs and steering directions; the teacher's forwards are computed once per batch and shared.

    Budgets: `fit_batches` global batches of fit rows for the maps and probes and `eval_batches` of eval rows for the
    measurements (a missing one: half of `batches`, rounded up); or `batches` alone, as before (that many batches of
    rows, documents alternating fit and eval). `intervention_batches`: how many of the eval batches of held-out rows
    also run the interventions, stitched forwards and steering (None: all), besides every row of a user concept's
    texts (the eval pass runs those first); the rest measure what needs no intervention (explained variance,
    probes, CE) at the cost of plain forwards. Held-out documents too few for a budget: a UserError naming it,
    before any model runs. Returns {name: report} (a `Measured`, whose `rows` feed `comparison`)."""
    from analogjax import mesh as mesh_lib
    from analogjax.fidelity import default_layer_pairs

    if teacher is None or teacher.features is None:
        raise UserError(
            "transfer checks read the teacher's residual stream: they need an analogjax model teacher "
            "(teacher.hf_path, teacher.checkpoint or a random init), not a logits-only or cached one"
        )
    if not students:
        raise ValueError("measure_models needs at least one model")
    if config.data.heldout_fraction <= 0:
        raise UserError("data.heldout_fraction is 0: transfer is measured on held-out documents only")
    for flag, value in (
        ("--batches", batches),
        ("--fit-batches", fit_batches),
        ("--eval-batches", eval_batches),
        ("--intervention-batches", intervention_batches),
    ):
        if value is not None and value <= 0:
            raise UserError(f"transfer {flag.lstrip('-').replace('-', '_')} ({flag}) must be positive, not {value}")
    if batches is None and (fit_batches is None or eval_batches is None):
        raise UserError("transfer needs batches, or fit_batches and eval_batches (--fit-batches, --eval-batches)")
    eval_count = concepts_lib.part_batches(batches, eval_batches)
    if intervention_batches is not None and intervention_batches > eval_count:
        raise UserError(
            f"transfer intervention_batches (--intervention-batches, {intervention_batches}) must not exceed the "
            f"eval batches ({eval_count}): they are eval batches of held-out rows"
        )
    ls, lt = config.model.n_layers, config.teacher.model.n_layers
    pairs = tuple((int(i), int(j)) for i, j in pairs) if pairs else default_layer_pairs(ls, lt)
    if concept_pair:
        ci, cj = concept_pair
        concept_pair = (int(ci), int(cj))
    else:
        concept_pair = pairs[(len(pairs) - 1) // 2]
    for i, j in (*pairs, concept_pair):
        if not (0 <= i < ls and 0 <= j < lt):
            raise UserError(f"layer pair ({i}, {j}) is outside the analog's {ls} and the teacher's {lt} layers")
    if concept_pair not in pairs:
        raise UserError(f"the concepts' layer pair {concept_pair} is not one of the layer pairs {list(pairs)}")
    gb = config.data.global_batch
    rows = concepts_lib.rows_for_budgets(config, batches, fit_batches, eval_batches, user_concepts)
    if rows.fit.all() or not rows.fit.any():
        raise UserError(
            f"the held-out split gave {sum(rows.documents.values())} document(s): the checks need at least "
            "two (one to fit, one to measure): raise data.heldout_fraction or --batches"
        )
    user_names = {u.concept for u in user_concepts}
    measured, markers, skipped = concepts_lib.measurable(rows, user_names)
    groups = _groups(rows.labels[..., measured])
    layout = _Layout(pairs, concept_pair, measured, groups)
    vocab = min(config.model.vocab_size, config.teacher.model.vocab_size)  # a padded vocabulary: the shared range
    batch_devices = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
    per_direction = max(gb // max(batch_devices, 1), 1) * config.data.seq_len * config.teacher.model.vocab_size
    chunk = max(1, STEER_CHUNK_ELEMENTS // per_direction)
    shape = (config.model, config.teacher.model, pairs, concept_pair, tuple(int(c) for c in measured), groups, mesh)
    fit_rows, eval_rows = concepts_lib.select(rows, rows.fit), concepts_lib.select(rows, ~rows.fit)
    # Eval rows of user concepts' texts first: only they label those concepts, so they are always among the rows
    # that run the interventions (the first ones), whatever intervention_batches leaves to the held-out rows; these
    # follow round-robin over their documents, so the rows that intervene come from as many documents as they can.
    user_columns = [c for c, name in enumerate(rows.concepts) if name in user_names]
    own_text = np.any(eval_rows.labels[..., user_columns] >= 0, axis=(1, 2))
    held_out = np.flatnonzero(~own_text)
    held_out = held_out[concepts_lib.round_robin(eval_rows.document_ids[held_out])]
    eval_rows = concepts_lib.select(eval_rows, np.concatenate([np.flatnonzero(own_text), held_out]))

    # Fit pass: the teacher's layers once per batch, each model's moments against them.
    shared: dict[str, Any] = {}
    stats: dict[str, dict[str, Any]] = {name: {} for name in students}
    teacher_step, student_step = _jitted("teacher_stats", *shape, vocab, chunk), _jitted("stats", *shape, vocab, chunk)
    with jax.set_mesh(mesh):
        for batch in _batches(mesh, fit_rows, measured, gb):
            held, sums = teacher_step(teacher_params, batch)
            outs = {name: student_step(params, held, batch) for name, params in students.items()}
            shared = add_sums(shared, jax.device_get(sums))
            for name, out in outs.items():
                stats[name] = add_sums(stats[name], jax.device_get(out))
    shared_fit, info = _fit_shared(shared, layout, markers, config)
    fitted = {name: _fit_student(stats[name], shared, info, layout) for name in students}

    # Eval pass: per-row sums; the teacher's forward, native and random directions once per batch.
    # The leading batches (user concepts' rows, then `intervention_batches` of held-out rows; all when None) also run
    # the interventions (the teacher's upper layers once per stitched pair and steering direction: ~10x a plain
    # forward); the rest only what plain forwards measure. The interventions' per-row sums thus cover the leading
    # eval rows (TransferRows slices the shared counts to them).
    steps = {
        heavy: (_jitted("teacher_eval", *shape, vocab, chunk, heavy), _jitted("eval", *shape, vocab, chunk, heavy))
        for heavy in (True, False)
    }
    heavy_rows = int(own_text.sum()) + (intervention_batches or len(eval_rows.tokens)) * gb
    heavy_batches = -(-heavy_rows // gb)
    shared_rows: list[Any] = []
    model_rows: dict[str, list[Any]] = {name: [] for name in students}
    with jax.set_mesh(mesh):
        # Small (maps, probes, directions, markers): replicated.
        on_device = jax.device_put((shared_fit, {n: f for n, (f, _) in fitted.items()}), mesh_lib.replicated(mesh))
        for index, batch in enumerate(_batches(mesh, eval_rows, measured, gb)):
            teacher_step, student_step = steps[index < heavy_batches]
            held, per_row = teacher_step(teacher_params, on_device[0], batch)
            outs = {
                name: student_step(params, teacher_params, on_device[0], on_device[1][name], held, batch)
                for name, params in students.items()
            }
            shared_rows.append(jax.device_get(per_row))
            for name, out in outs.items():
                model_rows[name].append(jax.device_get(out))
    real = len(eval_rows.tokens)
    teacher_rows = transfer_rows.per_row_arrays(shared_rows, real)
    reports = Measured()
    reports.rows = {}
    for name in students:
        rows_of = transfer_rows.TransferRows.from_sums(
            layout.pairs,
            layout.concept_pair,
            [rows.concepts[c] for c in layout.measured],
            {**teacher_rows, **transfer_rows.per_row_arrays(model_rows[name], real), DOCUMENT: eval_rows.document_ids},
        )
        reports.rows[name] = rows_of
        reports[name] = _report(stats[name], rows_of, {**info, **fitted[name][1]}, layout, rows, markers, skipped)
    return reports


def check_budgets(config, *, fit_batches: int, eval_batches: int, user_concepts=()) -> None:
    """The UserError measure_models would raise for held-out documents too few for `fit_batches` and `eval_batches`,
    raised without any model (for a recipe that checks its inputs before its first phase; it tokenizes the held-out
    documents the budgets need once)."""
    for flag, value in (("--fit-batches", fit_batches), ("--eval-batches", eval_batches)):
        if value <= 0:
            raise UserError(f"transfer {flag.lstrip('-').replace('-', '_')} ({flag}) must be positive, not {value}")
    concepts_lib.rows_for_budgets(config, None, fit_batches, eval_batches, user_concepts)


class _Layout:
    """What the jitted steps measure: layer pairs, the concepts' pair, concept columns and their labelled sets."""

    def __init__(self, pairs, concept_pair, measured, groups):
        self.pairs, self.concept_pair, self.measured = pairs, concept_pair, measured
        self.group_reps = sorted(set(groups))  # one concept column per distinct labelled set
        self.group_of = [self.group_reps.index(g) for g in groups]


def _groups(labels_rsc) -> tuple[int, ...]:
    """Per concept, the first concept with the same labelled tokens (so they share one XᵀX)."""
    labelled = [labels_rsc[..., c] >= 0 for c in range(labels_rsc.shape[-1])]
    return tuple(
        next(g for g in range(c + 1) if np.array_equal(labelled[g], labelled[c])) for c in range(len(labelled))
    )


@functools.lru_cache(maxsize=16)
def _jitted(
    kind: str, student_cfg, teacher_cfg, pairs, concept_pair, measured, groups, mesh, vocab, chunk, interventions=True
):
    """A jitted step of one shape: later calls for models of the same shape (the demo's baseline after its analog, a
    second measurement) reuse the compiled programs instead of compiling them again. Sums and per-row outputs are
    replicated (every process reads the global value); what the teacher step hands to the model steps stays on the
    devices, split over the batch like the batch itself."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    models = (Transformer(student_cfg), Transformer(teacher_cfg))
    layout = _Layout(pairs, concept_pair, measured, groups)
    if kind in ("teacher_stats", "stats"):
        step = (_teacher_stats_step if kind == "teacher_stats" else _stats_step)(models, layout, vocab, chunk)
    else:  # an eval step; without `interventions` it skips the stitched forwards and steering
        make = _teacher_eval_step if kind == "teacher_eval" else _eval_step
        step = make(models, layout, vocab, chunk, interventions=interventions)
    replicated = mesh_lib.replicated(mesh)
    if kind.startswith("teacher"):
        return jax.jit(step, out_shardings=(mesh_lib.batch_sharding(mesh), replicated))
    return jax.jit(step, out_shardings=replicated)


def _batches(mesh, rows, measured, global_batch):
    """Global batches of the rows (a short last batch is filled with empty rows); every process builds the same
    rows and feeds its share."""
    from analogjax import mesh as mesh_lib
    from analogjax.data.global_batch import to_global_batch

    local = global_batch // jax.process_count()
    first = jax.process_index() * local
    real = ((rows.segment_ids > 0) & (rows.positions > 0)).astype(np.float32)  # a segment's first token: SINK
    fields = {
        "tokens": rows.tokens,
        "segment_ids": rows.segment_ids,
        "positions": rows.positions,
        "targets": rows.targets,
        "loss_mask": rows.loss_mask,
        "real": real,
        "labels": rows.labels[..., measured],
    }
    for start in range(0, len(rows.tokens), global_batch):
        batch = {}
        for key, value in fields.items():
            chunk = value[start : start + global_batch]
            fill = np.full((global_batch - len(chunk), *chunk.shape[1:]), -1 if key == "labels" else 0, chunk.dtype)
            batch[key] = np.concatenate([chunk, fill])[first : first + local]
        yield to_global_batch(batch, mesh_lib.batch_sharding(mesh))


def _layers(model, rules, params, batch):
    with nn.logical_axis_rules(list(rules)):
        return model.features(params, batch["tokens"], batch["segment_ids"], batch["positions"], True)


def _teacher_stats_step(models, layout, vocab, chunk):
    from analogjax import mesh as mesh_lib

    big = models[1]

    def step(tp, batch):
        ys = _layers(big, mesh_lib.TEACHER_RULES, tp, batch).layers_lbsd
        w = batch["real"].reshape(-1)
        flat = ys.reshape(ys.shape[0], -1, ys.shape[-1])
        sums = {
            "n": jnp.sum(w),
            "norm": jnp.stack(
                [jnp.sum(jnp.linalg.norm(flat[j].astype(jnp.float32), axis=-1) * w) for _, j in layout.pairs]
            ),
        }
        if layout.measured:
            labels = batch["labels"].reshape(-1, len(layout.measured))
            group = (labels[:, layout.group_reps] >= 0) * w[:, None]
            sums["teacher"] = concept_moments(flat[layout.concept_pair[1]], group, (labels == 1) * w[:, None])
        return {"y": jnp.stack([ys[j] for _, j in layout.pairs], axis=1)}, sums  # y: [b, P, s, d]

    return step


def _stats_step(models, layout, vocab, chunk):
    from analogjax import mesh as mesh_lib

    student = models[0]

    def step(sp, held, batch):
        xs = _layers(student, mesh_lib.STUDENT_RULES, sp, batch).layers_lbsd
        xs = xs.reshape(xs.shape[0], -1, xs.shape[-1])
        ys = jnp.moveaxis(held["y"], 1, 0)
        ys = ys.reshape(ys.shape[0], -1, ys.shape[-1])
        w = batch["real"].reshape(-1)
        out = {
            "fit": jax.tree.map(
                lambda *a: jnp.stack(a), *[moments(xs[i], ys[p], w) for p, (i, _) in enumerate(layout.pairs)]
            )
        }
        if layout.measured:
            labels = batch["labels"].reshape(-1, len(layout.measured))
            group = (labels[:, layout.group_reps] >= 0) * w[:, None]
            out["analog"] = concept_moments(xs[layout.concept_pair[0]], group, (labels == 1) * w[:, None])
        return out

    return step


def _fit_shared(shared, layout, markers, config):
    """What every model shares: the steering norm, the teacher's native probes, the native and random steering
    directions (the unsteered stream first, as a zero direction) and the concepts' marker tokens."""
    pc = layout.pairs.index(layout.concept_pair)
    norm = STEER_SCALE * float(shared["norm"][pc] / shared["n"])
    info: dict[str, Any] = {"norm": norm, "native_norms": []}
    fitted: dict[str, np.ndarray] = {}
    if not layout.measured:
        return fitted, info
    t = shared["teacher"]
    native_probes, native_dirs = [], []
    for k, g in enumerate(layout.group_of):
        native_probes.append(fit_probe(t["n"][g], t["sx"][g], t["sxx"][g], t["npos"][k], t["sxpos"][k]))
        native = difference_of_means(t["n"][g], t["sx"][g], t["npos"][k], t["sxpos"][k])
        native_dirs.append(native)
        info["native_norms"].append(float(np.linalg.norm(native)))
    dt = len(native_dirs[0])
    randoms = np.random.default_rng(config.train.seed).standard_normal((RANDOM_DRAWS, dt))
    fitted["native_w"] = np.stack([w for w, _ in native_probes])
    fitted["native_b"] = np.asarray([b for _, b in native_probes])
    fitted["directions"] = np.concatenate([np.zeros((1, dt)), _scaled(np.stack([*native_dirs, *randoms]), norm)])
    vocab = config.teacher.model.vocab_size
    fitted["markers"] = np.zeros((len(layout.measured), vocab), np.float32)
    for k, tokens in enumerate(markers):
        fitted["markers"][k, [t for t in tokens if t < vocab]] = 1.0
    return {k: v.astype(np.float32) for k, v in fitted.items()}, info


def _scaled(directions, norm):
    return directions * norm / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-30)


def _fit_student(stats, shared, info, layout):
    """One model's maps per pair, its probes and carried directions at the concepts' pair (float32 arrays for the
    device), and the float64 maps for its report."""
    at = [{k: v[p] for k, v in stats["fit"].items()} for p in range(len(layout.pairs))]
    maps = [fit_affine(m) for m in at]
    back = [fit_affine(reversed_moments(m)) for m in at]
    fitted = {
        "w": np.stack([w for w, _ in maps]),
        "b": np.stack([b for _, b in maps]),
        "back_w": np.stack([w for w, _ in back]),
        "back_b": np.stack([b for _, b in back]),
    }
    if layout.measured:
        pc = layout.pairs.index(layout.concept_pair)
        a = stats["analog"]
        analog, transferred, carried = [], [], []
        for k, g in enumerate(layout.group_of):
            wa, ba = fit_probe(a["n"][g], a["sx"][g], a["sxx"][g], a["npos"][k], a["sxpos"][k])
            analog.append((wa, ba))
            transferred.append((back[pc][0] @ wa, back[pc][1] @ wa + ba))  # the analog probe on ŷ → x̂
            carried.append(difference_of_means(a["n"][g], a["sx"][g], a["npos"][k], a["sxpos"][k]) @ maps[pc][0])
        for name, fits in (("analog", analog), ("transferred", transferred)):
            fitted[f"{name}_w"] = np.stack([w for w, _ in fits])
            fitted[f"{name}_b"] = np.asarray([b for _, b in fits])
        fitted["carried"] = _scaled(np.stack(carried), info["norm"])
    return {k: v.astype(np.float32) for k, v in fitted.items()}, {"maps": maps, "back": back}


def _teacher_from(big, tp, first, h, seg, pos):
    """The teacher's blocks first.. on a residual stream, then its final norm and head: logits."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import logits as head_logits

    with nn.logical_axis_rules(list(mesh_lib.TEACHER_RULES)):
        return head_logits(tp, big.cfg, big.finish(tp, big.blocks(tp, first, h, seg, pos)))


def _steer_rest(big, tp, first, batch):
    """rest_fn for steered_mass: the teacher after layer first − 1, on `rows` stacked copies of the batch."""
    seg, pos = batch["segment_ids"], batch["positions"]

    def rest(h, rows):
        return _teacher_from(big, tp, first, h, jnp.repeat(seg, rows, axis=0), jnp.repeat(pos, rows, axis=0))

    return rest


def _teacher_eval_step(models, layout, vocab, chunk, interventions=True):
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import logits as head_logits
    from analogjax.objective import divergences as losses

    big = models[1]

    def step(tp, fitted, batch):
        ft = _layers(big, mesh_lib.TEACHER_RULES, tp, batch)
        with nn.logical_axis_rules(list(mesh_lib.TEACHER_RULES)):
            log_t = losses.log_softmax(head_logits(tp, big.cfg, ft.hidden_bsd)[..., :vocab])
        w = batch["loss_mask"] * batch["real"]
        held = {"y": jnp.stack([ft.layers_lbsd[j] for _, j in layout.pairs], axis=1), "log_t": log_t}
        per_row = {
            "n": batch["real"].sum(1),
            "tokens": w.sum(1),
            "teacher_ce": jnp.sum(-losses.pick(log_t, batch["targets"]) * w, 1),
        }
        if layout.measured:
            j = layout.concept_pair[1]
            labels = batch["labels"]
            labelled, truth = (labels >= 0) * batch["real"][..., None], labels == 1
            y = ft.layers_lbsd[j].astype(jnp.float32)
            scores = y @ fitted["native_w"].T + fitted["native_b"]
            c = len(layout.measured)
            per_row["probe"] = {
                "labelled": labelled.sum(1),
                "positive": (truth * labelled).sum(1),
                "native": jnp.sum(((scores > 0) == truth) * labelled, 1),
            }
            if not interventions:
                return held, per_row
            outside = (labels == 0) * batch["real"][..., None]  # b s C
            mass = steered_mass(
                _steer_rest(big, tp, j + 1, batch), ft.layers_lbsd[j], fitted["directions"], fitted["markers"], chunk
            )  # b 1+C+D s C: the unsteered stream first
            held["base"] = mass[:, 0]
            effect = jnp.sum((mass[:, 1:] - mass[:, :1]) * outside[:, None], 2)  # b C+D C
            per_row["steering"] = {
                "count": outside.sum(1),
                "native": jnp.diagonal(effect[:, :c], axis1=1, axis2=2),  # each concept's own direction
                "random": effect[:, c:],  # b D C: every random direction on every concept
            }
        return held, per_row

    return step


def _eval_step(models, layout, vocab, chunk, interventions=True):
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import logits as head_logits
    from analogjax.objective import divergences as losses

    student, big = models

    def step(sp, tp, shared, fitted, held, batch):
        seg, pos = batch["segment_ids"], batch["positions"]
        fs = _layers(student, mesh_lib.STUDENT_RULES, sp, batch)
        with nn.logical_axis_rules(list(mesh_lib.STUDENT_RULES)):
            log_s = losses.log_softmax(head_logits(sp, student.cfg, fs.hidden_bsd)[..., :vocab])
        log_t, real = held["log_t"], batch["real"]
        w = batch["loss_mask"] * real

        def nll(log_q):
            return jnp.sum(-losses.pick(log_q, batch["targets"]) * w, 1)

        out: dict[str, Any] = {"analog_ce": nll(log_s)}
        stitch: dict[str, list] = {
            k: [] for k in ("ce", "kl", "fwd_sse", "fwd_sy", "fwd_syy", "back_sse", "back_sy", "back_syy")
        }
        for p, (i, j) in enumerate(layout.pairs):
            x, y = fs.layers_lbsd[i].astype(jnp.float32), held["y"][:, p].astype(jnp.float32)
            mapped = x @ fitted["w"][p] + fitted["b"][p]
            if interventions:  # the sink keeps the teacher's own state: a function of the first token alone
                stitched = jnp.where((pos == 0)[..., None], y, mapped).astype(held["y"].dtype)
                log_q = losses.log_softmax(_teacher_from(big, tp, j + 1, stitched, seg, pos)[..., :vocab])
                stitch["ce"].append(nll(log_q))
                stitch["kl"].append(jnp.sum(losses.forward_kl_from_log_probs(log_t, log_q) * w, 1))
            back = y @ fitted["back_w"][p] + fitted["back_b"][p]
            for name, target, guess in (("fwd", y, mapped), ("back", x, back)):
                stitch[f"{name}_sse"].append(jnp.sum(jnp.sum((target - guess) ** 2, -1) * real, 1))
                stitch[f"{name}_sy"].append(jnp.sum(target * real[..., None], 1))
                stitch[f"{name}_syy"].append(jnp.sum(jnp.sum(target**2, -1) * real, 1))
        for key, values in stitch.items():
            if values:  # stitched CE and KL: only where the interventions run
                out[f"stitched_{key}" if key in ("ce", "kl") else key] = jnp.stack(values, axis=1)  # b P [...]
        if layout.measured:
            i, j = layout.concept_pair
            labels = batch["labels"]
            labelled, truth = (labels >= 0) * real[..., None], labels == 1
            x = fs.layers_lbsd[i].astype(jnp.float32)
            y = held["y"][:, layout.pairs.index(layout.concept_pair)]

            def correct(feats, name):
                scores = feats @ fitted[f"{name}_w"].T + fitted[f"{name}_b"]
                return jnp.sum(((scores > 0) == truth) * labelled, 1)

            out["probe"] = {
                "analog": correct(x, "analog"),
                "transferred": correct(y.astype(jnp.float32), "transferred"),
            }
            if not interventions:
                return out
            mass = steered_mass(_steer_rest(big, tp, j + 1, batch), y, fitted["carried"], shared["markers"], chunk)
            outside = (labels == 0) * real[..., None]
            own = jnp.diagonal(mass, axis1=1, axis2=3)  # b s C: each carried direction on its own concept
            out["steering"] = {"transferred": jnp.sum((own - held["base"]) * outside, 1)}
        return out

    return step


def _report(stats, rows_of: TransferRows, info, layout, rows, markers, skipped) -> dict[str, Any]:
    """One model's report object: the figures with their intervals (transfer_rows.figures) and what they were
    measured on and how."""
    figures = transfer_rows.figures(rows_of)
    for k, steer in enumerate(figures["steering"]):
        steer["markers"] = markers[k]
        steer["teacher_difference_of_means_norm"] = info["native_norms"][k]
    return {
        "layer_pairs": [list(p) for p in layout.pairs],
        "concept_layer_pair": list(layout.concept_pair),
        "split": "held-out documents alternate fit, eval (document k fits when k is even); user texts per concept",
        "documents": rows.documents,
        "fit_tokens": int(stats["fit"]["n"][0]),
        "eval_tokens": int(rows_of.sums["n"].sum()),
        "intervention_tokens": int(rows_of.sums["n"][: rows_of.intervention_rows].sum()),  # stitched KL, steering
        "fit_rows": int(rows.fit.sum()),
        **figures,
        "skipped": skipped,
        "method": {
            "map": f"ridge regression, lambda = {MAP_RIDGE:g} x mean input variance",
            "probe": f"linear discriminant analysis with class priors (shrinkage {PROBE_SHRINKAGE:g} to the diagonal)",
            "steering_norm": info["norm"],
            "steering_scale": STEER_SCALE,
            "random_draws": RANDOM_DRAWS,
            "random_directions": "one set shared by every concept (and every model measured together)",
            "marker_tokens": concepts_lib.MARKERS,
            "token_label": "a token is positive when any of its characters is inside the concept",
            "tokens": "all but each segment's first (the attention sink); stitched, the teacher's own state there",
            "intervals": transfer_rows.interval_method(rows_of),
        },
    }
