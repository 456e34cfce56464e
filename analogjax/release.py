"""The analog release: a Hugging Face folder, a fidelity report and a model card, from a finished run.

`write_release(run_dir, out_dir)` reads the run's resolved config (workdir run.json, else the checkpoint's meta
item), restores the student, exports it (analogjax.hf.save), measures it against its teacher on held-out data
(analogjax.fidelity) and writes README.md: provenance, recipe, compute ledger, size, fidelity table and plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analogjax.errors import UserError

RUN_FILE = "run.json"  # written by train._guard_workdir
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------------------------------
# A finished run on disk


def resolve_run(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint directory, workdir or None) for a run's workdir or its checkpoints directory."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise UserError(f"--checkpoint: no such directory {path}")
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, path
    if any(p.name.isdigit() for p in path.iterdir()):
        parent = path.parent
        return path, parent if (parent / RUN_FILE).is_file() else None
    raise UserError(f"--checkpoint: {path} is neither a run's workdir (with {CHECKPOINTS}/) nor a checkpoint directory")


def _manager(ckpt_dir: Path):
    import orbax.checkpoint as ocp

    from analogjax.checkpoint import ITEMS

    return ocp.CheckpointManager(ckpt_dir, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))


def run_config(path: str | Path):
    """(Config, checkpoint dir, workdir, step) of a finished run: the config it was trained with, resolved."""
    import orbax.checkpoint as ocp

    from analogjax.config import Config, from_dict

    ckpt_dir, workdir = resolve_run(path)
    manager = _manager(ckpt_dir)
    try:
        step = manager.latest_step()
        if step is None:
            raise UserError(f"no complete checkpoint in {ckpt_dir}")
        if workdir is not None and (workdir / RUN_FILE).is_file():
            raw = json.loads((workdir / RUN_FILE).read_text())["config"]
        else:
            try:
                raw = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["config"]
            except (KeyError, FileNotFoundError, ValueError):
                raise UserError(f"{ckpt_dir}: checkpoint {step} has no meta item with the run's config") from None
    finally:
        manager.close()
    return from_dict(Config, raw), ckpt_dir, workdir, step


def restore_student(config, ckpt_dir: Path, mesh, step: int | None = None):
    """The student's model params of a checkpoint, restored sharded under the student rules."""
    from analogjax import mesh as mesh_lib
    from analogjax.checkpoint import restore_params
    from analogjax.models.transformer import Transformer

    abstract = mesh_lib.abstract_sharded(Transformer(config.model).init_boxed, mesh, mesh_lib.STUDENT_RULES)
    return restore_params(ckpt_dir, abstract, step)


def eval_mesh(config):
    """All devices on the batch axes (data = -1), keeping the run's tensor size when it divides the devices."""
    import jax

    from analogjax import mesh as mesh_lib

    tensor = config.mesh.tensor if jax.device_count() % max(config.mesh.tensor, 1) == 0 else 1
    mesh = mesh_lib.make_mesh(-1, 1, tensor)
    mesh_lib.check_batch(config.data.global_batch, mesh)
    return mesh


def export_run(path: str | Path, out_dir: str | Path, *, force: bool = False, dtype: str = "float32") -> Path:
    """`analogjax export`: a run's student as a HF folder (weights, config.json, tokenizer files)."""
    from analogjax.models import hf

    hf.check_out_dir(out_dir, force)
    config, _, _, _, params = _load_student(path)
    return _export(config, params, out_dir, force, dtype)


def fidelity_of_run(path: str | Path, out_dir: str | Path, *, config=None, batches: int | None = None,
                    teacher=None, teacher_params=None) -> dict[str, Any]:
    """`analogjax eval`: measure a run's student against its teacher; writes fidelity.json/.md and plots."""
    return _fidelity(*_load_student(path, config), out_dir, batches, teacher, teacher_params)


def _load_student(path: str | Path, config=None):
    """(config, workdir, step, mesh, params): the run's student restored onto an evaluation mesh. `config`
    replaces the run's own (e.g. another data section) but must describe the same model."""
    run_cfg, ckpt_dir, workdir, step = run_config(path)
    config = config or run_cfg
    if config.model != run_cfg.model:
        raise UserError(f"{ckpt_dir} holds a student of another shape than the config's model section")
    mesh = eval_mesh(config)
    return config, workdir, step, mesh, restore_student(config, ckpt_dir, mesh, step)


def _export(config, params, out_dir, force: bool, dtype: str) -> Path:
    from analogjax.models import hf

    return hf.save_params(params, config.model, out_dir, tokenizer=config.data.tokenizer, force=force, dtype=dtype,
                   max_positions=config.data.seq_len)


def _fidelity(config, workdir, step, mesh, params, out_dir, batches, teacher, teacher_params) -> dict[str, Any]:
    from analogjax import fidelity

    if teacher is None:
        teacher, teacher_params = _teacher_for_fidelity(config, mesh)
    report = fidelity.measure(config, params, teacher, teacher_params, mesh, batches or config.train.eval_batches)
    report["step"] = step
    metrics = workdir / "metrics.jsonl" if workdir is not None else None
    fidelity.write_report(report, out_dir, metrics_jsonl=metrics)
    return report


def _teacher_for_fidelity(config, mesh):
    """Fidelity always compares against the live teacher, whatever the run distilled from (even a cache or
    nothing, for a CE-only baseline)."""
    from analogjax.teacher import live_source_kind, load_teacher

    if live_source_kind(config) == "random":
        raise UserError("the run's config names no teacher.checkpoint or teacher.hf_path: nothing to compare with")
    return load_teacher(config, mesh, live=True)


# ----------------------------------------------------------------------------------------------------------------
# The bundle


def write_release(run_dir: str | Path, out_dir: str | Path, *, batches: int | None = None, force: bool = False,
                  dtype: str = "float32", teacher=None, teacher_params=None) -> Path:
    """HF folder + fidelity/ + README.md model card for the run in `run_dir` (workdir or checkpoints dir)."""
    from analogjax.models import hf

    out = hf.check_out_dir(out_dir, force)
    student = _load_student(run_dir)  # restored once, for the export and the fidelity report both
    config, _, step, _, params = student
    _export(config, params, out, force, dtype)
    report = _fidelity(*student, out / "fidelity", batches, teacher, teacher_params)
    card = model_card(config, step, report, sorted(p.name for p in (out / "fidelity").glob("*.png")))
    (out / "README.md").write_text(card)
    return out


def _teacher_identity(config) -> dict[str, str]:
    from analogjax.config import fingerprint
    from analogjax.models.hf import folder_fingerprint

    source = config.teacher.hf_path or config.teacher.checkpoint
    identity = {"source": source or "random init (no teacher weights)", "shape": fingerprint(config.teacher.model)}
    if source and Path(source).is_dir():
        identity["manifest_sha256"] = folder_fingerprint(source)
    return identity


def compute_ledger(config, step: int) -> dict[str, float | None]:
    """Model FLOPs of the run (analogjax.flops conventions) and their share of the teacher's pretraining."""
    from analogjax.flops import forward_flops_per_token

    tokens = step * config.data.global_batch * config.data.seq_len
    student = 3 * forward_flops_per_token(config.model, config.data.seq_len) * tokens
    teacher = forward_flops_per_token(config.teacher.model, config.data.seq_len) * tokens
    pretraining = getattr(config.teacher, "pretraining_flops", None)
    total = student + teacher
    return {"tokens": tokens, "student_flops": student, "teacher_flops": teacher, "total_flops": total,
            "teacher_pretraining_flops": pretraining,
            "fraction_of_teacher_pretraining": total / pretraining if pretraining else None}


def _tokenizer_line(spec: str) -> str:
    if spec in ("bytes", "none"):
        return spec
    from analogjax.data.tokenize import load_tokenizer

    tok = load_tokenizer(spec)
    return f"{Path(spec).name} ({tok.kind}, {tok.vocab_size} tokens, fingerprint {tok.fingerprint})"


def model_card(config, step: int, report: dict[str, Any], plots: list[str] = ()) -> str:
    """README.md of the bundle; `plots` are PNG names under fidelity/."""
    from analogjax import fidelity
    from analogjax.data.spec import source_names
    from analogjax.flops import param_count
    from analogjax.models.hf import architecture_for

    ledger = compute_ledger(config, step)
    student_params, teacher_params = param_count(config.model), param_count(config.teacher.model)

    def active(cfg) -> str:  # an MoE model's per-token parameters beside its total
        return f" ({param_count(cfg, active=True):,} active per token)" if cfg.moe.enabled else ""
    teacher = _teacher_identity(config)
    d = config.distill
    terms = ", ".join(f"{t.kind} × {t.weight:g}" + (f" → {t.final_weight:g} ({t.schedule})" if t.final_weight is not None
                                                    else "") for t in d.terms)
    temperature = f"{d.temperature:g}" + (f" → {d.final_temperature:g} ({d.temperature_schedule})"
                                          if d.final_temperature is not None else "")
    mix = "; ".join(f"{name} ({s.path}, weight {s.weight:g})" for name, s in zip(source_names(config.data),
                                                                                 config.data.sources))
    init = f"checkpoint {config.checkpoint.init_path}" if config.checkpoint.init_path else \
        f"random (seed {config.train.seed})"
    fraction = ledger["fraction_of_teacher_pretraining"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [analogjax, distillation, analog]",
        "---",
        "",
        f"# Analog of {teacher['source']}",
        "",
        f"A {student_params:,}-parameter{active(config.model)} {architecture_for(config.model)[0]} distilled with "
        f"analogjax from a {teacher_params:,}-parameter{active(config.teacher.model)} teacher: "
        f"**{student_params / teacher_params:.2%}** of the teacher's size.",
        "",
        "## Provenance",
        "",
        f"- teacher: `{teacher['source']}` (shape fingerprint `{teacher['shape']}`"
        + (f", manifest sha256 `{teacher['manifest_sha256']}`)" if "manifest_sha256" in teacher else ")"),
        f"- tokenizer: {_tokenizer_line(config.data.tokenizer)}",
        f"- data mix: {mix}",
        f"- seed: {config.train.seed}",
        "",
        "## Recipe",
        "",
        f"- loss terms: {terms}",
        f"- temperature: {temperature}",
        "- teacher signal: full-vocabulary logits computed in the training step (no top-k truncation, no sampling)",
        f"- steps: {step:,} × {config.data.global_batch} sequences × {config.data.seq_len} tokens = "
        f"{ledger['tokens']:,} tokens seen",
        f"- student initialisation: {init}",
        f"- optimiser: AdamW, peak learning rate {config.optim.learning_rate:g}, {config.optim.warmup_steps} warm-up "
        f"steps, cosine to {config.optim.min_lr_ratio:g}×",
        "",
        "## Compute",
        "",
        "| | FLOPs |",
        "|---|---:|",
        f"| analog training (3 × forward) | {ledger['student_flops']:.3e} |",
        f"| teacher forward passes | {ledger['teacher_flops']:.3e} |",
        f"| total | {ledger['total_flops']:.3e} |",
        f"| teacher pretraining | {ledger['teacher_pretraining_flops']:.3e} |" if ledger["teacher_pretraining_flops"]
        else "| teacher pretraining | not given (teacher.pretraining_flops) |",
    ]
    if fraction is not None:
        lines.append(f"| distillation / teacher pretraining | {fraction:.4%} |")
    lines += [
        "",
        "## Fidelity to the teacher",
        "",
        f"Held-out documents, {report['overall']['tokens']:,} tokens, temperature 1 (step {step}).",
        "",
        fidelity.markdown_table(report),
        "",
    ]
    if report.get("cka"):
        cka = ", ".join(f"{c['student_layer']}↔{c['teacher_layer']}: {c['cka']:.3f}" for c in report["cka"])
        lines += [f"Linear CKA of matched layers (analog↔teacher): {cka}.", ""]
    lines += [f"![{Path(name).stem}](fidelity/{name})" for name in plots]
    lines += ["", "Full numbers: [fidelity/fidelity.json](fidelity/fidelity.json).", ""]
    return "\n".join(lines)
