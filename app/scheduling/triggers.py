"""The training triggers: what the store says about new data and the champion, and whether each
trigger fires on it.

:func:`measure` reads the evidence once per check (:class:`DataEvidence`); each trigger is a pure
function of it (the tests and ``kaizen training status`` run them without side effects):

* :func:`check_volume`: at least ``training.min_interactions`` new interactions at or above the
  inclusion threshold since the last cycle's data cut-off;
* :func:`check_quality`: the new data is better than what the champion learned from (its training
  set's mean quality, from the dataset manifest its lineage names), or the champion's live quality
  is falling (its answers since the cut-off, newer half against older half); both by
  ``training.quality_margin`` and significantly;
* :func:`check_time`: ``training.interval_hours`` since the last cycle started (before the first:
  since the oldest unlearned interaction), with at least one new interaction.

The manual trigger is an operator's request, kept on the scheduled run (:mod:`app.scheduling.state`).

"Significantly" is an always-valid confidence sequence (:mod:`app.deployment.stats`) at
:data:`TREND_ALPHA`: the scheduler looks at the same growing samples at every check, and a
fixed-sample test looked at that often would fire on noise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.config import KaizenConfig
from app.config_sections import TrainingConfig
from app.deployment.stats import Sample, mean_difference
from app.registry import AdapterRegistry
from app.scheduling.state import as_time
from app.store.base import InteractionStore

__all__ = [
    "TREND_ALPHA",
    "TRIGGERS",
    "DataEvidence",
    "TriggerCheck",
    "check_quality",
    "check_time",
    "check_triggers",
    "check_volume",
    "fired",
    "inclusion_threshold",
    "measure",
    "training_set_quality",
]

log = logging.getLogger("kaizen.scheduler")

TREND_ALPHA = 0.05
"""Error rate of the quality trigger's confidence sequences: the chance, over every check of one
cycle's data, that noise alone looks like better data or a falling champion."""


@dataclass(frozen=True)
class DataEvidence:
    """What the triggers look at, measured from the store at one check.

    ``new`` is the quality of the interactions at or above the inclusion threshold since the data
    cut-off (the unlearned ones); ``live_older`` and ``live_newer`` the two halves of the served
    model's last answers since the cut-off; ``training_set`` the champion's training set's quality
    (None: no champion, or its dataset's manifest cannot be read: ``training_set_note`` says which).
    """

    now: datetime
    threshold: float
    cutoff: datetime | None
    new: Sample
    oldest_new_at: datetime | None
    last_cycle_at: datetime | None
    champion: str | None
    served_model: str
    training_set: Sample | None
    training_set_note: str
    live_older: Sample
    live_newer: Sample

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "data_cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "new": self.new.to_json(),
            "oldest_new_at": self.oldest_new_at.isoformat() if self.oldest_new_at else None,
            "last_cycle_at": self.last_cycle_at.isoformat() if self.last_cycle_at else None,
            "champion": self.champion,
            "served_model": self.served_model,
            "training_set": self.training_set.to_json() if self.training_set else None,
            "training_set_note": self.training_set_note,
            "live_older": self.live_older.to_json(),
            "live_newer": self.live_newer.to_json(),
        }


@dataclass(frozen=True)
class TriggerCheck:
    """One trigger's answer: whether it fires, why (or why not) in words, and the numbers."""

    name: str
    fired: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fired": self.fired, "reason": self.reason, "evidence": self.evidence}


# --- measuring -----------------------------------------------------------------------------------


def inclusion_threshold(cfg: KaizenConfig) -> float:
    """The base quality an interaction needs to enter a dataset: ``dataset.threshold`` when the
    dataset section sets one, else ``quality.threshold`` (as jobs/build_dataset.py reads it)."""
    value = (cfg.dataset or {}).get("threshold")
    return float(value) if value is not None else cfg.quality.threshold


def measure(
    store: InteractionStore,
    cfg: KaizenConfig,
    now: datetime,
    *,
    cutoff: datetime | None,
    last_cycle_at: datetime | None,
) -> DataEvidence:
    """The evidence of one check: new data since ``cutoff`` (None: every interaction is new), the
    champion's training set and its live answers since ``cutoff``. A corrected answer counts as new
    data of quality 1.0 (its correction is what a cycle learns), unless ``dataset.corrections`` is
    false."""
    threshold = inclusion_threshold(cfg)
    # A user's correction is a training target of quality 1.0 whatever the answer scored (as the
    # dataset builder takes it, with dataset.corrections on).
    corrected = (
        "EXISTS (SELECT 1 FROM feedback f WHERE f.interaction_id = interactions.id "
        "AND f.correction IS NOT NULL AND f.correction <> '')"
        if (cfg.dataset or {}).get("corrections", True)
        else "1 = 0"
    )
    quality = f"(CASE WHEN {corrected} THEN 1.0 ELSE quality_score END)"
    where = f"quality_status = 'scored' AND (output_content <> '' OR {corrected}) AND {quality} >= ?"
    params: list[Any] = [threshold]
    if cutoff is not None:
        where += " AND timestamp >= ?"
        params.append(cutoff)
    (row,) = store._fetch(
        f"SELECT COUNT(*) AS n, AVG({quality}) AS mean, SUM({quality} * {quality}) AS sq, "
        f"MIN(timestamp) AS oldest FROM interactions WHERE {where}",
        params,
    )
    n = int(row["n"] or 0)
    mean = float(row["mean"] or 0.0)
    new = Sample(n, mean, max(0.0, float(row["sq"] or 0.0) - n * mean * mean)) if n else Sample()

    registry = AdapterRegistry(store)
    champion = registry.champion()
    served = champion or cfg.model.base_model
    training_set, note = training_set_quality(registry, champion)
    older, newer = _live_halves(store, served, cutoff, cfg.training.quality_window)
    return DataEvidence(
        now=now,
        threshold=threshold,
        cutoff=cutoff,
        new=new,
        oldest_new_at=as_time(row["oldest"]) if row.get("oldest") else None,
        last_cycle_at=last_cycle_at,
        champion=champion,
        served_model=served,
        training_set=training_set,
        training_set_note=note,
        live_older=older,
        live_newer=newer,
    )


def _live_halves(
    store: InteractionStore, model_version: str, cutoff: datetime | None, window: int
) -> tuple[Sample, Sample]:
    """The served model's last ``window`` scored answers since ``cutoff``, oldest half and newest half."""
    sql = "SELECT quality_score FROM interactions WHERE model_version = ? AND quality_status = 'scored'"
    params: list[Any] = [model_version]
    if cutoff is not None:
        sql += " AND timestamp >= ?"
        params.append(cutoff)
    rows = store._fetch(sql + " ORDER BY timestamp DESC, id DESC LIMIT ?", [*params, int(window)])
    scores = [float(r["quality_score"]) for r in reversed(rows) if r.get("quality_score") is not None]
    half = len(scores) // 2
    return Sample.of(scores[: len(scores) - half]), Sample.of(scores[len(scores) - half :])


def training_set_quality(registry: AdapterRegistry, champion: str | None) -> tuple[Sample | None, str]:
    """The quality of the champion's training set, from the histogram in the manifest of the dataset
    its lineage names (bin midpoints give the spread), and a note on where it came from or why
    there is none."""
    if champion is None:
        return None, "no champion adapter yet: the base model learned from no interactions"
    row = registry.get(champion)
    lineage = ((row or {}).get("manifest") or {}).get("lineage") or {}
    uri = lineage.get("dataset_uri")
    if not uri:
        return None, f"the champion {champion} names no training dataset in its lineage"
    try:
        histogram = _dataset_histogram(uri)
    except Exception as exc:  # gone, unreadable, not a dataset: the trigger says so and does not fire
        log.warning("cannot read the champion's training set %s: %s", uri, exc)
        return None, f"the champion {champion}'s training set {uri} cannot be read ({type(exc).__name__}: {exc})"
    n = sum(histogram.counts)
    if not n or histogram.mean is None:
        return None, f"the champion {champion}'s training set {uri} has no rows"
    m2 = 0.0
    for left, right, count in zip(histogram.edges, histogram.edges[1:], histogram.counts):
        width = right - left
        m2 += count * (((left + right) / 2 - histogram.mean) ** 2 + width * width / 12)
    return Sample(n, float(histogram.mean), m2), f"the champion {champion}'s training set {uri}"


def _dataset_histogram(uri: str) -> Any:
    """The quality histogram of the dataset at ``uri`` (its folder, or a Parquet file in it)."""
    from app.artifacts import MANIFEST_FILE, locate
    from app.learning.dataset.write import QualityHistogram

    where = locate(uri)
    if where.name.endswith(".parquet") or where.is_file():  # a split's file: the manifest is beside it
        where = where.parent
    with where.filesystem.open_input_stream(where.child(MANIFEST_FILE).path) as stream:
        manifest = json.loads(stream.read().decode("utf-8"))
    return QualityHistogram.model_validate(manifest["quality_histogram"])


# --- the triggers --------------------------------------------------------------------------------


def _since(cutoff: datetime | None) -> str:
    return f"since the data cut-off {cutoff.isoformat(timespec='seconds')}" if cutoff else "in the store (no cycle yet)"


def check_volume(e: DataEvidence, training: TrainingConfig) -> TriggerCheck:
    """Fires at ``training.min_interactions`` (at least one) new interactions above the threshold."""
    need = max(1, training.min_interactions)
    evidence = {"new": e.new.n, "needed": need, "threshold": e.threshold}
    words = f"{e.new.n} new interactions at or above quality {e.threshold:g} {_since(e.cutoff)}"
    if e.new.n >= need:
        return TriggerCheck("volume", True, f"{words}, at least the {need} of training.min_interactions", evidence)
    return TriggerCheck("volume", False, f"{words}, fewer than the {need} of training.min_interactions", evidence)


def check_quality(e: DataEvidence, training: TrainingConfig) -> TriggerCheck:
    """Fires when the new data is significantly better than the champion's training set by
    ``training.quality_margin``, or the served model's live quality fell significantly by it."""
    margin, n_opt = training.quality_margin, max(1.0, training.quality_window / 2)
    evidence: dict[str, Any] = {"margin": margin}
    words: list[str] = []
    if e.training_set is None:
        words.append(f"new data against the champion's training set: not compared ({e.training_set_note})")
    elif e.new.n == 0:
        words.append("new data against the champion's training set: no new interactions above the threshold")
    else:
        better = mean_difference(e.training_set, e.new, alpha=TREND_ALPHA, n_opt=n_opt)
        evidence["new_minus_training_set"] = better.to_json()
        text = (
            f"new data's mean quality {e.new.mean:.3f} ({e.new.n}) minus the champion's training set's "
            f"{e.training_set.mean:.3f} ({e.training_set.n}): {better}"
        )
        if better.estimate >= margin and better.low > 0:
            return TriggerCheck(
                "quality", True, f"{text}, better by at least {margin:g} (training.quality_margin)", evidence
            )
        words.append(f"{text}, not significantly better by {margin:g} (training.quality_margin)")
    trend = mean_difference(e.live_older, e.live_newer, alpha=TREND_ALPHA, n_opt=n_opt)
    evidence["live_newer_minus_older"] = trend.to_json()
    served = e.live_older.n + e.live_newer.n
    text = (
        f"live quality of {e.served_model} over its last {served} scored answers {_since(e.cutoff)}: newer half "
        f"{e.live_newer.mean:.3f} minus older half {e.live_older.mean:.3f} = {trend}"
    )
    if trend.estimate <= -margin and trend.high < 0:
        return TriggerCheck(
            "quality", True, f"{text}, falling by at least {margin:g} (training.quality_margin)", evidence
        )
    words.append(f"{text}, not significantly falling by {margin:g}")
    return TriggerCheck("quality", False, "; ".join(words), evidence)


def check_time(e: DataEvidence, training: TrainingConfig) -> TriggerCheck:
    """Fires ``training.interval_hours`` after the last cycle started (before the first: after the
    oldest unlearned interaction), when there is new data."""
    if e.last_cycle_at is not None:
        since, what = e.last_cycle_at, "the last cycle started"
    else:
        since, what = e.oldest_new_at, "the oldest unlearned interaction"
    evidence: dict[str, Any] = {"interval_hours": training.interval_hours, "new": e.new.n}
    if since is None:
        return TriggerCheck("time", False, "no cycle yet and no interaction above the threshold", evidence)
    hours = (e.now - since).total_seconds() / 3600
    evidence.update(hours=round(hours, 3), since=since.isoformat())
    words = f"{hours:.1f} h since {what} (training.interval_hours {training.interval_hours:g})"
    if hours < training.interval_hours:
        return TriggerCheck("time", False, words, evidence)
    if e.new.n == 0:
        return TriggerCheck("time", False, f"{words}, but no new interaction above the threshold", evidence)
    return TriggerCheck("time", True, f"{words}, with {e.new.n} new interactions above the threshold", evidence)


TRIGGERS: tuple[Callable[[DataEvidence, TrainingConfig], TriggerCheck], ...] = (check_volume, check_quality, check_time)
"""The automatic triggers, in the order their reasons are reported."""


def check_triggers(e: DataEvidence, training: TrainingConfig) -> list[TriggerCheck]:
    """Every automatic trigger's answer on ``e``."""
    return [trigger(e, training) for trigger in TRIGGERS]


def fired(checks: Sequence[TriggerCheck]) -> list[TriggerCheck]:
    """The checks that fired."""
    return [c for c in checks if c.fired]
