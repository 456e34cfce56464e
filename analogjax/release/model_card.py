"""The analog's model card (README.md of a release bundle): what a release discloses, and nothing it did not choose.

`disclosure(config)` decides how the teacher, the data, the lab, the license and the languages appear publicly:
the `release` config section first, then what the artefacts themselves say (a HF teacher's config.json
`_name_or_path` when it is a Hub id, its README metadata, a GGUF's general.name), never a filesystem path.
`model_card(...)` renders a Hugging Face model card: YAML metadata (license, tags, base_model where public, language,
pipeline_tag, library_name), a "How to load" snippet that runs as printed, provenance, recipe, compute ledger and
the fidelity table. `find_local_strings` is the release's last check that no local path reached the bundle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from analogjax.errors import UserError

# A Hugging Face Hub repository id: "name" or "owner/name". A local path ("/data/teacher", "./x", "~/x", "C:\\x")
# never matches, so a `_name_or_path` that a folder's loader wrote is not taken for a public name.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
TAGS = ("analogjax", "distillation", "analog")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


# ----------------------------------------------------------------------------------------------------------------
# What the artefacts say about the teacher


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card ({} when there is none or it does not parse)."""
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _as_languages(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(v for v in value if isinstance(v, str) and v.replace("-", "").isalnum())


def teacher_metadata(teacher) -> dict[str, Any]:
    """{"name", "license", "language"} as far as the teacher's own files say (HF folder, GGUF file)."""
    found: dict[str, Any] = {}
    if teacher.hf_path and Path(teacher.hf_path).is_dir():
        folder = Path(teacher.hf_path)
        card = _front_matter(folder / "README.md")
        try:
            hf_config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            hf_config = {}
        for name in (hf_config.get("_name_or_path"), card.get("model_name")):
            if isinstance(name, str) and is_hub_id(name):
                found["name"] = name
                break
        if isinstance(card.get("license"), str):
            found["license"] = card["license"]
        found["language"] = _as_languages(card.get("language"))
    gguf_path = getattr(teacher, "gguf_path", None)  # a GGUF teacher, where the config schema has one
    if gguf_path and Path(gguf_path).is_file():
        found.update({k: v for k, v in _gguf_metadata(gguf_path).items() if v})
    return found


def _gguf_metadata(path: str) -> dict[str, Any]:
    from analogjax.models.gguf import open_gguf

    fields = open_gguf(path).reader.fields  # the file the teacher was loaded from, parsed once per process

    def value(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    name = value("general.name")
    return {
        "name": name if isinstance(name, str) and name.strip() else None,
        "license": value("general.license"),
        "language": _as_languages(value("general.languages")),
    }


# ----------------------------------------------------------------------------------------------------------------
# What the release discloses


@dataclass(frozen=True)
class Disclosure:
    teacher_name: str  # "" when neither the release section nor the teacher's files name it
    base_model: str | None  # the teacher's Hub id, only where the lab said it is public
    license: str
    license_chosen: bool  # False: "other", nobody chose; the card asks the lab to
    language: tuple[str, ...]
    lab: str
    data_description: str
    local_paths: bool


def disclosure(config) -> Disclosure:
    release = config.release
    found = teacher_metadata(config.teacher)
    name = release.teacher_name or found.get("name", "")
    base_model = None
    if release.base_model_public:
        if not is_hub_id(name):
            raise UserError(
                f"release.base_model_public: the teacher's name {name!r} is not a Hub id (owner/name); "
                "set release.teacher_name to it"
            )
        base_model = name
    license_ = release.license or found.get("license") or "other"
    return Disclosure(
        teacher_name=name,
        base_model=base_model,
        license=license_,
        license_chosen=bool(release.license or found.get("license")),
        language=release.language or found.get("language", ()),
        lab=release.lab,
        data_description=release.data_description or _default_data_description(config.data),
        local_paths=release.allow_local_paths,
    )


def public_source_names(data) -> dict[str, str]:
    """Each source's name in the pipeline's reports → its public name: the one the config gave, else "source N"
    (default names are derived from paths)."""
    from analogjax.data.spec import source_names

    return {
        name: name if s.name else f"source {i + 1}" for i, (name, s) in enumerate(zip(source_names(data), data.sources))
    }


def _default_data_description(data) -> str:
    """Counts and weights only, under the sources' public names."""
    total = sum(s.weight for s in data.sources)
    names = list(public_source_names(data).values())
    parts = [f"{name} ({s.weight / total:.0%})" for name, s in zip(names, data.sources)]
    return (
        f"{len(parts)} source{'s' if len(parts) > 1 else ''}: "
        + ", ".join(parts)
        + " (not described by the lab: release.data_description)"
    )


def local_paths(config, *extra) -> list[str]:
    """The local paths a run names (teacher, cache, data, tokenizer, init checkpoint, and `extra`), absolute."""
    teacher = config.teacher
    named = [
        teacher.hf_path,
        teacher.checkpoint,
        teacher.cache,
        getattr(teacher, "gguf_path", None),
        config.checkpoint.init_path,
        config.data.tokenizer,
        *(s.path for s in config.data.sources),
        *extra,
    ]
    out = []
    for p in named:
        if p and p not in ("bytes", "none", "stdlib") and "://" not in str(p):
            out.append(str(Path(p).expanduser().absolute()))
    return out


def find_local_strings(folder: Path, needles: list[str], names: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(file, string) for each of `needles` (local paths) found in a file of `folder` (text files, safetensors
    headers) and each of `names` (host and user names) found where it is part of a path or an address ("/alice",
    "~alice", "alice@", "@buildbox", "buildbox:/"): a bare word may be a user named like any English word.
    tokenizer.json is the lab's own file, copied as it is: its vocabulary may hold any string, so it is not read."""
    found = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "tokenizer.json"):
        text = _searchable_text(file)
        if text is None:
            continue
        rel = str(file.relative_to(folder))
        found += [(rel, n) for n in needles if len(n) > 3 and n in text]
        for name in (n for n in names if n):
            word = re.escape(name)
            if re.search(rf"[/\\~@]{word}(?![\w-])|(?<![\w.-]){word}(@|:/)", text):
                found.append((rel, name))
    return found


def _searchable_text(file: Path) -> str | None:
    if file.suffix == ".safetensors":
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return f.read(size).decode("utf-8", errors="replace")  # the JSON header: names, shapes, metadata
    if file.suffix in (".json", ".md", ".txt", ".jinja", ".yaml", ".csv"):
        return file.read_text(errors="replace")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Compute


def compute_ledger(config, step: int, cache_provenance: dict | None = None) -> dict[str, Any]:
    """Model FLOPs of the run (analogjax.runtime.flops conventions), its teacher cost and their share of the teacher's
    pretraining. The teacher's forward counts only where it ran in training (a live teacher); a cached run's cost is
    the cache's own, computed from its provenance (the steps it covers); a CE-only run has none."""
    from analogjax.config import fingerprint
    from analogjax.runtime.flops import forward_flops_per_token
    from analogjax.teacher import source_kind

    kind = source_kind(config)
    tokens = step * config.data.global_batch * config.data.seq_len
    student = 3 * forward_flops_per_token(config.model, config.data.seq_len) * tokens
    teacher_live = (
        forward_flops_per_token(config.teacher.model, config.data.seq_len) * tokens
        if kind in ("hf", "gguf", "checkpoint", "random")
        else 0.0
    )
    cache_tokens = cache_flops = None
    # The cache's cost is the run's teacher over the cache's tokens, where the cache says it was that teacher.
    same_teacher = (cache_provenance or {}).get("teacher", {}).get("model") == fingerprint(config.teacher.model)
    if kind == "cache" and cache_provenance and same_teacher:
        seq = cache_provenance["seq_len"]
        cache_tokens = cache_provenance["steps"] * cache_provenance["global_batch"] * seq
        cache_flops = forward_flops_per_token(config.teacher.model, seq) * cache_tokens
    pretraining = config.teacher.pretraining_flops
    total = student + teacher_live + (cache_flops or 0.0)
    return {
        "tokens": tokens,
        "teacher_kind": kind,
        "student_flops": student,
        "teacher_flops": teacher_live,
        "cache_tokens": cache_tokens,
        "cache_flops": cache_flops,
        "total_flops": total,
        "teacher_pretraining_flops": pretraining,
        "fraction_of_teacher_pretraining": total / pretraining if pretraining else None,
    }


def recipe_ledger(ledgers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ledger of a recipe: its training phases' ledgers (compute_ledger of each) added up."""
    total: dict[str, Any] = {"teacher_kind": "recipe", "phases": len(ledgers)}
    for key in ("tokens", "student_flops", "teacher_flops", "total_flops"):
        total[key] = sum(ledger[key] for ledger in ledgers)
    cached = [ledger for ledger in ledgers if ledger["cache_flops"] is not None]
    total["cache_tokens"] = sum(ledger["cache_tokens"] for ledger in cached) if cached else None
    total["cache_flops"] = sum(ledger["cache_flops"] for ledger in cached) if cached else None
    pretraining = ledgers[-1]["teacher_pretraining_flops"]
    total["teacher_pretraining_flops"] = pretraining
    total["fraction_of_teacher_pretraining"] = total["total_flops"] / pretraining if pretraining else None
    return total


def _compute_rows(ledger: dict[str, Any]) -> list[str]:
    kind = ledger["teacher_kind"]
    rows = ["| | FLOPs |", "|---|---:|", f"| analog training (3 × forward) | {ledger['student_flops']:.3e} |"]
    if kind == "recipe":  # the recipe's training phases: a cached distillation and a live on-policy phase
        rows.append(f"| teacher forward passes in training (live phases) | {ledger['teacher_flops']:.3e} |")
        if ledger["cache_flops"] is not None:
            rows.append(
                f"| teacher cache, written once ({ledger['cache_tokens']:,} tokens) | {ledger['cache_flops']:.3e} |"
            )
    elif kind == "none":
        rows.append("| teacher forward passes | 0 (labels only: the teacher never ran) |")
    elif kind == "cache":
        rows.append("| teacher forward passes in training | 0 (the teacher's outputs came from a cache) |")
        rows.append(
            f"| teacher cache, written once ({ledger['cache_tokens']:,} tokens) | {ledger['cache_flops']:.3e} |"
            if ledger["cache_flops"] is not None
            else "| teacher cache, written once | not counted (no provenance of this teacher's cache found) |"
        )
    else:
        rows.append(f"| teacher forward passes in training | {ledger['teacher_flops']:.3e} |")
    rows.append(f"| total | {ledger['total_flops']:.3e} |")
    pretraining = ledger["teacher_pretraining_flops"]
    rows.append(
        f"| teacher pretraining | {pretraining:.3e} |"
        if pretraining
        else "| teacher pretraining | not given (teacher.pretraining_flops) |"
    )
    if ledger["fraction_of_teacher_pretraining"] is not None:
        rows.append(f"| distillation / teacher pretraining | {ledger['fraction_of_teacher_pretraining']:.4%} |")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The card


def how_to_load(has_tokenizer: bool, prompt: str) -> str:
    """Python that loads the bundle from the folder it runs in (or its Hub id, once uploaded) and generates."""
    if has_tokenizer:
        return "\n".join(
            [
                "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
                "",
                'path = "."  # this folder; or its Hub id once uploaded',
                "tokenizer = AutoTokenizer.from_pretrained(path)",
                "model = AutoModelForCausalLM.from_pretrained(path)",
                'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
                f'print(generate({json.dumps(prompt)}, max_new_tokens=8, do_sample=False)[0]["generated_text"])',
            ]
        )
    return (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "\n"
        'path = "."  # this folder; or its Hub id once uploaded\n'
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "# No tokenizer ships with these weights: ids are those of the tokenizer the analog was trained with.\n"
        "print(model(torch.tensor([[1, 2, 3]])).logits.shape)"
    )


def metadata_block(d: Disclosure) -> str:
    meta: dict[str, Any] = {
        "license": d.license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(TAGS),
    }
    if d.base_model:
        meta["base_model"] = d.base_model
    if d.language:
        meta["language"] = list(d.language)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _active(cfg) -> str:
    """An MoE model's per-token (active) parameters beside its total; nothing for a dense model."""
    from analogjax.runtime.flops import param_count

    return f" ({param_count(cfg, active=True):,} active per token)" if cfg.moe.enabled else ""


def model_card(
    config,
    step: int,
    report: dict[str, Any],
    plots: Sequence[str] = (),
    *,
    disclosed: Disclosure,
    tokenizer: Any = None,
    cache_provenance: dict | None = None,
    recipe: dict | None = None,
    phase_ledger: dict | None = None,
    statement: str = "",
) -> str:
    """README.md of the bundle. `tokenizer`: the analogjax tokenizer shipped in the bundle (None: weights only);
    `plots`: PNG names under fidelity/; `cache_provenance`: the teacher cache's, for a cached run; `recipe`: the
    recipe.json of a recipe's workdir (its phases); `phase_ledger`: the compute of all its training phases
    (recipe_ledger), in place of the last phase's alone; `statement`: the release statement
    (analogjax.release.gates.release_statement), the card's first section."""
    from analogjax import fidelity
    from analogjax.config import fingerprint
    from analogjax.models.hf.convert import architecture_for
    from analogjax.models.hf.write import folder_fingerprint
    from analogjax.runtime.flops import param_count
    from analogjax.teacher import describe_signal, source_kind

    ledger = phase_ledger or compute_ledger(config, step, cache_provenance)
    student_params, teacher_params = param_count(config.model), param_count(config.teacher.model)
    d = config.distill
    terms = ", ".join(
        f"{t.kind} × {t.weight:g}" + (f" → {t.final_weight:g} ({t.schedule})" if t.final_weight is not None else "")
        for t in d.terms
    )
    temperature = f"{d.temperature:g}" + (
        f" → {d.final_temperature:g} ({d.temperature_schedule})" if d.final_temperature is not None else ""
    )
    kind = source_kind(config)
    signal = describe_signal(config, (cache_provenance or {}).get("layout"))
    if kind == "cache" and cache_provenance is None:
        signal += " (the cache's provenance was not found at release time)"
    teacher_name = disclosed.teacher_name or "a teacher not named in this release"
    title = f"Analog of {disclosed.teacher_name}" if disclosed.teacher_name else "An analog distilled with analogjax"
    init = (
        "a checkpoint" + (f" ({config.checkpoint.init_path})" if disclosed.local_paths else "")
        if config.checkpoint.init_path
        else f"random (seed {config.train.seed})"
    )
    identity = f"shape fingerprint `{fingerprint(config.teacher.model)}`"
    if config.teacher.hf_path and Path(config.teacher.hf_path).is_dir():
        identity += f", files sha256 `{folder_fingerprint(config.teacher.hf_path)}`"
    if config.teacher.gguf_path and Path(config.teacher.gguf_path).is_file():
        from analogjax.models.gguf import gguf_provenance

        gguf = gguf_provenance(config.teacher.gguf_path)  # the file's own identity: no path, only its content
        identity += (
            f", GGUF file sha256 `{gguf['sha256']}` ({gguf['name'] or 'unnamed'}, "
            f"{gguf['file_type'] or 'unknown'} quantisation, tensor types "
            f"{', '.join(f'{k} × {v}' for k, v in gguf['tensor_types'].items())})"
        )
    if tokenizer is not None:
        tokenizer_line = (
            f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size:,} tokens, fingerprint "
            f"`{tokenizer.fingerprint}`; shipped in this folder"
        )
    else:
        tokenizer_line = "not shipped: these are the weights alone"
    lines = [
        metadata_block(disclosed),
        "",
        f"# {title}",
        "",
        f"A {student_params:,}-parameter{_active(config.model)} {architecture_for(config.model)[0]} distilled with "
        f"analogjax from a {teacher_params:,}-parameter{_active(config.teacher.model)} teacher: "
        f"**{student_params / teacher_params:.2%}** of the teacher's size."
        + (f" Released by {disclosed.lab}." if disclosed.lab else ""),
        "",
        *([statement] if statement else []),
        "## How to load",
        "",
        "```python",
        how_to_load(tokenizer is not None, config.release.prompt),
        "```",
        "",
        "## Provenance",
        "",
        f"- teacher: {teacher_name} ({identity})",
        f"- tokenizer: {tokenizer_line}",
        f"- data: {disclosed.data_description}",
        f"- license: {disclosed.license}"
        + ("" if disclosed.license_chosen else " (not chosen: set release.license; the teacher's terms may apply)"),
        f"- seed: {config.train.seed}",
    ]
    if disclosed.local_paths:
        lines.append("- local paths: " + ", ".join(f"`{p}`" for p in local_paths(config)))
    lines += [
        "",
        "## Recipe",
        "",
        f"- loss terms: {terms}",
        f"- temperature: {temperature}",
        f"- teacher signal: {signal}",
        (
            f"- steps: {step:,} × {config.data.global_batch} sequences × {config.data.seq_len} tokens = "
            f"{step * config.data.global_batch * config.data.seq_len:,} tokens seen"
            + (f" in its last phase; {ledger['tokens']:,} over the recipe" if recipe else "")
        ),
        f"- student initialisation: {init}",
        *([f"- recipe: {recipe_phases(recipe)}"] if recipe else []),
        f"- optimiser: {_optimiser(config.optim)}",
        "",
        "## Compute",
        "",
        *_compute_rows(ledger),
        "",
        "## Fidelity to the teacher",
        "",
        f"Held-out documents, {report['overall']['tokens']:,} tokens"
        + (f" of {report['documents']} documents" if report.get("documents") else "")
        + f", temperature 1 (step {step}).",
        "",
        fidelity.markdown_table(report),
        "",
    ]
    if report.get("ci95"):
        from analogjax.fidelity.intervals import format_interval

        o, ci = report["overall"], report["ci95"]
        lines += [
            f"95% intervals (percentile bootstrap over {_bootstrap_units(report.get('rows'))}): "
            f"KL(teacher‖analog) {format_interval(o['forward_kl'], ci['forward_kl'])}, "
            f"top-1 agreement {format_interval(o['top1_agreement'], ci['top1_agreement'])}.",
            "",
        ]
    if report.get("comparison"):
        from analogjax.fidelity.intervals import comparison_markdown

        lines += [
            "### Against a same-size baseline",
            "",
            "The same shape trained on the same tokens with cross-entropy alone, measured on the same held-out rows, "
            "prompts and directions. `better` names a model only when the paired 95% interval of the difference "
            "excludes zero.",
            "",
            comparison_markdown(report["comparison"]),
            "",
        ]
    if report.get("cka"):
        cka = ", ".join(f"{c['student_layer']}↔{c['teacher_layer']}: {c['cka']:.3f}" for c in report["cka"])
        lines += [f"Linear CKA of matched layers (analog↔teacher): {cka}.", ""]
    if report.get("tasks"):
        from analogjax.release.gates import tasks_table

        lines += [
            "Tasks (lm-evaluation-harness), the analog and the teacher on the same examples; agreement: the same "
            "choice (or the same greedy answer) on an example.",
            "",
            tasks_table(report["tasks"]),
            "",
        ]
    lines += [f"![{Path(name).stem}](fidelity/{name})" for name in plots]
    lines += ["", "Full numbers: [fidelity/fidelity.json](fidelity/fidelity.json).", ""]
    if report.get("transfer"):
        from analogjax.fidelity.transfer_report import card_paragraph, markdown_table

        lines += [
            "## Do findings on this analog hold on the teacher?",
            "",
            card_paragraph(report["transfer"]),
            "",
            markdown_table(report["transfer"]),
            "",
        ]
    return "\n".join(lines)


def recipe_phases(recipe: dict) -> str:
    """The phases of a recipe (recipe.json) in words, in order; this card's other Recipe lines are its last phase's."""
    settings, steps = recipe.get("recipe", {}), recipe.get("steps", {})
    distinct = recipe.get("distinct_steps", steps.get("distill", 0))  # absent in recipes written before epochs
    words = {
        "pruned_init": f"the teacher pruned to this shape ({settings.get('prune_batches')} calibration batches)",
        "teacher_cache": (
            f"{settings.get('cache_k')} ids per token sampled from the teacher (importance-weighted) cached once"
            if settings.get("cache_kind") == "sampled"
            else f"the teacher's top-{settings.get('cache_k')} logits cached once"
        ),
        "distill": f"distilled {steps.get('distill', '?')} steps"
        + (" from the cache" if settings.get("cache_k") else " from the live teacher")
        + (f" (epochs over its first {distinct} batches)" if distinct < steps.get("distill", distinct) else ""),
        "on_policy": f"continued {steps.get('on_policy', '?')} steps on its own samples scored by the live teacher",
    }
    return " → ".join(words.get(name, name) for name in recipe.get("phases", []))


def _bootstrap_units(rows) -> str:
    """What the fidelity intervals resampled, in words: the held-out documents (with how many rows), or rows."""
    from analogjax.fidelity import intervals

    if not rows:
        return "the held-out rows"
    count = len(next(iter(rows.values())))
    if intervals.DOCUMENT not in rows:
        return f"{count} held-out rows"
    return f"the {intervals.units(rows)} held-out documents of its {count} rows, each document's rows together"


def _optimiser(optim) -> str:
    schedule = (
        f"peak learning rate {optim.learning_rate:g}, {optim.warmup_steps} warm-up steps, cosine to "
        f"{optim.min_lr_ratio:g}×"
    )
    if optim.name == "muon":
        return (
            f"Muon for the blocks' weight matrices (at {optim.muon_lr_scale:g}× the rate), AdamW for embeddings, "
            f"norms and biases; {schedule}"
        )
    return f"AdamW, {schedule}"
