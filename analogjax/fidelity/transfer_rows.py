"""The transfer checks' per-row sums → every figure with its 95% interval, and paired comparisons of two models.

analogjax.fidelity.transfer's eval pass returns, per eval row (one chunk of one held-out document), the sums every
figure is made of: tokens and CE sums; per layer pair the stitched model's CE and KL sums and, for each map
(analog → teacher `fwd`, teacher → analog `back`), the squared error Σ‖y − ŷ‖², Σy and Σ‖y‖² of its target, so the
explained variance 1 − SSE / (Σ‖y‖² − ‖Σy‖² / n) is a function of row sums; per concept the labelled, positive and
correctly classified tokens of each probe; and steering's marker-mass increases summed over positions outside the
concept, for the native, the carried ("transferred") and each random direction. Intervals are percentile bootstraps
over the documents these rows come from (analogjax.fidelity.intervals; the per-row key intervals.DOCUMENT names each
row's). The interventions' sums (stitched CE and KL, steering) may cover only the leading rows (measure_models'
`intervention_batches`): their figures are taken on those rows, with the tokens counted there, and
`teacher_ce_intervened` / `analog_ce_intervened` give the CE on the same rows to set beside them.

Steering's random baseline is the mean effect of RANDOM_DRAWS random directions, and which directions were drawn is
noise of its own: every bootstrap draw resamples the directions too (RANDOM_DRAWS of them with replacement, drawn
independently of the rows with a fixed seed, the same for every model), so the baseline's interval, and those of
recovered, hold the spread over text and over random directions together.

Two models measured on the same rows are compared paired (intervals.compare): the same document resamples, and for
steering the same direction resamples, for both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analogjax.fidelity import intervals

RANDOM_DRAWS = 8  # random steering directions, shared by every concept and every model
DIRECTION_SEED = 1  # the bootstrap's resamples of the random directions (rows use intervals' own seed, 0)
_TINY = 1e-30


def recovered(value: float, baseline: float, native: float, noise: float = 0.0) -> float | None:
    """(value − baseline) / (native − baseline); None when the native method beats the baseline by no more than
    `noise` (the ratio of two noisy small numbers says nothing)."""
    gap = native - baseline
    return float((value - baseline) / gap) if gap > max(noise, 1e-12) else None


# ----------------------------------------------------------------------------------------------------------------
# Figures as functions of (resampled) sums: each array may carry a leading axis of bootstrap draws.


def explained_variance_of(prefix: str, pair: int | None = None) -> intervals.Statistic:
    """The explained variance of the `prefix` map ("fwd": analog → teacher, "back": teacher → analog) at layer pair
    index `pair`, or the mean over pairs when None."""

    def statistic(s: Mapping[str, np.ndarray]) -> np.ndarray:
        sse, syy, sy = (np.asarray(s[f"{prefix}_{k}"]) for k in ("sse", "syy", "sy"))
        n = np.asarray(s["n"])[..., None]
        sst = syy - np.sum(sy**2, -1) / np.maximum(n, _TINY)
        ev = 1 - sse / np.where(sst > 0, sst, np.nan)
        return ev[..., pair] if pair is not None else ev.mean(-1)

    return statistic


def per_token(key: str, pair: int | None = None) -> intervals.Statistic:
    """Σ key / Σ tokens (a mean per predicted token), at layer pair index `pair` (or the mean over pairs when the key
    has a pair axis and `pair` is None)."""

    def statistic(s: Mapping[str, np.ndarray]) -> np.ndarray:
        value, tokens = np.asarray(s[key]), np.maximum(np.asarray(s["tokens"]), _TINY)
        if value.ndim > tokens.ndim:  # a pair axis
            value = value / tokens[..., None]
            return value[..., pair] if pair is not None else value.mean(-1)
        return value / tokens

    return statistic


def _accuracy(s, name: str, k: int) -> np.ndarray:
    return np.asarray(s[f"probe/{name}"])[..., k] / np.maximum(np.asarray(s["probe/labelled"])[..., k], _TINY)


def _chance(s, k: int) -> np.ndarray:
    rate = np.asarray(s["probe/positive"])[..., k] / np.maximum(np.asarray(s["probe/labelled"])[..., k], _TINY)
    return np.maximum(rate, 1 - rate)


def _ratio(value, baseline, native) -> np.ndarray:
    gap = np.asarray(native - baseline, np.float64)
    return np.where(gap > 0, (value - baseline) / np.where(gap > 0, gap, 1.0), np.nan)


def probe_statistic(what: str, k: int) -> intervals.Statistic:
    """Concept k's probe figure: an accuracy ("analog", "native", "transferred"), "chance", "native_gap" (native −
    chance) or "recovered"."""

    def statistic(s: Mapping[str, np.ndarray]) -> np.ndarray:
        if what == "chance":
            return _chance(s, k)
        if what == "native_gap":
            return _accuracy(s, "native", k) - _chance(s, k)
        if what == "recovered":
            return _ratio(_accuracy(s, "transferred", k), _chance(s, k), _accuracy(s, "native", k))
        return _accuracy(s, what, k)

    return statistic


def _effect(s, name: str, k: int) -> np.ndarray:
    return np.asarray(s[f"steering/{name}"])[..., k] / np.maximum(np.asarray(s["steering/count"])[..., k], 1.0)


def _random(s, k: int) -> np.ndarray:
    """The mean effect of the random directions on concept k; under the bootstrap (a leading draws axis) each draw
    averages its own resample of the directions."""
    per_direction = (
        np.asarray(s["steering/random"])[..., k] / np.maximum(np.asarray(s["steering/count"])[..., k], 1.0)[..., None]
    )
    if per_direction.ndim == 1:
        return per_direction.mean(-1)
    draws, directions = per_direction.shape
    weights = intervals.row_weights(directions, draws, DIRECTION_SEED) / directions
    return np.sum(weights * per_direction, -1)


def steering_statistic(what: str, k: int) -> intervals.Statistic:
    """Concept k's steering figure: an effect ("native", "transferred"), "random", "native_gap" (native − random)
    or "recovered"."""

    def statistic(s: Mapping[str, np.ndarray]) -> np.ndarray:
        if what == "random":
            return _random(s, k)
        if what == "native_gap":
            return _effect(s, "native", k) - _random(s, k)
        if what == "recovered":
            return _ratio(_effect(s, "transferred", k), _random(s, k), _effect(s, "native", k))
        return _effect(s, what, k)

    return statistic


def _mean_over(statistics: Sequence[intervals.Statistic]) -> intervals.Statistic:
    """The mean of several figures, ignoring those undefined in a draw (nan where its native gap vanished)."""

    def statistic(s: Mapping[str, np.ndarray]) -> np.ndarray:
        values = np.stack([np.asarray(f(s), np.float64) for f in statistics])
        finite = np.isfinite(values)
        count = finite.sum(0)
        return np.where(count > 0, np.where(finite, values, 0.0).sum(0) / np.maximum(count, 1), np.nan)

    return statistic


# ----------------------------------------------------------------------------------------------------------------
# One model's rows


def per_row_arrays(batches: list[Any], real: int) -> dict[str, np.ndarray]:
    """The eval pass's per-row outputs of each batch → one float64 array per key (nested keys joined by '/'), the
    padding rows past the `real` ones dropped. A key only some (leading) batches hold covers only their rows."""
    out: dict[str, list[np.ndarray]] = {}

    def walk(prefix, tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}/", value)
            else:
                out.setdefault(prefix + key, []).append(np.asarray(value, np.float64))

    for batch in batches:
        walk("", batch)
    return {k: np.concatenate(v)[:real] for k, v in out.items()}


@dataclass(frozen=True)
class TransferRows:
    """One model's per-row sums of the transfer checks' eval pass (arrays with a leading axis of eval rows, the same
    rows in the same order for every model measured together; the interventions' arrays cover the leading
    `intervention_rows` of them), with what they were measured at."""

    pairs: tuple[tuple[int, int], ...]
    concept_pair: tuple[int, int]
    concepts: tuple[str, ...]  # the measured concepts, in the order of the probe/ and steering/ columns
    sums: Mapping[str, np.ndarray]

    @classmethod
    def from_sums(cls, pairs, concept_pair, concepts, sums: Mapping[str, Any]) -> TransferRows:
        """From the eval pass's per-row arrays (nested keys joined by '/')."""
        arrays = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        return cls(tuple(tuple(p) for p in pairs), tuple(concept_pair), tuple(concepts), arrays)  # type: ignore[arg-type]

    @property
    def rows(self) -> int:
        """The number of eval rows."""
        return int(len(self.sums["n"]))

    @property
    def intervention_rows(self) -> int:
        """The leading eval rows that also ran the interventions (stitched forwards, steering)."""
        return int(len(self.sums.get("stitched_kl", self.sums["n"])))

    def leading(self, count: int) -> TransferRows:
        """The same sums on the first `count` rows only."""
        return TransferRows(self.pairs, self.concept_pair, self.concepts, {k: v[:count] for k, v in self.sums.items()})

    def _only(self, *prefixes: str) -> dict[str, np.ndarray]:
        """The sums whose keys start with `prefixes`, with the token counts of the rows they cover (the interventions'
        sums cover only the leading rows, measure_models' `intervention_batches`)."""
        shared = ("n", "tokens", intervals.DOCUMENT)
        picked = {k: v for k, v in self.sums.items() if k.startswith(prefixes) and k not in shared}
        covered = min((len(v) for v in picked.values()), default=self.rows)
        return {k: self.sums[k][:covered] for k in shared if k in self.sums} | picked

    def figure(self, statistic: intervals.Statistic, *prefixes: str) -> tuple[float, list[float | None]]:
        """(point, [lo, hi]) of a statistic of the sums whose keys start with `prefixes`."""
        sums = self._only(*prefixes)
        return intervals.point(statistic, sums), intervals.ci95(statistic, sums)

    def probe_judged(self, k: int) -> bool:
        """Whether concept k's teacher-native probe beats chance beyond noise: by more than two standard errors of an
        accuracy at chance over its labelled tokens, and with a 95% interval of native − chance above zero."""
        labelled = float(self.sums["probe/labelled"][:, k].sum())
        chance, _ = self.figure(probe_statistic("chance", k), "probe/")
        gap, (lo, _) = self.figure(probe_statistic("native_gap", k), "probe/")
        noise = 2 * np.sqrt(chance * (1 - chance) / max(labelled, 1.0))
        return bool(gap > max(noise, 1e-12) and lo is not None and lo > 0)  # no interval (too few rows): not judged

    def steering_judged(self, k: int) -> bool:
        """Whether concept k's native direction beats the random ones beyond noise: by more than the spread (standard
        deviation) of one random direction's effect, and with a 95% interval of native − random above zero."""
        count = max(float(self.sums["steering/count"][:, k].sum()), 1.0)
        spread = float(np.std(self.sums["steering/random"][:, :, k].sum(0) / count))
        gap, (lo, _) = self.figure(steering_statistic("native_gap", k), "steering/")
        return bool(gap > max(spread, 1e-12) and lo is not None and lo > 0)


def interval_method(rows: TransferRows) -> str:
    """How the report's intervals were taken, in words."""
    cut = rows.leading(rows.intervention_rows)
    intervened = (
        f"; stitched CE and KL and steering over the first {rows.intervention_rows} rows ({_units(cut)}), which ran "
        "the interventions"
        if rows.intervention_rows < rows.rows
        else ""
    )
    return (
        f"95% percentile bootstrap over the {rows.rows} eval rows ({_units(rows)}; {intervals.DRAWS} resamples"
        f"{intervened}); steering's also resample the random directions"
    )


def _units(rows: TransferRows) -> str:
    if intervals.DOCUMENT not in rows.sums:
        return "each row resampled alone"
    return f"{intervals.units(rows.sums)} documents, each resampled with its rows"


def _with_interval(out: dict, key: str, figure: tuple[float, list[float | None]]) -> None:
    out[key], out[f"{key}_ci95"] = figure


def figures(rows: TransferRows) -> dict[str, Any]:
    """The report's figures, each with its `*_ci95`: teacher and analog CE, `stitch` per layer pair, `probes` and
    `steering` per concept (recovered and its interval null where the native method is not beyond noise)."""
    out: dict[str, Any] = {"eval_rows": rows.rows, "intervention_rows": rows.intervention_rows}
    _with_interval(out, "teacher_ce", rows.figure(per_token("teacher_ce"), "teacher_ce"))
    _with_interval(out, "analog_ce", rows.figure(per_token("analog_ce"), "analog_ce"))
    if rows.intervention_rows < rows.rows:  # the CE on the rows the stitched CE was measured on, to compare with it
        cut = rows.leading(rows.intervention_rows)
        for key in ("teacher_ce", "analog_ce"):
            _with_interval(out, f"{key}_intervened", cut.figure(per_token(key), key))
    out["stitch"] = []
    for p, (i, j) in enumerate(rows.pairs):
        entry: dict[str, Any] = {"analog_layer": i, "teacher_layer": j}
        _with_interval(entry, "explained_variance", rows.figure(explained_variance_of("fwd", p), "fwd_"))
        _with_interval(
            entry, "teacher_to_analog_explained_variance", rows.figure(explained_variance_of("back", p), "back_")
        )
        _with_interval(entry, "stitched_ce", rows.figure(per_token("stitched_ce", p), "stitched_ce"))
        _with_interval(entry, "stitched_kl", rows.figure(per_token("stitched_kl", p), "stitched_kl"))
        out["stitch"].append(entry)
    out["probes"], out["steering"] = [], []
    i, j = rows.concept_pair
    for k, name in enumerate(rows.concepts):
        labelled = float(rows.sums["probe/labelled"][:, k].sum())
        positive = float(rows.sums["probe/positive"][:, k].sum())
        probe: dict[str, Any] = {"concept": name, "analog_layer": i, "teacher_layer": j, "eval_tokens": int(labelled)}
        probe["positive_rate"] = positive / max(labelled, 1.0)
        _with_interval(probe, "chance", rows.figure(probe_statistic("chance", k), "probe/"))
        for key, what in (("analog", "analog"), ("teacher_native", "native"), ("transferred", "transferred")):
            _with_interval(probe, key, rows.figure(probe_statistic(what, k), "probe/"))
        judged = rows.probe_judged(k)
        _with_interval(
            probe, "recovered", rows.figure(probe_statistic("recovered", k), "probe/") if judged else (None, None)
        )
        out["probes"].append(probe)
        steer: dict[str, Any] = {"concept": name, "analog_layer": i, "teacher_layer": j}
        for key in ("native", "transferred", "random"):
            _with_interval(steer, key, rows.figure(steering_statistic(key, k), "steering/"))
        count = max(float(rows.sums["steering/count"][:, k].sum()), 1.0)
        steer["random_draws"] = [float(e) for e in rows.sums["steering/random"][:, :, k].sum(0) / count]
        judged = rows.steering_judged(k)
        _with_interval(
            steer, "recovered", rows.figure(steering_statistic("recovered", k), "steering/") if judged else (None, None)
        )
        out["steering"].append(steer)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Two models, paired


def comparison(analog: TransferRows, baseline: TransferRows) -> list[dict[str, Any]]:
    """Paired comparison entries (intervals.compare) of two models measured together on the same rows: stitch
    explained variance both ways and stitched KL (each the mean over the layer pairs), and probe and steering
    recovered (the mean over the concepts whose teacher-native method is beyond noise, at the concepts' layer pair).
    Each entry: measure, analog, baseline, analog_ci95, baseline_ci95, difference_ci95, higher_is_better, better
    ("analog", "baseline" or "not distinguishable"); the recovered ones also name their `concepts`."""
    if (analog.pairs, analog.concept_pair, analog.concepts) != (
        baseline.pairs,
        baseline.concept_pair,
        baseline.concepts,
    ):
        raise ValueError("the two models were measured at different layer pairs or concepts")
    if (analog.rows, analog.intervention_rows) != (baseline.rows, baseline.intervention_rows):
        raise ValueError("the two models were measured on different rows")
    i, j = analog.concept_pair
    entries = []
    for measure, statistic, prefix, higher in (
        (
            "stitch explained variance analog→teacher (mean over layer pairs)",
            explained_variance_of("fwd"),
            "fwd_",
            True,
        ),
        (
            "stitch explained variance teacher→analog (mean over layer pairs)",
            explained_variance_of("back"),
            "back_",
            True,
        ),
        ("stitched KL(teacher‖stitched) (mean over layer pairs)", per_token("stitched_kl"), "stitched_kl", False),
    ):
        entries.append(
            intervals.compare(measure, statistic, analog._only(prefix), baseline._only(prefix), higher_is_better=higher)
        )
    for what, make, judged, prefix in (
        ("probe", probe_statistic, "probe_judged", "probe/"),
        ("steering", steering_statistic, "steering_judged", "steering/"),
    ):
        ks = [k for k in range(len(analog.concepts)) if getattr(analog, judged)(k) and getattr(baseline, judged)(k)]
        measure = f"{what} recovered (mean over concepts, layer pair {i}:{j})"
        if ks:
            entry = intervals.compare(
                measure,
                _mean_over([make("recovered", k) for k in ks]),
                analog._only(prefix),
                baseline._only(prefix),
                higher_is_better=True,
            )
        else:
            entry = _unjudged(measure)
        entry["concepts"] = [analog.concepts[k] for k in ks]
        entries.append(entry)
    return entries


def _unjudged(measure: str) -> dict[str, Any]:
    """An entry for a measure with nothing to judge (no concept's native method beyond noise): kept, not dropped."""
    return {
        "measure": measure,
        "analog": None,
        "baseline": None,
        "analog_ci95": None,
        "baseline_ci95": None,
        "difference_ci95": None,
        "higher_is_better": True,
        "better": "not distinguishable",
    }
