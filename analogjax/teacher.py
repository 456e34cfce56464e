"""The teacher room: where a teacher comes from, and the one teacher forward that everyone calls.

A teacher is decided here once (`source_kind`), loaded here (`load_teacher`), and run here (`forward`): the distill
step, the eval step, fidelity and the teacher-cache writer all call `forward`, which returns the teacher's outputs
in the one shape the objective reads (objective.TeacherSignal) and is the one place they are cut out of autodiff.
Kinds:
- `checkpoint`: an analogjax Orbax checkpoint (its params item), restored sharded under the teacher's own rules;
- `hf`: a Hugging Face folder, read tensor by tensor onto the mesh (models/hf);
- `gguf`: a llama.cpp GGUF file, dequantized tensor by tensor onto the mesh (models/gguf.py);
- `cache`: a teacher cache (teacher_cache/): its outputs arrive with each batch, nothing of it is in memory;
- `random`: neither path: a random init from train.seed + 1 (tests and benchmarks only);
- bring your own: `Teacher(logits=fn)` with its params, passed to `setup.build` / `train.run_training`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import flax.linen as nn
import jax

from analogjax.errors import UserError
from analogjax.objective import TeacherSignal, needs_teacher
from analogjax.runtime import compute_dtype

# A bring-your-own teacher: (params, tokens, segment_ids, positions) -> float32 logits [b, s, v].
TeacherLogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class Teacher:
    """A teacher as functions of its params. analogjax models give `features` (hidden + head, so the fused loss
    never materialises the teacher's logits either); any other model gives `logits`."""

    logits: TeacherLogitsFn | None = None
    features: Callable[..., tuple[Any, jax.Array]] | None = None  # (params, tok, seg, pos, collect) -> (Features, head)
    # params -> the head `features` returns, without the forward: what lets a caller keep a batch's teacher rows
    # (forward_rows) and rebuild the signal later (signal_of_rows). None: `features` alone (always run whole).
    head: Callable[[Any], jax.Array] | None = None
    rules: tuple = ()  # its logical-axis rules (mesh.TEACHER_RULES for analogjax models)
    vocab_size: int | None = None
    # A cached teacher (teacher_cache/): batch -> TopKTeacher | SampledTeacher read from arrays in the batch, and
    # the cache's layout (teacher_cache.CacheLayout: top-k or sampled, k), which also sets the batch's fields.
    from_batch: Callable[[dict], Any] | None = None
    cache_layout: Any = None
    # The final logit soft-cap its `features` path leaves to the caller (Gemma 2: 30; 0 = none). `logits` teachers
    # return capped logits themselves.
    final_softcap: float = 0.0

    @property
    def is_cached(self) -> bool:
        return self.from_batch is not None

    @property
    def signal_kind(self) -> str:
        """The kind of TeacherSignal `forward` returns: hidden, logits, topk or sampled."""
        if self.is_cached:
            if self.cache_layout is None:
                raise UserError("a cached Teacher (from_batch) needs its cache_layout: top-k and sampled rows differ")
            return self.cache_layout.kind
        return "hidden" if self.features is not None else "logits"


def model_teacher(model, rules) -> Teacher:
    """Wrap an analogjax Transformer as a Teacher."""

    def features(params, tokens, segment_ids, positions, collect_layers):
        # Every consumer of a Teacher's features caps the logits it builds with Teacher.final_softcap.
        feats = model.features(params, tokens, segment_ids, positions, collect_layers, applies_final_softcap=True)
        # its logits from products in the compute dtype, as the model's own (step.forward_outputs: the student's)
        hidden_bsd = feats.hidden_bsd.astype(compute_dtype.of(model.cfg.dtype))
        return feats._replace(hidden_bsd=hidden_bsd), model.head(params)

    return Teacher(
        logits=model,
        features=features,
        head=model.head,
        rules=tuple(rules),
        vocab_size=model.cfg.vocab_size,
        final_softcap=model.cfg.final_softcap,
    )


def forward(teacher: Teacher, params, batch: dict[str, jax.Array], collect_layers: bool = False) -> TeacherSignal:
    """The teacher's signal for a batch. Never differentiated: the gradient stops here, once, for every caller."""
    if teacher.from_batch is not None:
        return jax.lax.stop_gradient(TeacherSignal.from_rows(teacher.from_batch(batch)))
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    with nn.logical_axis_rules(list(teacher.rules)):
        if teacher.features is not None:
            feats, head = teacher.features(params, tokens, seg, pos, collect_layers)
            signal = TeacherSignal.from_hidden(
                feats.hidden_bsd, head, layers=feats.layers_lbsd, softcap=teacher.final_softcap
            )
        elif teacher.logits is not None:
            signal = TeacherSignal.from_logits(teacher.logits(params, tokens, seg, pos))
        else:
            raise UserError("a Teacher needs `logits`, `features` or `from_batch`")
    return jax.lax.stop_gradient(signal)


def runs_live(teacher: Teacher | None) -> TypeGuard[Teacher]:
    """Whether the step runs this teacher's forward (it exists and is not read from a cache): what its FLOPs count."""
    return teacher is not None and not teacher.is_cached


def keeps_rows(teacher: Teacher | None) -> bool:
    """Whether a live teacher's forward can be kept as rows and its signal rebuilt from them (forward_rows,
    signal_of_rows): a logits teacher, or a features teacher that gives its head."""
    return runs_live(teacher) and (teacher.features is None or teacher.head is not None)


def forward_rows(teacher: Teacher, params, batch: dict[str, jax.Array]) -> jax.Array:
    """The part of a live teacher's signal that depends on the batch: its final hidden states [b, s, d] (a features
    teacher) or its logits [b, s, v]. Held across calls by whoever measures the same batch again (fidelity curves),
    it skips the teacher's trunk: signal_of_rows rebuilds the signal from it."""
    return forward(teacher, params, batch).rows


def signal_of_rows(teacher: Teacher, params, rows: jax.Array) -> TeacherSignal:
    """The TeacherSignal `forward` returns for the batch whose `rows` forward_rows gave (without layers)."""
    if teacher.features is not None:
        if teacher.head is None:
            raise UserError("a features Teacher kept as rows needs its `head` (params -> [d, v])")
        with nn.logical_axis_rules(list(teacher.rules)):
            head = teacher.head(params)
        return jax.lax.stop_gradient(TeacherSignal.from_hidden(rows, head, softcap=teacher.final_softcap))
    return TeacherSignal.from_logits(rows)


# ----------------------------------------------------------------------------------------------------------------
# Where the config's teacher comes from


def source_kind(config) -> str:
    """How the config's teacher is given: none (a CE-only objective), cache, hf, gguf, checkpoint or random."""
    if not needs_teacher(config.distill):
        return "none"
    return live_source_kind(config) if not config.teacher.cache else "cache"


def live_source_kind(config) -> str:
    """Where the teacher's own weights come from, whatever the objective: hf, gguf, checkpoint or random."""
    if config.teacher.hf_path:
        return "hf"
    if config.teacher.gguf_path:
        return "gguf"
    if config.teacher.checkpoint:
        return "checkpoint"
    return "random"


def load_teacher(config, mesh, *, live: bool = False, abstract: bool = False) -> tuple[Teacher | None, Any]:
    """The config's teacher and its params (born sharded under the teacher's own rules).

    live=False: what a run of this config distills from (None for a CE-only objective, the cache for a cached
    teacher). live=True: the teacher model itself whatever the objective (fidelity, writing a cache).
    abstract=True: its params as sharded ShapeDtypeStructs, nothing read or allocated (compile-check; a cache's
    layout is read, but it is not checked against this process count, which a pod plan's differs from)."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    kind = live_source_kind(config) if live else source_kind(config)
    if kind == "none":
        return None, None
    if kind == "cache":  # distill from cached teacher outputs: nothing of the teacher is loaded
        from analogjax.teacher_cache.read import cached_teacher_source

        from_batch, vocab_size, layout = cached_teacher_source(config, check=not abstract)
        cached = Teacher(
            from_batch=from_batch, rules=mesh_lib.TEACHER_RULES, vocab_size=vocab_size, cache_layout=layout
        )
        return cached, None
    model = Transformer(config.teacher.model)
    teacher = model_teacher(model, mesh_lib.TEACHER_RULES)
    if abstract:
        return teacher, mesh_lib.abstract_sharded(model.init_boxed, mesh, mesh_lib.TEACHER_RULES)
    if kind == "hf":
        from analogjax.models import hf

        return teacher, hf.load_params(config.teacher.hf_path, config.teacher.model, mesh, mesh_lib.TEACHER_RULES)
    if kind == "gguf":
        from analogjax.models import gguf

        return teacher, gguf.load_params(config.teacher.gguf_path, config.teacher.model, mesh, mesh_lib.TEACHER_RULES)
    if kind == "checkpoint":
        from analogjax.checkpoint import restore_params

        abstract = mesh_lib.abstract_sharded(model.init_boxed, mesh, mesh_lib.TEACHER_RULES)
        return teacher, restore_params(config.teacher.checkpoint, abstract)
    if jax.process_index() == 0:  # one warning per job, not one per host
        print("warning: no teacher.checkpoint or teacher.hf_path: the teacher is randomly initialised", file=sys.stderr)
    params, _ = mesh_lib.init_sharded(
        model.init_boxed, jax.random.key(config.train.seed + 1), mesh, mesh_lib.TEACHER_RULES
    )
    return teacher, params


def describe_signal(config, cache_layout: dict | None = None) -> str:
    """What the student learned from, in words (the model card's recipe line)."""
    kind = source_kind(config)
    if kind == "none":
        return "none: labels only (cross-entropy), no teacher signal"
    if kind == "cache":
        layout = cache_layout or {}
        if layout.get("kind") == "sampled":
            return (
                f"{layout.get('k', '?')} tokens per position sampled from the teacher with importance weights "
                "(a cached teacher)"
            )
        return (
            f"the teacher's top-{layout.get('k', '?')} logits per position, cached "
            f"(treatment: {config.distill.topk_treatment})"
        )
    return "the teacher's full-vocabulary logits, computed live in each step"
