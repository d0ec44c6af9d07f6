"""The scheduler actor under real Ray: named and detached in its namespace, checking on its own with
the cluster's real free resources, an operator's request starting a real cycle (``python -m
jobs.learn`` as a process joined to the cluster: the test's Ray runs no job server), whose end is
read back from its exit status and output, then removed.

The tests of the logic itself, on both store engines, are in tests/app/scheduling/."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from actors.scheduler import ACTOR_NAME, scheduler_handle, start_scheduler, stop_scheduler
from app.config import KaizenConfig
from app.scheduling.state import TrainingRunStore
from app.store.sqlite import SQLiteStore
from tests.conftest import wait_for


@pytest.mark.integration
def test_actor_checks_starts_a_requested_cycle_and_reads_its_end(ray_session: None, tmp_path: Path) -> None:
    import ray

    namespace = f"kaizen-scheduler-test-{uuid.uuid4().hex[:6]}"
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "kaizen.db")},
            "privacy": {"hmac_key": "k"},
            "ray": {"namespace": namespace},
            "model": {"checkpoint_dir": str(tmp_path / "checkpoints"), "storage_root": str(tmp_path / "root")},
            "training": {
                "check_interval_s": 0.5,
                "min_interactions": 10,
                "resource_limits": {"max_system_memory_gb": 0.25},
            },
        }
    )
    store = SQLiteStore(cfg.store.sqlite_path)
    store.migrate()
    runs = TrainingRunStore(store)
    try:
        handle = start_scheduler(cfg, detached=True)
        assert scheduler_handle(namespace) is not None
        status = wait_for("a check", lambda: (s := ray.get(handle.status.remote()))["scheduler"]["ticks"] and s)
        assert status["scheduler"]["last_error"] is None and status["last_decision"]["code"] == "no_trigger"
        assert status["resources"]["ok"] and 0 < status["resources"]["free"]["CPU"] <= 2
        assert [t["name"] for t in status["triggers"]] == ["volume", "quality", "time"]

        # The store is empty: the cycle starts, and stops at its dataset stage for want of data.
        run = ray.get(handle.request.remote("alice", "try the loop"), timeout=60)
        assert run["status"] == "running" and run["trigger"] == "manual", run
        launch = run["config"]["launch"]
        assert launch["via"] == "process" and "dataset.until=" in launch["command"]
        ended = wait_for("the cycle's end", lambda: (r := runs.get(run["id"])).status != "running" and r, 180)
        assert ended.status == "failed", ended.metrics
        assert "kaizen learn: not enough data for a cycle" in ended.metrics["reason"]
        assert Path(launch["log"]).read_text().startswith("[1/5] dataset")
        after = ray.get(handle.status.remote())
        assert after["recent"][0]["id"] == run["id"] and after["backoff"]["failures"] == 1
        about = [d["code"] for d in runs.decisions() if d["target"] == run["id"]]
        assert about == ["requested", "started", "failed"]
    finally:
        assert stop_scheduler(namespace)
        assert scheduler_handle(namespace) is None
        assert not stop_scheduler(namespace)
        store.close()
    with pytest.raises(ValueError):
        ray.get_actor(ACTOR_NAME, namespace=namespace)
