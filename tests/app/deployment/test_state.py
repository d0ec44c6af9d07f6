"""The deployment store: one active deployment, compare-and-set transitions, the validations a
deployer takes up, failures and heartbeats, on each engine."""

from __future__ import annotations

import pytest

from app.deployment.state import DeploymentStore, StaleDeploymentError, in_canary
from app.store import InteractionStore


def test_one_deployment_at_a_time_and_a_stale_decision_is_refused(store: InteractionStore) -> None:
    deployments = DeploymentStore(store)
    first = deployments.create("adp-a", "staged", "preloading", actor="t", reason="verdict")
    with pytest.raises(ValueError, match="one deployment at a time"):
        deployments.create("adp-b", "staged", "preloading", actor="t", reason="verdict")
    moved = deployments.transition(first, "canary", actor="t", decision="canary", reason="smoke ok", share=0.1)
    assert (moved.state, moved.share, moved.version) == ("canary", 0.1, 1)
    assert deployments.canary_route().challenger == "adp-a"
    with pytest.raises(StaleDeploymentError):
        deployments.transition(first, "rolled_back", actor="t", decision="rollback", reason="stale read")
    ended = deployments.transition(moved, "rolled_back", actor="t", decision="rollback", reason="worse")
    assert ended.finished_at is not None and deployments.active() is None and deployments.canary_route() is None
    assert [d["decision"] for d in deployments.decisions(first.id)] == ["start", "canary", "rollback"]
    assert [a["action"] for a in deployments.audit(first.id)] == [
        "deployment.start",
        "deployment.canary",
        "deployment.rollback",
    ]


def test_a_validation_is_taken_up_once_and_again_after_a_later_validation(store: InteractionStore) -> None:
    deployments = DeploymentStore(store)
    deployments.record_validation("adp-a", "base:tiny", "production", {"accuracy": 0.9}, actor="t")
    deployments.record_validation("adp-b", "base:tiny", "staging", {}, actor="t")
    assert [v["adapter_id"] for v in deployments.undeployed_validations()] == ["adp-a"]
    failed = deployments.create("adp-a", "staged", "preloading", actor="t", reason="verdict")
    deployments.transition(failed, "failed", actor="t", decision="fail", reason="smoke test timed out")
    assert deployments.undeployed_validations() == []
    again = deployments.record_validation("adp-a", "base:tiny", "production", {}, actor="t")
    assert [v["id"] for v in deployments.undeployed_validations()] == [again["id"]]
    (audit,) = [a for a in deployments.audit("adp-a") if a["details"]["validation_id"] == again["id"]]
    assert audit["action"] == "validation.verdict" and audit["details"]["summary"] == {}


def test_failures_heartbeats_and_the_adapters_replicas_keep(store: InteractionStore) -> None:

    deployments = DeploymentStore(store)
    deployments.record_failure(
        model="champion", adapter_id="adp-a", serving_arm="challenger", deployment_id="dep-1", status=503, reason="x"
    )
    assert [f["serving_arm"] for f in deployments.failures(deployment_id="dep-1")] == ["challenger"]
    deployments.heartbeat("replica-1", ["adp-b", "adp-a"])
    assert deployments.replicas() == {"replica-1": ["adp-a", "adp-b"]}
    assert deployments.replicas(max_age_s=0.0) == {}
    active = deployments.create("adp-new", "staged", "preloading", actor="t", reason="v", previous_champion="adp-old")
    assert deployments.wanted_adapters() == ["adp-new", "adp-old"]
    assert active.previous_champion == "adp-old"


def test_canary_membership_is_sticky_and_close_to_the_share() -> None:
    inside = [in_canary(f"session-{i}", "dep-1", 0.1) for i in range(5000)]
    assert inside == [in_canary(f"session-{i}", "dep-1", 0.1) for i in range(5000)]
    assert 0.08 < sum(inside) / len(inside) < 0.12
    other = [in_canary(f"session-{i}", "dep-2", 0.1) for i in range(5000)]
    assert inside != other  # each deployment draws its own share
