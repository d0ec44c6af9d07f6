"""``QualityService``: scores stored interactions and writes the scores back; a plain class that
the scorer deployment and ``jobs/score.py`` wrap. Requests for the same content are answered from
an LRU cache keyed by a hash of everything the score depends on."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from app.quality import ASSESSOR_VERSION, assess_text, record_arguments
from app.quality.calibration import Calibration, CalibrationReport, fit_calibration
from app.schemas import QualityScore
from app.store import InteractionStore

__all__ = ["QualityService"]


def _content_key(record: Mapping[str, Any]) -> str:
    fields = ("input_raw", "output_content", "generation_time_ms", "feedback", "outcome", "context", "timestamp")
    payload = json.dumps({f: record.get(f) for f in fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class QualityService:
    """Score interactions by id, or every pending one, and store the results."""

    def __init__(self, store: InteractionStore, cache_size: int = 10_000):
        self.store = store
        self.cache_size = cache_size
        self._cache: OrderedDict[str, QualityScore] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.calibration: Calibration | None = None
        self.refresh_calibration()

    def refresh_calibration(self) -> Calibration | None:
        """Use the store's active calibration (the seed's weights when there is none)."""
        row = self.store.active_calibration()
        calibration = Calibration.from_row(row) if row else None
        if calibration != self.calibration:
            with self._lock:
                self.calibration = calibration
                self._cache.clear()  # cached scores were combined with the old weights
        return calibration

    def assess(self, record: Mapping[str, Any], execute: bool = True) -> QualityScore:
        """Score one interaction record (as the store returns it), through the cache."""
        key = _content_key(record) + ("" if execute else ":static")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        score = assess_text(**record_arguments(record), execute=execute, calibration=self.calibration)
        with self._lock:
            self.misses += 1
            self._cache[key] = score
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return score

    def score_batch(
        self, interaction_ids: Sequence[str], execute: bool = True
    ) -> dict[str, QualityScore | Literal["no_evidence", "missing"]]:
        """Score and store the given interactions (the scores in one transaction); for each id its
        score, ``"no_evidence"`` (an empty response: nothing to assess, ever) or ``"missing"``."""
        out: dict[str, QualityScore | Literal["no_evidence", "missing"]] = {}
        for interaction_id in interaction_ids:
            record = self.store.get_interaction(interaction_id)
            if record is None:
                out[interaction_id] = "missing"
                continue
            try:
                out[interaction_id] = self.assess(record, execute)
            except ValueError:
                self.store.set_quality(interaction_id, None, None, status="no_evidence")
                out[interaction_id] = "no_evidence"
        scores = [(i, s) for i, s in out.items() if isinstance(s, QualityScore)]
        if scores:
            self.store.save_scores(scores)
        return out

    def score_ids(self, interaction_ids: Sequence[str]) -> dict[str, QualityScore]:
        """Score and store the given interactions; unknown and empty ones are left out."""
        return {i: s for i, s in self.score_batch(interaction_ids).items() if isinstance(s, QualityScore)}

    def score_pending(self, limit: int = 500) -> int:
        """Score interactions still marked pending (committed while the scorer was slow or down)."""
        self.refresh_calibration()
        pending = self.store.query_interactions(quality_status="pending", limit=limit)
        return len(self.score_ids([r["id"] for r in pending]))

    def calibrate(
        self, *, min_ratings: int = 50, test_fraction: float = 0.25, seed: int = 0, activate: bool = True
    ) -> CalibrationReport:
        """Fit a calibration to the human ratings in the store (``kaizen calibrate``) and, when it
        ranks the held-out ratings at least as well as the seed's weights, store it as the active
        one. Interactions scored before keep their scores until ``jobs/score.py`` re-scores them."""
        samples = []
        for interaction_id, rating in sorted(self.store.mean_ratings().items()):
            # Dimension scores do not depend on the calibration: reuse any stored under this
            # assessor version, and assess (and store) only the rated interactions never scored.
            rows = [
                r
                for r in self.store.quality_scores(interaction_id)
                if r["assessor_version"].split("+")[0] == ASSESSOR_VERSION
            ]
            if rows:
                samples.append((rows[0]["components"], rows[0].get("cap"), rating))
                continue
            score = self.score_batch([interaction_id]).get(interaction_id)
            if isinstance(score, QualityScore):
                samples.append((score.components, score.cap, rating))
        report = fit_calibration(samples, min_ratings=min_ratings, test_fraction=test_fraction, seed=seed)
        if report.calibration is not None:
            self.store.save_calibration(
                report.calibration.version,
                "positive-linear+linear-map",
                report.calibration.params(),
                {
                    "ratings": report.ratings,
                    "train": report.train,
                    "test": report.test,
                    "seed_weights": report.seed,
                    "calibrated": report.calibrated,
                },
                activate=activate,
            )
            if activate:
                self.refresh_calibration()
        return report
