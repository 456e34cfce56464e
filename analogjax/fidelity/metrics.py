"""How faithful an analog is to its teacher, measured on held-out documents.

Output level (T = 1, per data source): forward and reverse KL and JSD (analogjax.losses), top-1 agreement,
top-5 overlap, both perplexities and their gap, and the expected calibration error of both models (15 equal-width
bins of top-1 confidence against next-token correctness, as in Stanton et al. 2021 / Guo et al. 2017).
Representation level: linear CKA (Kornblith et al. 2019) of the residual streams of matched layer pairs, over every
token but each document's first, the attention sink, whose outsized norm would decide it alone (transfer.py: SINK).

Every metric is accumulated as sums and counts over batches (float64 on the host) and divided once at the end,
so the result is exact whatever the batching. CKA accumulates raw moments (n, Σx, Σy, XᵀX, YᵀY, YᵀX) and centres
them at the end, which is the same as centring the concatenated representations.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from analogjax.errors import UserError
from analogjax.fidelity import intervals
from analogjax.objective import divergences as losses
from analogjax.runtime import figures
from analogjax.runtime.batch_sums import add_sums

N_BINS = 15
TOP_K = 5
# Cross-moment matrices of every (student, teacher) layer pair are kept only while they stay this small (elements);
# beyond it only the matched pairs are measured.
FULL_GRID_ELEMENTS = 1 << 24
_SCALARS = (
    "count",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "top1_agree",
    "topk_overlap",
    "student_nll",
    "teacher_nll",
    "student_correct",
    "teacher_correct",
)


# ----------------------------------------------------------------------------------------------------------------
# Per-batch sums


def token_sums(
    student_logits,
    teacher_logits,
    targets,
    loss_mask,
    source_ids,
    positions,
    *,
    n_sources: int,
    seq_len: int,
    rows: bool = False,
) -> dict[str, jax.Array]:
    """Sums over the valid tokens of one batch, per source ([n_sources] or [n_sources, N_BINS]) and per position;
    rows=True adds `rows`, per-row sums ([b]) of the figures whose intervals a report gives."""
    log_q = losses.log_softmax(student_logits)
    log_p = losses.log_softmax(teacher_logits)
    w = loss_mask.astype(jnp.float32)
    s_top = losses.argmax_last(student_logits)
    t_top = losses.argmax_last(teacher_logits)
    _, s_k = jax.lax.top_k(student_logits.astype(jnp.float32), TOP_K)
    _, t_k = jax.lax.top_k(teacher_logits.astype(jnp.float32), TOP_K)
    per_token = {
        "count": jnp.ones_like(w),
        "forward_kl": losses.forward_kl_from_log_probs(log_p, log_q),
        "reverse_kl": losses.reverse_kl_from_log_probs(log_p, log_q),
        "jsd": losses.jsd_from_log_probs(log_p, log_q, 0.5),
        "top1_agree": (s_top == t_top).astype(jnp.float32),
        "topk_overlap": jnp.sum(s_k[..., :, None] == t_k[..., None, :], axis=(-1, -2)) / TOP_K,
        "student_nll": -losses.pick(log_q, targets),
        "teacher_nll": -losses.pick(log_p, targets),
        "student_correct": (s_top == targets).astype(jnp.float32),
        "teacher_correct": (t_top == targets).astype(jnp.float32),
    }
    by_source = (source_ids[..., None] == jnp.arange(n_sources)).astype(jnp.float32) * w[..., None]  # b s S
    sums: dict[str, Any] = {
        k: jnp.einsum("bs,bsS->S", jnp.where(w > 0, v, 0.0), by_source) for k, v in per_token.items()
    }
    for model, log_probs, correct in (
        ("student", log_q, per_token["student_correct"]),
        ("teacher", log_p, per_token["teacher_correct"]),
    ):
        confidence = jnp.exp(jnp.max(log_probs, axis=-1))
        bins = jnp.clip(jnp.floor(confidence * N_BINS).astype(jnp.int32), 0, N_BINS - 1)
        in_bin = (bins[..., None] == jnp.arange(N_BINS)).astype(jnp.float32)  # b s B
        sums[f"{model}_bin_count"] = jnp.einsum("bsS,bsB->SB", by_source, in_bin)
        sums[f"{model}_bin_confidence"] = jnp.einsum("bsS,bsB->SB", by_source, in_bin * confidence[..., None])
        sums[f"{model}_bin_correct"] = jnp.einsum("bsS,bsB->SB", by_source, in_bin * correct[..., None])
    # Per-row sums of what the intervals need (a row is one packed window of held-out documents; the bootstrap
    # resamples the documents the rows come from, as neither the tokens of a row nor the rows of a document are
    # independent).
    if rows:
        sums["rows"] = {
            k: jnp.sum(jnp.where(w > 0, per_token[k], 0.0) * w, axis=-1)
            for k in ("count", "forward_kl", "top1_agree", "student_nll", "teacher_nll")
        }
    at_position = (jnp.clip(positions, 0, seq_len - 1)[..., None] == jnp.arange(seq_len)).astype(jnp.float32)
    sums["position_count"] = jnp.einsum("bs,bsP->P", w, at_position)
    sums["position_forward_kl"] = jnp.einsum(
        "bs,bsP->P", jnp.where(w > 0, per_token["forward_kl"], 0.0) * w, at_position
    )
    return sums


def cka_sums(student_layers_lbsd, teacher_layers_lbsd, weights_bs, pairs: Sequence[tuple[int, int]]) -> dict:
    """Raw moments for linear CKA of each (student layer, teacher layer) pair over the weighted tokens."""
    w = weights_bs.astype(jnp.float32)
    x = student_layers_lbsd.astype(jnp.float32)
    y = teacher_layers_lbsd.astype(jnp.float32)
    s_idx = jnp.asarray([i for i, _ in pairs])
    t_idx = jnp.asarray([j for _, j in pairs])
    return {
        "n": jnp.sum(w),
        "sx": jnp.einsum("lbsd,bs->ld", x, w),
        "sy": jnp.einsum("lbsd,bs->ld", y, w),
        "sxx": jnp.einsum("lbsd,bs,lbse->lde", x, w, x),
        "syy": jnp.einsum("lbsd,bs,lbse->lde", y, w, y),
        "syx": jnp.einsum("pbse,bs,pbsd->ped", y[t_idx], w, x[s_idx]),
    }


def cka_from_moments(n, sx, sy, sxx, syy, syx) -> float:
    """Linear CKA = ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F) from raw moments (X̃, Ỹ centred), in float64."""
    cxx = sxx - np.outer(sx, sx) / n
    cyy = syy - np.outer(sy, sy) / n
    cyx = syx - np.outer(sy, sx) / n
    denominator = np.linalg.norm(cxx) * np.linalg.norm(cyy)
    return float(np.sum(cyx * cyx) / denominator) if denominator > 0 else float("nan")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples ([n, d1], [n, d2])."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return cka_from_moments(len(x), x.sum(0), y.sum(0), x.T @ x, y.T @ y, y.T @ x)


def default_layer_pairs(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """Student layer i ↔ teacher layer round((i + 1)·Lt/Ls) − 1: equal fractions of depth (halves round up)."""
    return tuple(
        (i, int(math.floor((i + 1) * teacher_layers / student_layers + 0.5)) - 1) for i in range(student_layers)
    )


# ----------------------------------------------------------------------------------------------------------------
# Sums → metrics


def _metrics(s: dict[str, np.ndarray]) -> dict[str, float]:
    count = float(s["count"])
    if count == 0:
        return {"tokens": 0}
    mean = {k: float(s[k]) / count for k in _SCALARS if k != "count"}
    out = {
        "tokens": int(count),
        "forward_kl": mean["forward_kl"],
        "reverse_kl": mean["reverse_kl"],
        "jsd": mean["jsd"],
        "top1_agreement": mean["top1_agree"],
        f"top{TOP_K}_overlap": mean["topk_overlap"],
        "student_ppl": math.exp(mean["student_nll"]),
        "teacher_ppl": math.exp(mean["teacher_nll"]),
        "student_accuracy": mean["student_correct"],
        "teacher_accuracy": mean["teacher_correct"],
    }
    out["ppl_gap"] = out["student_ppl"] - out["teacher_ppl"]
    for model in ("student", "teacher"):
        gap = np.abs(np.asarray(s[f"{model}_bin_correct"]) - np.asarray(s[f"{model}_bin_confidence"]))
        out[f"{model}_ece"] = float(gap.sum() / count)
    return out


def finalize(
    sums: dict[str, np.ndarray],
    source_names: Sequence[str],
    pairs: Sequence[tuple[int, int]] = (),
    matched: Sequence[tuple[int, int]] = (),
    shape: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Exact means from accumulated sums: overall, per source, by position, and CKA of the measured pairs."""
    per_source = {k: v for k, v in sums.items() if k in _SCALARS or "_bin_" in k}
    overall = _metrics({k: np.sum(v, axis=0) for k, v in per_source.items()})
    by_source = {name: _metrics({k: v[i] for k, v in per_source.items()}) for i, name in enumerate(source_names)}
    pos_count = np.asarray(sums["position_count"])
    report: dict[str, Any] = {
        "temperature": 1.0,
        "overall": overall,
        "by_source": {k: v for k, v in by_source.items() if v["tokens"] > 0},
        "kl_by_position": [float(k / c) if c else None for k, c in zip(sums["position_forward_kl"], pos_count)],
        "tokens_by_position": [int(c) for c in pos_count],
    }
    if pairs:
        values = {}
        for p, (i, j) in enumerate(pairs):
            values[(i, j)] = cka_from_moments(
                float(sums["n"]), sums["sx"][i], sums["sy"][j], sums["sxx"][i], sums["syy"][j], sums["syx"][p]
            )
        report["cka"] = [{"student_layer": i, "teacher_layer": j, "cka": values[(i, j)]} for i, j in matched]
        if shape is not None:
            report["cka_grid"] = [[values.get((i, j)) for j in range(shape[1])] for i in range(shape[0])]
    return report


# ----------------------------------------------------------------------------------------------------------------
# Measuring a student against a teacher over held-out batches


def make_fidelity_steps(
    student, student_rules, teacher, *, n_sources: int, seq_len: int, pairs: Sequence[tuple[int, int]] = ()
):
    """(teacher_step, student_step), pure functions: teacher_step(teacher_params, batch) -> held, the teacher's
    forward on a batch (its logits over the vocabulary both share, and its layers where CKA is measured), computed
    once per batch; student_step(params, held, batch) -> one student's sums, called per student. Two programs, each
    compiled once whatever the number of students: one program for the demo's four students compiled in ~12 s on 2
    CPU cores, one student in ~5 s. Full [b, s, v] logits (an eval-sized batch); the sums hold `rows`: per-row sums
    of the figures whose intervals the report gives (fidelity/intervals.py)."""
    from analogjax.models.transformer import logits as head_logits
    from analogjax.teacher import forward as teacher_forward

    collect = bool(pairs) and teacher.features is not None
    shared_vocab = min(student.cfg.vocab_size, teacher.vocab_size or student.cfg.vocab_size)

    def teacher_step(teacher_params, batch):
        signal = teacher_forward(teacher, teacher_params, batch, collect)
        held = {"logits": signal.logits()[..., :shared_vocab].astype(jnp.float32)}  # soft-capped as the teacher caps
        return held | {"layers": signal.layers} if collect else held

    def student_step(params, held, batch):
        tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
        with nn.logical_axis_rules(list(student_rules)):
            feats = student.features(params, tokens, seg, pos, collect, applies_final_softcap=True)
            s_logits = head_logits(params, student.cfg, feats.hidden_bsd)  # soft-capped where the model caps
        # A padded vocabulary (same tokenizer) is compared on the shared real range only.
        sums = token_sums(
            s_logits[..., :shared_vocab],
            held["logits"],
            batch["targets"],
            batch["loss_mask"],
            batch["source_ids"],
            pos,
            n_sources=n_sources,
            seq_len=seq_len,
            rows=True,
        )
        if collect:  # without each segment's first token, the attention sink (module docstring)
            sums.update(cka_sums(feats.layers_lbsd, held["layers"], batch["loss_mask"] * (pos > 0), pairs))
        return sums

    return teacher_step, student_step


def measure(config, student_params, teacher, teacher_params, mesh, batches: int) -> dict[str, Any]:
    """Fidelity of `student_params` (config.model) against the teacher on `batches` held-out batches of config.data."""
    return measure_models(config, {"analog": student_params}, teacher, teacher_params, mesh, batches)["analog"]


def measure_models(
    config, params_by_name: dict[str, Any], teacher, teacher_params, mesh, batches: int
) -> dict[str, dict[str, Any]]:
    """The fidelity report of each student (every one of config.model's shape) against the teacher, on the same
    `batches` held-out batches of config.data, the teacher's forward computed once per batch for all of them. Each
    report's `ci95` gives 95% intervals of the headline figures (bootstrap over the held-out documents the rows come
    from), and `rows` the per-row sums they come from (with each row's document, intervals.DOCUMENT), for paired
    comparisons of two reports (`comparison`)."""
    from analogjax import mesh as mesh_lib
    from analogjax.data import heldout_batches
    from analogjax.data.spec import source_names
    from analogjax.models.transformer import Transformer

    if config.data.heldout_fraction <= 0:
        raise UserError("data.heldout_fraction is 0: fidelity is measured on held-out documents only")
    student = Transformer(config.model)
    names = source_names(config.data)
    ls, lt = config.model.n_layers, config.teacher.model.n_layers
    matched = tuple(tuple(p) for p in config.distill.layer_map) or default_layer_pairs(ls, lt)
    for i, j in matched:
        if not (0 <= i < ls and 0 <= j < lt):
            raise UserError(f"distill.layer_map: pair ({i}, {j}) is outside {ls} student and {lt} teacher layers")
    full_grid = ls * lt * config.model.d_model * config.teacher.model.d_model <= FULL_GRID_ELEMENTS
    pairs = tuple((i, j) for i in range(ls) for j in range(lt)) if full_grid else matched
    if teacher.features is None:
        pairs = ()
    teacher_step, student_step = make_fidelity_steps(
        student, mesh_lib.STUDENT_RULES, teacher, n_sources=len(names), seq_len=config.data.seq_len, pairs=pairs
    )
    batch_sharding = mesh_lib.batch_sharding(mesh)
    # The teacher's outputs stay on the mesh, sharded as the batch, between its step and the students'.
    teacher_fn = jax.jit(teacher_step)
    student_fn = jax.jit(student_step, out_shardings=mesh_lib.replicated(mesh))
    heldout = heldout_batches(
        config.data,
        seed=config.train.seed,
        vocab_size=config.model.vocab_size,
        sharding=batch_sharding,
        batches=batches,
        documents=True,
    )
    totals: dict[str, dict] = {name: {} for name in params_by_name}
    rows: dict[str, dict[str, list]] = {name: {} for name in params_by_name}
    with jax.set_mesh(mesh):
        for batch, documents in heldout:
            held = teacher_fn(teacher_params, batch)
            got = jax.device_get({name: student_fn(params, held, batch) for name, params in params_by_name.items()})
            for name, sums in got.items():
                per_row = sums.pop("rows") | {intervals.DOCUMENT: documents}
                add_sums(totals[name], sums)
                for key, value in per_row.items():
                    rows[name].setdefault(key, []).append(np.asarray(value, np.float64))
    reports = {}
    for name, total in totals.items():
        if not total or float(np.sum(total["count"])) == 0:
            raise UserError("the held-out split gave no valid tokens: raise data.heldout_fraction or add documents")
        report = finalize(total, names, pairs, matched, (ls, lt) if full_grid and pairs else None)
        report["batches"] = batches
        per_row = {key: np.concatenate(parts) for key, parts in rows[name].items()}
        filled = per_row["count"] > 0  # a short held-out split pads its last batch with empty rows: not rows at all
        report["rows"] = {key: value[filled] for key, value in per_row.items()}
        report["documents"] = intervals.units(report["rows"])  # the held-out documents measured (the intervals' unit)
        report["ci95"] = {
            figure: intervals.ci95(statistic, report["rows"]) for figure, (statistic, _) in ROW_FIGURES.items()
        }
        reports[name] = report
    documents = next(iter(reports.values()))["documents"]
    if documents < intervals.MIN_UNITS and jax.process_index() == 0:
        print(
            f"warning: the held-out rows measured come from {documents} document(s), too few for 95% intervals (at "
            f"least {intervals.MIN_UNITS}): spread them over more documents with data.heldout_shuffle_rows and "
            "data.heldout_document_tokens, or measure more batches",
            file=sys.stderr,
        )
    return reports


# The figures whose 95% intervals a report gives, from its per-row sums: (statistic, higher is better).
ROW_FIGURES = {
    "forward_kl": (intervals.ratio("forward_kl", "count"), False),
    "top1_agreement": (intervals.ratio("top1_agree", "count"), True),
    "student_nll": (intervals.ratio("student_nll", "count"), False),
}


def comparison(analog: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired comparisons (same held-out rows) of two fidelity reports of measure_models: KL(teacher‖model), top-1
    agreement and the model's own held-out CE, each judged beyond noise (intervals.compare)."""
    return [
        intervals.compare(measure, statistic, analog["rows"], baseline["rows"], higher_is_better=higher_is_better)
        for measure, (statistic, higher_is_better) in ROW_FIGURES.items()
    ]


# ----------------------------------------------------------------------------------------------------------------
# Report: fidelity.json, plots, fidelity.md


_TABLE = (
    ("forward_kl", "KL(teacher‖analog)", 4),
    ("reverse_kl", "KL(analog‖teacher)", 4),
    ("jsd", "JSD", 4),
    ("top1_agreement", "top-1 agreement", 4),
    (f"top{TOP_K}_overlap", f"top-{TOP_K} overlap", 4),
    ("student_ppl", "analog perplexity", 3),
    ("teacher_ppl", "teacher perplexity", 3),
    ("ppl_gap", "perplexity gap", 3),
    ("student_ece", "analog ECE", 4),
    ("teacher_ece", "teacher ECE", 4),
    ("tokens", "tokens", 0),
)


def markdown_table(report: dict[str, Any]) -> str:
    """The fidelity table: overall and per-source columns."""
    columns = [("all", report["overall"])] + list(report["by_source"].items())
    if len(columns) == 2:  # one source: its column repeats the overall one
        columns = columns[:1]
    lines = ["| metric | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for key, label, digits in _TABLE:
        cells = [f"{col[key]:.{digits}f}" if digits else f"{col[key]:,}" for _, col in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    report: dict[str, Any],
    out_dir: str | Path,
    *,
    metrics_jsonl: str | Path | None = None,
    title: str = "Fidelity of the analog to its teacher",
) -> dict[str, Path]:
    """fidelity.json, fidelity.md and PNG plots in `out_dir`; returns the written paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "fidelity.json"}
    # Per-row sums (measure_models) serve intervals and comparisons, not readers.
    written["json"].write_text(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2) + "\n")
    written.update(plot(report, out, metrics_jsonl))
    lines = [
        f"# {title}",
        "",
        f"Held-out documents ({report['overall']['tokens']:,} tokens"
        + (f" of {report['documents']} documents" if report.get("documents") else "")
        + "), temperature 1. "
        "KL, JSD in nats per token; ECE over 15 equal-width confidence bins.",
        "",
        markdown_table(report),
        "",
    ]
    if report.get("cka"):
        lines += ["## Linear CKA of matched layers", "", "| analog layer | teacher layer | CKA |", "|---:|---:|---:|"]
        lines += [f"| {c['student_layer']} | {c['teacher_layer']} | {c['cka']:.4f} |" for c in report["cka"]]
        lines.append("")
    if report.get("transfer"):  # analogjax.fidelity.transfer's object, when the caller measured it
        from analogjax.fidelity import transfer_report

        written.update(transfer_report.plot(report["transfer"], out))
        lines += [
            "## Transfer to the teacher",
            "",
            transfer_report.card_paragraph(report["transfer"]),
            "",
            transfer_report.markdown_table(report["transfer"]),
            "",
        ]
    lines += [f"![{name}]({path.name})" for name, path in written.items() if path.suffix == ".png"]
    written["md"] = out / "fidelity.md"
    written["md"].write_text("\n".join(lines) + "\n")
    return written


def plot(report: dict[str, Any], out: Path, metrics_jsonl: str | Path | None = None) -> dict[str, Path]:
    plt = figures.pyplot()
    from matplotlib.patches import Rectangle

    written = {}

    def save(fig, name):
        written[name] = figures.save(fig, out / f"{name}.png")

    kl = [(i, v) for i, v in enumerate(report["kl_by_position"]) if v is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([i for i, _ in kl], [v for _, v in kl])
    ax.set(xlabel="position in document", ylabel="KL(teacher‖analog), nats", title="KL by position")
    save(fig, "kl_by_position")

    sources = report["by_source"] or {"all": report["overall"]}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(sources))
    ax.bar(xs - 0.2, [s["top1_agreement"] for s in sources.values()], 0.4, label="top-1 agreement")
    ax.bar(xs + 0.2, [s[f"top{TOP_K}_overlap"] for s in sources.values()], 0.4, label=f"top-{TOP_K} overlap")
    ax.set_xticks(xs, list(sources), rotation=30, ha="right")
    ax.set(ylim=(0, 1), title="agreement with the teacher by source")
    ax.legend()
    save(fig, "agreement_by_source")

    if report.get("cka_grid") or report.get("cka"):
        grid = report.get("cka_grid")
        if grid is None:
            ls = 1 + max(c["student_layer"] for c in report["cka"])
            lt = 1 + max(c["teacher_layer"] for c in report["cka"])
            grid = [[None] * lt for _ in range(ls)]
            for c in report["cka"]:
                grid[c["student_layer"]][c["teacher_layer"]] = c["cka"]
        values = np.array([[np.nan if v is None else v for v in row] for row in grid], float)
        fig, ax = plt.subplots(figsize=(1.5 + 0.5 * values.shape[1], 1.2 + 0.5 * values.shape[0]))
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for c in report.get("cka", []):
            ax.add_patch(
                Rectangle(
                    (c["teacher_layer"] - 0.5, c["student_layer"] - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    linewidth=1.5,
                )
            )
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        ax.set(xlabel="teacher layer", ylabel="analog layer", title="linear CKA (red: matched)")
        fig.colorbar(image, ax=ax)
        save(fig, "cka")

    records = _read_metrics(metrics_jsonl) if metrics_jsonl else []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("loss", "ce", "forward_kl"):
            points = [(r["step"], r[key]) for r in train if key in r]
            if points:
                ax.plot(*zip(*points), label=f"train {key}")
        for key in ("eval_ce", "eval_kl"):
            points = [(r["step"], r[key]) for r in evals if key in r]
            if points:
                ax.plot(*zip(*points), "o--", label=key.replace("_", " "))
        ax.set(xlabel="step", title="training curves")
        ax.legend()
        save(fig, "training_curves")
    return written


def _read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
