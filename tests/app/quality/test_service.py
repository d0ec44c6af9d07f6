"""Scoring stored interactions and writing the scores back, on both store engines."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from app.quality import ASSESSOR_VERSION
from app.quality.service import FALLBACK_VERSION, QualityService
from app.quality.streaming import CircuitBreaker
from app.sample import sample_interactions
from app.store import InteractionStore
from tests.conftest import ingest_samples


def test_pending_interactions_are_scored_and_stored(store: InteractionStore) -> None:
    ids = ingest_samples(store, 12)
    service = QualityService(store)
    assert service.score_pending() == 12
    assert store.stats()["quality_status"] == {"scored": 12, "no_evidence": 1}
    assert service.score_pending() == 0  # nothing left pending
    record = store.get_interaction(ids[0])
    assert 0 <= record["quality_score"] <= 1 and record["quality_status"] == "scored"
    rows = store.quality_scores(ids[0])
    assert len(rows) == 1 and rows[0]["overall"] == pytest.approx(record["quality_score"])
    assert set(rows[0]["components"]) >= {"functional_correctness", "context_relevance", "efficiency"}
    assert len(store.query_interactions(min_quality=0.0, max_quality=1.0, limit=100)) == 12


def test_rescoring_replaces_and_the_cache_answers_repeats(store: InteractionStore) -> None:
    ids = ingest_samples(store, 3)
    service = QualityService(store, cache_size=2)
    first = service.score_ids(ids[:1])
    again = service.score_ids(ids[:1])
    assert service.hits == 1 and first[ids[0]] == again[ids[0]]
    assert len(store.quality_scores(ids[0])) == 1  # one row per assessor version, replaced
    service.score_ids(ids[:3])
    assert len(service._cache) == 2  # least recently used evicted
    assert service.score_ids(["no-such-id"]) == {}


def _rate_by_hand(store: InteractionStore, ids: list[str], n: int) -> None:
    """Ratings as a reviewer would give them: poor answers low, good ones high, with some spread."""
    rng = random.Random(3)
    for sample, interaction_id in zip(sample_interactions(n, seed=5), ids):
        rating = rng.choice([1, 2]) if sample.poor else rng.choice([4, 4, 5, 5, 3])
        store.add_rating(interaction_id, (rating - 1) / 4, rater="reviewer")


def test_calibration_fits_ratings_and_the_scorer_uses_it(store: InteractionStore) -> None:
    ids = ingest_samples(store, 80)
    service = QualityService(store)
    service.score_pending()
    # A reviewer who judges by efficiency alone, with some noise (the seed gives it a tenth of the
    # weight): the fit must find it, whatever the sample's other dimensions look like.
    rng = random.Random(1)
    for interaction_id in ids[:80]:
        components = store.quality_scores(interaction_id)[0]["components"]
        rating = components.get("efficiency", 0.5)
        store.add_rating(interaction_id, min(1.0, max(0.0, rating + rng.gauss(0, 0.02))), rater="reviewer")
    report = service.calibrate(min_ratings=40, seed=0)
    assert report.ratings == 80 and (report.train, report.test) == (60, 20)
    assert report.calibration is not None, report.reason
    assert report.calibration.weights["efficiency"] > 0.5
    assert report.calibrated["spearman"] > report.seed["spearman"] + 0.2
    active = store.active_calibration()
    assert active["version"] == report.calibration.version and active["metrics"]["test"] == 20
    # The service now combines with the fitted weights; a re-score is stored beside the old one.
    rescored = service.score_ids(ids[:3])
    assert all(s.assessor_version.endswith("+" + report.calibration.version) for s in rescored.values())
    assert len(store.quality_scores(ids[0])) == 2
    # Another scorer process picks it up from the store.
    assert QualityService(store).calibration == service.calibration


def test_too_few_ratings_keep_the_seed_weights_in_the_store(store: InteractionStore) -> None:
    ids = ingest_samples(store, 10)
    _rate_by_hand(store, ids, 10)
    report = QualityService(store).calibrate(min_ratings=50)
    assert report.calibration is None and store.active_calibration() is None


def test_review_queue_lists_low_confidence_unrated_interactions(store: InteractionStore) -> None:
    ids = ingest_samples(store, 6)
    QualityService(store).score_pending()
    queue = store.review_queue(max_confidence=1.0, limit=10)
    assert {r["id"] for r in queue} == set(ids[:6])  # the empty one has no score: nothing to review
    confidences = [r["quality_confidence"] for r in queue]
    assert confidences == sorted(confidences)
    store.add_rating(queue[0]["id"], 0.75, rater="ana", comment="fine", dimensions={"code_quality": 0.5})
    assert queue[0]["id"] not in {r["id"] for r in store.review_queue(1.0)}
    assert store.review_queue(max_confidence=0.0) == []
    (rating,) = store.ratings(queue[0]["id"])
    assert rating["rating"] == 0.75 and rating["dimensions"] == {"code_quality": 0.5}
    with pytest.raises(KeyError):
        store.add_rating("no-such-id", 0.5, rater="ana")


# --- the real-time assessment: quality.assessment_timeout_ms and quality.fallback_on_timeout ---------------


class Gate:
    """Holds every full assessment of ``service`` until opened (a scorer slower than its budget)."""

    def __init__(self, service: QualityService) -> None:
        self.opened = threading.Event()
        self.calls = 0
        full = service.assess

        def held(record, execute=True):
            self.calls += 1
            self.opened.wait(60)
            return full(record, execute)

        service.assess = held


def test_realtime_scores_in_full_within_the_budget(store: InteractionStore) -> None:
    ids = ingest_samples(store, 2)
    with ThreadPoolExecutor(1) as pool:
        result = QualityService(store).score_within(
            [ids[0], ids[1], "empty"], timeout_s=120, fallback=True, executor=pool
        )
    assert result.status == {ids[0]: "scored", ids[1]: "scored", "empty": "no_evidence"}
    assert not result.running and not result.not_started
    assert store.quality_scores(ids[0])[0]["assessor_version"] == ASSESSOR_VERSION


@pytest.mark.parametrize("fallback", [True, False])
def test_past_the_budget_the_fallback_score_or_pending(store: InteractionStore, fallback: bool) -> None:
    ids = ingest_samples(store, 2)
    service = QualityService(store)
    gate = Gate(service)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        result = service.score_within(ids[:2], timeout_s=0.3, fallback=fallback, executor=pool)
        assert time.monotonic() - started < 10  # the caller waits the budget, not the assessment
        # One thread: the first is running past the budget, the second never started (hand it off).
        assert len(result.running) == 1 and result.not_started == [ids[1]]
        want = "fallback" if fallback else "pending"
        assert result.status == {ids[0]: want, ids[1]: want}
        for interaction_id in ids[:2]:
            record = store.get_interaction(interaction_id)
            if fallback:  # the cheap score: no embedding, no analysers
                (row,) = store.quality_scores(interaction_id)
                assert row["assessor_version"] == FALLBACK_VERSION and record["quality_status"] == "scored"
                assert "context_relevance" not in row["components"] and "code_quality" not in row["components"]
            else:
                assert record["quality_status"] == "pending" and store.quality_scores(interaction_id) == []
        gate.opened.set()
        wait(result.running)
    # The full assessment that was running stores its score over the fallback when it finishes.
    assert store.quality_scores(ids[0])[0]["assessor_version"] == ASSESSOR_VERSION
    assert store.get_interaction(ids[0])["quality_status"] == "scored" and gate.calls == 1


def test_an_open_breaker_answers_at_once_without_assessing(store: InteractionStore) -> None:
    ids = ingest_samples(store, 2)
    service = QualityService(store)
    gate = Gate(service)
    breaker = CircuitBreaker(failures=1, reset_after_s=60)
    with ThreadPoolExecutor(1) as pool:
        first = service.score_within(ids[:1], timeout_s=0.2, fallback=False, executor=pool, breaker=breaker)
        assert first.status == {ids[0]: "pending"} and breaker.state == "open"
        started = time.monotonic()
        second = service.score_within(ids[1:2], timeout_s=5, fallback=True, executor=pool, breaker=breaker)
        assert time.monotonic() - started < 2 and second.not_started == [ids[1]]
        assert second.status == {ids[1]: "fallback"} and gate.calls == 1  # nothing submitted
        gate.opened.set()
        wait(first.running)


def test_fallback_score_uses_the_cheap_dimensions_only(store: InteractionStore) -> None:
    ids = ingest_samples(store, 1)
    service = QualityService(store)
    score = service.fallback_score(store.get_interaction(ids[0]))
    assert score is not None and score.assessor_version == FALLBACK_VERSION
    assert set(score.components) <= {"user_satisfaction", "functional_correctness", "efficiency"}
    assert service.fallback_score(store.get_interaction("empty")) is None  # nothing to judge
