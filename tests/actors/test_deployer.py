"""The deployer actor under real Ray: named and detached in its namespace, ticking on its own,
killed in the middle of a canary and restarted by Ray, going on from the store where it was.

The tests of the logic itself, on both store engines, are in tests/app/deployment/."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from actors.deployer import ACTOR_NAME, deployer_handle, start_deployer, stop_deployer
from app.config import KaizenConfig
from app.deployment.state import DeploymentStore
from app.registry import AdapterRegistry
from app.store.sqlite import SQLiteStore
from tests.app.deployment.helpers import Endpoint, make_champion, register, serve, validate
from tests.conftest import wait_for

OLD, NEW = "adp-old", "adp-new"


@pytest.mark.integration
def test_actor_killed_mid_canary_resumes_where_it_was(ray_session: None, tmp_path: Path) -> None:
    import ray

    endpoint = Endpoint()  # Kaizen's chat endpoint, for the smoke test
    host, port = endpoint.url.removeprefix("http://").split(":")
    namespace = f"kaizen-deployer-test-{uuid.uuid4().hex[:6]}"
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "kaizen.db")},
            "privacy": {"hmac_key": "k"},
            "serve": {"host": host, "port": int(port)},
            "ray": {"namespace": namespace},
            "model": {"base_model": "tiny", "deployment_strategy": "staged"},
            "deploy": {"check_interval_s": 0.2, "min_interactions_per_arm": 20},
        }
    )
    store = SQLiteStore(cfg.store.sqlite_path)
    store.migrate()
    deployments = DeploymentStore(store)
    register(store, OLD, NEW)
    make_champion(store, OLD)
    validate(store, NEW)
    deployments.heartbeat("replica-1", [OLD, NEW])
    try:
        handle = start_deployer(cfg, detached=True)
        assert deployer_handle(namespace) is not None
        d = wait_for("the canary", lambda: (x := deployments.active()) is not None and x.state == "canary" and x)
        assert endpoint.requests[-1][1]["model"] == NEW  # smoke-tested through the endpoint first
        before = ray.get(handle.status.remote())
        assert before["active"]["id"] == d.id and before["deployer"]["last_error"] is None

        ray.kill(handle, no_restart=False)  # dies mid-canary; Ray starts it again
        # The kill lands asynchronously: a call sent at once may still be answered by the old process.
        after = wait_for(
            "the restarted deployer",
            lambda: (
                (x := ray.get(handle.status.remote(), timeout=120))["deployer"]["pid"] != before["deployer"]["pid"]
                and x
            ),
        )
        assert after["active"]["id"] == d.id and after["active"]["state"] == "canary"

        serve(store, 200, model=OLD, arm="champion", deployment_id=d.id, quality=0.8, seed=1)
        serve(store, 30, model=NEW, arm="challenger", deployment_id=d.id, quality=0.82, seed=2)
        d = wait_for("the promotion", lambda: (x := deployments.get(d.id)).state == "watching" and x)
        decisions = [r["decision"] for r in deployments.decisions(d.id)]
        assert decisions.count("start") == 1 and decisions.count("canary") == 1 and decisions[-1] == "promote"
        assert AdapterRegistry(store).champion() == NEW
        assert len(deployments.list()) == 1  # the restarted actor went on with the same deployment
        with pytest.raises(ValueError, match="only a canary can be paused"):  # a refusal comes back as it was
            ray.get(handle.pause.remote(None, "alice", "not a canary any more"), timeout=30)
    finally:
        assert stop_deployer(namespace)
        assert deployer_handle(namespace) is None
        assert not stop_deployer(namespace)
        endpoint.close()
        store.close()
    with pytest.raises(ValueError):
        ray.get_actor(ACTOR_NAME, namespace=namespace)
