"""Both engines pass the same tests: SQLite in a temp file, PostgreSQL on the real local server."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from app.config import KaizenConfig
from app.ingest import IngestPipeline
from app.store import InteractionStore
from app.store.base import MIGRATIONS

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pipeline() -> IngestPipeline:
    return IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "test-key"}}))


def interaction(i: int, session: str = "s1", ts: datetime = T0, **extra) -> dict:
    body = {
        "session_id": session,
        "input": {"raw": f"write function number {i}", "type": "prompt", "complexity": "simple"},
        "output": {
            "content": f"```python\ndef f{i}():\n    return {i}\n```",
            "format": "markdown",
            "generation_time_ms": 120.5,
            "token_count": 12,
        },
        "metadata": {"model_version": "base", "temperature": 0.2, "stop_sequences": ["<|im_end|>"]},
    }
    body.update(extra)
    return {"id": f"int-{i}", "type": "interaction", "timestamp": ts.isoformat(), "body": body}


def commit(store: InteractionStore, pipeline: IngestPipeline, events: list[dict]) -> list[str]:
    prepared = pipeline.prepare(events, now=T0 + timedelta(days=1))
    return [r.status for r in prepared.finish(store.write(prepared.to_commit))]


def test_migrations_are_versioned_and_idempotent(store: InteractionStore) -> None:
    assert store.schema_version() == max(v for v, _, _ in MIGRATIONS)
    assert store.migrate() == []


def test_batch_write_is_idempotent_on_event_id(store, pipeline) -> None:
    events = [interaction(i) for i in range(3)]
    assert commit(store, pipeline, events) == ["accepted"] * 3
    # A retry of the same batch, plus a repeat inside one batch: written once.
    assert commit(store, pipeline, events + [interaction(3), interaction(3)]) == [
        "duplicate",
        "duplicate",
        "duplicate",
        "accepted",
        "duplicate",
    ]
    assert store.count("interactions") == 4
    assert store.count("events") == 4


def test_interaction_round_trip_with_nested_records(store, pipeline) -> None:
    ev = interaction(
        1,
        context={"project_type": "library", "technologies": ["python"], "git": {"branch": "main", "stash_count": 0}},
        tool_calls=[{"tool_name": "read_file", "parameters_raw": {"path": "src/app.py"}, "success": True}],
        feedback={"explicit": {"rating": 4}, "implicit": {"accepted": True}},
        outcome={"code_compiles": True, "tests_pass": False},
    )
    assert commit(store, pipeline, [ev]) == ["accepted"]
    got = store.get_interaction("int-1")
    assert got["input_raw"] == "write function number 1"
    assert got["streaming"] is False and got["stop_sequences"] == ["<|im_end|>"]
    assert got["context"]["git"]["branch"] == "main"
    assert [t["tool_name"] for t in got["tool_usage"]] == ["read_file"]
    assert got["tool_usage"][0]["parameters_raw"] == {"path": "src/app.py"}
    assert got["feedback"][0]["rating"] == 4 and got["feedback"][0]["accepted"] is True
    assert got["outcome"]["code_compiles"] is True and got["outcome"]["tests_pass"] is False
    assert got["outcome"]["lint_passes"] is None
    assert got["session_hash"] != "s1" and len(got["session_hash"]) == 32
    assert store.get_interaction("nope") is None


@pytest.mark.parametrize("feedback_first", [True, False])
def test_feedback_and_outcome_attach_in_either_order(store, pipeline, feedback_first: bool) -> None:
    fb = {
        "id": "fb-1",
        "type": "feedback",
        "timestamp": T0.isoformat(),
        "body": {"interaction_id": "int-7", "explicit": {"thumbs": "down", "comment": "wrong"}},
    }
    oc = {
        "id": "oc-1",
        "type": "outcome",
        "timestamp": T0.isoformat(),
        "body": {"interaction_id": "int-7", "lint_passes": True},
    }
    tool = {
        "id": "tu-1",
        "type": "tool_usage",
        "timestamp": T0.isoformat(),
        "body": {"interaction_id": "int-7", "tool_name": "run_tests", "exit_code": 1, "success": False},
    }
    order = [[fb, oc, tool], [interaction(7)]]
    for batch in order if feedback_first else order[::-1]:
        assert set(commit(store, pipeline, batch)) == {"accepted"}
    got = store.get_interaction("int-7")
    assert got["feedback"][0]["thumbs"] == "down"
    assert got["outcome"]["lint_passes"] is True
    assert got["tool_usage"][0]["exit_code"] == 1


def test_queries_by_session_time_and_quality(store, pipeline) -> None:
    events = [interaction(i, session="a" if i % 2 else "b", ts=T0 + timedelta(minutes=i)) for i in range(10)]
    commit(store, pipeline, events)
    for i in range(10):
        assert store.set_quality(f"int-{i}", overall=i / 10, confidence=0.5)
    assert not store.set_quality("missing", 0.5, 0.5)
    session_a = pipeline.privacy.hash_id("a")
    assert [r["id"] for r in store.query_interactions(session_hash=session_a)] == [f"int-{i}" for i in (1, 3, 5, 7, 9)]
    window = store.query_interactions(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=5))
    assert [r["id"] for r in window] == ["int-2", "int-3", "int-4"]
    good = store.query_interactions(min_quality=0.7)
    assert [r["id"] for r in good] == ["int-7", "int-8", "int-9"]
    mid = store.query_interactions(min_quality=0.3, max_quality=0.5, session_hash=session_a)
    assert [r["id"] for r in mid] == ["int-3", "int-5"]
    assert len(store.query_interactions(limit=4, offset=8)) == 2
    assert store.existing_ids(["int-1", "int-99"]) == {"int-1"}


def test_stats_counts_days_and_redactions(store, pipeline) -> None:
    secret = interaction(1, session="x")
    secret["body"]["input"]["raw"] = "mail me at jane.doe@example.com, key AKIAIOSFODNN7EXAMPLE"
    commit(store, pipeline, [secret, interaction(2, ts=T0 + timedelta(days=1))])
    stats = store.stats()
    assert stats["engine"] == store.engine and stats["interactions"] == 2
    assert [d["day"] for d in stats["per_day"]] == ["2026-11-01", "2026-11-02"]
    assert stats["redactions"].get("email") == 1 and stats["redactions"].get("aws_key") == 1
    stored = store.get_interaction("int-1")
    assert "jane.doe" not in stored["input_raw"] and "AKIAIOSFODNN7EXAMPLE" not in stored["input_raw"]
    assert stored["redactions"] == {"aws_key": 1, "email": 1}


def test_concurrent_writers_lose_nothing(store, pipeline) -> None:
    def worker(k: int) -> None:
        for j in range(5):
            commit(store, pipeline, [interaction(k * 1000 + j * 10 + n) for n in range(10)])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count("interactions") == 200


def test_ingestion_writes_only_known_tables(store) -> None:
    from app.store.base import StoredEvent

    with pytest.raises(ValueError, match="adapters"):
        store.write([StoredEvent("x", "interaction", T0, {"adapters": [{"id": "a"}]})])
    # The failed transaction left nothing behind, not even the ledger entry.
    assert store.count("events") == 0


def test_all_interaction_ids_walks_the_pages_in_id_order(store) -> None:
    from tests.conftest import ingest_samples

    ingest_samples(store, 11)  # and one with an empty answer: 12 interactions
    every = store.all_interaction_ids(page_size=5)
    assert len(every) == 12 and every == sorted(every) == store.interaction_ids(limit=100)
    assert store.all_interaction_ids(page_size=5, limit=7) == every[:7]
    assert store.all_interaction_ids(quality_status="scored") == []


def test_a_postgres_server_that_refuses_says_why(pg_dsn: str) -> None:
    """The server's own reason (here: no such database), not the pool's timeout."""
    import psycopg

    from app.store.postgres import PostgresStore

    missing = pg_dsn.rsplit("/", 1)[0] + "/kaizen_no_such_database"
    with pytest.raises(psycopg.OperationalError, match="kaizen_no_such_database"):
        PostgresStore(missing)
