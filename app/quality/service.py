"""``QualityService``: scores stored interactions and writes the scores back; a plain class that
the scorer deployment and ``jobs/score.py`` wrap. Requests for the same content are answered from
an LRU cache keyed by a hash of everything the score depends on.

The real-time assessment (:meth:`QualityService.score_within`) has a time budget
(``quality.assessment_timeout_ms``). An interaction not scored in full within it gets the cheap
fallback score (:meth:`QualityService.fallback_score`, with ``quality.fallback_on_timeout``) or
stays pending; either way the full assessment, once it finishes, stores its score over the fallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any, Literal

from app.quality import ASSESSOR_VERSION, assess_text, record_arguments
from app.quality.aggregate import aggregate
from app.quality.calibration import Calibration, CalibrationReport, fit_calibration
from app.quality.correctness import assess_correctness
from app.quality.efficiency import assess_efficiency
from app.quality.satisfaction import assess_satisfaction
from app.quality.streaming import CircuitBreaker
from app.schemas import QualityScore
from app.store import InteractionStore

__all__ = ["FALLBACK_VERSION", "QualityService", "RealtimeResult"]

log = logging.getLogger("kaizen.quality")

# The assessor version of a fallback score. Not ASSESSOR_VERSION followed by "+": calibration reuses
# the stored components of that version, and a fallback score lacks most dimensions.
FALLBACK_VERSION = ASSESSOR_VERSION + "-fallback"
Outcome = QualityScore | Literal["no_evidence", "missing"]


@dataclass
class RealtimeResult:
    """What :meth:`QualityService.score_within` did with each interaction.

    ``status``: ``scored`` (in full), ``no_evidence``, ``missing``, ``fallback`` (the cheap score
    stored, the full one to follow) or ``pending``. ``running``: full assessments
    still running past the budget; each stores its score when done. ``not_started``: interactions
    whose full assessment never started within the budget; hand them to a later scoring.
    """

    status: dict[str, str] = field(default_factory=dict)
    running: list[Future] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)


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

    def score_batch(self, interaction_ids: Sequence[str], execute: bool = True) -> dict[str, Outcome]:
        """Score and store the given interactions (the scores in one transaction); for each id its
        score, ``"no_evidence"`` (an empty response: nothing to assess, ever) or ``"missing"``."""
        out: dict[str, Outcome] = {}
        for interaction_id in interaction_ids:
            out[interaction_id] = self._assess_id(interaction_id, execute)
            if out[interaction_id] == "no_evidence":
                self.store.set_quality(interaction_id, None, None, status="no_evidence")
        scores = [(i, s) for i, s in out.items() if isinstance(s, QualityScore)]
        if scores:
            self.store.save_scores(scores)
        return out

    def fallback_score(self, record: Mapping[str, Any]) -> QualityScore | None:
        """The cheap score of an interaction record: feedback, reported outcomes or static checks
        (parse and compile, nothing run) and timing; no code-quality analysers, no embedding.
        None when none of these has evidence."""
        args = record_arguments(record)
        feedback = args["feedback"]
        found = (
            assess_satisfaction([feedback] if isinstance(feedback, Mapping) else list(feedback or [])),
            assess_correctness(args["response"], args["outcome"], prompt=args["prompt"], execute=False),
            assess_efficiency(args["response"], args["generation_time_ms"]),
        )
        components = {c.name: c for c in found if c is not None}
        if not components:
            return None
        score = aggregate(
            components, context=args["context"], timestamp=args["timestamp"], calibration=self.calibration
        )
        return score.model_copy(
            update={"assessor_version": FALLBACK_VERSION + score.assessor_version.removeprefix(ASSESSOR_VERSION)}
        )

    def _assess_id(self, interaction_id: str, execute: bool = True) -> Outcome:
        record = self.store.get_interaction(interaction_id)
        if record is None:
            return "missing"
        try:
            return self.assess(record, execute)
        except ValueError:
            return "no_evidence"

    def _store_outcome(self, interaction_id: str, outcome: Outcome) -> str:
        if isinstance(outcome, QualityScore):
            self.store.save_scores([(interaction_id, outcome)])
            return "scored"
        if outcome == "no_evidence":
            self.store.set_quality(interaction_id, None, None, status="no_evidence")
        return outcome

    def score_within(
        self,
        interaction_ids: Sequence[str],
        *,
        timeout_s: float,
        fallback: bool,
        executor: Executor,
        breaker: CircuitBreaker | None = None,
    ) -> RealtimeResult:
        """The real-time assessment: score these interactions in full on ``executor`` and store
        each score as it is ready, waiting at most ``timeout_s``. Past it, an interaction gets the
        cheap :meth:`fallback_score` (``fallback``) or stays pending; a full assessment that started
        keeps running and stores its score over the fallback when it finishes.

        With a ``breaker``, a call that misses its budget counts as a failure; while the breaker is
        open nothing is submitted (every interaction goes straight to the fallback or stays pending),
        so callers that wait stop waiting for an executor that cannot keep up.
        """
        result = RealtimeResult()
        ids = list(dict.fromkeys(interaction_ids))
        finished: dict[str, str] = {}  # what the full assessments stored: a fallback never overwrites it
        lock = threading.Lock()

        def score_one(interaction_id: str) -> str:
            outcome = self._assess_id(interaction_id)
            with lock:
                finished[interaction_id] = self._store_outcome(interaction_id, outcome)
                return finished[interaction_id]

        late = []
        if breaker is not None and not breaker.allow():
            result.not_started, late = ids, ids
        else:
            futures = {i: executor.submit(score_one, i) for i in ids}
            wait(list(futures.values()), timeout=timeout_s)
            for interaction_id, future in futures.items():
                if future.cancel() or future.cancelled():  # False once it runs or is done
                    result.not_started.append(interaction_id)
                elif not future.done():
                    result.running.append(future)
                elif future.exception() is None:
                    result.status[interaction_id] = future.result()
                    continue
                else:  # the store failed: it stays pending for the sweep
                    log.error("scoring %s failed: %r", interaction_id, future.exception())
                    result.status[interaction_id] = "pending"
                    continue
                late.append(interaction_id)
            if breaker is not None:
                breaker.record(not late)
        for interaction_id in late:
            result.status[interaction_id] = "pending"
            record = self.store.get_interaction(interaction_id) if fallback else None
            score = self.fallback_score(record) if record is not None else None
            with lock:
                if interaction_id in finished:
                    result.status[interaction_id] = finished[interaction_id]
                elif score is not None:
                    self.store.save_scores([(interaction_id, score)])
                    result.status[interaction_id] = "fallback"
        return result

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
