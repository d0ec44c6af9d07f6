"""The scheduler actor under real Ray: named and detached in its namespace, checking on its own with
the cluster's real free resources, an operator's request starting a real cycle (``python -m
jobs.learn`` as a process joined to the cluster: the test's Ray runs no job server), asked for
over HTTP with ``kaizen learn --now``, whose end and stages are read back, then removed.

The tests of the logic itself, on both store engines, are in tests/app/scheduling/."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from actors.scheduler import ACTOR_NAME, scheduler_handle, start_scheduler, stop_scheduler
from app import cli
from app.config import KaizenConfig
from app.scheduling.state import TrainingRunStore
from app.store.sqlite import SQLiteStore
from tests.conftest import LocalServer, wait_for


@pytest.mark.integration
def test_actor_checks_starts_a_requested_cycle_and_reads_its_end(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
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

        # Through the API, as an operator asks (kaizen learn --now): the store is empty, so the cycle
        # starts, and stops at its dataset stage for want of data.
        server = LocalServer(cfg).start()
        try:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                seen = http.get("/v1/training").json()
                assert seen["scheduler"]["ticks"] >= 1 and seen["last_decision"]["code"] == "no_trigger"
            assert cli.main(["learn", "--now", "--url", server.url, "--reason", "try the loop", "--json"]) == 0
            run = json.loads(capsys.readouterr().out)
        finally:
            server.stop()
        assert run["status"] == "running" and run["trigger"] == "manual", run
        assert run["config"]["requests"][0]["reason"] == "try the loop"
        launch = run["config"]["launch"]
        assert launch["via"] == "process" and "dataset.until=" in launch["command"]
        ended = wait_for("the cycle's end", lambda: (r := runs.get(run["id"])).status != "running" and r, 180)
        assert ended.status == "failed", ended.metrics
        assert "kaizen learn: not enough data for a cycle" in ended.metrics["reason"]
        assert Path(launch["log"]).read_text().startswith("[1/6] dataset")
        assert f"learn.run_id={run['id']}" in launch["command"]
        dataset_stage = ended.metrics["stages"]["dataset"]
        assert dataset_stage["status"] == "failed" and dataset_stage["error"].startswith("NotEnoughData: ")
        after = ray.get(handle.status.remote())
        assert after["recent"][0]["id"] == run["id"] and after["backoff"]["failures"] == 1
        about = [d["code"] for d in runs.decisions() if d["target"] == run["id"]]
        assert about == ["requested", "started", "failed"]
        # Without the scheduler, asking is refused with the reason, not a trace.
        assert cli.main(["learn", "--now", "--url", "http://127.0.0.1:9"]) == 1
        assert "is kaizen up running?" in capsys.readouterr().err
    finally:
        assert stop_scheduler(namespace)
        assert scheduler_handle(namespace) is None
        assert not stop_scheduler(namespace)
        store.close()
    with pytest.raises(ValueError):
        ray.get_actor(ACTOR_NAME, namespace=namespace)
