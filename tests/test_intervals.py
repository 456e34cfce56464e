"""Intervals resample held-out documents, not the rows cut from them: checked against a simulation whose truth is
known, and against sums grouped by hand."""

import numpy as np
import pytest

from analogjax.fidelity import intervals

MEAN = intervals.ratio("value", "count")


def _correlated_rows(rng, documents: int, rows_per_document: int, spread: float = 1.0, noise: float = 0.2):
    """Rows of `documents` documents: each document has its own level (the figure's true mean is 0), and its rows
    differ from it by a little noise only, as the rows of one long file do."""
    level = rng.normal(0.0, spread, documents)
    document = np.repeat(np.arange(documents), rows_per_document)
    count = np.full(len(document), 100.0)
    value = (level[document] + rng.normal(0.0, noise, len(document))) * count
    order = rng.permutation(len(document))  # rows of a document need not be adjacent
    return {"value": value[order], "count": count[order], intervals.DOCUMENT: document[order].astype(np.float64)}


def test_document_intervals_cover_the_truth_where_row_intervals_do_not():
    rng = np.random.default_rng(0)
    covered = {"documents": 0, "rows": 0}
    trials = 120
    for trial in range(trials):
        rows = _correlated_rows(rng, documents=12, rows_per_document=8)
        as_rows = {k: v for k, v in rows.items() if k != intervals.DOCUMENT}
        for unit, per_row in (("documents", rows), ("rows", as_rows)):
            lo, hi = intervals.ci95(MEAN, per_row, draws=400, seed=trial)
            covered[unit] += lo <= 0.0 <= hi
    # Over the 12 documents (widened for few units) the intervals cover the truth about as often as they say; over the
    # 96 rows as if independent far less often, because the rows of a document share its level.
    assert covered["documents"] / trials >= 0.9
    assert covered["rows"] / trials <= 0.6


@pytest.mark.parametrize("documents", [5, 8, 20])
def test_few_documents_widen_the_interval_to_its_nominal_coverage(documents):
    """The percentile bootstrap alone covers the truth ~0.82 of the time over 5 documents and ~0.89 over 8; widened
    by √(G/(G−1))·t(G−1)/z, about 0.95."""
    rng = np.random.default_rng(documents)
    trials, covered = 200, 0
    for trial in range(trials):
        lo, hi = intervals.ci95(MEAN, _correlated_rows(rng, documents, 4), draws=400, seed=trial)
        covered += lo <= 0.0 <= hi
    assert 0.9 <= covered / trials <= 0.99


def test_rows_of_a_document_move_together():
    rng = np.random.default_rng(1)
    rows = _correlated_rows(rng, documents=9, rows_per_document=3)
    document = rows[intervals.DOCUMENT]
    # By hand: each document's sums, then the bootstrap over those (documents in sorted order).
    by_hand = {k: np.array([rows[k][document == d].sum() for d in np.unique(document)]) for k in ("value", "count")}
    assert intervals.ci95(MEAN, rows) == pytest.approx(intervals.ci95(MEAN, by_hand), rel=1e-12)
    assert intervals.point(MEAN, rows) == pytest.approx(rows["value"].sum() / rows["count"].sum())
    assert intervals.units(rows) == 9 and intervals.units(by_hand) == 9


def test_comparisons_resample_documents_and_need_five_of_them():
    rng = np.random.default_rng(2)
    analog = _correlated_rows(rng, documents=4, rows_per_document=10)
    baseline = dict(analog, value=analog["value"] + 50.0 * analog["count"])  # far worse on every row
    entry = intervals.compare("m", MEAN, analog, baseline, higher_is_better=False)
    # 40 rows but 4 documents: no noise estimate, so no verdict however far apart the figures are.
    assert entry["rows"] == 40 and entry["documents"] == 4
    assert entry["better"] == "not distinguishable" and entry["analog_ci95"] == [None, None]
    assert intervals.ci95(MEAN, analog) == [None, None]

    analog = _correlated_rows(rng, documents=6, rows_per_document=2)
    baseline = dict(analog, value=analog["value"] + 50.0 * analog["count"])
    entry = intervals.compare("m", MEAN, analog, baseline, higher_is_better=False)
    assert entry["documents"] == 6 and entry["better"] == "analog"
    relabelled = dict(baseline, **{intervals.DOCUMENT: np.roll(baseline[intervals.DOCUMENT], 1)})
    with pytest.raises(ValueError, match="different documents"):
        intervals.compare("m", MEAN, analog, relabelled, higher_is_better=False)
