"""Scoring stored interactions and writing the scores back, on both store engines."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from app.config import KaizenConfig
from app.ingest import IngestPipeline
from app.quality.service import QualityService
from app.sample import sample_interactions
from app.store import InteractionStore
from app.store.postgres import PostgresStore
from app.store.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path) -> InteractionStore:
    s = SQLiteStore(tmp_path / "k.db") if request.param == "sqlite" else PostgresStore(request.getfixturevalue("pg_dsn"))
    s.migrate()
    yield s
    s.close()


def _ingest(store: InteractionStore, n: int) -> list[str]:
    pipeline = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "k"}}))
    events = []
    for s in sample_interactions(n, seed=5):
        it = s.interaction
        body = {"session_id": it["session_id"], "input": {"raw": it["prompt"]},
                "output": {"content": it["response"], "generation_time_ms": it["generation_time_ms"]},
                "context": it["context"]}  # fmt: skip
        if s.feedback:
            body["feedback"] = {"explicit": {"rating": s.feedback["rating"]}} if s.feedback.get("rating") else None
        events.append({"id": it["id"], "type": "interaction", "timestamp": it["timestamp"],
                       "body": {k: v for k, v in body.items() if v is not None}})  # fmt: skip
    events.append({"id": "empty", "type": "interaction", "timestamp": datetime.now(timezone.utc).isoformat(),
                   "body": {"session_id": "s", "input": {"raw": "hi"}, "output": {"content": ""}}})  # fmt: skip
    prepared = pipeline.prepare(events)
    assert all(r.status == "accepted" for r in prepared.finish(store.write(prepared.to_commit)))
    return [e["id"] for e in events]


def test_pending_interactions_are_scored_and_stored(store: InteractionStore) -> None:
    ids = _ingest(store, 12)
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
    ids = _ingest(store, 3)
    service = QualityService(store, cache_size=2)
    first = service.score_ids(ids[:1])
    again = service.score_ids(ids[:1])
    assert service.hits == 1 and first[ids[0]] == again[ids[0]]
    assert len(store.quality_scores(ids[0])) == 1  # one row per assessor version, replaced
    service.score_ids(ids[:3])
    assert len(service._cache) == 2  # least recently used evicted
    assert service.score_ids(["no-such-id"]) == {}
