"""The live comparison reads each arm's evidence from a real store of either engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.deployment.live import ArmEvidence, LiveComparison, accepted, satisfaction
from app.store import InteractionStore
from tests.app.deployment.helpers import fail, serve


def test_satisfaction_and_acceptance_from_feedback() -> None:
    assert satisfaction([]) is None and accepted([]) is None
    assert satisfaction([{"rating": 5}]) == 1.0
    assert satisfaction([{"rating": 1, "thumbs": "up"}]) == 0.5
    assert satisfaction([{"accepted": True}]) == 1.0
    assert satisfaction([{"accepted": True, "modified": True}]) == 0.5
    assert satisfaction([{"accepted": False}]) == 0.0
    assert satisfaction([{"abandoned": True, "accepted": True}]) == 0.0
    assert satisfaction([{"rating": 5, "corrected": 1}]) == 0.5
    assert satisfaction([{"rating": None, "thumbs": None, "corrected": 0}]) is None
    assert accepted([{"accepted": False}, {"accepted": None}, {"accepted": True}]) is True


def test_canary_arms_are_read_exactly(store: InteractionStore) -> None:
    """Only the deployment's own interactions count, split by the arm that served them."""
    serve(store, 12, model="adp-old", arm="champion", deployment_id="dep-1", quality=0.8, sd=0.0, latency_ms=100)
    serve(
        store,
        6,
        model="adp-new",
        arm="challenger",
        deployment_id="dep-1",
        quality=0.6,
        sd=0.0,
        latency_ms=300,
        feedback={"explicit": {"rating": 2}, "implicit": {"accepted": False}},
        seed=1,
    )
    serve(store, 2, model="adp-new", arm="challenger", deployment_id="dep-1", quality=None, seed=2)  # not scored yet
    serve(store, 5, model="adp-new", arm="challenger", deployment_id="dep-0", quality=0.1, seed=3)  # another deployment
    serve(store, 5, model="adp-new", quality=0.1, seed=4)  # asked for the adapter by name: never an arm
    fail(store, 3, adapter_id="adp-new", arm="challenger", deployment_id="dep-1")
    fail(store, 1, adapter_id="adp-old", arm="champion", deployment_id="dep-0")

    live = LiveComparison(store).canary("dep-1")
    champion, challenger = live.champion, live.challenger
    assert (champion.completions, champion.quality.n, champion.failures) == (12, 12, 0)
    assert champion.quality.mean == pytest.approx(0.8) and champion.model == "adp-old"
    assert champion.satisfaction.n == 0 and champion.acceptance.n == 0
    assert (challenger.completions, challenger.quality.n, challenger.failures) == (8, 6, 3)
    assert challenger.quality.mean == pytest.approx(0.6) and challenger.model == "adp-new"
    assert challenger.errors.n == 11 and challenger.errors.rate == pytest.approx(3 / 11)
    assert challenger.satisfaction.n == 6 and challenger.satisfaction.mean == pytest.approx((0.25 + 0.0) / 2)
    assert (challenger.acceptance.successes, challenger.acceptance.n) == (0, 6)
    assert 270 <= challenger.latency_p50_ms <= 330 and challenger.latency_p95_ms >= challenger.latency_p50_ms
    assert 90 <= champion.latency_p50_ms <= 110 and champion.latency_n == 12
    assert ArmEvidence.from_json(challenger.to_json()) == challenger


def test_a_champion_served_since_and_before_a_time(store: InteractionStore) -> None:
    now = datetime.now(UTC)
    serve(store, 30, model="adp-old", quality=0.8, at=now - timedelta(hours=2))
    serve(store, 10, model="adp-old", quality=0.7, at=now - timedelta(minutes=30), seed=1)
    serve(store, 4, model="adp-new", arm="champion", quality=0.5, at=now + timedelta(seconds=1), seed=2)
    serve(store, 3, model="adp-new", quality=0.5, at=now - timedelta(minutes=1), seed=3)  # before the promotion
    fail(store, 2, adapter_id="adp-new", arm=None, deployment_id=None)
    fail(store, 1, adapter_id=None, arm=None, deployment_id=None)  # the base model's

    live = LiveComparison(store)
    new = live.served_since("adp-new", "adp-new", now)
    assert (new.completions, new.quality.n, new.failures) == (4, 4, 2)
    last = live.served_before("adp-old", "adp-old", now, limit=10)
    assert last.quality.n == 10 and last.quality.mean == pytest.approx(0.7, abs=0.05)
    everything = live.served_before("adp-old", "adp-old", now, limit=1000)
    assert everything.quality.n == 40 and everything.failures == 0
    assert live.served_before("tiny", None, now, limit=10) == ArmEvidence(model="tiny")
