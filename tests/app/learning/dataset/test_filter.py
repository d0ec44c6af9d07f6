"""Stage 3 (``app.learning.dataset.filter``): the inclusion threshold per domain and complexity;
corrections pass it."""

from __future__ import annotations

from app.learning.dataset.filter import filter_quality
from app.learning.dataset.options import threshold_manager
from tests.app.learning.dataset.samples import read_rows


def test_filter_keeps_rows_at_or_above_their_domain_and_complexity_threshold() -> None:
    manager = threshold_manager(0.70, {"rust": 0.05})
    batch = read_rows(
        5,
        language=["python", "python", "python", "python", "rust"],
        complexity=["simple", "complex", "complex", "expert", "moderate"],
        quality_score=[0.65, 0.74, 0.75, 0.79, 0.74],
    )
    out = filter_quality(batch, manager)
    assert list(out["interaction_id"]) == ["id-00", "id-02"]  # 0.65 >= 0.65, 0.75 >= 0.75
    assert list(out["threshold"]) == [0.65, 0.75]


def test_a_correction_passes_whatever_the_threshold() -> None:
    batch = read_rows(
        2,
        language=["python", "python"],
        complexity=["simple", "simple"],
        quality_score=[0.1, 0.1],
        source=["correction", "interaction"],
    )
    out = filter_quality(batch, threshold_manager(0.70))
    assert list(out["interaction_id"]) == ["id-00"] and list(out["threshold"]) == [0.65]
