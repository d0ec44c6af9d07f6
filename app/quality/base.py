"""What every assessor returns: a score in [0, 1] for one dimension, its sub-scores, and the
evidence it rests on. An assessor with no evidence returns ``None``: unknown, not zero."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DIMENSIONS", "DimensionScore", "clamp", "weighted"]

# The seed's five dimensions and their weights in the overall score.
DIMENSIONS: dict[str, float] = {
    "user_satisfaction": 0.30,
    "functional_correctness": 0.25,
    "code_quality": 0.20,
    "context_relevance": 0.15,
    "efficiency": 0.10,
}


@dataclass(frozen=True)
class DimensionScore:
    """One dimension's assessment."""

    name: str
    score: float
    subscores: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)


def clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def weighted(parts: dict[str, tuple[float, float | None]]) -> tuple[float, dict[str, float]] | None:
    """Weighted mean of the parts that are known, their weights renormalised.

    Args:
        parts: name -> (weight, value or None when unknown).

    Returns:
        (score, known sub-scores), or None when no part is known.
    """
    known = {name: (w, v) for name, (w, v) in parts.items() if v is not None}
    total = sum(w for w, _ in known.values())
    if not known or total <= 0:
        return None
    score = sum(w * v for w, v in known.values()) / total
    return clamp(score), {name: float(v) for name, (_, v) in known.items()}
