"""The one config schema: typed, frozen, nested dataclasses, filled from YAML and `--set a.b=c` overrides.

Loading is generic over the dataclasses (no per-key code): unknown keys, wrong types and impossible values are
rejected with a `UserError` that names the dotted key. Keys that docs and launch scripts rely on keep their names:
`train.steps`, `train.seed`, `data.global_batch`, `data.seq_len`, `checkpoint.every`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from analogjax.data.spec import DataConfig
from analogjax.data.spec import validate as validate_data
from analogjax.errors import UserError, check_choice
from analogjax.models.config import SIZE_FIELDS, ModelConfig
from analogjax.models.presets import PRESETS


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher comes from; it is never trained and never written into a student checkpoint."""

    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny-teacher"])
    checkpoint: str | None = None  # an Orbax checkpoint directory written by analogjax (its params item)
    hf_path: str | None = None  # a Hugging Face folder (safetensors + config.json)
    gguf_path: str | None = None  # a llama.cpp GGUF file (Llama family; F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors)
    # A teacher cache (analogjax cache-teacher) to distill from instead of a live teacher: no teacher in memory.
    cache: str | None = None
    # With neither path the teacher is randomly initialised: useful for tests and benchmarks only.
    # FLOPs spent pretraining the teacher, when known: the model card reports distillation as a fraction of it.
    pretraining_flops: float | None = None

    @classmethod
    def from_preset_dict(cls, raw: dict, prefix: str) -> dict:
        """With hf_path (gguf_path), the teacher's shape is read from its config.json (GGUF metadata); teacher.model
        adds only dtype and remat."""
        if raw.get("hf_path") and raw.get("gguf_path"):
            raise UserError(f"{prefix}: set hf_path or gguf_path, not both")
        if raw.get("gguf_path"):
            from analogjax.models.gguf import model_config_from_gguf

            shape = dataclasses.asdict(model_config_from_gguf(raw["gguf_path"]))
        elif raw.get("hf_path"):
            from analogjax.models.hf.convert import model_config_from_hf

            shape = dataclasses.asdict(model_config_from_hf(raw["hf_path"]))
        else:
            return raw
        model = raw.get("model")
        given: dict = model if isinstance(model, dict) else {}
        return {**raw, "model": {**shape, **{k: given[k] for k in ("dtype", "remat") if k in given}}}


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes. One of them may be -1: it takes all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1  # long context: each sequence split over this many chips (mesh.py says how and why)


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of the distillation objective.

    kind: a logit divergence (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd, soft_ce), `ce` on the
    labels, or a feature term (hidden_mse, hidden_cosine) over `distill.layer_map`. The term registry
    (analogjax/objective/terms.py) is the one list of kinds, their parameters and their checks.
    """

    kind: str
    weight: float = 1.0
    beta: float = 0.5  # jsd mixture weight on the teacher
    alpha: float = 0.1  # skew_kl / skew_reverse_kl skew
    # Multiply by T² so gradient scale does not depend on T (Hinton et al. 2015). None = on for forward_kl and
    # soft_ce (they share a gradient), off for the rest.
    t2_scale: bool | None = None
    schedule: str = "constant"  # constant | linear | cosine, from weight at step 0 to final_weight at train.steps
    final_weight: float | None = None


ON_POLICY_PROMPTS = ("auto", "field", "prefix")
CACHE_KINDS = ("topk", "sampled")  # what a teacher cache holds per token (teacher_cache/format.py)


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation (GKD, arXiv 2306.13649): a fraction of the steps train on completions the current
    student samples for prompts from the data, scored token by token by the live teacher in the same jitted step.

    Which steps: step s (0-based) is on-policy when floor((s + 1)·fraction) > floor(s·fraction): exactly that share of
    steps, evenly spread, decided by the step number alone (a resume needs no extra state). Whole steps rather than
    rows of every step, because sampling is a sequential decode loop whose time barely depends on how many rows
    sample: spreading on-policy rows over every step would make every step pay for it.
    """

    fraction: float = 0.0  # λ: the share of steps that are on-policy; 0 = off
    # The objective on the student's own samples, over completion tokens only (prompt tokens masked); reverse KL,
    # the mode-seeking divergence of GKD/MiniLLM, by default. Any divergence or hidden-state term; not `ce`.
    terms: tuple[LossTerm, ...] = (LossTerm("reverse_kl", 1.0),)
    # Sampling, separate from distill.temperature (the divergence's): 0 = greedy; top_k 0 and top_p 1 = off.
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Prompt tokens per row: a document prefix takes this many; a longer `prompt` field keeps its last prompt_len.
    prompt_len: int = 32
    max_new_tokens: int = 0  # completion tokens per row; 0 = data.seq_len - prompt_len
    # auto: a JSONL source whose records have `prompt_field` gives those prompts (in the tokenizer's chat template
    # when it has one), any other source document prefixes; field / prefix force one kind.
    prompts: str = "auto"
    prompt_field: str = "prompt"

    def check(self, prefix: str) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"{_join(prefix, 'fraction')} must lie in [0, 1], got {self.fraction}")
        if not self.temperature >= 0:
            raise UserError(f"{_join(prefix, 'temperature')} must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"{_join(prefix, 'top_k')} must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"{_join(prefix, 'top_p')} must be in (0, 1], got {self.top_p}")
        _positive(self, prefix, "prompt_len")
        _non_negative(self, prefix, "max_new_tokens")
        check_choice(_join(prefix, "prompts"), self.prompts, ON_POLICY_PROMPTS)
        if not self.prompt_field:
            raise UserError(f"{_join(prefix, 'prompt_field')} is empty")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def new_tokens(self, seq_len: int) -> int:
        """Completion tokens per row: max_new_tokens, or (0) what data.seq_len leaves after the prompt."""
        return self.max_new_tokens or seq_len - self.prompt_len

    def check_fits(self, seq_len: int, prefix: str, seq_len_key: str = "data.seq_len") -> None:
        """A row (prompt + completion) must fit in seq_len with at least one new token."""
        new = self.new_tokens(seq_len)
        if new <= 0 or self.prompt_len + new > seq_len:
            implied = "" if self.max_new_tokens else ", from 0: seq_len - prompt_len"
            raise UserError(
                f"{prefix}: prompt_len ({self.prompt_len}) + max_new_tokens ({new}{implied}) must be at most "
                f"{seq_len_key} ({seq_len}), with at least one new token"
            )


@dataclass(frozen=True)
class DistillConfig:
    """The objective: loss = Σ weightᵢ(step)·termᵢ, each masked and divided by the global valid-token count."""

    terms: tuple[LossTerm, ...] = (LossTerm("forward_kl", 0.5), LossTerm("ce", 0.5))
    temperature: float = 2.0
    temperature_schedule: str = "constant"
    final_temperature: float | None = None
    layer_map: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) pairs for hidden_* terms
    fused: bool = True  # chunked loss that never holds [tokens, vocab] logits
    # Tokens per batch shard in each chunk of the fused loss ([chunk, vocab] per device). 256 is the 2-core CPU's best;
    # on one H200 at a 128k vocabulary 1,024-4,096 ran 8-11% faster for 2-4x the loss's memory (BENCHMARKS.md).
    chunk_size: int = 256
    # With a top-k teacher cache, forward_kl becomes: tail_bucket (exact at k = vocab), gathered or renormalized.
    topk_treatment: str = "tail_bucket"
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # or muon: Muon for the blocks' matrices, AdamW for the rest (objective/optimizer.py)
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at train.steps
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # microbatches per step
    muon_lr_scale: float = 1.0  # name: muon: the matrices' peak rate is learning_rate x this (same schedule)

    def check(self, prefix: str) -> None:
        check_choice(_join(prefix, "name"), self.name, ("adamw", "muon"))
        _positive(self, prefix, "learning_rate", "grad_accum", "muon_lr_scale")
        _non_negative(self, prefix, "warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio")


@dataclass(frozen=True)
class CheckpointConfig:
    """Student checkpoints in WORKDIR/checkpoints (see analogjax/checkpoint.py for what each one holds)."""

    every: int = 0  # steps between saves; 0 = only the final (or preemption) save
    keep: int = 3  # the latest `keep` checkpoints are kept
    async_save: bool = True  # write on a background thread; training only starts a copy to host memory
    init_path: str | None = None  # student init checkpoint when the workdir has none
    # Also keep the `keep_best` best checkpoints by `best_metric` (a key of the step's logged record, e.g. loss or
    # eval_kl; a save whose step logged no such key does not compete). 0 = off.
    keep_best: int = 0
    best_metric: str = "loss"
    best_mode: str = "min"  # min | max
    # Resume a workdir whose checkpoints were written under another model or data config (refused otherwise).
    allow_config_change: bool = False
    # zstd on the arrays: ~20% smaller float32 checkpoints, paid in host CPU that competes with the step on hosts
    # whose cores the step uses (on 2 CPU cores it raised a save's stall from 12% to 18% of a step; BENCHMARKS.md).
    compression: bool = False

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "keep")
        _non_negative(self, prefix, "every", "keep_best")
        check_choice(_join(prefix, "best_mode"), self.best_mode, ("min", "max"))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    # A non-finite loss or gradient: halt (stop with an error; the bad state is never saved) or skip (the jitted
    # step keeps the previous params and optimizer state, the step counter moves on, the record says nonfinite=1).
    nonfinite: str = "halt"
    # The fidelity curve: held-out KL, agreement and CE at `curve_points` evenly spaced steps (the init and the last
    # step included; 0 = none) on the first `curve_batches` held-out batches, in metrics.jsonl (fidelity/curves.py).
    curve_points: int = 10
    curve_batches: int = 1

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "steps", "log_every", "eval_batches", "curve_batches")
        _non_negative(self, prefix, "eval_every", "curve_points")
        if self.curve_points == 1:
            raise UserError(
                f"{_join(prefix, 'curve_points')} must be 0 (no curve) or at least 2 (the init and the last step)"
            )
        check_choice(_join(prefix, "nonfinite"), self.nonfinite, ("halt", "skip"))


@dataclass(frozen=True)
class ReleaseGate:
    """One condition a release must meet (analogjax.release.gates): a capability ceiling `{task, max_accuracy}`, a
    task fidelity floor `{task, min_agreement}`, or a bound on any figure of the fidelity report
    `{measure: overall.forward_kl, max: 0.5}` (a dotted path into fidelity.json: overall.*, by_source.NAME.*,
    transfer.*, tasks.TASK.*)."""

    task: str = ""  # an entry of release.tasks (its name, or the task name inside a task file)
    max_accuracy: float | None = None
    min_agreement: float | None = None
    measure: str = ""
    max: float | None = None
    min: float | None = None

    def check(self, prefix: str) -> None:
        task_bounds = [k for k in ("max_accuracy", "min_agreement") if getattr(self, k) is not None]
        measure_bounds = [k for k in ("max", "min") if getattr(self, k) is not None]
        if bool(self.task) == bool(self.measure):
            raise UserError(f"{prefix}: a gate names a task or a measure (exactly one)")
        if self.task and (len(task_bounds) != 1 or measure_bounds):
            raise UserError(f"{prefix}: a task gate has one bound, max_accuracy or min_agreement")
        if self.measure and (len(measure_bounds) != 1 or task_bounds):
            raise UserError(f"{prefix}: a measure gate has one bound, max or min")
        for key in task_bounds:
            if not 0 <= getattr(self, key) <= 1:
                raise UserError(f"{_join(prefix, key)}: a fraction in [0, 1], got {getattr(self, key)}")

    @property
    def name(self) -> str:
        """How errors, the card and --override-gate name it: TASK.max_accuracy, MEASURE.max, ..."""
        bound = next(k for k in ("max_accuracy", "min_agreement", "max", "min") if getattr(self, k) is not None)
        return f"{self.task or self.measure}.{bound}"


@dataclass(frozen=True)
class GateOverride:
    """A gate released past anyway, and why (the card's release statement says so)."""

    gate: str  # a gate's name: size_cap, TASK.max_accuracy, MEASURE.min, ...
    reason: str

    def check(self, prefix: str) -> None:
        if not self.reason.strip():
            raise UserError(f"{_join(prefix, 'reason')}: an override needs its reason")


@dataclass(frozen=True)
class ReleaseConfig:
    """What `analogjax release` discloses, as it should appear publicly. An empty field takes what the artefacts
    themselves say (a HF teacher's config.json `_name_or_path` when it is a Hub id, its README metadata, a GGUF's
    general.name), never a filesystem path, host name or user name."""

    teacher_name: str = ""  # the teacher as the card names it (default: from the teacher's own files)
    data_description: str = ""  # the training data in words (default: counts and weights only, no paths)
    lab: str = ""  # who releases the analog (default: unnamed)
    # A Hub license id (apache-2.0, mit, llama3.1, other, ...). Default: the teacher's license when its README states
    # one (an analog derives from its outputs; only the lab may relax its terms), else "other", asking the lab.
    license: str = ""
    language: tuple[str, ...] = ()  # ISO 639 codes (default: the teacher README's)
    # Name the teacher as base_model in the card's metadata (a public Hub id; off: a private name would be linked).
    base_model_public: bool = False
    # Print local paths (teacher folder, data, cache, init checkpoint) in the card's provenance.
    allow_local_paths: bool = False
    prompt: str = "The"  # the prompt of the card's "How to load" snippet
    # The release gate (analogjax.release.gates). lm-eval tasks (names, or local task YAML files) run for the analog
    # and the teacher on the same examples; their accuracies and per-example agreement join the fidelity report.
    tasks: tuple[str, ...] = ()
    task_limit: int = 0  # examples per task (0 = all)
    # The analog's parameters as a fraction of the teacher's (total; the card shows active beside it for MoE): the
    # range the release policy allows (arXiv 2510.14053: 0.5%-5%).
    size_cap: tuple[float, float] = (0.005, 0.05)
    gates: tuple[ReleaseGate, ...] = ()
    overrides: tuple[GateOverride, ...] = ()  # gates released past, each with its reason (or --override-gate)

    def check(self, prefix: str) -> None:
        low, high = self.size_cap
        if not (0 < low <= 1 and 0 < high <= 1):
            raise UserError(
                f"{_join(prefix, 'size_cap')}: fractions of the teacher in (0, 1], got {list(self.size_cap)}"
            )
        if low > high:
            raise UserError(f"{_join(prefix, 'size_cap')}: [low, high] is reversed: {list(self.size_cap)}")
        _non_negative(self, prefix, "task_limit")
        for value in self.language:
            if not value or not value.replace("-", "").isalnum():
                raise UserError(f"{_join(prefix, 'language')}: {value!r} is not a language code (e.g. en, fr)")
        if not self.prompt:
            raise UserError(f"{_join(prefix, 'prompt')} is empty: the card's snippet generates from it")
        if self.license and not all(ch.isalnum() or ch in "-._" for ch in self.license):
            raise UserError(f"{_join(prefix, 'license')}: {self.license!r} is not a Hub license id (e.g. apache-2.0)")


@dataclass(frozen=True)
class RecipeConfig:
    """The recipe labs use for small models, run by `analogjax distill` as phases, in order, each in its own
    sub-directory of the workdir and each resumable (recipes/analog.py):

    prune      (prune_batches > 0) the teacher pruned to `model`'s shape (importance over that many calibration
               batches) → WORKDIR/pruned_init, where the distillation starts (Minitron, Sheared-LLaMA);
    cache      (cache_k > 0) the teacher's top-k logits (+ logsumexp), or k ids sampled from it (`cache_kind`),
               over every batch the distillation reads, once → WORKDIR/teacher_cache, read instead of the teacher;
    distill    the run the rest of the config describes (`distill`, `optim`, `train`) → WORKDIR/distill;
    on_policy  (on_policy_steps > 0) the distilled analog continued on its own samples, scored token by token by the
               live teacher (GKD, Qwen3's strong-to-weak distillation) → WORKDIR/on_policy.

    With every count 0 (the default) there is no recipe: `analogjax distill` trains in WORKDIR itself, as it always
    has. WORKDIR/recipe.json names the phases; evaluation, export and release of WORKDIR read the last one.
    """

    prune_batches: int = 0
    cache_k: int = 0
    cache_kind: str = "topk"  # sampled: importance-weighted, unbiased forward KL (Anshumann et al. 2025); top-k is not
    on_policy_steps: int = 0
    # The on-policy phase's sampling and objective (every one of its steps is on-policy unless fraction says less).
    on_policy: OnPolicyConfig = field(default_factory=lambda: OnPolicyConfig(fraction=1.0))
    # Below the distillation's peak (a fresh optimizer): the demo measured 3e-4 undoing part of it, 1e-4 not (README).
    on_policy_learning_rate: float = 1e-4
    on_policy_warmup_steps: int = 2

    @property
    def enabled(self) -> bool:
        return bool(self.prune_batches or self.cache_k or self.on_policy_steps)

    def check(self, prefix: str) -> None:
        _non_negative(self, prefix, "prune_batches", "cache_k", "on_policy_steps", "on_policy_warmup_steps")
        _positive(self, prefix, "on_policy_learning_rate")
        check_choice(_join(prefix, "cache_kind"), self.cache_kind, CACHE_KINDS)
        if self.on_policy_steps and not self.on_policy.enabled:
            raise UserError(
                f"{_join(prefix, 'on_policy.fraction')} is 0: the on-policy phase needs on-policy steps "
                f"(or {_join(prefix, 'on_policy_steps')}: 0)"
            )
        # on_policy.is_on_policy: step s is on-policy when floor((s + 1)·fraction) > floor(s·fraction), so a phase
        # of n steps holds floor(n·fraction) of them.
        if self.on_policy_steps and math.floor(self.on_policy_steps * self.on_policy.fraction) == 0:
            raise UserError(
                f"{_join(prefix, 'on_policy_steps')}: {self.on_policy_steps} steps at "
                f"{_join(prefix, 'on_policy.fraction')} {self.on_policy.fraction} hold no step on the analog's own "
                "samples; raise either"
            )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny"])
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    topology: str | None = None  # target TPU topology for `compile-check`, e.g. v5p-256

    def check(self, prefix: str) -> None:
        validate_data(self.data, vocab_size=self.model.vocab_size)
        if self.recipe.on_policy_steps:  # the recipe's on-policy window must fit a row: refused at load
            self.recipe.on_policy.check_fits(self.data.seq_len, _join(prefix, "recipe.on_policy"), "data.seq_len")

    @classmethod
    def from_preset_dict(cls, raw: dict, prefix: str) -> dict:
        """`model: {like_teacher: {n_layers: 8, d_model: 1024, ...}}`: the student is the resolved teacher model
        (family, norms, RoPE, attention pattern, activation, vocabulary) with only its size fields replaced."""
        model = raw.get("model")
        if not (isinstance(model, dict) and "like_teacher" in model):
            return raw
        key = _join(prefix, "model")
        others = sorted(set(model) - {"like_teacher"})
        if others:
            raise UserError(
                f"{key}.{others[0]}: with {key}.like_teacher every field but the size comes from the "
                f"teacher; size fields go inside like_teacher ({', '.join(SIZE_FIELDS)})"
            )
        sizes = model["like_teacher"] or {}
        if not isinstance(sizes, dict):
            raise UserError(f"{key}.like_teacher: expected a mapping of size fields, got {sizes!r}")
        for name in sizes:
            if name not in SIZE_FIELDS:
                raise UserError(
                    f"{key}.like_teacher.{name}: only size fields may differ from the teacher "
                    f"({', '.join(SIZE_FIELDS)})"
                )
        teacher = from_dict(TeacherConfig, raw.get("teacher", {}), _join(prefix, "teacher"))
        shape = {k: v for k, v in to_dict(teacher.model).items() if k != "preset"}
        return {**raw, "model": {**shape, **sizes}}


def _positive(obj, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise UserError(f"{_join(prefix, name)} must be positive, got {getattr(obj, name)}")


def _non_negative(obj, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise UserError(f"{_join(prefix, name)} must not be negative, got {getattr(obj, name)}")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (), schema: type = Config) -> Any:
    """`schema` (Config) from a YAML file, or its defaults when path is None, with `a.b=c` overrides on top."""
    return from_dict(schema, read_layers(path, overrides)[2])


def read_layers(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> tuple[dict, dict, dict]:
    """(what the file gives, what --set gives, both merged): the raw dicts a config is built from."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: malformed YAML: {' '.join(str(exc).split())}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot be read as a YAML config: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
        raw = loaded or {}
    merged, given = copy.deepcopy(raw), {}  # type: dict[str, Any], dict[str, Any]
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key.strip()}: malformed YAML value: {' '.join(str(exc).split())}") from None
        _set_dotted(merged, key.strip(), value)
        _set_dotted(given, key.strip(), copy.deepcopy(value))
    return raw, given, merged


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, naming the dotted key of any unknown or mistyped entry."""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"unknown config key: {_join(prefix, str(unknown[0]))}")
    # The preset (or teacher) first, then the field defaults under what is still missing: a partly given nested
    # section of a preset (`--set model.moe.aux_loss_weight=0.02`) keeps the rest of the preset's section.
    raw = _onto_field_defaults(cls, _apply_defaults_hook(cls, raw, prefix))
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in raw.items()}
    try:
        built = cls(**kwargs)
    except TypeError as exc:  # a required field left out
        raise UserError(f"{prefix or 'config'}: {exc}") from None
    # A dataclass may check its own values; it is told its dotted prefix so errors name the real key.
    check = getattr(built, "check", None)
    if check is not None:
        check(prefix)
    return built


def _onto_field_defaults(cls: type, raw: dict) -> dict:
    """Where a partly given nested section takes the values it does not give.

    The rule: a section that names a `preset` starts from that preset. Otherwise it fills its gaps from the field's
    default (which may differ from the section class's own defaults), so `--set run.train.steps=5` keeps the rest
    of the demo's run, *unless that default is itself a preset* (`model` is the `tiny` preset, `teacher.model`
    `tiny-teacher`): then the section starts from its class's own defaults (ModelConfig's), as if no preset existed.

    Why: a preset is a named, complete shape, applied only where a config names it. Filling a hand-written model
    from the default preset made `teacher.model: {d_model: 192, n_layers: 4, n_heads: 4, d_ff: 512}` silently take
    `n_kv_heads: 2` (and vocab_size, and `preset: tiny-teacher`) from a preset the user never wrote, and the
    resolved config then named a preset whose shape it did not have. ModelConfig's defaults are the ones its class
    documents, with `n_kv_heads: 0` meaning "as many as n_heads". `analogjax config --explain` shows where each
    value came from: the file, --set, a preset, or a default."""
    merged = dict(raw)
    for f in dataclasses.fields(cls):
        value = raw.get(f.name)
        if not isinstance(value, dict) or "preset" in value or "like_teacher" in value:
            continue  # a preset or the teacher (Config.from_preset_dict) fills the gaps instead
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(default) and not _is_preset(to_dict(default)):
            merged[f.name] = _deep_merge(to_dict(default), value)
    return merged


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        # A nested section naming a preset replaces the default wholesale: the preset fills its gaps. One that names
        # none replaces a default that is a preset too (the rule in _onto_field_defaults).
        mergeable = (
            isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and "preset" not in value
            and not _is_preset(out[key])
        )
        out[key] = _deep_merge(out[key], value) if mergeable else value
    return out


def _is_preset(section: dict) -> bool:
    return bool(section.get("preset"))


def _apply_defaults_hook(cls: type, raw: dict, prefix: str) -> dict:
    # A dataclass may name a preset whose fields fill in what the YAML leaves out (models do).
    hook = getattr(cls, "from_preset_dict", None)
    return hook(raw, prefix) if hook else raw


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0])
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a dataclass type (a hint is never an instance)
        return from_dict(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise UserError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key}: expected a string, got {value!r}")
    if hint is Any:
        return value
    raise TypeError(f"config schema uses an unsupported type at {key}: {hint!r}")


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------------------------------------
# Serialisation and identity


def to_dict(config: Any) -> Any:
    """Plain JSON/YAML-able form (tuples become lists); `from_dict` reads it back to an equal config."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_dict(v) for v in config]
    return config


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config sections: a workdir remembers it to refuse a resume under another config."""
    text = json.dumps([to_dict(p) for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Data keys that choose only which held-out rows evaluations read, never a training batch: a run resumes across them.
EVALUATION_DATA_KEYS = ("heldout_shuffle_rows", "heldout_document_tokens")


def run_identity(config: Config) -> dict[str, str]:
    """What must match for a workdir's checkpoints to be resumed: the student's shape and the data it trains on."""
    data = {k: v for k, v in to_dict(config.data).items() if k not in EVALUATION_DATA_KEYS}
    if not config.data.epoch_steps:  # added later: at its default (no epochs) a workdir keeps the hash it had
        del data["epoch_steps"]
    return {"model": fingerprint(config.model), "data": fingerprint(data, config.train.seed)}


# ----------------------------------------------------------------------------------------------------------------
# Showing the config that runs


def to_yaml(config: Any, comments: dict[str, str] | None = None) -> str:
    """The fully resolved `config` as YAML that `load_config` reads back to an equal config: every section in block
    style, every value in flow style on one line, optionally followed by `# comments[dotted key]`."""
    lines: list[str] = []

    def emit(obj: Any, prefix: str, indent: str) -> None:
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), _join(prefix, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, key, indent + "  ")
                continue
            # A one-item flow list is YAML's one-line form of any value; strip the brackets.
            text = f"{indent}{f.name}: {yaml.safe_dump([to_dict(value)], default_flow_style=True, width=10**9)[1:-2]}"
            note = (comments or {}).get(key)
            lines.append(f"{text}  # {note}" if note else text)

    emit(config, "", "")
    return "\n".join(lines) + "\n"


def flat_values(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: plain value} of every leaf (lists and tuples are one leaf)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), _join(prefix, f.name)
        out.update(flat_values(value, key) if dataclasses.is_dataclass(value) else {key: to_dict(value)})
    return out


def differences(config: Any, defaults: Any = None) -> dict[str, Any]:
    """The leaves of `config` that differ from `defaults` (the schema's own defaults): what a run logs at start."""
    base = flat_values(defaults if defaults is not None else type(config)())
    return {key: value for key, value in flat_values(config).items() if base.get(key, object()) != value}
