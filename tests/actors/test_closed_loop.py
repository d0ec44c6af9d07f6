"""The whole loop under real Ray, Serve and HTTP, left alone: traffic alone leads to a promoted adapter.

Kaizen runs as ``kaizen up`` starts it (``actors.stack.start_kaizen``: collector, scorer and generator
on Serve, the scheduler and the deployer actors) on the tiny model. Simulated users
(``benchmarks.closed_loop.Population``, the official ``openai`` client and the Kaizen client)
ask for ``champion``; the right answer to every request is ``ok``, which the tiny model never
writes, so the users correct every answer. Nothing else is done: the scheduler's volume trigger
starts a cycle that learns from the corrections, the validation job's production verdict goes to
the deployer, the canary on live traffic promotes the challenger, and the users' acceptance rises.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.simulation import Population, Watcher, ack_family

pytestmark = pytest.mark.integration

ANSWER = "ok"


def _config(model_root: Path, work: Path, port: int):
    from app.config import KaizenConfig

    return KaizenConfig.model_validate(
        {
            "model": {
                "base_model": "tiny",
                "storage_root": str(model_root),
                "checkpoint_dir": str(work / "checkpoints"),
                "deployment_strategy": "staged",
            },
            "store": {"sqlite_path": str(work / "kaizen.db")},
            "privacy": {"hmac_key": "loop-test"},
            "ray": {"namespace": f"kaizen-loop-test-{uuid.uuid4().hex[:6]}"},
            "training": {
                "min_interactions": 24,
                "check_interval_s": 1,
                "resource_limits": {"max_system_memory_gb": 0.25},
            },
            "dataset": {"min_examples": 8, "keep_fraction": 1.0, "max_group_share": 1.0, "validation_fraction": 0.2},
            "learn": {"min_train_rows": 8, "max_group_share": 1.0, "max_duplicate_share": 1.0},
            "finetune": {
                "lr": 1e-2,
                "epochs": 10,
                "max_steps": 40,
                "batch_size": 8,
                "max_length": 64,
                "early_stopping_patience": 0,
                "num_workers": 1,
                "cpus_per_worker": 1,
            },
            # The tiny model's latency doubles with an unmerged adapter; the gate is for real weights.
            "validation": {"max_new_tokens": 6, "max_examples": 8, "concurrency": [2], "max_latency_increase": 2.0},
            "deploy": {
                "canary_share": 0.5,
                "min_interactions_per_arm": 10,
                "non_inferiority_margin": 0.1,
                "max_latency_increase": 1.0,
                "watch_minutes": 0.1,
                "max_canary_minutes": 10,
                "check_interval_s": 0.5,
                "smoke_timeout_s": 90,
            },
            "serve": {
                "host": "127.0.0.1",
                "port": port,
                "app_name": "kaizen-loop-test",
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "generator": {
                    "num_cpus": 0.5,
                    "default_max_tokens": 6,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
            },
        }
    )


def test_traffic_alone_leads_to_a_promoted_adapter(ray_session, model_root: Path, tmp_path: Path) -> None:
    import ray
    from ray import serve

    from actors.stack import start_kaizen, stop_kaizen
    from app.deployment.state import DeploymentStore
    from app.registry import AdapterRegistry
    from app.scheduling.state import TrainingRunStore
    from app.store import open_store
    from tests.conftest import free_port

    serve.shutdown()  # another module's Serve would keep its own HTTP port
    cfg = _config(model_root, tmp_path, free_port())
    url = start_kaizen(cfg)
    # An error from the scorer replica is answered with its reason, not Ray's traceback around it.
    refused = httpx.post(f"{url}/v1/quality/assess", json={"prompt": "", "response": ""}, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "response", refused.text
    assert not any(m in refused.text for m in ("ray::", "pid=", "ip=", "actor_id", "File ", "Traceback", ".py")), (
        refused.text
    )
    users = Population(url, "tiny", users=12, threads=2, seed=0, max_tokens=6, pause_s=0.05)
    watcher = Watcher(cfg, users.started)
    try:
        users.set_phase(1, [ack_family(ANSWER)], 0.0)
        # Until a deployment has been promoted and watched to its end (cycles that fall short go on).
        promoted = users.run(
            lambda: any(e["what"].startswith("deployment") and e["value"] == "completed" for e in watcher.events),
            timeout_s=600,
        )
        promoted_at = next(
            (e["t"] for e in watcher.events if e["what"] == "champion" and e["value"] != "(base model)"), None
        )
        assert promoted and promoted_at is not None, (watcher.events, ray.available_resources())
        # The users go on with the promoted champion.
        before = users.count()
        users.run(lambda: users.count() >= before + 30, timeout_s=180)
    finally:
        delivered = users.close()
        watcher.close()
        stop_kaizen(cfg, end_cycles=True)
    assert delivered

    failed = [r.failed for r in users.requests if r.failed]
    assert not failed, failed[:5]
    early = [r.correct for r in users.requests if r.t < promoted_at][:30]
    late = [r.correct for r in users.requests if r.t > promoted_at][-30:]
    assert sum(early) == 0 and sum(late) / len(late) >= 0.9, (early, late)

    store = open_store(cfg.store)
    try:
        runs = TrainingRunStore(store).list()
        adapter_id = AdapterRegistry(store).champion()
        deployments = DeploymentStore(store).list()
        decisions = [d["code"] for d in TrainingRunStore(store).decisions(limit=50)]
        (started,) = store.audit_entries(action="config.apply")  # kaizen up audits what it starts with
        retention = store.audit_entries(action="retention.run")  # the scheduler's first daily run
    finally:
        store.close()
    assert started["details"]["changed"]["training.min_interactions"] == cfg.training.min_interactions
    assert len(started["details"]["sha256"]) == 64 and len(retention) == 1
    # The cycle that made the champion, started by the volume trigger, whose stages the store kept
    # (traffic goes on, so later cycles may have started since).
    (run,) = [r for r in runs if r.adapter_id == adapter_id]
    assert run.status == "succeeded" and run.trigger == "volume" and "started" in decisions
    stages = run.metrics["stages"]
    assert all(stages[name]["status"] == "done" for name in ("dataset", "dataset checks", "validation")), stages
    assert "production" in stages["validation"]["summary"]
    # The deployer canaried it on live traffic and promoted it on the evidence.
    (deployment,) = [d for d in deployments if d.adapter_id == adapter_id]
    assert deployment.state in ("watching", "completed") and deployment.strategy == "staged"
    assert any(e["what"].startswith("deployment") and e["value"] == "canary" for e in watcher.events)
    assert time.monotonic() - users.started < 900
