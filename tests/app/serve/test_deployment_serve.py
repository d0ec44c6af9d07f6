"""Deployments end to end through the real Serve app and real HTTP (issue 18).

The deployer runs in this process, ticked by the test, on the store the Serve app writes to; it
preloads a validated adapter on the Generator replica (the replica's heartbeat says when), smoke-
tests it through the HTTP endpoint, splits the requests for ``champion`` with a canary, and
promotes, rolls back or holds on the live evidence. Meanwhile a background thread asks for
``champion`` without pause, each request in a session of its own, and every one of its requests
must be answered.

The quality scorer deployment is off (the machine has two CPUs): where the decision turns on
quality scores, the test plays the scorer and scores each recorded answer (``store.set_quality``);
the users' verdicts on the answers go through ``POST /v1/feedback`` of the same app, as an agent
sends them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.client import wait_until_ready
from app.config import KaizenConfig
from app.deployment.deployer import Deployer
from app.deployment.live import LiveComparison
from app.deployment.probe import HttpProbe
from app.deployment.state import Deployment, DeploymentStore
from app.model.adapters import AdapterStore
from app.registry import AdapterRegistry
from app.store.sqlite import SQLiteStore
from tests.app.deployment.helpers import Clock
from tests.conftest import free_port, train_answer_adapter

pytestmark = pytest.mark.integration

PROMPT = "What is 6 times 7?"
PROMPTS = (PROMPT, "hi")
CHAMPION_ANSWER = "The answer is 42."
GOOD_ANSWER = "It is 42."  # right, and no longer than the champion's (latency is a guardrail)
BAD_ANSWER = "Seven."  # wrong: the users reject it
MIN_PER_ARM = 10
DEPLOY = {
    "canary_share": 0.5,
    "min_interactions_per_arm": MIN_PER_ARM,
    # Equal scores prove non-inferiority within 0.1 after a dozen or so answers per arm.
    "non_inferiority_margin": 0.1,
    # The answers differ in length and the machine is busy: latency is not what these tests are about.
    "max_latency_increase": 1.0,
    "watch_minutes": 0.1,
    "max_canary_minutes": 10,
    "check_interval_s": 0.5,
    "smoke_timeout_s": 90,
}
PAUSE_S = 0.05
"""Between two requests of the stream: steady, and leaves the replicas some CPU for the rest."""


@dataclass
class Kaizen:
    """The running app and what the tests reach it through."""

    cfg: KaizenConfig
    url: str
    store: SQLiteStore
    registry: AdapterRegistry
    adapters: AdapterStore

    def validated(self, adapter_id: str) -> None:
        """Register a stored adapter and record a production verdict for it, as the validation
        job does (``app.validation.report.record_outcome``)."""
        self.registry.register(self.adapters.manifest(adapter_id), self.adapters.uri(adapter_id), actor="learn-job")
        row = DeploymentStore(self.store).record_validation(
            adapter_id,
            self.registry.champion() or self.cfg.model.base_model,
            "production",
            {"accuracy_change": 0.0, "safety_passed": True, "forgetting_passed": True},
            actor="validate-job",
        )
        self.registry.set_status(adapter_id, "validated", "validate-job", f"validation {row['id']}: production")

    def deployer(self, clock: Callable[[], Any] | None = None, **deploy: Any) -> Deployer:
        """The deployer as the actor builds it, with ``deploy`` settings changed for one test."""
        cfg = self.cfg.model_copy(update={"deploy": self.cfg.deploy.model_copy(update=deploy)})
        options = {"clock": clock} if clock is not None else {}
        return Deployer(cfg, self.store, HttpProbe.for_config(cfg, self.store), **options)


@pytest.fixture(scope="module")
def kaizen(ray_session, model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kaizen]:
    from ray import serve

    from app.serve.build import build_app

    # Trained before Serve starts: training competes with the replicas for the two CPUs.
    adapters = AdapterStore(model_root)
    for adapter_id, answer in (
        ("deploy-42", CHAMPION_ANSWER),
        ("deploy-good", GOOD_ANSWER),
        ("deploy-bad", BAD_ANSWER),
    ):
        if not adapters.exists(adapter_id):
            train_answer_adapter(model_root, adapters, adapter_id, answer, PROMPTS)
    db = tmp_path_factory.mktemp("deploy") / "kaizen.db"
    store = SQLiteStore(db)
    store.migrate()
    registry = AdapterRegistry(store)
    registry.register(adapters.manifest("deploy-42"), adapters.uri("deploy-42"), actor="test")
    registry.set_alias("champion", "deploy-42", actor="test", reason="the champion before the tests")
    registry.set_status("deploy-42", "champion", "test", "the champion before the tests")

    serve.shutdown()  # another module's Serve would keep its own HTTP port
    port = free_port()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "deploy-test"},
            "model": {"base_model": "tiny", "storage_root": str(model_root), "deployment_strategy": "staged"},
            "deploy": DEPLOY,
            "serve": {
                "host": "127.0.0.1",
                "port": port,
                "app_name": "kaizen-deploy-test",
                "collector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "scorer": {"enabled": False},
                "generator": {
                    "num_cpus": 1,
                    "max_adapters": 4,
                    "default_max_tokens": 12,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
            },
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
    assert wait_until_ready(cfg.api_url(), timeout_s=120)
    try:
        yield Kaizen(cfg, cfg.api_url(), store, registry, adapters)
    finally:
        serve.shutdown()
        store.close()


@pytest.fixture(autouse=True)
def no_deployment_left(kaizen: Kaizen) -> Iterator[None]:
    """A test that fails halfway leaves no active deployment to the next one."""
    yield
    if DeploymentStore(kaizen.store).active() is not None:
        kaizen.deployer().rollback(None, "test", "the test ended before its deployment did")


# --- the users, the scorer and the deployer's loop ------------------------------------------------


@dataclass(frozen=True)
class Answer:
    id: str
    content: str
    session: str


def user(content: str) -> dict[str, Any]:
    """A user who asked for six times seven: uses an answer that says 42, throws the others away."""
    if "42" in content:
        return {"explicit": {"thumbs": "up"}, "implicit": {"accepted": True}}
    return {"explicit": {"thumbs": "down"}, "implicit": {"accepted": False, "abandoned": True}}


class Traffic:
    """Chat completions for ``champion`` from a background thread, one after the other, each in a
    new session (so the canary's sticky split sends each to either arm), with the user's feedback
    on every answer. Every failed request or feedback is kept in ``failures``."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{name}", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the request stream did not stop"

    def wait_for(self, count: int, timeout_s: float = 120.0) -> None:
        """Until the stream has ``count`` answers."""
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.answers) >= count, f"{len(self.answers)} answers of {count} in {timeout_s:g} s"

    def _run(self) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                session = f"{self.name}-{i}"
                i += 1
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="champion",
                        messages=[{"role": "user", "content": PROMPT}],
                        temperature=0,
                        max_tokens=12,
                        extra_headers={"X-Kaizen-Session": session},
                    )
                    if raw.status_code != 200:
                        self.failures.append(f"{session}: {raw.status_code} {raw.text[:200]}")
                        continue
                    completion = raw.parse()
                    answer = Answer(completion.id, completion.choices[0].message.content or "", session)
                    self.answers.append(answer)
                    sent = http.post("/v1/feedback", json={"interaction_id": answer.id, **user(answer.content)})
                    if sent.status_code != 201:
                        self.failures.append(f"{session} feedback: {sent.status_code} {sent.text[:200]}")
                except Exception as exc:  # any failure counts
                    self.failures.append(f"{session}: {type(exc).__name__}: {exc}")
                self._stop.wait(PAUSE_S)


class Scorer:
    """The quality scorer's part: each answer of the stream, once recorded, gets the score
    ``score(arm, k)`` (``arm``: the recorded deployment and serving arm; ``k``: how many answers
    of that arm were scored before)."""

    def __init__(self, store: SQLiteStore, score: Callable[[tuple[str | None, str | None], int], float]) -> None:
        self.store, self.score = store, score
        self.done: set[str] = set()
        self.per_arm: Counter[tuple[str | None, str | None]] = Counter()

    def catch_up(self, answers: list[Answer]) -> None:
        for answer in list(answers):
            if answer.id in self.done:
                continue
            row = self.store.get_interaction(answer.id)
            if row is None:
                continue  # recorded after the reply: scored at the next look
            arm = (row["deployment_id"], row["serving_arm"])
            assert self.store.set_quality(answer.id, self.score(arm, self.per_arm[arm]), 0.9)
            self.per_arm[arm] += 1
            self.done.add(answer.id)


def drive(
    deployer: Deployer,
    until: Callable[[Deployment | None], bool],
    *,
    every_tick: Callable[[], None] = lambda: None,
    timeout_s: float = 240.0,
) -> tuple[Deployment, list[str]]:
    """Tick ``deployer`` as its actor does until ``until`` holds of the deployment it returns;
    that deployment and the states it went through (each once, in order)."""
    states: list[str] = []
    deadline = time.monotonic() + timeout_s
    d = None
    while time.monotonic() < deadline:
        every_tick()
        d = deployer.tick()
        if d is not None and (not states or states[-1] != d.state):
            states.append(d.state)
        if until(d):
            assert d is not None
            return d, states
        time.sleep(deployer.deploy.check_interval_s)
    decisions = deployer.deployments.decisions(d.id)[-5:] if d is not None else []
    raise AssertionError(
        f"not reached in {timeout_s:g} s; states {states}; last decisions "
        + "; ".join(f"{x['decision']} ({x['to_state']}): {x['reason']}" for x in decisions)
    )


def recorded(store: SQLiteStore, answers: list[Answer], timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The stored interaction of each answer (each is recorded after its reply has gone)."""
    rows: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for a in answers:
            if a.id not in rows and (row := store.get_interaction(a.id)) is not None:
                rows[a.id] = row
        if len(rows) == len(answers):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{len(answers) - len(rows)} of {len(answers)} answers were not recorded")


def last(decisions: list[dict[str, Any]], decision: str) -> dict[str, Any]:
    found = [x for x in decisions if x["decision"] == decision]
    assert found, f"no {decision!r} decision in {[x['decision'] for x in decisions]}"
    return found[-1]


# --- the scenarios ----------------------------------------------------------------------------------


def test_a_good_challenger_is_preloaded_smoke_tested_canaried_promoted_and_watched(kaizen: Kaizen) -> None:
    store, registry = kaizen.store, kaizen.registry
    deployments = DeploymentStore(store)
    previous = registry.champion()
    assert previous == "deploy-42"
    kaizen.validated("deploy-good")
    interactions_before = store.count()
    deployer = kaizen.deployer()
    scorer = Scorer(store, lambda arm, k: 0.8)  # the two arms' answers are equally good

    with Traffic(kaizen.url, "promote") as traffic:
        d, states = drive(
            deployer,
            lambda d: d is not None and d.state == "completed",
            every_tick=lambda: scorer.catch_up(traffic.answers),
        )
    assert traffic.failures == []
    assert states == ["preloading", "canary", "watching", "completed"]

    # Preloaded on the replica (its heartbeat lists it) and smoke-tested over HTTP before any traffic moved.
    decisions = deployments.decisions(d.id)
    kinds = [x["decision"] for x in decisions]
    assert kinds[0] == "start" and kinds.index("canary") < kinds.index("promote") < kinds.index("complete")
    # The deployment's first tick found the replica without it: no traffic moved before the heartbeat said so.
    assert (decisions[1]["decision"], decisions[1]["to_state"]) == ("hold", "preloading")
    assert decisions[1]["reason"].startswith("preloading: "), decisions[1]["reason"]
    canary = last(decisions, "canary")
    assert canary["evidence"]["loaded"] == "loaded on all 1 replicas"
    assert canary["evidence"]["smoke_test"].startswith("answered ")
    assert all("deploy-good" in adapters for adapters in deployments.replicas().values())

    # The canary: both arms answered requests for champion, each recorded with its arm; then the
    # new champion answered them all.
    rows = recorded(store, traffic.answers)
    served = Counter()
    for answer in traffic.answers:
        row = rows[answer.id]
        key = (row["model_version"], row["serving_arm"], row["deployment_id"] == d.id)
        served[key] += 1
        assert answer.content == (GOOD_ANSWER if row["model_version"] == "deploy-good" else CHAMPION_ANSWER)
    assert set(served) == {
        ("deploy-42", "champion", False),  # while preloading
        ("deploy-42", "champion", True),  # the canary's champion arm
        ("deploy-good", "challenger", True),  # its challenger arm
        ("deploy-good", "champion", False),  # promoted: the watch
    }, served
    assert served[("deploy-42", "champion", True)] >= MIN_PER_ARM
    assert served[("deploy-good", "challenger", True)] >= MIN_PER_ARM
    assert rows[traffic.answers[-1].id]["model_version"] == "deploy-good"
    # The smoke test's completion is no user's interaction: nothing but the stream was recorded.
    assert store.count() == interactions_before + len(traffic.answers)
    assert deployments.failures(deployment_id=d.id) == []

    # Promoted on the live evidence, then watched against the previous champion, then completed.
    promote = last(decisions, "promote")
    assert promote["actor"] == "deployer" and promote["from_state"] == "canary"
    assert promote["reason"].startswith("non-inferior")
    arms = promote["evidence"]["arms"]
    assert arms["champion"]["quality"]["n"] >= MIN_PER_ARM and arms["challenger"]["quality"]["n"] >= MIN_PER_ARM
    assert arms["challenger"]["satisfaction"]["mean"] == arms["champion"]["satisfaction"]["mean"] == 1.0
    assert d.evidence["previous_champion"] == "deploy-42" and d.evidence["baseline"]["quality"]["n"] >= MIN_PER_ARM
    assert any(x["decision"] == "hold" and x["from_state"] == "watching" for x in decisions)
    complete = decisions[-1]
    assert complete["decision"] == "complete" and complete["to_state"] == "completed"
    assert complete["evidence"]["current"]["completions"] > 0

    # The champion alias moved, through the registry's audited history; the old champion retired.
    assert registry.aliases() == {"champion": "deploy-good"}
    move = registry.alias_history("champion")[-1]
    assert (move["adapter_id"], move["previous_adapter_id"], move["actor"]) == ("deploy-good", "deploy-42", "deployer")
    assert d.id in move["reason"]
    assert registry.get("deploy-good")["status"] == "champion"
    assert registry.get("deploy-42")["status"] == "retired"


def test_a_challenger_the_users_reject_is_rolled_back_by_itself(kaizen: Kaizen) -> None:
    store, registry = kaizen.store, kaizen.registry
    deployments = DeploymentStore(store)
    champion = registry.champion()
    assert champion is not None
    kaizen.validated("deploy-bad")
    deployer = kaizen.deployer()

    # No quality scores at all: the users' feedback is the evidence.
    with Traffic(kaizen.url, "reject") as traffic:
        d, states = drive(deployer, lambda d: d is not None and not d.active)
        ended_at = len(traffic.answers)
        traffic.wait_for(ended_at + 6)
    assert traffic.failures == []
    assert states == ["preloading", "canary", "rolled_back"]

    decisions = deployments.decisions(d.id)
    rollback = decisions[-1]
    assert (rollback["decision"], rollback["actor"], rollback["from_state"]) == ("rollback", "deployer", "canary")
    assert "significantly lower" in rollback["reason"]
    assert "users' satisfaction" in rollback["reason"] or "acceptance rate" in rollback["reason"]
    arms = rollback["evidence"]["arms"]
    assert arms["challenger"]["satisfaction"]["mean"] == 0.0 and arms["champion"]["satisfaction"]["mean"] == 1.0
    assert arms["challenger"]["quality"]["n"] == 0  # decided before (and without) any score

    # The challenger answered its share while the canary ran and was rejected; the champion never moved.
    during = [a.content for a in traffic.answers[:ended_at]]
    assert BAD_ANSWER in during
    assert {a.content for a in traffic.answers[ended_at + 1 :]} == {
        GOOD_ANSWER if champion == "deploy-good" else CHAMPION_ANSWER
    }
    assert registry.aliases() == {"champion": champion}
    assert registry.get("deploy-bad")["status"] == "rejected"
    assert registry.get(champion)["status"] == "champion"
    status = [r for r in registry.audit("deploy-bad") if r["action"] == "adapter.status"][-1]
    assert status["details"]["to"] == "rejected" and d.id in status["details"]["reason"]
    assert deployments.failures(deployment_id=d.id) == []


def test_an_inconclusive_canary_holds_and_never_promotes(kaizen: Kaizen) -> None:
    store, registry = kaizen.store, kaizen.registry
    deployments = DeploymentStore(store)
    champion = registry.champion()
    assert champion is not None
    # An A/A canary: the champion's own weights under a new id, so the two arms are truly equal;
    # with a margin of 0.02 the evidence of a short canary cannot show non-inferiority.
    kaizen.adapters.save(kaizen.adapters.local_path(champion), base_model="tiny", adapter_id="deploy-same")
    kaizen.validated("deploy-same")
    clock = Clock()
    deployer = kaizen.deployer(clock, non_inferiority_margin=0.02, on_timeout="wait", max_canary_minutes=5)
    spread = (0.5, 0.9, 0.7, 0.6, 0.8)  # each arm's scores cycle through the same values
    scorer = Scorer(store, lambda arm, k: spread[k % len(spread)])
    live = LiveComparison(store)

    def enough(d: Deployment | None) -> bool:
        if d is None or d.state != "canary":
            return False
        arms = live.canary(d.id)
        return min(arms.champion.quality.n, arms.challenger.quality.n) >= 2 * MIN_PER_ARM

    with Traffic(kaizen.url, "hold") as traffic:
        d, states = drive(deployer, enough, every_tick=lambda: scorer.catch_up(traffic.answers))
        for _ in range(3):  # a few more looks at the full evidence
            scorer.catch_up(traffic.answers)
            d = deployer.tick()
            time.sleep(deployer.deploy.check_interval_s)
        assert d is not None and d.state == "canary"
        decisions = deployments.decisions(d.id)
        assert "promote" not in [x["decision"] for x in decisions]
        hold = last(decisions, "hold")
        assert hold["reason"].startswith("inconclusive"), hold["reason"]
        interval = hold["evidence"]["intervals"]["quality"]
        assert interval["low"] < -0.02 < 0 < interval["high"]

        # The operator's view through HTTP says the same.
        view = httpx.get(f"{kaizen.url}/v1/deployments", timeout=30).json()
        assert view["active"]["id"] == d.id and view["active"]["state"] == "canary"
        assert view["aliases"] == {"champion": champion, "challenger": "deploy-same"}

        # Past deploy.max_canary_minutes, inconclusive still does not promote: with on_timeout
        # "wait" the canary's traffic goes back to the champion and an operator decides.
        clock.advance(minutes=6)
        d = deployer.tick()
        assert d is not None and d.state == "awaiting_operator" and d.share == 0.0
        ended_at = len(traffic.answers)
        traffic.wait_for(ended_at + 6)
        tail = traffic.answers[ended_at + 1 :]
        rows = recorded(store, tail)
        assert {rows[a.id]["model_version"] for a in tail} == {champion}
        assert {rows[a.id]["deployment_id"] for a in tail} == {None}

        # The operator ends it through the API.
        answer = httpx.post(
            f"{kaizen.url}/v1/deployments/{d.id}/rollback",
            json={"reason": "inconclusive canary", "actor": "test-operator"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "rolled_back"
    assert traffic.failures == []
    assert states == ["preloading", "canary"]
    assert [x["decision"] for x in deployments.decisions(d.id)][-2:] == ["timeout", "rollback"]
    assert registry.aliases() == {"champion": champion}
    assert registry.get("deploy-same")["status"] == "rejected"
    assert deployments.failures(deployment_id=d.id) == []
