"""What each arm of a deployment has shown on live traffic, read from the interaction store.

During a canary the Generator records, on every completion of a request for ``champion``, which
arm answered (``serving_arm``) and under which deployment (``deployment_id``), and every request it
could not answer in ``request_failures`` with the same two fields; so the two arms' evidence is
exact: no time window or guess about who answered what. After a promotion the new champion's
answers are those whose ``model_version`` is its adapter id, since the promotion.

Per arm: the quality scores of its scored interactions, the users' signals where feedback exists
(a satisfaction value per interaction, and acceptance), failed requests and the error rate, and
latency (``generation_time_ms``) p50/p95. :class:`~app.deployment.stats.Sample` and
:class:`~app.deployment.stats.Count` carry them to the confidence sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.deployment.stats import Count, Sample
from app.store.base import InteractionStore

__all__ = [
    "ARMS",
    "ArmEvidence",
    "CanaryEvidence",
    "LiveComparison",
    "accepted",
    "satisfaction",
]

ARMS = ("champion", "challenger")

# One row per (interaction, feedback) pair; the correction's text is not read, only whether there is one.
_ROWS = (
    "SELECT i.id, i.serving_arm, i.model_version, i.quality_score, i.quality_status, i.generation_time_ms, "
    "i.timestamp, f.id AS feedback_id, f.rating, f.thumbs, f.accepted, f.modified, f.abandoned, "
    "CASE WHEN f.correction IS NULL OR f.correction = '' THEN 0 ELSE 1 END AS corrected "
    "FROM interactions i LEFT JOIN feedback f ON f.interaction_id = i.id "
)


def satisfaction(feedback: Iterable[Mapping[str, Any]]) -> float | None:
    """What the users' feedback on one answer says of it, in [0, 1]; None without any signal.

    Each signal gives a value and the answer's satisfaction is their mean: a rating of 1-5 stars
    ``(r - 1) / 4``; thumbs up 1, down 0; a correction 0 (the user had to write the answer); and
    of the implicit signals the strongest present: abandoned 0, modified before use 0.5, accepted
    as it was 1, not accepted 0.
    """
    values: list[float] = []
    for row in feedback:
        if row.get("rating") is not None:
            values.append((float(row["rating"]) - 1) / 4)
        if row.get("thumbs") in ("up", "down"):
            values.append(1.0 if row["thumbs"] == "up" else 0.0)
        if row.get("corrected"):
            values.append(0.0)
        if row.get("abandoned"):
            values.append(0.0)
        elif row.get("modified"):
            values.append(0.5)
        elif row.get("accepted") is not None:
            values.append(1.0 if row["accepted"] else 0.0)
    return sum(values) / len(values) if values else None


def accepted(feedback: Iterable[Mapping[str, Any]]) -> bool | None:
    """Whether the user used the answer (the latest feedback that says), or None."""
    verdict = None
    for row in feedback:
        if row.get("accepted") is not None:
            verdict = bool(row["accepted"])
    return verdict


@dataclass(frozen=True)
class ArmEvidence:
    """One arm's live evidence (or a champion's baseline kept for the watch)."""

    model: str | None = None
    completions: int = 0
    failures: int = 0
    quality: Sample = field(default_factory=Sample)
    satisfaction: Sample = field(default_factory=Sample)
    acceptance: Count = field(default_factory=Count)
    latency_n: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None

    @property
    def errors(self) -> Count:
        """Failed requests among all requests the arm was asked to answer."""
        return Count(self.failures, self.failures + self.completions)

    def summary(self) -> str:
        q = f"{self.quality.mean:.3f}" if self.quality.n else "-"
        err = self.errors.rate
        p50 = f"{self.latency_p50_ms:.0f} ms" if self.latency_p50_ms is not None else "-"
        return (
            f"{self.quality.n} scored (mean {q}), {self.satisfaction.n} with feedback, "
            f"{self.failures}/{self.errors.n} failed ({0.0 if err is None else err:.1%}), p50 {p50}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "completions": self.completions,
            "failures": self.failures,
            "error_rate": self.errors.rate,
            "quality": self.quality.to_json(),
            "quality_mean": self.quality.mean if self.quality.n else None,
            "satisfaction": self.satisfaction.to_json(),
            "acceptance": self.acceptance.to_json(),
            "latency_n": self.latency_n,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ArmEvidence:
        if not data:
            return cls()
        return cls(
            model=data.get("model"),
            completions=int(data.get("completions", 0)),
            failures=int(data.get("failures", 0)),
            quality=Sample.from_json(data.get("quality")),
            satisfaction=Sample.from_json(data.get("satisfaction")),
            acceptance=Count.from_json(data.get("acceptance")),
            latency_n=int(data.get("latency_n", 0)),
            latency_p50_ms=data.get("latency_p50_ms"),
            latency_p95_ms=data.get("latency_p95_ms"),
        )


@dataclass(frozen=True)
class CanaryEvidence:
    """Both arms of one deployment's canary."""

    deployment_id: str
    champion: ArmEvidence
    challenger: ArmEvidence

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment_id": self.deployment_id,
            "champion": self.champion.to_json(),
            "challenger": self.challenger.to_json(),
        }


class LiveComparison:
    """Reads arms' evidence from the store (see the module docstring)."""

    def __init__(self, store: InteractionStore) -> None:
        self.store = store

    def canary(self, deployment_id: str) -> CanaryEvidence:
        """Both arms of ``deployment_id``: everything its traffic split recorded."""
        rows = self.store._fetch(
            _ROWS + "WHERE i.deployment_id = ? AND i.serving_arm IS NOT NULL ORDER BY i.id, f.timestamp, f.id",
            [deployment_id],
        )
        failed = self.store._fetch(
            "SELECT serving_arm, COUNT(*) AS n FROM request_failures WHERE deployment_id = ? GROUP BY serving_arm",
            [deployment_id],
        )
        failures = {r["serving_arm"]: int(r["n"]) for r in failed}
        arms = {
            arm: _arm([r for r in rows if r["serving_arm"] == arm], failures.get(arm, 0), model=None) for arm in ARMS
        }
        return CanaryEvidence(deployment_id, arms["champion"], arms["challenger"])

    def served_since(self, model_version: str, adapter_id: str | None, since: datetime) -> ArmEvidence:
        """Every answer by ``model_version`` (an adapter id, or the base model's name) from
        ``since`` on, whichever name the request used; failures of requests that resolved to
        ``adapter_id`` (None: the base model) in the same time."""
        rows = self.store._fetch(
            _ROWS + "WHERE i.model_version = ? AND i.timestamp >= ? ORDER BY i.id, f.timestamp, f.id",
            [model_version, since],
        )
        failures = self._failures(adapter_id, since, None)
        return _arm(rows, failures, model=model_version)

    def served_before(self, model_version: str, adapter_id: str | None, until: datetime, limit: int) -> ArmEvidence:
        """The last ``limit`` answers by ``model_version`` before ``until`` (a champion's baseline
        when no canary measured it), with its failures over the same span."""
        recent = self.store._fetch(
            "SELECT id, timestamp FROM interactions WHERE model_version = ? AND timestamp < ? "
            "ORDER BY timestamp DESC, id DESC LIMIT ?",
            [model_version, until, int(limit)],
        )
        if not recent:
            return ArmEvidence(model=model_version)
        start = _when(recent[-1]["timestamp"])
        rows = self.store._fetch(
            _ROWS + "WHERE i.model_version = ? AND i.timestamp >= ? AND i.timestamp < ? "
            "ORDER BY i.id, f.timestamp, f.id",
            [model_version, start, until],
        )
        return _arm(rows, self._failures(adapter_id, start, until), model=model_version)

    def _failures(self, adapter_id: str | None, since: datetime, until: datetime | None) -> int:
        sql = "SELECT COUNT(*) AS n FROM request_failures WHERE created_at >= ?"
        params: list[Any] = [since]
        if until is not None:
            sql += " AND created_at < ?"
            params.append(until)
        if adapter_id is None:
            sql += " AND adapter_id IS NULL"
        else:
            sql += " AND adapter_id = ?"
            params.append(adapter_id)
        return int(self.store._fetch(sql, params)[0]["n"])


def _arm(rows: Sequence[Mapping[str, Any]], failures: int, *, model: str | None) -> ArmEvidence:
    """Fold (interaction, feedback) rows, ordered by interaction, into one arm's evidence."""
    by_interaction: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_interaction.setdefault(row["id"], []).append(row)
    quality, sat, acc = Sample(), Sample(), Count()
    latencies: list[float] = []
    models: dict[str, int] = {}
    for group in by_interaction.values():
        first = group[0]
        if first["quality_status"] == "scored" and first["quality_score"] is not None:
            quality = quality.add(first["quality_score"])
        if first["generation_time_ms"] is not None:
            latencies.append(float(first["generation_time_ms"]))
        if first["model_version"] is not None:
            models[first["model_version"]] = models.get(first["model_version"], 0) + 1
        feedback = [r for r in group if r["feedback_id"] is not None]
        value = satisfaction(feedback)
        if value is not None:
            sat = sat.add(value)
        used = accepted(feedback)
        if used is not None:
            acc = Count(acc.successes + used, acc.n + 1)
    latencies.sort()
    return ArmEvidence(
        model=model if model is not None else (max(models, key=models.__getitem__) if models else None),
        completions=len(by_interaction),
        failures=failures,
        quality=quality,
        satisfaction=sat,
        acceptance=acc,
        latency_n=len(latencies),
        latency_p50_ms=_percentile(latencies, 0.5),
        latency_p95_ms=_percentile(latencies, 0.95),
    )


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks of sorted values; None when empty."""
    if not ordered:
        return None
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
