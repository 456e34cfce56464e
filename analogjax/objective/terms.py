"""The term registry: every kind of loss term the objective knows, one record each.

A `Term` holds everything about one kind in one place: its per-token function, the parameters it takes (which
`LossTerm` fields, in which range), whether the Hinton T² factor is on by default, what it becomes with a cached
(sparse) teacher, and whether it may train on the student's own samples. Validation, the fused loss and the cached
teacher all read this table; nothing else lists term kinds.

Adding a divergence: write its function on log-probabilities in divergences.py (and its logits form in
`divergences.DIVERGENCES`), then add one `Term` below. Nothing else changes.

The sparse forms (a teacher cache's top-k or sampled rows stand in for the full distribution) are terms of their own
(`SPARSE_TERMS`), reached only through `Term.sparse_stand_in` of a config term, never named in a config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from analogjax.errors import UserError, check_choice

DIVERGENCE, LABELS, HIDDEN = "divergence", "labels", "hidden"
SCHEDULES = ("constant", "linear", "cosine")
TOPK_TREATMENTS = ("tail_bucket", "gathered", "renormalized")
# Teacher signal kinds (objective/signal.py): live ones carry full logits, sparse ones a cache's rows.
LIVE_SIGNALS = ("hidden", "logits")
SPARSE_SIGNALS = ("topk", "sampled")


@dataclass(frozen=True)
class Param:
    """A parameter a term reads from its `LossTerm` field of the same name, with its closed range [low, high]."""

    name: str
    low: float = 0.0
    high: float = 1.0

    def check(self, value: float, key: str) -> float:
        if not self.low <= value <= self.high:
            raise UserError(f"{key}.{self.name} must lie in [{self.low:g}, {self.high:g}], got {value}")
        return float(value)


@dataclass(frozen=True)
class Term:
    """One kind of loss term. `per_token` takes (log_p teacher, log_q student, **params) for divergences and
    (student logits [n, V], sparse rows, temperature) for the sparse forms; labels and hidden terms are computed
    by the objective itself (cross-entropy inside the fused loss, hidden matching in hidden.py)."""

    kind: str
    family: str  # DIVERGENCE, LABELS or HIDDEN
    summary: str
    per_token: Callable[..., Any] | None = None
    params: tuple[Param, ...] = ()
    t2_default: bool = False  # multiply by T² unless the LossTerm says otherwise (gradient scale independent of T)
    # With a cached teacher: "estimate" = the cache's estimate of forward KL replaces it (same gradient); None = it
    # needs the teacher's full outputs. Labels terms need no teacher at all.
    sparse_stand_in: str | None = None
    on_policy: bool = True  # may train on the student's own samples
    hidden_measure: str | None = None  # hidden terms: "mse" or "cosine" (hidden.py)

    @property
    def needs_teacher(self) -> bool:
        return self.family != LABELS

    def parameters(self, term: Any, key: str) -> tuple[tuple[str, float], ...]:
        """The (name, value) pairs this kind reads from a LossTerm, each checked against its range."""
        return tuple((p.name, p.check(getattr(term, p.name), key)) for p in self.params)


def _divergences():
    # Deferred: the function table imports JAX; validating a config does not need it.
    from analogjax.objective import divergences

    return divergences


def _log_prob_fn(name: str) -> Callable[..., Any]:
    def per_token(log_p, log_q, **params):
        return getattr(_divergences(), f"{name}_from_log_probs")(log_p, log_q, **params)

    per_token.__name__ = f"{name}_from_log_probs"
    return per_token


def _sparse_fn(name: str) -> Callable[..., Any]:
    def per_token(log_q, rows, temperature):
        from analogjax.objective import sparse

        return getattr(sparse, f"{name}_from_log_probs")(log_q, rows, temperature=temperature)

    per_token.__name__ = f"{name}_from_log_probs"
    return per_token


UNIT = (Param("beta"),)
SKEW = (Param("alpha"),)

TERMS: dict[str, Term] = {
    t.kind: t
    for t in (
        Term(
            "forward_kl",
            DIVERGENCE,
            "KL(p‖q), mean-seeking (Hinton et al. 2015)",
            _log_prob_fn("forward_kl"),
            t2_default=True,
            sparse_stand_in="estimate",
        ),
        Term("reverse_kl", DIVERGENCE, "KL(q‖p), mode-seeking (MiniLLM)", _log_prob_fn("reverse_kl")),
        Term("jsd", DIVERGENCE, "generalized JSD(β) (GKD; β=0 forward, β=1 reverse KL)", _log_prob_fn("jsd"), UNIT),
        Term("skew_kl", DIVERGENCE, "KL(p‖αp + (1−α)q) (DistiLLM)", _log_prob_fn("skew_kl"), SKEW),
        Term("skew_reverse_kl", DIVERGENCE, "KL(q‖αq + (1−α)p) (DistiLLM)", _log_prob_fn("skew_reverse_kl"), SKEW),
        Term("tvd", DIVERGENCE, "total variation ½Σ|p − q|", _log_prob_fn("tvd")),
        Term(
            "soft_ce",
            DIVERGENCE,
            "soft-target cross-entropy −Σ p log q (forward KL's gradient)",
            _log_prob_fn("soft_ce"),
            t2_default=True,
            sparse_stand_in="estimate",
        ),
        Term("ce", LABELS, "cross-entropy on the labels", on_policy=False, sparse_stand_in="labels"),
        Term("hidden_mse", HIDDEN, "projected student layer vs teacher layer, MSE", hidden_measure="mse"),
        Term("hidden_cosine", HIDDEN, "projected student layer vs teacher layer, 1 − cos", hidden_measure="cosine"),
    )
}

# What a cached teacher's rows give in place of forward KL (sparse.py says how each treats the missing mass).
SPARSE_TERMS: dict[str, Term] = {
    t.kind: t
    for t in (
        Term("topk_tail_bucket", DIVERGENCE, "top-k + a bucket for the tail mass", _sparse_fn("topk_tail_bucket")),
        Term("topk_gathered", DIVERGENCE, "top-k, student's full softmax gathered", _sparse_fn("topk_gathered")),
        Term("topk_renormalized", DIVERGENCE, "top-k, both renormalised over k", _sparse_fn("topk_renormalized")),
        Term("sampled_kd", DIVERGENCE, "importance-weighted sampled ids (unbiased)", _sparse_fn("sampled_kd")),
    )
}


def term(kind: str, where: str = "kind") -> Term:
    if kind not in TERMS:
        raise UserError(f"{where}: unknown loss term {kind!r} (known: {', '.join(sorted(TERMS))})")
    return TERMS[kind]


def sparse_kind(signal: str, topk_treatment: str) -> str:
    """The SPARSE_TERMS kind that stands in for forward KL with a `signal` ("topk" or "sampled") teacher."""
    return f"topk_{topk_treatment}" if signal == "topk" else "sampled_kd"


def resolve(kind: str, params: Sequence[tuple[str, float]], signal: str) -> Callable[..., Any]:
    """A divergence as the fused loss calls it for a teacher signal of kind `signal`: fn(log_p, log_q) for live
    signals, fn(log_q, rows, temperature) for sparse ones (log_q: the student's log-softmax at the temperature, which
    the fused loss shares with its CE). UserError when it does not apply."""
    given = dict(params)
    if signal in SPARSE_SIGNALS:
        table = {k: t for k, t in SPARSE_TERMS.items() if k.startswith("topk") == (signal == "topk")}
        if kind not in table:
            raise UserError(f"kd term {kind!r} does not apply to a {signal} teacher; choose one of {sorted(table)}")
        if given:
            raise UserError(f"kd term {kind!r} takes no parameters, got {given}")
        fn = table[kind].per_token
        assert fn is not None
        return fn
    found = TERMS.get(kind)
    if found is None or found.family != DIVERGENCE:
        known = sorted(k for k, t in TERMS.items() if t.family == DIVERGENCE)
        raise UserError(f"unknown divergence {kind!r}; choose one of {known}")
    allowed = {p.name: p for p in found.params}
    unknown = set(given) - set(allowed)
    if unknown:
        raise UserError(f"divergence {kind!r} takes parameters {sorted(allowed) or 'none'}, got {sorted(unknown)}")
    checked = {name: allowed[name].check(value, f"divergence {kind}") for name, value in given.items()}
    fn = found.per_token
    assert fn is not None
    return lambda log_p, log_q: fn(log_p, log_q, **checked)


def check_terms(terms: Sequence[Any], where: str, layer_map: Sequence, *, on_policy: bool = False) -> None:
    """Every LossTerm of `terms` (config `where`) against the registry, naming the offending key."""
    if not terms:
        raise UserError(f"{where}: at least one loss term is needed")
    for i, loss_term in enumerate(terms):
        key = f"{where}[{i}]"
        found = term(loss_term.kind, f"{key}.kind")
        check_choice(f"{key}.schedule", loss_term.schedule, SCHEDULES)
        found.parameters(loss_term, key)
        if found.family == HIDDEN and not layer_map:
            raise UserError(f"{key}: {loss_term.kind} needs distill.layer_map (student layer, teacher layer) pairs")
        if on_policy and not found.on_policy:
            raise UserError(
                f"{key}.kind: {loss_term.kind} on the student's own samples trains it towards itself; on-policy "
                "terms are divergences from the teacher (reverse_kl, forward_kl, jsd, ...)"
            )


def check_sparse(terms: Sequence[Any], where: str) -> None:
    """A cached teacher carries top-k or sampled rows only: the terms that need its full outputs are refused."""
    for i, loss_term in enumerate(terms):
        if TERMS[loss_term.kind].sparse_stand_in is None:
            supported = sorted(k for k, t in TERMS.items() if t.sparse_stand_in)
            raise UserError(
                f"{where}[{i}].kind: {loss_term.kind} needs the teacher's full outputs; a teacher cache supports "
                f"{', '.join(supported)}"
            )


def any_needs_teacher(terms: Sequence[Any]) -> bool:
    return any(TERMS[t.kind].needs_teacher for t in terms if t.kind in TERMS)


def check_distill(cfg: Any) -> None:
    """The distill section (config.DistillConfig) against the registry, naming the offending key: what a run checks
    before anything is loaded, and what `analogjax config` checks (no teacher, model or JAX needed)."""
    check_terms(cfg.terms, "distill.terms", cfg.layer_map)
    check_terms(cfg.on_policy.terms, "distill.on_policy.terms", cfg.layer_map, on_policy=True)
    if cfg.temperature <= 0 or (cfg.final_temperature is not None and cfg.final_temperature <= 0):
        raise UserError("distill.temperature must be positive")
    check_choice("distill.temperature_schedule", cfg.temperature_schedule, SCHEDULES)
    check_choice("distill.topk_treatment", cfg.topk_treatment, TOPK_TREATMENTS)
    if cfg.chunk_size <= 0:
        raise UserError("distill.chunk_size must be positive")


def needs_teacher(cfg: Any) -> bool:
    """Whether a run of this distill section needs a teacher at all (a CE-only objective does not)."""
    return any_needs_teacher(cfg.terms) or cfg.on_policy.enabled


def t2_scaled(loss_term: Any) -> bool:
    """Whether a LossTerm's weight is multiplied by T²: its own t2_scale, else its kind's default."""
    return TERMS[loss_term.kind].t2_default if loss_term.t2_scale is None else loss_term.t2_scale
