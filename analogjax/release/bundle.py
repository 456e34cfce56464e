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
    override_gates: Sequence[tuple[str, str]] = (),
) -> Path:
    """HF folder + fidelity/ + README.md model card for the run in `run_dir` (workdir or checkpoints dir).

    `release_overrides`: "key=value" settings of the `release` config section over the run's own (e.g.
    "teacher_name=org/model"). Refuses a bundle in which a local path, host or user name appears, unless the
    section's allow_local_paths says the lab wants them. The transfer checks (analogjax.fidelity.transfer) go into the
    fidelity report and the card unless `transfer` is false; `transfer_report` passes one already measured, and
    `fidelity_report` a fidelity report already measured on this run's student (metrics.measure_models: the teacher
    is then not run again). `comparison`: entries judging the analog against a control beyond noise (the demo's),
    shown in the card and kept in fidelity.json. A recipe's workdir (recipe.json) is released as its final phase,
    and the card lists the recipe's phases.

    The release gate (analogjax.release.gates) decides whether anything is written: release.tasks run for the analog
    and the teacher (fidelity.json `tasks`), then the size cap and release.gates are judged; a failing gate not
    overridden (release.overrides, or `override_gates`: (gate name, reason) pairs) refuses the release with one
    `error:` line per gate and nothing written. The card opens with the release statement."""
    import dataclasses
    import getpass
    import json
    import shutil
    import socket
    import tempfile

    import jax

    from analogjax.data.tokenize import load_tokenizer
    from analogjax.fidelity.measure_run import live_teacher, measure_fidelity, measure_transfer
    from analogjax.models.hf.write import check_out_dir
    from analogjax.release import gates, model_card

    out = check_out_dir(out_dir, force)
    run_cfg = with_release_overrides(run_config(run_dir)[0], release_overrides)
    disclosed = model_card.disclosure(run_cfg)  # a bad release section is refused before any work
    spec = bundle_tokenizer(run_cfg, tokenizer=tokenizer, weights_only=weights_only)
    release = run_cfg.release
    overrides = gates.overrides_of(release, override_gates)
    gates.check_config(release, transfer=transfer, overrides=overrides)
    tasks, codec, task_names = _release_tasks(run_cfg)  # built by lm-eval before any model is loaded
    size = gates.size_figures(run_cfg)
    student = load_student(run_dir, run_cfg)  # restored once, for the export and the fidelity report both
    config, workdir, step = student.config, student.workdir, student.step
    if teacher is None:  # loaded once for fidelity, transfer and tasks
        teacher, teacher_params = live_teacher(config, student.mesh)
    if transfer and transfer_report is None:
        transfer_report = measure_transfer(
            student, teacher, teacher_params, batches=batches, user_concepts=user_concepts
        )
    staging = Path(tempfile.mkdtemp(prefix="analogjax-release-"))  # the report waits here until the gates pass
    try:
        report = measure_fidelity(
            student,
            staging,
            batches=batches,
            teacher=teacher,
            teacher_params=teacher_params,
            source_names=None if disclosed.local_paths else model_card.public_source_names(config.data),
            transfer_report=transfer_report if transfer else None,
            measured=fidelity_report,
            comparison=comparison,
        )
        if tasks is not None:
            report["tasks"] = measure_tasks(student, teacher_params, tasks, codec, limit=release.task_limit)
        results = gates.judge(release, size, report, overrides, task_names)  # GateRefusal: nothing is written
        report["release_gate"] = {"size": size, "gates": [dataclasses.asdict(r) for r in results]}
        export_params(config, student.params, out, force, dtype, spec)
        if jax.process_index() == 0:
            written = staging / "fidelity.json"  # as measure_fidelity wrote it, with the gate's keys added
            staged = json.loads(written.read_text())
            staged.update({k: report[k] for k in ("tasks", "release_gate") if k in report})
            written.write_text(json.dumps(staged, indent=2) + "\n")
            shutil.copytree(staging, out / "fidelity", dirs_exist_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
        statement=gates.release_statement(size, results, report),
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


def _release_tasks(config):
    """(lm-eval tasks, the text codec both models read them with, entry -> task name) for release.tasks; (None,
    None, {}) when it names none (lm-eval is then never imported)."""
    from analogjax.release import gates

    if not config.release.tasks:
        return None, None, {}
    from analogjax.evals import require_lm_harness

    require_lm_harness("release.tasks")
    from analogjax.evals.load import RunCodec
    from analogjax.evals.tasks import load_tasks

    codec = RunCodec.for_data(config.data)
    tasks = load_tasks(config.release.tasks, key="release.tasks")
    names = {entry: name for entry, (name, _) in tasks.entries.items()}
    gates.check_task_gates(config.release, names)
    return tasks, codec, names


def measure_tasks(student, teacher_params, tasks, codec, *, limit: int = 0) -> dict:
    """release.tasks for the analog and the teacher on the same examples (analogjax.evals.tasks.task_fidelity),
    both read with the run's tokenizer at the run's sequence length."""
    from analogjax import mesh as mesh_lib
    from analogjax.evals.lm import AnalogLM
    from analogjax.evals.tasks import task_fidelity
    from analogjax.models.model import Model

    config = student.config
    analog = Model(config.model, student.params, mesh=student.mesh, rules=mesh_lib.STUDENT_RULES)
    teacher = Model(config.teacher.model, teacher_params, mesh=student.mesh, rules=mesh_lib.TEACHER_RULES)
    context = config.data.seq_len
    return task_fidelity(
        AnalogLM(analog, codec, max_length=context, name="analog"),
        AnalogLM(teacher, codec, max_length=context, name="teacher"),
        tasks,
        limit=limit or None,
    )


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
