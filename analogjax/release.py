"""The analog release: a Hugging Face folder, a fidelity report and a model card, from a finished run.

`write_release(run_dir, out_dir)` reads the run's resolved config (workdir run.json, else the checkpoint's meta
item), restores the student, exports it with the run's tokenizer (analogjax.hf.save_params; for data.tokenizer
"none" the one its prepared shards name), measures it against its teacher on held-out data (analogjax.fidelity)
and writes README.md (analogjax.model_card) disclosing what the `release` config section chooses and no local path.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
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


def export_run(
    path: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    dtype: str = "float32",
    tokenizer: str | None = None,
    weights_only: bool = False,
) -> Path:
    """`analogjax export`: a run's student as a HF folder (weights, config.json, tokenizer files)."""
    from analogjax.models import hf

    hf.check_out_dir(out_dir, force)
    config = run_config(path)[0]
    spec = bundle_tokenizer(config, tokenizer=tokenizer, weights_only=weights_only)  # refused before any work
    config, _, _, _, params = _load_student(path)
    return _export(config, params, out_dir, force, dtype, spec)


def fidelity_of_run(
    path: str | Path, out_dir: str | Path, *, config=None, batches: int | None = None, teacher=None, teacher_params=None
) -> dict[str, Any]:
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


def bundle_tokenizer(config, *, tokenizer: str | None = None, weights_only: bool = False) -> str | None:
    """The tokenizer spec a bundle ships (None: weights only): `tokenizer` when given, else the run's own (its
    data.tokenizer, or for "none" the one its prepared shards name). UserError when there is none to ship."""
    from analogjax.data.tokenize import check_vocab, load_tokenizer, resolve_tokenizer

    if weights_only:
        if tokenizer:
            raise UserError("--tokenizer and --weights-only contradict each other: choose one")
        return None
    run_spec = resolve_tokenizer(config.data)
    spec = tokenizer or run_spec
    if spec == "none":
        raise UserError(
            "no tokenizer to ship: the run's data.tokenizer is none and its sources name none (analogjax "
            "prepare records one); pass --tokenizer FILE (the tokenizer its token ids belong to) or "
            "--weights-only to publish the weights alone"
        )
    chosen = load_tokenizer(spec)
    if tokenizer and run_spec != "none" and chosen.fingerprint != load_tokenizer(run_spec).fingerprint:
        raise UserError(f"--tokenizer {tokenizer} is not the tokenizer the run was trained with ({run_spec})")
    if chosen.kind not in ("bytes", "hf"):
        raise UserError(
            f"tokenizer {spec} ({chosen.kind}) cannot be written as a HF tokenizer.json; pass "
            "--weights-only to publish the weights alone"
        )
    check_vocab(chosen, config.model.vocab_size, where=f"tokenizer {spec}")
    return spec


def _export(config, params, out_dir, force: bool, dtype: str, tokenizer: str | None) -> Path:
    """The HF folder; a chat teacher's template goes with the tokenizer when the analog's tokenizer is the teacher's
    (the template spells the teacher's special tokens), so the analog formats chats as its teacher does."""
    import jax

    from analogjax.data.tokenize import load_tokenizer
    from analogjax.models import hf
    from analogjax.tokenizer_files import (
        TOKENIZER_FILE,
        add_chat_template,
        teacher_chat_template,
    )

    out = hf.save_params(
        params, config.model, out_dir, tokenizer=tokenizer, force=force, dtype=dtype, max_positions=config.data.seq_len
    )
    template = teacher_chat_template(config.teacher.hf_path) if tokenizer else None
    if template is None or jax.process_index() != 0:  # process 0 wrote the files
        return out
    teacher_tokenizer = Path(config.teacher.hf_path) / TOKENIZER_FILE
    if (
        teacher_tokenizer.is_file()
        and load_tokenizer(str(teacher_tokenizer)).fingerprint != load_tokenizer(tokenizer).fingerprint
    ):
        print(
            "warning: the teacher's chat template is not carried into the analog's tokenizer: the analog's "
            "tokenizer is not the teacher's",
            file=sys.stderr,
        )
        return out
    add_chat_template(Path(out), template)
    return out


def _fidelity(
    config,
    workdir,
    step,
    mesh,
    params,
    out_dir,
    batches,
    teacher,
    teacher_params,
    source_names: dict[str, str] | None = None,
    transfer_report: dict | None = None,
) -> dict[str, Any]:
    """Measure and write the fidelity report; `source_names` renames its per-source columns (a release publishes
    the names the lab chose, not those derived from paths)."""
    from analogjax import fidelity

    if teacher is None:
        teacher, teacher_params = _teacher_for_fidelity(config, mesh)
    report = fidelity.measure(config, params, teacher, teacher_params, mesh, batches or config.train.eval_batches)
    report["step"] = step
    if source_names:
        report["by_source"] = {source_names[name]: v for name, v in report["by_source"].items()}
    if transfer_report is not None:
        report["transfer"] = transfer_report
    metrics = workdir / "metrics.jsonl" if workdir is not None else None
    fidelity.write_report(report, out_dir, metrics_jsonl=metrics)
    return report


def _teacher_for_fidelity(config, mesh):
    """Fidelity always compares against the live teacher, whatever the run distilled from (even a cache or
    nothing, for a CE-only baseline)."""
    from analogjax.teacher import live_source_kind, load_teacher

    if live_source_kind(config) == "random":
        raise UserError(
            "the run's config names no teacher.checkpoint, teacher.hf_path or teacher.gguf_path: nothing "
            "to compare with"
        )
    return load_teacher(config, mesh, live=True)


# ----------------------------------------------------------------------------------------------------------------
# The bundle


def write_release(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    batches: int | None = None,
    force: bool = False,
    dtype: str = "float32",
    teacher=None,
    teacher_params=None,
    tokenizer: str | None = None,
    weights_only: bool = False,
    release_overrides: Sequence[str] = (),
    transfer: bool = True,
    transfer_report: dict | None = None,
    user_concepts: Sequence = (),
) -> Path:
    """HF folder + fidelity/ + README.md model card for the run in `run_dir` (workdir or checkpoints dir).

    `release_overrides`: "key=value" settings of the `release` config section over the run's own (e.g.
    "teacher_name=org/model"). Refuses a bundle in which a local path, host or user name appears, unless the
    section's allow_local_paths says the lab wants them. The transfer checks (analogjax.transfer) go into the
    fidelity report and the card unless `transfer` is false; `transfer_report` passes one already measured."""
    import getpass
    import socket

    import jax

    from analogjax import model_card
    from analogjax.data.tokenize import load_tokenizer
    from analogjax.models import hf

    out = hf.check_out_dir(out_dir, force)
    run_cfg = with_release_overrides(run_config(run_dir)[0], release_overrides)
    disclosed = model_card.disclosure(run_cfg)  # a bad release section is refused before any work
    spec = bundle_tokenizer(run_cfg, tokenizer=tokenizer, weights_only=weights_only)
    student = _load_student(run_dir, run_cfg)  # restored once, for the export and the fidelity report both
    config, workdir, step, _, params = student
    _export(config, params, out, force, dtype, spec)
    mesh = student[3]
    if teacher is None:  # loaded once for fidelity and transfer
        teacher, teacher_params = _teacher_for_fidelity(config, mesh)
    if transfer and transfer_report is None:
        from analogjax.transfer import measure

        transfer_report = measure(
            config,
            params,
            teacher,
            teacher_params,
            mesh,
            batches=batches or config.train.eval_batches,
            user_concepts=user_concepts,
        )
    report = _fidelity(
        *student,
        out / "fidelity",
        batches,
        teacher,
        teacher_params,
        None if disclosed.local_paths else model_card.public_source_names(config.data),
        transfer_report=transfer_report if transfer else None,
    )
    if jax.process_index() != 0:
        return out
    card = model_card.model_card(
        config,
        step,
        report,
        sorted(p.name for p in (out / "fidelity").glob("*.png")),
        disclosed=disclosed,
        tokenizer=load_tokenizer(spec) if spec else None,
        cache_provenance=_cache_provenance(config),
    )
    (out / "README.md").write_text(card)
    if not disclosed.local_paths:
        needles = model_card.local_paths(config, run_dir, workdir or "", Path.cwd(), Path.home())
        leaks = model_card.find_local_strings(out, needles, [socket.gethostname(), getpass.getuser()])
        if leaks:
            raise UserError(
                f"{out}: the bundle names {leaks[0][1]!r} in {leaks[0][0]}, which this release did not "
                "choose to disclose (release.allow_local_paths); rename it or opt in"
            )
    return out


def with_release_overrides(config, overrides: Sequence[str]):
    """`config` with "key=value" settings applied to its release section (YAML values, as --set takes them)."""
    import dataclasses

    import yaml

    from analogjax.config import ReleaseConfig, from_dict, to_dict

    if not overrides:
        return config
    raw = to_dict(config.release)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("release.")
        if not sep or not key or "." in key:
            raise UserError(f"--set expects release.KEY=VALUE (a release setting), got {item!r}")
        raw[key] = yaml.safe_load(text) if text.strip() else ""
    return dataclasses.replace(config, release=from_dict(ReleaseConfig, raw, "release"))


def _cache_provenance(config) -> dict | None:
    """A cached run's teacher cache provenance (what the card's signal and compute lines need), if still on disk."""
    if not config.teacher.cache:
        return None
    from analogjax.teacher_cache.format import read_provenance

    return read_provenance(config.teacher.cache)
