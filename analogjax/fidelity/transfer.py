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
   directions. Each is scaled to STEER_SCALE × the teacher layer's mean residual norm (the same norm for all: half
   the typical residual is a clear push that leaves the stream dominated by the text itself) and added to the
   teacher's residual after block j at every position. Effect = the mean increase of the teacher's next-token
   probability of the concept's concepts.MARKERS marker tokens (those whose rate right after concept tokens most
   exceeds their rate after other tokens, counted on fit rows) over eval positions outside the concept;
   recovered = (transferred − random) / (native − random).
   Recovered is null ("cannot be judged") where the teacher's own method beats its baseline by no more than the noise:
   two standard errors of an accuracy at chance (probes), the spread of the random directions' effects (steering).

Data route: the packed held-out batches carry token ids only, and the concepts need character offsets, so the
checks tokenize the held-out documents' text themselves (concepts.labelled_rows: one document chunk per row, the
same tokenizer and specials as the pipeline) and split them by document: held-out document k is a fit document when
k is even, an eval document when odd. Every process builds the same rows and feeds its share of each global batch;
moments are summed by the jitted step over the whole global batch (a replicated output), so the maps are the same
on one host or many. All statistics are sums (float32 per batch on the device, float64 across batches on the host):
memory does not grow with the number of tokens.
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
from analogjax.fidelity.transfer_report import (  # noqa: F401 (the report's public names, here with the measurement)
    card_paragraph,
    comparison_table,
    markdown_table,
    proxy_summary,
    write_report,
)
from analogjax.runtime.batch_sums import sum_over_batches

MAP_RIDGE = 1e-3
PROBE_SHRINKAGE = 0.1
STEER_SCALE = 0.5
RANDOM_DRAWS = 4


# ----------------------------------------------------------------------------------------------------------------
# Sufficient statistics and closed-form fits (float64 numpy on the host)


def moments(x_nd, y_ne, w_n) -> dict[str, jax.Array]:
    """Weighted raw moments of paired rows: n, Σx, Σy, XᵀX, YᵀY, XᵀY (what both maps and their scores need)."""
    x, y, w = x_nd.astype(jnp.float32), y_ne.astype(jnp.float32), w_n.astype(jnp.float32)
    xw, yw = x * w[:, None], y * w[:, None]
    return {
        "n": jnp.sum(w),
        "sx": jnp.sum(xw, 0),
        "sy": jnp.sum(yw, 0),
        "sxx": xw.T @ x,
        "syy": yw.T @ y,
        "sxy": xw.T @ y,
    }


def reversed_moments(m: dict) -> dict:
    """The moments with x and y swapped (for the teacher → analog map)."""
    return {
        "n": m["n"],
        "sx": m["sy"],
        "sy": m["sx"],
        "sxx": m["syy"],
        "syy": m["sxx"],
        "sxy": np.swapaxes(m["sxy"], -1, -2),
    }


def fit_affine(m: dict, ridge: float = MAP_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression y ≈ x W + b from moments (centred; λ = ridge × mean input variance; b not penalised)."""
    n = float(m["n"])
    mx, my = m["sx"] / n, m["sy"] / n
    cxx = m["sxx"] / n - np.outer(mx, mx)
    cxy = m["sxy"] / n - np.outer(mx, my)
    lam = ridge * max(np.trace(cxx) / len(cxx), 1e-12)
    weight = np.linalg.solve(cxx + lam * np.eye(len(cxx)), cxy)
    return weight, my - mx @ weight


def explained_variance(m: dict, weight: np.ndarray, bias: np.ndarray) -> float:
    """1 − Σ‖y − (xW + b)‖² / Σ‖y − ȳ‖² over the tokens of `m` (about their mean ȳ), from moments alone."""
    n = float(m["n"])
    b_aug = np.vstack([weight, bias[None]])  # [x, 1] B = x W + b
    sxx_aug = np.block([[m["sxx"], m["sx"][:, None]], [m["sx"][None], np.array([[n]])]])
    sxy_aug = np.vstack([m["sxy"], m["sy"][None]])
    sse = np.trace(m["syy"]) - 2 * np.sum(b_aug * sxy_aug) + np.sum(b_aug * (sxx_aug @ b_aug))
    sst = np.trace(m["syy"]) - m["sy"] @ m["sy"] / n
    return float(1 - sse / sst) if sst > 0 else float("nan")


def concept_moments(x_nd, group_ng, positive_nc) -> dict[str, jax.Array]:
    """Per labelled set g (concepts sharing which tokens are labelled): n, Σx, XᵀX; per concept c: positives, Σx."""
    x = x_nd.astype(jnp.float32)
    return {
        "n": group_ng.sum(0),
        "sx": group_ng.T @ x,
        "sxx": jnp.einsum("ng,nd,ne->gde", group_ng, x, x),
        "npos": positive_nc.sum(0),
        "sxpos": positive_nc.T @ x,
    }


def fit_probe(n, sx, sxx, npos, sxpos, shrinkage: float = PROBE_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Linear discriminant analysis as an affine score x·w + b > 0: two Gaussian classes with one covariance and
    their priors, so the threshold is Bayes-optimal however rare the concept (a least-squares ±1 classifier
    calls nearly every token negative when 5% are positive). The within-class covariance (total minus between-
    class, from the same moments) is shrunk towards its diagonal by `shrinkage`."""
    nneg = n - npos
    mu1, mu0 = sxpos / npos, (sx - sxpos) / nneg
    mu = sx / n
    diff = mu1 - mu0
    within = sxx / n - np.outer(mu, mu) - (npos / n) * (nneg / n) * np.outer(diff, diff)
    diag = np.diag(np.diag(within))
    floor = 1e-9 * max(np.trace(within) / len(mu), 1e-30)
    w = np.linalg.solve((1 - shrinkage) * within + shrinkage * diag + floor * np.eye(len(mu)), diff)
    return w, -w @ (mu1 + mu0) / 2 + np.log(npos / nneg)


def difference_of_means(n, sx, npos, sxpos) -> np.ndarray:
    """mean(x | positive) − mean(x | negative)."""
    return sxpos / npos - (sx - sxpos) / (n - npos)


def recovered(value: float, baseline: float, native: float, noise: float = 0.0) -> float | None:
    """(value − baseline) / (native − baseline); None when the native method beats the baseline by no more than
    `noise` (the ratio of two noisy small numbers says nothing)."""
    gap = native - baseline
    return float((value - baseline) / gap) if gap > max(noise, 1e-12) else None


def steering_sums(rest_fn, h_bsd, directions_kd, concept_k, markers_cv, outside_bsc):
    """Σ over positions outside each direction's concept of (marker probability steered − unsteered), and the
    count. rest_fn: residual after the steered layer → logits [b, s, v]; directions run one after another."""

    def mass(h):
        return jax.nn.softmax(rest_fn(h).astype(jnp.float32), axis=-1) @ markers_cv.T  # b s C

    base = mass(h_bsd)

    def one(args):
        direction, c = args
        diff = jnp.take(mass(h_bsd + direction.astype(h_bsd.dtype)) - base, c, axis=-1)
        return jnp.sum(diff * jnp.take(outside_bsc, c, axis=-1))

    effect = jax.lax.map(one, (directions_kd, concept_k))
    return effect, jnp.take(outside_bsc.sum((0, 1)), concept_k)


# ----------------------------------------------------------------------------------------------------------------
# The whole check: analog params + teacher → the report object


def measure(
    config,
    student_params,
    teacher,
    teacher_params,
    mesh,
    *,
    batches: int,
    user_concepts: Sequence[concepts_lib.UserConcept] = (),
    pairs: Sequence[tuple[int, int]] | None = None,
    concept_pair: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Stitching, probe and steering transfer of `student_params` (config.model) to the teacher, on `batches` global
    batches of held-out rows (plus the user concepts' texts). Returns the `transfer` report object."""
    from analogjax.fidelity import default_layer_pairs

    if teacher is None or teacher.features is None:
        raise UserError(
            "transfer checks read the teacher's residual stream: they need an analogjax model teacher "
            "(teacher.hf_path, teacher.checkpoint or a random init), not a logits-only or cached one"
        )
    if config.data.heldout_fraction <= 0:
        raise UserError("data.heldout_fraction is 0: transfer is measured on held-out documents only")
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
    rows = concepts_lib.labelled_rows(
        config.data, config.model.vocab_size, rows=batches * config.data.global_batch, user=user_concepts
    )
    if rows.fit.all() or not rows.fit.any():
        raise UserError(
            f"the held-out split gave {sum(rows.documents.values())} document(s): the checks need at least "
            "two (one to fit, one to measure): raise data.heldout_fraction or --batches"
        )
    user_names = {u.concept for u in user_concepts}
    measured, markers, skipped = concepts_lib.measurable(rows, user_names)
    shape = (config.model, config.teacher.model, pairs, concept_pair, tuple(int(c) for c in measured))
    groups = _groups(rows.labels[..., measured])
    layout = _Layout(pairs, concept_pair, measured, groups)
    stats = _run(
        mesh,
        rows,
        measured,
        config.data.global_batch,
        _jitted("stats", *shape, groups, mesh),
        student_params,
        teacher_params,
    )
    fitted, info = _fit(stats, layout, markers, config)
    # Everything the second pass measures is on eval rows: measuring on fit rows too would double its cost for nothing.
    eval_rows = rows._replace(
        **{
            f: getattr(rows, f)[~rows.fit]
            for f in ("tokens", "segment_ids", "positions", "targets", "loss_mask", "fit", "labels")
        }
    )
    sums = _run(
        mesh,
        eval_rows,
        measured,
        config.data.global_batch,
        _jitted("eval", *shape, groups, mesh),
        student_params,
        teacher_params,
        fitted,
    )
    return _report(stats, sums, info, layout, rows, markers, skipped)


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


@functools.lru_cache(maxsize=8)
def _jitted(kind: str, student_cfg, teacher_cfg, pairs, concept_pair, measured, groups, mesh):
    """The jitted stats or eval step of one shape: a second model of the same shape measured on the same rows (the
    demo's baseline after its analog) reuses the compiled programs instead of compiling them again."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    models = (Transformer(student_cfg), Transformer(teacher_cfg))
    layout = _Layout(pairs, concept_pair, measured, groups)
    step = (_stats_step if kind == "stats" else _eval_step)(models, layout)
    return jax.jit(step, out_shardings=mesh_lib.replicated(mesh))


def _run(mesh, rows, measured, global_batch, fn, student_params, teacher_params, fitted=None) -> dict:
    """Sum the jitted step `fn` over the rows in global batches; every process builds the same rows and feeds its
    share."""
    from analogjax import mesh as mesh_lib
    from analogjax.data.global_batch import to_global_batch

    local = global_batch // jax.process_count()
    first = jax.process_index() * local
    real = rows.segment_ids > 0
    fields = {
        "tokens": rows.tokens,
        "segment_ids": rows.segment_ids,
        "positions": rows.positions,
        "targets": rows.targets,
        "loss_mask": rows.loss_mask,
        "fit": (real & rows.fit[:, None]).astype(np.float32),
        "eval": (real & ~rows.fit[:, None]).astype(np.float32),
        "labels": rows.labels[..., measured],
    }

    def batches():
        for start in range(0, len(rows.tokens), global_batch):
            batch = {}
            for key, value in fields.items():
                chunk = value[start : start + global_batch]
                fill = np.full((global_batch - len(chunk), *chunk.shape[1:]), -1 if key == "labels" else 0, chunk.dtype)
                batch[key] = np.concatenate([chunk, fill])[first : first + local]  # a short last batch: empty rows
            yield to_global_batch(batch, mesh_lib.batch_sharding(mesh))

    with jax.set_mesh(mesh):
        extra = () if fitted is None else (jax.device_put(fitted, mesh_lib.replicated(mesh)),)  # small: replicated
        return sum_over_batches(fn, batches(), student_params, teacher_params, *extra)


def _layers(model, rules, params, batch):
    with nn.logical_axis_rules(list(rules)):
        return model.features(params, batch["tokens"], batch["segment_ids"], batch["positions"], True)


def _stats_step(models, layout):
    from analogjax import mesh as mesh_lib

    student, big = models

    def step(sp, tp, batch):
        xs = _layers(student, mesh_lib.STUDENT_RULES, sp, batch).layers_lbsd
        ys = _layers(big, mesh_lib.TEACHER_RULES, tp, batch).layers_lbsd
        xs, ys = xs.reshape(xs.shape[0], -1, xs.shape[-1]), ys.reshape(ys.shape[0], -1, ys.shape[-1])
        fit, ev = batch["fit"].reshape(-1), batch["eval"].reshape(-1)
        out = {
            part: jax.tree.map(lambda *a: jnp.stack(a), *[moments(xs[i], ys[j], w) for i, j in layout.pairs])
            for part, w in (("fit", fit), ("eval", ev))
        }
        out["norm"] = jnp.stack(
            [jnp.sum(jnp.linalg.norm(ys[j].astype(jnp.float32), axis=-1) * fit) for _, j in layout.pairs]
        )
        if layout.measured:
            labels = batch["labels"].reshape(-1, len(layout.measured))
            group = (labels[:, layout.group_reps] >= 0) * fit[:, None]
            positive = (labels == 1) * fit[:, None]
            i, j = layout.concept_pair
            out["analog"] = concept_moments(xs[i], group, positive)
            out["teacher"] = concept_moments(ys[j], group, positive)
        return out

    return step


def _fit(stats, layout, markers, config):
    """Maps per pair; probes and steering directions at the concepts' pair (float32 arrays for the device)."""
    at = [{k: v[p] for k, v in stats["fit"].items()} for p in range(len(layout.pairs))]
    maps = [fit_affine(m) for m in at]
    back = [fit_affine(reversed_moments(m)) for m in at]
    fitted = {"w": np.stack([w for w, _ in maps]), "b": np.stack([b for _, b in maps])}
    pc = layout.pairs.index(layout.concept_pair)
    norm = STEER_SCALE * float(stats["norm"][pc] / stats["fit"]["n"][pc])
    info = {"maps": maps, "back": back, "norm": norm}
    if not layout.measured:
        return {k: v.astype(np.float32) for k, v in fitted.items()}, info
    a, t = stats["analog"], stats["teacher"]
    rng = np.random.default_rng(config.train.seed)
    probes = {"analog": [], "native": [], "transferred": []}
    directions = []
    for k, g in enumerate(layout.group_of):
        wa, ba = fit_probe(a["n"][g], a["sx"][g], a["sxx"][g], a["npos"][k], a["sxpos"][k])
        probes["analog"].append((wa, ba))
        probes["native"].append(fit_probe(t["n"][g], t["sx"][g], t["sxx"][g], t["npos"][k], t["sxpos"][k]))
        probes["transferred"].append((back[pc][0] @ wa, back[pc][1] @ wa + ba))  # the analog probe on ŷ → x̂
        native = difference_of_means(t["n"][g], t["sx"][g], t["npos"][k], t["sxpos"][k])
        carried = difference_of_means(a["n"][g], a["sx"][g], a["npos"][k], a["sxpos"][k]) @ maps[pc][0]
        directions += [native, carried, *rng.standard_normal((RANDOM_DRAWS, len(native)))]
        info.setdefault("native_norms", []).append(float(np.linalg.norm(native)))
    for name, fits in probes.items():
        fitted[f"{name}_w"] = np.stack([w for w, _ in fits])
        fitted[f"{name}_b"] = np.asarray([b for _, b in fits])
    directions = np.stack(directions)
    fitted["directions"] = directions * norm / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-30)
    fitted = {k: v.astype(np.float32) for k, v in fitted.items()}
    fitted["concept_k"] = np.repeat(np.arange(len(layout.measured), dtype=np.int32), 2 + RANDOM_DRAWS)
    vocab = config.teacher.model.vocab_size
    fitted["markers"] = np.zeros((len(layout.measured), vocab), np.float32)
    for k, tokens in enumerate(markers):
        fitted["markers"][k, [t for t in tokens if t < vocab]] = 1.0
    return fitted, info


def _eval_step(models, layout):
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import logits as head_logits
    from analogjax.objective import divergences as losses

    student, big = models
    vocab = min(student.cfg.vocab_size, big.cfg.vocab_size)  # a padded vocabulary: the shared real range

    def step(sp, tp, fitted, batch):
        seg, pos = batch["segment_ids"], batch["positions"]
        fs = _layers(student, mesh_lib.STUDENT_RULES, sp, batch)
        ft = _layers(big, mesh_lib.TEACHER_RULES, tp, batch)
        with nn.logical_axis_rules(list(mesh_lib.STUDENT_RULES)):
            log_s = losses.log_softmax(head_logits(sp, student.cfg, fs.hidden_bsd)[..., :vocab])
        with nn.logical_axis_rules(list(mesh_lib.TEACHER_RULES)):
            log_t = losses.log_softmax(head_logits(tp, big.cfg, ft.hidden_bsd)[..., :vocab])
        w = batch["loss_mask"] * batch["eval"]

        def nll(log_q):
            return jnp.sum(-losses.pick(log_q, batch["targets"]) * w)

        def teacher_from(first, h):  # the teacher's blocks first.. on a residual stream, then norm and head
            with nn.logical_axis_rules(list(mesh_lib.TEACHER_RULES)):
                for layer in range(first, big.cfg.n_layers):
                    h = big.block(tp, layer, h, seg, pos)
                return head_logits(tp, big.cfg, big.finish(tp, h))

        out = {
            "tokens": jnp.sum(w),
            "teacher_ce": nll(log_t),
            "analog_ce": nll(log_s),
            "stitched_ce": [],
            "stitched_kl": [],
        }
        for p, (i, j) in enumerate(layout.pairs):
            mapped = fs.layers_lbsd[i].astype(jnp.float32) @ fitted["w"][p] + fitted["b"][p]
            log_q = losses.log_softmax(teacher_from(j + 1, mapped.astype(ft.layers_lbsd.dtype))[..., :vocab])
            out["stitched_ce"].append(nll(log_q))
            out["stitched_kl"].append(jnp.sum(losses.forward_kl_from_log_probs(log_t, log_q) * w))
        out["stitched_ce"], out["stitched_kl"] = jnp.stack(out["stitched_ce"]), jnp.stack(out["stitched_kl"])
        if layout.measured:
            i, j = layout.concept_pair
            labels, ev = batch["labels"], batch["eval"][..., None]
            labelled, truth = (labels >= 0) * ev, labels == 1
            x, y = fs.layers_lbsd[i].astype(jnp.float32), ft.layers_lbsd[j].astype(jnp.float32)

            def correct(feats, name):
                scores = feats @ fitted[f"{name}_w"].T + fitted[f"{name}_b"]
                return jnp.sum(((scores > 0) == truth) * labelled, (0, 1))

            out["probe"] = {
                "labelled": labelled.sum((0, 1)),
                "positive": (truth * labelled).sum((0, 1)),
                "analog": correct(x, "analog"),
                "native": correct(y, "native"),
                "transferred": correct(y, "transferred"),
            }
            out["steer_effect"], out["steer_count"] = steering_sums(
                lambda h: teacher_from(j + 1, h),
                ft.layers_lbsd[j],
                fitted["directions"],
                fitted["concept_k"],
                fitted["markers"],
                (labels == 0) * ev,
            )
        return out

    return step


def _report(stats, sums, info, layout, rows, markers, skipped) -> dict[str, Any]:
    tokens = float(sums["tokens"])
    stitch = []
    for p, (i, j) in enumerate(layout.pairs):
        ev = {k: v[p] for k, v in stats["eval"].items()}
        back = explained_variance(reversed_moments(ev), *info["back"][p])
        stitch.append(
            {
                "analog_layer": i,
                "teacher_layer": j,
                "explained_variance": explained_variance(ev, *info["maps"][p]),
                "teacher_to_analog_explained_variance": back,
                "stitched_ce": float(sums["stitched_ce"][p] / tokens),
                "stitched_kl": float(sums["stitched_kl"][p] / tokens),
            }
        )
    probes, steering = [], []
    i, j = layout.concept_pair
    for k, c in enumerate(layout.measured):
        name = rows.concepts[c]
        pr = {key: float(v[k]) for key, v in sums["probe"].items()}
        rate = pr["positive"] / pr["labelled"]
        chance = max(rate, 1 - rate)
        acc = {key: pr[key] / pr["labelled"] for key in ("analog", "native", "transferred")}
        probes.append(
            {
                "concept": name,
                "analog_layer": i,
                "teacher_layer": j,
                "eval_tokens": int(pr["labelled"]),
                "positive_rate": rate,
                "chance": chance,
                "analog": acc["analog"],
                "teacher_native": acc["native"],
                "transferred": acc["transferred"],
                # Noise: two standard errors of an accuracy at chance over these tokens.
                "recovered": recovered(
                    acc["transferred"], chance, acc["native"], 2 * np.sqrt(chance * (1 - chance) / pr["labelled"])
                ),
            }
        )
        span = slice(k * (2 + RANDOM_DRAWS), (k + 1) * (2 + RANDOM_DRAWS))
        effect = sums["steer_effect"][span] / np.maximum(sums["steer_count"][span], 1)
        random = float(np.mean(effect[2:]))
        steering.append(
            {
                "concept": name,
                "analog_layer": i,
                "teacher_layer": j,
                "markers": markers[k],
                "teacher_difference_of_means_norm": info["native_norms"][k],
                "native": float(effect[0]),
                "transferred": float(effect[1]),
                "random": random,
                "random_draws": [float(e) for e in effect[2:]],
                # Noise: the spread of one random direction's effect.
                "recovered": recovered(float(effect[1]), random, float(effect[0]), float(np.std(effect[2:]))),
            }
        )
    fit_tokens = int(stats["fit"]["n"][0])
    return {
        "layer_pairs": [list(p) for p in layout.pairs],
        "concept_layer_pair": list(layout.concept_pair),
        "split": "held-out documents alternate fit, eval (document k fits when k is even); user concept texts "
        "alternate likewise per concept",
        "documents": rows.documents,
        "fit_tokens": fit_tokens,
        "eval_tokens": int(stats["eval"]["n"][0]),
        "teacher_ce": float(sums["teacher_ce"] / tokens),
        "analog_ce": float(sums["analog_ce"] / tokens),
        "stitch": stitch,
        "probes": probes,
        "steering": steering,
        "skipped": skipped,
        "method": {
            "map": f"ridge regression, lambda = {MAP_RIDGE:g} x mean input variance",
            "probe": f"linear discriminant analysis with class priors (shrinkage {PROBE_SHRINKAGE:g} to the diagonal)",
            "steering_norm": info["norm"],
            "steering_scale": STEER_SCALE,
            "random_draws": RANDOM_DRAWS,
            "marker_tokens": concepts_lib.MARKERS,
            "token_label": "a token is positive when any of its characters is inside the concept",
        },
    }
