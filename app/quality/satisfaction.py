"""User satisfaction from feedback: the seed's explicit 0.5, implicit 0.3, temporal 0.2.

Feedback may arrive in several events (a thumbs-up now, acceptance later); later values win field
by field. A part with no feedback is unknown and its weight goes to the parts that are known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app.quality.base import DimensionScore, weighted

__all__ = ["assess_satisfaction", "merge_feedback"]

_FIELDS = (
    "rating",
    "thumbs",
    "accepted",
    "modified",
    "abandoned",
    "time_to_acceptance_s",
    "time_to_first_use_s",
    "usage_time_s",
    "return_visits",
    "copy_events",
)


def merge_feedback(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Flatten feedback rows (store rows or nested explicit/implicit/temporal bodies), later wins."""
    merged: dict[str, Any] = {}
    for row in rows:
        flat = dict(row)
        for section in ("explicit", "implicit", "temporal"):
            flat.update(flat.pop(section, None) or {})
        for name in _FIELDS:
            if flat.get(name) is not None:
                merged[name] = flat[name]
    return merged


def assess_satisfaction(feedback: Iterable[Mapping[str, Any]]) -> DimensionScore | None:
    """The seed's satisfaction formula over whatever feedback there is; None without any."""
    fb = merge_feedback(feedback)
    explicit = None
    if fb.get("rating") is not None:
        explicit = float(fb["rating"]) / 5.0  # the seed's scale: 1 star is 0.2, 5 stars 1.0
    elif fb.get("thumbs") is not None:
        explicit = 1.0 if fb["thumbs"] == "up" else 0.0
    implicit = None
    if fb.get("accepted"):
        implicit = 1.0
    elif fb.get("modified"):
        implicit = 0.7  # partial credit: used after changes
    elif fb.get("abandoned") or fb.get("accepted") is False:
        implicit = 0.0
    temporal = None
    if fb.get("time_to_first_use_s") is not None:
        t = float(fb["time_to_first_use_s"])
        temporal = 1.0 if t < 30 else 0.5 if t < 300 else 0.0
    result = weighted({"explicit": (0.5, explicit), "implicit": (0.3, implicit), "temporal": (0.2, temporal)})
    if result is None:
        return None
    score, subscores = result
    return DimensionScore(
        "user_satisfaction",
        score,
        subscores,
        {"has_explicit": explicit is not None, "has_implicit": implicit is not None, "feedback": fb},
    )
