"""Calibration: how the five dimensions combine, fitted to human ratings.

``fit_calibration`` learns non-negative dimension weights (scikit-learn's ``LinearRegression`` with
``positive=True``) and a linear map from the weighted score onto the rating scale (strictly
increasing, so it never ties scores that the weights told apart), on a training split of the rated
interactions, and reports Spearman and
Pearson correlation on the held-out split next to the seed's fixed weights. A ``Calibration`` is
plain numbers, stored as JSON in the ``calibrations`` table and applied by :func:`aggregate`; while
there are fewer ratings than ``min_ratings`` the seed's weights stay in force.

A dimension without evidence for an interaction is imputed with the seed-weighted mean of the
dimensions it does have, which is exactly what renormalising over the known dimensions does, so
the fitted weights mean the same thing at fit time and at scoring time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.quality.base import DIMENSIONS, DimensionScore, clamp

__all__ = ["Calibration", "CalibrationReport", "correlations", "fit_calibration", "overall_cap", "weighted_overall"]

NAMES = tuple(DIMENSIONS)


@dataclass(frozen=True)
class Calibration:
    """Fitted weights per dimension and a piecewise-linear map (``xs`` -> ``ys``) of the weighted
    score onto the rating scale."""

    version: str
    weights: dict[str, float]
    xs: tuple[float, ...] = ()
    ys: tuple[float, ...] = ()

    def transform(self, raw: float) -> float:
        """The weighted score mapped onto the human rating scale (identity without a map)."""
        if len(self.xs) < 2:
            return raw
        # np.interp holds the end values outside xs; the map is a line through them.
        slope = (self.ys[-1] - self.ys[0]) / (self.xs[-1] - self.xs[0])
        if raw < self.xs[0] or raw > self.xs[-1]:
            return clamp(self.ys[0] + slope * (raw - self.xs[0]))
        return clamp(float(np.interp(raw, self.xs, self.ys)))

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights, "xs": list(self.xs), "ys": list(self.ys)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Calibration:
        """From a row of the ``calibrations`` table."""
        p = row["params"]
        return cls(row["version"], dict(p["weights"]), tuple(p.get("xs", ())), tuple(p.get("ys", ())))


@dataclass
class CalibrationReport:
    """What ``kaizen calibrate`` prints: sizes, held-out correlations before and after."""

    ratings: int
    train: int
    test: int
    fitted: bool
    reason: str
    seed: dict[str, float] = field(default_factory=dict)  # held-out correlation, seed weights
    calibrated: dict[str, float] = field(default_factory=dict)  # held-out correlation, fitted
    calibration: Calibration | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calibration"] = (
            self.calibration.params() | {"version": self.calibration.version} if self.calibration else None
        )
        return out


SECURITY_CAP = 0.5  # an answer with an injection risk is not an answer to learn from, however it reads


def overall_cap(components: Mapping[str, DimensionScore]) -> float | None:
    """The most the overall score may be, whatever the other dimensions say, or None: code that
    fails its own examples, or does not parse, is held to its correctness score; code with an
    injection risk (shell, eval/exec, SQL built from strings) to ``SECURITY_CAP``."""
    caps = []
    fc = components.get("functional_correctness")
    if fc is not None and fc.score <= 0.5 and (fc.evidence.get("tests") or fc.evidence.get("errors")):
        caps.append(fc.score)
    cq = components.get("code_quality")
    if cq is not None and cq.evidence.get("injection"):
        caps.append(SECURITY_CAP)
    return min(caps) if caps else None


def weighted_overall(scores: Mapping[str, float], weights: Mapping[str, float], cap: float | None = None) -> float:
    """The weights renormalised over the dimensions that have evidence (``scores``), held to
    ``cap`` when there is one (see :func:`overall_cap`)."""
    known = {n: v for n, v in scores.items() if n in DIMENSIONS}
    if not known:
        raise ValueError("no dimension has evidence to score")
    total = sum(weights.get(n, 0.0) for n in known)
    if total <= 0:  # a fitted calibration gave every known dimension weight 0: fall back to the seed's
        weights, total = DIMENSIONS, sum(DIMENSIONS[n] for n in known)
    overall = clamp(sum(weights.get(n, 0.0) * v for n, v in known.items()) / total)
    return overall if cap is None else min(overall, cap)


def _features(scores: Mapping[str, float]) -> list[float]:
    known = {n: v for n, v in scores.items() if n in DIMENSIONS}
    fill = sum(DIMENSIONS[n] * v for n, v in known.items()) / sum(DIMENSIONS[n] for n in known)
    return [known.get(n, fill) for n in NAMES]


def correlations(pred: Sequence[float], truth: Sequence[float]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(set(pred)) < 2 or len(set(truth)) < 2:
        return {"spearman": 0.0, "pearson": 0.0}
    return {
        "spearman": round(float(spearmanr(pred, truth).statistic), 4),
        "pearson": round(float(pearsonr(pred, truth).statistic), 4),
    }


def fit_calibration(
    samples: Sequence[tuple[Mapping[str, float], float | None, float]],
    *,
    min_ratings: int = 50,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> CalibrationReport:
    """Fit a calibration on ``(dimension scores, cap or None, human rating in [0, 1])``.

    Returns:
        The report; ``calibration`` is None (keep the seed's weights) when there are too few
        ratings, or when the fitted combination does no better than the seed's on the held-out
        split.
    """
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import train_test_split

    samples = [(c, cap, float(r)) for c, cap, r in samples if any(n in DIMENSIONS for n in c)]
    n = len(samples)
    if n < min_ratings:
        return CalibrationReport(n, 0, 0, False, f"{n} rated interactions, fewer than min_ratings={min_ratings}")
    train, test = train_test_split(samples, test_size=test_fraction, random_state=seed)
    x = np.array([_features(c) for c, _, _ in train])
    y = np.array([r for _, _, r in train])
    reg = LinearRegression(positive=True).fit(x, y)
    coef = np.clip(reg.coef_, 0.0, None)
    if coef.sum() <= 0:
        return CalibrationReport(n, len(train), len(test), False, "no dimension predicts the ratings")
    weights = {name: round(float(w / coef.sum()), 6) for name, w in zip(NAMES, coef)}
    raw_train = np.array([[weighted_overall(c, weights, cap)] for c, cap, _ in train])
    line = LinearRegression().fit(raw_train, y)
    if line.coef_[0] <= 0:
        return CalibrationReport(n, len(train), len(test), False, "the weighted score does not rise with the ratings")
    ys = (float(line.intercept_), float(line.intercept_ + line.coef_[0]))
    digest = hashlib.sha256(json.dumps([weights, ys]).encode()).hexdigest()
    calibration = Calibration(
        version=f"cal-{n}-{digest[:10]}",
        weights=weights,
        xs=(0.0, 1.0),
        ys=tuple(round(v, 6) for v in ys),
    )
    truth = [r for _, _, r in test]
    before = correlations([weighted_overall(c, DIMENSIONS, cap) for c, cap, _ in test], truth)
    after = correlations([calibration.transform(weighted_overall(c, weights, cap)) for c, cap, _ in test], truth)
    better = after["spearman"] >= before["spearman"] - 0.01
    return CalibrationReport(
        n,
        len(train),
        len(test),
        better,
        "fitted" if better else "the fitted combination ranks the held-out ratings worse than the seed's weights",
        before,
        after,
        calibration if better else None,
    )
