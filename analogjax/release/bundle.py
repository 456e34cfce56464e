"""The analog release: a Hugging Face folder, a fidelity report and a model card, from a finished run.

`write_release(run_dir, out_dir)` reads the run's resolved config (workdir run.json, else the checkpoint's meta
item), restores the student, exports it with the run's tokenizer (analogjax.hf.save_params; for data.tokenizer
"none" the one its prepared shards name), measures it against its teacher on held-out data (analogjax.fidelity)
and writes README.md (analogjax.release.model_card) disclosing what the `release` config section chooses and no
local path.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from analogjax.errors import UserError
from analogjax.run_dir import load_student, run_config


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
    from analogjax.models.hf.write import check_out_dir

    check_out_dir(out_dir, force)
    config = run_config(path)[0]
    spec = bundle_tokenizer(config, tokenizer=tokenizer, weights_only=weights_only)  # refused before any work
    student = load_student(path)
    return export_params(student.config, student.params, out_dir, force, dtype, spec)


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


def export_params(config, params, out_dir, force: bool, dtype: str, tokenizer: str | None) -> Path:
    """The HF folder; a chat teacher's template goes with the tokenizer when the analog's tokenizer is the teacher's
    (the template spells the teacher's special tokens), so the analog formats chats as its teacher does."""
    import jax

    from analogjax.data.tokenize import load_tokenizer
    from analogjax.data.tokenizer_files import (
        TOKENIZER_FILE,
        add_chat_template,
        teacher_chat_template,
    )
    from analogjax.models.hf.write import save_params

    out = save_params(
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
    fidelity_report: dict | None = None,
    comparison: Sequence[dict] | None = None,
) -> Path:
    """HF folder + fidelity/ + README.md model card for the run in `run_dir` (workdir or checkpoints dir).

    `release_overrides`: "key=value" settings of the `release` config section over the run's own (e.g.
    "teacher_name=org/model"). Refuses a bundle in which a local path, host or user name appears, unless the
    section's allow_local_paths says the lab wants them. The transfer checks (analogjax.fidelity.transfer) go into the
    fidelity report and the card unless `transfer` is false; `transfer_report` passes one already measured, and
    `fidelity_report` a fidelity report already measured on this run's student (metrics.measure_models: the teacher
    is then not run again). `comparison`: entries judging the analog against a control beyond noise (the demo's),
    shown in the card and kept in fidelity.json. A recipe's workdir (recipe.json) is released as its final phase,
    and the card lists the recipe's phases."""
    import getpass
    import socket

    import jax

    from analogjax.data.tokenize import load_tokenizer
    from analogjax.fidelity.measure_run import live_teacher, measure_fidelity, measure_transfer
    from analogjax.models.hf.write import check_out_dir
    from analogjax.release import model_card

    out = check_out_dir(out_dir, force)
    run_cfg = with_release_overrides(run_config(run_dir)[0], release_overrides)
    disclosed = model_card.disclosure(run_cfg)  # a bad release section is refused before any work
    spec = bundle_tokenizer(run_cfg, tokenizer=tokenizer, weights_only=weights_only)
    student = load_student(run_dir, run_cfg)  # restored once, for the export and the fidelity report both
    config, workdir, step = student.config, student.workdir, student.step
    export_params(config, student.params, out, force, dtype, spec)
    if teacher is None:  # loaded once for fidelity and transfer
        teacher, teacher_params = live_teacher(config, student.mesh)
    if transfer and transfer_report is None:
        transfer_report = measure_transfer(
            student, teacher, teacher_params, batches=batches, user_concepts=user_concepts
        )
    report = measure_fidelity(
        student,
        out / "fidelity",
        batches=batches,
        teacher=teacher,
        teacher_params=teacher_params,
        source_names=None if disclosed.local_paths else model_card.public_source_names(config.data),
        transfer_report=transfer_report if transfer else None,
        measured=fidelity_report,
        comparison=comparison,
    )
    if jax.process_index() != 0:
        return out
    recipe = recipe_record(run_dir)
    card = model_card.model_card(
        config,
        step,
        report,
        sorted(p.name for p in (out / "fidelity").glob("*.png")),
        disclosed=disclosed,
        tokenizer=load_tokenizer(spec) if spec else None,
        cache_provenance=cache_provenance(config),
        recipe=recipe,
        phase_ledger=_recipe_ledger(run_dir, recipe),
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


def cache_provenance(config) -> dict | None:
    """A cached run's teacher cache provenance (what the card's signal and compute lines need), if still on disk."""
    if not config.teacher.cache:
        return None
    from analogjax.teacher_cache.format import read_provenance

    return read_provenance(config.teacher.cache)


def recipe_record(run_dir: str | Path) -> dict | None:
    """recipe.json of a recipe's workdir (its phases, steps and settings), None for a plain run."""
    import json

    from analogjax.run_dir import RECIPE_FILE

    path = Path(run_dir) / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _recipe_ledger(run_dir: str | Path, recipe: dict | None) -> dict | None:
    """The compute of a recipe's training phases together (each phase's own config, steps and cache)."""
    if recipe is None:
        return None
    from analogjax.release import model_card

    ledgers = []
    for phase in recipe["phases"]:
        if phase in recipe.get("steps", {}):  # the training phases (pruning and the cache are not runs)
            config, _, _, step = run_config(Path(run_dir) / phase)
            ledgers.append(model_card.compute_ledger(config, step, cache_provenance(config)))
    return model_card.recipe_ledger(ledgers)
