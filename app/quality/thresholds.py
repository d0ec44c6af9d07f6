"""Quality thresholds: the seed's base values, complexity adjustments, and per-domain
adjustments learned from how training on a domain went, clamped to [0.50, 0.95]."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["BASE_THRESHOLDS", "ThresholdManager"]

BASE_THRESHOLDS = {"training_inclusion": 0.70, "high_quality": 0.85, "exceptional": 0.95}
COMPLEXITY_ADJUSTMENTS = {"simple": -0.05, "moderate": 0.0, "medium": 0.0, "complex": 0.05, "expert": 0.10}
LOW, HIGH = 0.50, 0.95


class ThresholdManager:
    """The inclusion threshold for a domain and complexity (see the module docstring)."""

    def __init__(self, base: Mapping[str, float] | None = None, adjustments: Mapping[str, float] | None = None):
        self.base = dict(BASE_THRESHOLDS, **(base or {}))
        self.adjustments: dict[str, float] = dict(adjustments or {})

    def threshold(
        self, domain: str | None = None, complexity: str | None = None, level: str = "training_inclusion"
    ) -> float:
        if level not in self.base:
            raise ValueError(f"level: unknown threshold {level!r} (allowed: {', '.join(self.base)})")
        value = self.base[level]
        value += self.adjustments.get(f"domain_{domain}", 0.0) if domain else 0.0
        value += COMPLEXITY_ADJUSTMENTS.get(complexity or "", 0.0)
        return min(HIGH, max(LOW, value))

    def update(self, performance: Mapping[str, float]) -> None:
        """After a training run: a domain whose model did poorly (< 0.80) gets a stricter
        threshold (+0.02), one that did excellently (> 0.95) a looser one (-0.01)."""
        for domain, score in performance.items():
            key = f"domain_{domain}"
            if score < 0.80:
                self.adjustments[key] = self.adjustments.get(key, 0.0) + 0.02
            elif score > 0.95:
                self.adjustments[key] = self.adjustments.get(key, 0.0) - 0.01
