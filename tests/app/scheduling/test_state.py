"""Training runs and the scheduler's decisions in the store, on both engines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.scheduling.state import StaleRunError, TrainingRunNotFoundError, TrainingRunStore
from app.store import InteractionStore


def test_one_scheduled_and_one_running_run_with_their_json(store: InteractionStore) -> None:
    runs = TrainingRunStore(store)
    t0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
    first = runs.schedule(t0, triggers={"volume": "120 new interactions"})
    again = runs.schedule(t0 + timedelta(minutes=1), triggers={"volume": "130 new", "time": "25 h"})
    merged = runs.schedule(t0 + timedelta(minutes=2), request={"actor": "alice", "reason": "now"})
    assert first.id == again.id == merged.id and len(runs.list()) == 1
    assert merged.triggers["volume"] == {
        "reason": "130 new",
        "first_at": t0.isoformat(),
        "last_at": (t0 + timedelta(minutes=1)).isoformat(),
    }
    assert merged.trigger == "manual" and merged.reasons() == ["volume: 130 new", "time: 25 h", "manual: alice: now"]

    running = runs.claim(merged, t0 + timedelta(minutes=3), data_cutoff=t0 + timedelta(minutes=3), needs={"CPU": 1})
    assert running.status == "running" and running.started_at == t0 + timedelta(minutes=3)
    assert running.data_cutoff == t0 + timedelta(minutes=3) and running.config["needs"] == {"CPU": 1}
    with pytest.raises(StaleRunError, match="no longer scheduled"):
        runs.claim(merged, t0, data_cutoff=t0, needs={})
    second = runs.schedule(t0 + timedelta(minutes=4), triggers={"time": "25 h"})
    assert second.id != running.id and runs.scheduled().id == second.id and runs.running().id == running.id
    with pytest.raises(StaleRunError, match="another cycle is running"):
        runs.claim(second, t0, data_cutoff=t0, needs={})

    runs.set_launch(running.id, {"via": "ray_job", "job_id": "kaizen-run-1"})
    runs.record_stage(running.id, "dataset", {"seconds": 2.0, "rows": 40})
    runs.record_stage(running.id, "training", {"seconds": 30.0})
    done = runs.finish(
        runs.get(running.id),
        "succeeded",
        t0 + timedelta(hours=1),
        reason="adapter adp-1 registered",
        adapter_id="adp-1",
    )
    assert done.launched and done.config["launch"]["job_id"] == "kaizen-run-1"
    assert done.metrics == {
        "stages": {"dataset": {"seconds": 2.0, "rows": 40}, "training": {"seconds": 30.0}},
        "reason": "adapter adp-1 registered",
    }
    assert (done.status, done.adapter_id, done.finished_at) == ("succeeded", "adp-1", t0 + timedelta(hours=1))
    assert runs.last_succeeded().id == done.id and runs.last_started().id == done.id
    with pytest.raises(ValueError, match="has already ended"):
        runs.finish(done, "failed", t0, reason="late")
    with pytest.raises(ValueError, match="not one of"):
        runs.finish(second, "running", t0, reason="?")  # type: ignore[arg-type]
    with pytest.raises(TrainingRunNotFoundError):
        runs.get("run-nope")
    assert runs.failures_in_a_row() == []


def test_decisions_are_audited_in_order(store: InteractionStore) -> None:
    runs = TrainingRunStore(store)
    t0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
    runs.decide(t0, "scheduler", "no_trigger", "nothing new", {"triggers": []})
    runs.decide(t0 + timedelta(minutes=1), "alice", "requested", "operator alice asked", {}, "run-1")
    assert [d["code"] for d in runs.decisions()] == ["no_trigger", "requested"]
    assert runs.last_decision() == {
        "at": (t0 + timedelta(minutes=1)).isoformat(),
        "actor": "alice",
        "target": "run-1",
        "code": "requested",
        "reason": "operator alice asked",
    }
    assert [d["code"] for d in runs.decisions(run_id="run-1")] == ["requested"]
    rows = store._fetch("SELECT action FROM audit_log")
    assert {r["action"] for r in rows} == {"training.decision"}
