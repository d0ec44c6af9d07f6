"""The overall score: the seed's weights renormalised over the dimensions that have evidence,
the seed's confidence (feedback, objective metrics, context completeness, time decay), and an
interval that widens as confidence falls."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from app.quality.base import DIMENSIONS, DimensionScore, clamp
from app.quality.calibration import Calibration, overall_cap, weighted_overall
from app.schemas import QualityScore

__all__ = ["ASSESSOR_VERSION", "aggregate", "confidence", "context_completeness", "time_decay"]

ASSESSOR_VERSION = "kaizen-quality-0.1"
_CONTEXT_FIELDS = ("project_type", "technologies", "architecture", "git", "build", "testing")
TIME_DECAY_HALF_LIFE_DAYS = 30.0


def context_completeness(context: Mapping[str, Any] | None) -> float:
    """Share of the project-context fields that were captured."""
    if not context:
        return 0.0
    return sum(1 for f in _CONTEXT_FIELDS if context.get(f)) / len(_CONTEXT_FIELDS)


def time_decay(timestamp: datetime | None, now: datetime | None = None) -> float:
    """1.0 for a fresh interaction, halving every 30 days (older evidence says less about the
    model now in production)."""
    if timestamp is None:
        return 1.0
    now = now or datetime.now(UTC)
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    age_days = max(0.0, (now - timestamp).total_seconds() / 86400.0)
    return math.pow(0.5, age_days / TIME_DECAY_HALF_LIFE_DAYS)


def confidence(
    components: Mapping[str, DimensionScore],
    context: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
    now: datetime | None = None,
) -> float:
    """The seed's confidence: the mean of four factors."""
    sat = components.get("user_satisfaction")
    if sat is not None and sat.evidence.get("has_explicit"):
        feedback = 1.0
    elif sat is not None and sat.evidence.get("has_implicit"):
        feedback = 0.7
    else:
        feedback = 0.3
    fc = components.get("functional_correctness")
    objective = (
        1.0
        if fc is not None and fc.evidence.get("source") == "outcomes"
        else (0.75 if fc is not None and fc.evidence.get("has_compilation_result") else 0.5)
    )  # a static compile is evidence, but less than the agent's own build
    return (feedback + objective + context_completeness(context) + time_decay(timestamp, now)) / 4.0


def aggregate(
    components: Mapping[str, DimensionScore],
    context: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
    calibration: Calibration | None = None,
    now: datetime | None = None,
) -> QualityScore:
    """Combine dimension scores into a :class:`QualityScore`.

    Args:
        components: the dimensions that have evidence (absent ones are unknown).
        calibration: fitted weights and rating-scale map; the seed's weights when None.

    Raises:
        ValueError: no dimension has evidence.
    """
    weights = calibration.weights if calibration is not None else DIMENSIONS
    known = {name: c for name, c in components.items() if name in DIMENSIONS}
    cap = overall_cap(known)
    overall = weighted_overall({name: c.score for name, c in known.items()}, weights, cap)
    version = ASSESSOR_VERSION
    if calibration is not None:
        overall = calibration.transform(overall)
        version = f"{ASSESSOR_VERSION}+{calibration.version}"
    conf = clamp(confidence(known, context, timestamp, now))
    half = 0.5 * (1.0 - conf)
    return QualityScore(
        overall=overall,
        components={name: c.score for name, c in known.items()},
        confidence=conf,
        interval=(clamp(overall - half), clamp(overall + half)),
        assessor_version=version,
        cap=cap,
    )
