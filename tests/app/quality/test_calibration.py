"""Calibration: weights fitted to human ratings, evaluated on a held-out split."""

from __future__ import annotations

import random

import pytest

from app.quality.aggregate import aggregate
from app.quality.base import DIMENSIONS, DimensionScore
from app.quality.calibration import Calibration, fit_calibration, weighted_overall


def _components(rng: random.Random, drop: str | None = None) -> dict[str, float]:
    return {n: rng.random() for n in DIMENSIONS if n != drop}


def test_fitted_weights_follow_what_people_rate() -> None:
    # People here judge almost only correctness; the seed gives it a quarter of the weight.
    rng = random.Random(0)
    samples = []
    for i in range(300):
        comps = _components(rng, drop="user_satisfaction" if i % 3 else None)
        rating = 0.85 * comps["functional_correctness"] + 0.15 * rng.random()
        samples.append((comps, None, rating))
    report = fit_calibration(samples, min_ratings=50, seed=1)
    assert report.fitted and report.calibration is not None
    assert (report.train, report.test) == (225, 75)
    weights = report.calibration.weights
    assert max(weights, key=weights.get) == "functional_correctness"
    assert weights["functional_correctness"] > 0.6 and sum(weights.values()) == pytest.approx(1.0, abs=1e-4)
    assert report.calibrated["spearman"] > report.seed["spearman"] + 0.2
    assert report.calibrated["spearman"] > 0.8 and report.calibrated["pearson"] > 0.8
    assert report.calibration.version.startswith("cal-300-")


def test_too_few_ratings_keep_the_seed_weights() -> None:
    rng = random.Random(1)
    report = fit_calibration([(_components(rng), None, rng.random()) for _ in range(20)], min_ratings=50)
    assert not report.fitted and report.calibration is None
    assert "fewer than min_ratings=50" in report.reason


def test_a_calibration_that_ranks_worse_than_the_seed_is_not_kept() -> None:
    rng = random.Random(2)  # ratings that are pure noise: nothing to learn
    report = fit_calibration([(_components(rng), None, rng.random()) for _ in range(200)], min_ratings=50)
    if report.calibration is None:
        assert "worse than the seed" in report.reason or "no dimension" in report.reason
    else:  # noise may, by chance, favour the fit a little; it must then not rank worse
        assert report.calibrated["spearman"] >= report.seed["spearman"] - 0.01


def test_aggregate_applies_the_calibration_and_names_it() -> None:
    comps = {
        "functional_correctness": DimensionScore("functional_correctness", 0.9),
        "code_quality": DimensionScore("code_quality", 0.3),
    }
    cal = Calibration(
        "cal-x", {n: (1.0 if n == "code_quality" else 0.0) for n in DIMENSIONS}, xs=(0.0, 1.0), ys=(0.2, 0.8)
    )
    seed = aggregate(comps)
    calibrated = aggregate(comps, calibration=cal)
    assert seed.overall == pytest.approx((0.25 * 0.9 + 0.20 * 0.3) / 0.45)
    assert calibrated.overall == pytest.approx(0.2 + 0.6 * 0.3)  # only code quality, then the map
    assert calibrated.assessor_version.endswith("+cal-x") and "+" not in seed.assessor_version
    assert Calibration.from_row({"version": "cal-x", "params": cal.params()}) == cal


def test_weighted_overall_falls_back_when_the_known_dimensions_have_no_weight() -> None:
    zero = {n: 0.0 for n in DIMENSIONS}
    assert weighted_overall({"efficiency": 0.4}, zero) == pytest.approx(0.4)
    both = {"efficiency": 0.9, "functional_correctness": 0.2}
    assert weighted_overall(both, DIMENSIONS) == pytest.approx((0.1 * 0.9 + 0.25 * 0.2) / 0.35)
    assert weighted_overall(both, DIMENSIONS, cap=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no dimension"):
        weighted_overall({}, DIMENSIONS)
