"""The deployer on a real store of either engine, driven by measured evidence written the way the
Generator and the scorer write it: every decision going each way, the strategies, the operators'
actions, the watch, durability across restarts, and refused stale decisions."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from app.deployment.deployer import HOLD_RECORD_S, Deployer
from app.deployment.live import ArmEvidence, CanaryEvidence
from app.deployment.rules import decide_canary
from app.deployment.state import Deployment, DeploymentStore, StaleDeploymentError
from app.deployment.stats import Count, Sample
from app.registry import AdapterNotRegisteredError, AdapterRegistry
from app.store import InteractionStore
from tests.app.deployment.helpers import (
    BASE_MODEL,
    Clock,
    ReplicaProbe,
    fail,
    make_cfg,
    make_champion,
    register,
    serve,
    validate,
)

OLD, NEW = "adp-old", "adp-new"


class World:
    """A store with a champion, a validated adapter, a Generator replica's heartbeats and a
    deployer; the test writes traffic and moves the clock."""

    def __init__(self, store: InteractionStore, strategy: str = "staged", champion: bool = True, **deploy) -> None:
        self.store = store
        self.cfg = make_cfg(strategy, **deploy)
        self.registry = register(store, OLD, NEW)
        if champion:
            make_champion(store, OLD)
        self.deployments = DeploymentStore(store)
        self.probe = ReplicaProbe(store)
        self.clock = Clock()
        self.deployer = Deployer(self.cfg, store, self.probe, clock=self.clock)
        self.seed = 0

    def decisions(self, d: Deployment) -> list[str]:
        return [r["decision"] for r in self.deployments.decisions(d.id)]

    def to_canary(self) -> Deployment:
        validate(self.store, NEW)
        self.probe.replica_loads(OLD, NEW)
        d = self.deployer.tick()
        assert d.state == "canary", self.deployments.decisions(d.id)
        return d

    def traffic(self, d: Deployment, n_champion: int, n_challenger: int, **challenger) -> None:
        """Canary traffic: the champion's answers score 0.80, the challenger's as given."""
        self.seed += 2
        champion_model = self.registry.champion() or BASE_MODEL
        serve(self.store, n_champion, model=champion_model, arm="champion", deployment_id=d.id, seed=self.seed)
        challenger.setdefault("quality", 0.8)
        serve(
            self.store, n_challenger, model=NEW, arm="challenger", deployment_id=d.id, seed=self.seed + 1, **challenger
        )


@pytest.fixture
def world(store: InteractionStore) -> Iterator[World]:
    yield World(store)


def test_good_challenger_promoted_watched_and_completed(world: World) -> None:
    validate(world.store, NEW)
    d = world.deployer.tick()
    assert (d.state, d.strategy, d.adapter_id, d.previous_champion) == ("preloading", "staged", NEW, OLD)
    assert world.deployer.tick().state == "preloading"  # no replica has it loaded: no traffic moves
    assert world.probe.smoke_calls == []
    world.probe.replica_loads(OLD, NEW, replica="replica-1")
    world.probe.replica_loads(OLD, replica="replica-2")
    assert world.deployer.tick().state == "preloading"  # loaded on one replica of two
    world.probe.replica_loads(OLD, NEW, replica="replica-2")
    d = world.deployer.tick()
    assert (d.state, d.share) == ("canary", 0.1) and world.probe.smoke_calls == [NEW]
    assert world.registry.aliases() == {"champion": OLD, "challenger": NEW}
    assert world.registry.get(NEW)["status"] == "challenger"
    canary = world.deployments.canary_route()
    assert (canary.deployment_id, canary.challenger, canary.share) == (d.id, NEW, 0.1)

    world.traffic(d, 40, 10, quality=0.82)
    for _ in range(3):
        d = world.deployer.tick()
    assert d.state == "canary"
    holds = [r for r in world.deployments.decisions(d.id) if r["decision"] == "hold" and r["from_state"] == "canary"]
    assert len(holds) == 1 and "10 challenger and 40 champion scored" in holds[0]["reason"]

    world.traffic(d, 160, 30, quality=0.82)
    d = world.deployer.tick()
    assert d.state == "watching" and d.share == 0.0, world.deployments.decisions(d.id)[-1]
    promote = world.deployments.decisions(d.id)[-1]
    assert promote["decision"] == "promote" and promote["reason"].startswith("non-inferior")
    assert promote["evidence"]["arms"]["challenger"]["quality"]["n"] == 40
    assert promote["evidence"]["intervals"]["quality"]["low"] > -0.05
    assert world.registry.aliases() == {"champion": NEW}
    assert world.registry.get(NEW)["status"] == "champion" and world.registry.get(OLD)["status"] == "retired"
    assert d.evidence["previous_champion"] == OLD and d.evidence["baseline"]["quality"]["n"] == 200
    assert world.deployments.canary_route() is None
    moves = [(h["alias"], h["adapter_id"], h["actor"]) for h in world.registry.alias_history()]
    assert moves[-3:] == [
        ("challenger", NEW, "deployer"),
        ("champion", NEW, "deployer"),
        ("challenger", None, "deployer"),
    ]

    serve(world.store, 40, model=NEW, arm="champion", quality=0.81, seed=99)
    assert world.deployer.tick().state == "watching"
    world.clock.advance(11)
    d = world.deployer.tick()
    assert d.state == "completed" and d.finished_at is not None
    assert "without a significant drop" in world.deployments.decisions(d.id)[-1]["reason"]
    assert world.deployer.tick() is None  # nothing else to deploy
    assert world.decisions(d) == ["start", "hold", "canary", "hold", "promote", "hold", "complete"]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"quality": 0.5}, "quality score significantly lower"),
        ({"latency_ms": 400.0}, "median latency"),
        ({"feedback": {"explicit": {"rating": 1}, "implicit": {"accepted": False}}}, "users' satisfaction"),
    ],
    ids=["low-scores", "slow", "users-unhappy"],
)
def test_bad_challenger_rolled_back_with_the_reason(world: World, bad: dict, expected: str) -> None:
    d = world.to_canary()
    good_feedback = {"explicit": {"rating": 5}, "implicit": {"accepted": True}}
    world.seed += 2
    serve(world.store, 100, model=OLD, arm="champion", deployment_id=d.id, feedback=good_feedback, seed=world.seed)
    serve(world.store, 25, model=NEW, arm="challenger", deployment_id=d.id, seed=world.seed + 1, **bad)
    d = world.deployer.tick()
    assert d.state == "rolled_back", world.deployments.decisions(d.id)[-1]
    last = world.deployments.decisions(d.id)[-1]
    assert last["decision"] == "rollback" and expected in last["reason"]
    assert world.registry.aliases() == {"champion": OLD}
    assert world.registry.get(NEW)["status"] == "rejected"
    status_change = world.registry.audit(NEW)[-1]
    assert status_change["details"]["to"] == "rejected" and expected in status_change["details"]["reason"]
    assert world.deployments.canary_route() is None


def test_failing_challenger_rolled_back_before_the_minimum_sample(world: World) -> None:
    d = world.to_canary()
    world.traffic(d, 60, 3)
    fail(world.store, 2, adapter_id=NEW, arm="challenger", deployment_id=d.id)
    assert world.deployer.tick().state == "canary"  # 2 of 5 failed: not yet significant
    fail(world.store, 6, adapter_id=NEW, arm="challenger", deployment_id=d.id)
    d = world.deployer.tick()
    assert d.state == "rolled_back"
    reason = world.deployments.decisions(d.id)[-1]["reason"]
    assert "error rate 72.7% (8 of 11 requests failed)" in reason and "deploy.max_error_rate" in reason
    assert world.registry.get(NEW)["status"] == "rejected"


@pytest.mark.parametrize("on_timeout", ["rollback", "wait"])
def test_inconclusive_canary_held_then_timed_out(store: InteractionStore, on_timeout: str) -> None:
    world = World(store, on_timeout=on_timeout)
    d = world.to_canary()
    world.traffic(d, 25, 25, quality=0.75, sd=0.3)  # noisy and slightly worse: neither way yet
    for _ in range(3):
        d = world.deployer.tick()
        world.clock.advance(1)
    assert d.state == "canary"
    holds = [r for r in world.deployments.decisions(d.id) if r["decision"] == "hold" and r["from_state"] == "canary"]
    assert len(holds) == 1 and holds[0]["reason"].startswith("inconclusive")
    world.clock.advance(HOLD_RECORD_S / 60)  # an unchanged hold is written again after a while
    d = world.deployer.tick()
    assert [r["decision"] for r in world.deployments.decisions(d.id)][-2:] == ["hold", "hold"]

    world.clock.advance(30)
    d = world.deployer.tick()
    last = world.deployments.decisions(d.id)[-1]
    assert last["decision"] == "timeout" and "inconclusive after" in last["reason"]
    assert world.registry.aliases() == {"champion": OLD}  # never promoted
    assert world.deployments.canary_route() is None
    if on_timeout == "rollback":
        assert d.state == "rolled_back" and world.registry.get(NEW)["status"] == "rejected"
        return
    assert d.state == "awaiting_operator" and d.share == 0.0
    assert world.deployer.tick().state == "awaiting_operator"  # nothing moves by itself
    d = world.deployer.promote(NEW, "alice", "the canary was fine by eye")
    assert d.state == "preloading"
    d = world.deployer.tick()  # checked again before traffic moves, then champion
    assert d.state == "watching" and world.registry.champion() == NEW
    assert d.evidence["baseline"]["quality"]["n"] == 25  # the canary's champion arm
    assert world.deployments.decisions(d.id)[-1]["actor"] == "alice"


def test_promoted_champion_that_degrades_is_rolled_back_to_the_previous(world: World) -> None:
    d = world.to_canary()
    world.traffic(d, 200, 40)
    d = world.deployer.tick()
    assert d.state == "watching"
    serve(world.store, 3, model=NEW, arm="champion", quality=0.55, seed=50)
    assert world.deployer.tick().state == "watching"  # three answers: too few to say
    serve(world.store, 10, model=NEW, arm="champion", quality=0.55, seed=51)
    d = world.deployer.tick()
    assert d.state == "rolled_back"
    reason = world.deployments.decisions(d.id)[-1]["reason"]
    assert reason.startswith("dropped after promotion: quality score significantly lower") and OLD in reason
    assert world.registry.aliases() == {"champion": OLD}
    assert world.registry.get(OLD)["status"] == "champion" and world.registry.get(NEW)["status"] == "rejected"
    # A hand-made move after the rollback is not undone by later ticks.
    world.registry.set_alias("champion", NEW, "alice", "trying it again by hand")
    world.deployer.tick()
    assert world.registry.champion() == NEW


def test_immediate_strategy_without_a_champion_rolls_back_to_the_base_model(store: InteractionStore) -> None:
    world = World(store, strategy="immediate", champion=False)
    serve(store, 50, model=BASE_MODEL, arm="champion", quality=0.8)  # the base model's traffic before
    validate(store, NEW)
    world.probe.replica_loads(NEW)
    d = world.deployer.tick()
    assert d.state == "watching" and world.registry.aliases() == {"champion": NEW}
    assert world.decisions(d) == ["start", "promote"]
    assert d.evidence["previous_champion"] is None
    assert d.evidence["baseline"]["model"] == BASE_MODEL and d.evidence["baseline"]["quality"]["n"] == 50
    serve(store, 30, model=NEW, arm="champion", quality=0.4, seed=7)
    d = world.deployer.tick()
    assert d.state == "rolled_back" and "the base model tiny" in world.deployments.decisions(d.id)[-1]["reason"]
    assert world.registry.aliases() == {}


def test_immediate_strategy_completes_after_the_watch(store: InteractionStore) -> None:
    world = World(store, strategy="immediate", watch_minutes=5)
    serve(store, 50, model=OLD, arm="champion", quality=0.8)
    validate(store, NEW)
    world.probe.replica_loads(OLD, NEW)
    d = world.deployer.tick()
    assert d.state == "watching" and d.evidence["baseline"]["model"] == OLD
    serve(store, 50, model=NEW, arm="champion", quality=0.8, seed=3)
    world.clock.advance(6)
    assert world.deployer.tick().state == "completed"
    assert world.registry.get(OLD)["status"] == "retired" and world.registry.champion() == NEW


def test_manual_strategy_waits_for_an_operator(store: InteractionStore) -> None:
    world = World(store, strategy="manual")
    validate(store, NEW)
    world.probe.replica_loads(OLD, NEW)
    d = world.deployer.tick()
    assert (d.state, d.strategy) == ("awaiting_operator", "manual")
    world.clock.advance(600)
    assert world.deployer.tick().state == "awaiting_operator"
    assert world.registry.champion() == OLD and world.probe.smoke_calls == []
    d = world.deployer.promote(NEW, "alice", "reviewed the validation report")
    assert d.state == "preloading"
    world.probe.smoke_ok = False
    assert world.deployer.tick().state == "preloading"  # the smoke test failed: no traffic moves
    assert world.registry.champion() == OLD
    world.probe.smoke_ok = True
    d = world.deployer.tick()
    assert d.state == "watching" and world.registry.champion() == NEW
    assert world.deployments.decisions(d.id)[-1]["actor"] == "alice"


def test_manual_deployment_cancelled_by_an_operator(store: InteractionStore) -> None:
    world = World(store, strategy="manual")
    validate(store, NEW)
    d = world.deployer.tick()
    d = world.deployer.rollback(None, "bob", "not this week")
    assert d.state == "cancelled" and world.registry.get(NEW)["status"] == "rejected"
    assert world.registry.audit(NEW)[-1]["details"]["reason"].endswith("operator bob: not this week")
    assert world.deployer.tick() is None  # its validation is taken up: not deployed again


def test_preloading_fails_past_the_smoke_timeout(world: World) -> None:
    validate(world.store, NEW)
    d = world.deployer.tick()
    world.clock.advance(0.5)
    assert world.deployer.tick().state == "preloading"
    world.clock.advance(1)
    d = world.deployer.tick()
    assert d.state == "failed"
    reason = world.deployments.decisions(d.id)[-1]["reason"]
    assert "deploy.smoke_timeout_s" in reason and "no Generator replica" in reason
    assert world.registry.aliases() == {"champion": OLD}


def test_operator_pause_resume_promote_and_rollback(world: World) -> None:
    d = world.to_canary()
    world.clock.advance(20)
    d = world.deployer.pause(d.id, "alice", "looking at the logs")
    assert (d.state, d.share) == ("paused", 0.0) and world.deployments.canary_route() is None
    world.clock.advance(60)  # paused time does not count toward deploy.max_canary_minutes
    assert world.deployer.tick().state == "paused"
    d = world.deployer.resume(None, "alice", "logs are fine")
    assert (d.state, d.share) == ("canary", 0.1)
    world.clock.advance(5)
    assert world.deployer.tick().state == "canary"  # 25 canary minutes of 30
    with pytest.raises(ValueError, match="only a paused canary"):
        world.deployer.resume(d.id, "alice", "again")

    world.traffic(d, 10, 3)  # inconclusive: the operator promotes anyway
    d = world.deployer.promote(NEW, "alice", "needed for the release")
    assert d.state == "watching" and world.registry.champion() == NEW
    assert world.deployments.decisions(d.id)[-1]["reason"] == "operator alice: needed for the release"
    d = world.deployer.rollback(d.id, "bob", "customers report broken imports")
    assert d.state == "rolled_back" and world.registry.aliases() == {"champion": OLD}
    assert world.registry.get(NEW)["status"] == "rejected" and world.registry.get(OLD)["status"] == "champion"
    with pytest.raises(ValueError, match="has ended"):
        world.deployer.rollback(d.id, "bob", "twice")


def test_operator_errors_name_the_problem(world: World) -> None:
    with pytest.raises(AdapterNotRegisteredError):
        world.deployer.promote("adp-none", "alice", "why not")
    with pytest.raises(ValueError, match="already the champion"):
        world.deployer.promote(OLD, "alice", "again")
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        world.deployer.promote(NEW, "alice", " ")
    with pytest.raises(ValueError, match="no deployment is active"):
        world.deployer.pause(None, "alice", "nothing to pause")
    d = world.to_canary()
    register(world.store, "adp-other")
    with pytest.raises(ValueError, match=f"deployment {d.id} of {NEW} is active"):
        world.deployer.promote("adp-other", "alice", "this one instead")
    world.deployer.pause(d.id, "alice", "first")
    with pytest.raises(ValueError, match="only a canary can be paused"):
        world.deployer.pause(d.id, "alice", "again")


def test_status_shows_the_live_comparison(world: World) -> None:
    d = world.to_canary()
    world.traffic(d, 30, 10)
    status = world.deployer.status()
    json.dumps(status)  # what the CLI and the HTTP route send
    assert status["strategy"] == "staged" and status["aliases"] == {"champion": OLD, "challenger": NEW}
    assert status["active"]["id"] == d.id and status["active"]["state"] == "canary"
    assert status["live"]["rule"] == "hold" and status["live"]["arms"]["challenger"]["quality"]["n"] == 10
    assert [x["decision"] for x in status["decisions"]] == ["start", "canary"]


def test_a_restarted_deployer_resumes_and_completes_cut_off_moves(store: InteractionStore) -> None:
    """The state is the store's: a new deployer (another process's connection) goes on from it,
    and the registry moves of a decision whose deployer died before making them are made."""
    world = World(store)
    d = world.to_canary()
    world.traffic(d, 200, 40)
    # The deployer "dies" right after committing the promotion, before moving the aliases.
    DeploymentStore(store).transition(
        d,
        "watching",
        actor="deployer",
        decision="promote",
        reason="non-inferior",
        share=0.0,
        merge_evidence={"previous_champion": OLD, "promoted": True},
    )
    assert world.registry.aliases() == {"champion": OLD, "challenger": NEW}
    other = _reopen(store)
    try:
        restarted = Deployer(world.cfg, other, ReplicaProbe(other), clock=world.clock)
        d = restarted.tick()
        registry = AdapterRegistry(other)
        assert d.state == "watching" and registry.aliases() == {"champion": NEW}
        assert registry.get(NEW)["status"] == "champion" and registry.get(OLD)["status"] == "retired"
        # The same for a final decision: rolled back, champion not yet moved back.
        DeploymentStore(other).transition(
            d, "rolled_back", actor="bob", decision="rollback", reason="operator bob: broken", share=0.0
        )
        restarted.tick()
        assert registry.aliases() == {"champion": OLD} and registry.get(NEW)["status"] == "rejected"
        assert registry.alias_history("champion")[-1]["reason"].endswith("operator bob: broken")
    finally:
        other.close()


def test_a_stale_concurrent_decision_is_refused(store: InteractionStore) -> None:
    """Two deployers (two processes) look at one canary; an operator's rollback lands between the
    deployer's read and its promotion: the promotion is refused and nothing of it is written."""
    world = World(store)
    stale = world.to_canary()
    world.traffic(stale, 200, 40)  # good evidence: the deployer is about to promote
    other = _reopen(store)
    try:
        operator = Deployer(world.cfg, other, ReplicaProbe(other), clock=world.clock)
        read = world.deployer.live.canary

        def read_while_an_operator_rolls_back(deployment_id: str) -> CanaryEvidence:
            evidence = read(deployment_id)
            operator.rollback(deployment_id, "bob", "pulling it")
            return evidence

        world.deployer.live.canary = read_while_an_operator_rolls_back
        d = world.deployer.tick()
        assert d.state == "rolled_back"
        assert [(r["decision"], r["actor"]) for r in world.deployments.decisions(d.id)][-1] == ("rollback", "bob")
        assert "promote" not in world.decisions(d)
        assert world.registry.aliases() == {"champion": OLD}
        with pytest.raises(StaleDeploymentError):  # any decision made on the stale read is refused
            world.deployer._promote(stale, "deployer", "late", {}, baseline=ArmEvidence())
        assert world.registry.aliases() == {"champion": OLD} and world.deployments.get(d.id).state == "rolled_back"
    finally:
        other.close()


def _reopen(store: InteractionStore) -> InteractionStore:
    """A second connection to the same database, as another process would have."""
    from app.store.postgres import PostgresStore
    from app.store.sqlite import SQLiteStore

    if store.engine == "sqlite":
        return SQLiteStore(store.path)
    return PostgresStore(store.dsn)


# --- the rule alone, on simulated canaries --------------------------------------------------------


def _simulate(rng: random.Random, mean_a: float, mean_b: float, *, share: float = 0.1, limit: int = 3000):
    """A canary of beta-distributed scores seen every 5 interactions; the rule's first non-hold."""
    deploy = make_cfg().deploy.model_copy(update={"min_interactions_per_arm": 30})
    a, b = Sample(), Sample()
    for t in range(1, limit + 1):
        if rng.random() < share:
            b = b.add(rng.betavariate(8 * mean_b, 8 * (1 - mean_b)))
        else:
            a = a.add(rng.betavariate(8 * mean_a, 8 * (1 - mean_a)))
        if t % 5:
            continue
        evidence = CanaryEvidence(
            "sim",
            ArmEvidence(completions=a.n, quality=a, acceptance=Count()),
            ArmEvidence(completions=b.n, quality=b),
        )
        decision = decide_canary(evidence, deploy)
        if decision.action != "hold":
            return decision.action, b.n
    return "hold", b.n


def test_rule_on_simulated_canaries() -> None:
    """A/A canaries are rarely rolled back (at most alpha) and mostly promoted; a challenger 30 %
    worse is never promoted and rolled back within 200 of its interactions at a 10 % share."""
    rng = random.Random(5)
    same = [_simulate(rng, 0.7, 0.7) for _ in range(100)]
    rollbacks = sum(action == "rollback" for action, _ in same)
    assert rollbacks <= 5 and sum(action == "promote" for action, _ in same) >= 90
    worse = [_simulate(rng, 0.7, 0.49) for _ in range(100)]
    assert all(action == "rollback" for action, _ in worse)
    assert max(n for _, n in worse) <= 200


def _arm(scores: list[float], accepted: list[bool]) -> ArmEvidence:
    signals = [1.0 if a else 0.0 for a in accepted]
    return ArmEvidence(
        completions=len(scores),
        quality=Sample.of(scores),
        satisfaction=Sample.of(signals),
        acceptance=Count(sum(accepted), len(accepted)),
    )


def test_the_users_outrank_the_scorer() -> None:
    """The scorer rates the challenger's answers lower (a real-time score, made before the users'
    feedback) while the users accept far more of them: promoted, not rolled back. Where the users'
    signals do not favour it, the lower score still rolls it back."""
    deploy = make_cfg().deploy.model_copy(update={"min_interactions_per_arm": 30})
    rng = random.Random(3)
    champion = _arm([rng.uniform(0.6, 0.8) for _ in range(200)], [rng.random() < 0.5 for _ in range(200)])
    lower_scores = [rng.uniform(0.5, 0.7) for _ in range(200)]

    preferred = decide_canary(
        CanaryEvidence("d", champion, _arm(lower_scores, [rng.random() < 0.9 for _ in range(200)])), deploy
    )
    assert (preferred.action, preferred.code) == ("promote", "users_prefer"), preferred.reason
    assert "acceptance higher by" in preferred.reason and "outranked" in preferred.reason

    same_users = decide_canary(
        CanaryEvidence("d", champion, _arm(lower_scores, [rng.random() < 0.5 for _ in range(200)])), deploy
    )
    assert same_users.action == "rollback" and "quality score significantly lower" in same_users.reason

    # The users' own signals significantly worse roll back whatever the scorer says.
    worse_users = decide_canary(
        CanaryEvidence(
            "d", champion, _arm([rng.uniform(0.6, 0.8) for _ in range(200)], [rng.random() < 0.1 for _ in range(200)])
        ),
        deploy,
    )
    assert worse_users.action == "rollback" and "acceptance rate significantly lower" in worse_users.reason
