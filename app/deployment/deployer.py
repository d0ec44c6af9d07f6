"""The deployer: takes an adapter validated for production to the champion alias, behind a canary,
and takes it away again by itself when live traffic says it is worse.

One deployment at a time, kept in the store as a state machine
(:class:`~app.deployment.state.DeploymentStore`); :meth:`Deployer.tick` reads it, decides, and
writes the decision, so a restarted deployer goes on from where the store says it was. Following
``model.deployment_strategy``:

* ``immediate``: preload and smoke-test, then champion at once, then the watch;
* ``staged``: preload and smoke-test, then the ``challenger`` alias and a sticky canary share
  (``deploy.canary_share``) of the sessions asking for ``champion``; the two arms are compared on
  live traffic (:func:`decide_canary`) until the challenger is promoted, rolled back, or the canary
  times out (``deploy.max_canary_minutes``, then ``deploy.on_timeout``);
* ``manual``: the verdict waits (``awaiting_operator``) for an operator's promote or rollback.

After a promotion the new champion is watched against the previous champion's baseline for
``deploy.watch_minutes`` (:func:`decide_watch`), and a significant drop rolls it back.

The decision rule on live traffic is :mod:`app.deployment.rules` (promote, roll back, hold).

Every transition goes through :meth:`DeploymentStore.transition` (optimistic concurrency: a
decision made on a deployment that changed since it was read is refused, not written), and the
registry follows the deployment's state (:meth:`Deployer._settle`): aliases and statuses are moved
after the transition commits, through :class:`~app.registry.AdapterRegistry` (audited), and a
deployer that died between the two completes the move at its next tick. While a deployment is
active the deployer owns the aliases it names; a move made by hand after the deployment's last
decision is left alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from app.config import KaizenConfig
from app.deployment.live import ArmEvidence, LiveComparison
from app.deployment.probe import ServingProbe
from app.deployment.rules import decide_canary, decide_watch
from app.deployment.state import Deployment, DeploymentStore, StaleDeploymentError
from app.registry import AdapterNotRegisteredError, AdapterRegistry
from app.store.base import InteractionStore

__all__ = [
    "BASELINE_INTERACTIONS",
    "HOLD_RECORD_S",
    "Deployer",
]

log = logging.getLogger("kaizen.deployer")

HOLD_RECORD_S = 300.0
"""A hold whose reason has not changed is written as a decision at most this often (seconds)."""
BASELINE_INTERACTIONS = 1000
"""When no canary measured the champion being replaced (``immediate``, or an operator's promote of
an adapter that had no canary), its baseline for the watch is its last this many answers."""


# --- the deployer --------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Deployer:
    """The deployment state machine's driver (see the module docstring).

    Args:
        cfg: reads ``model.deployment_strategy``, ``model.base_model`` and the ``deploy`` section.
        store: the interaction store (deployments, registry and live evidence are all in it).
        probe: whether an adapter is loaded everywhere and answers (:class:`ServingProbe`).
        clock: the current time (UTC); tests move it forward.
        actor: the name automatic decisions are recorded under.

    Thread-safe: one lock serialises its methods within a process; between processes the store's
    optimistic concurrency refuses a decision made on a stale read.
    """

    def __init__(
        self,
        cfg: KaizenConfig,
        store: InteractionStore,
        probe: ServingProbe,
        *,
        clock: Callable[[], datetime] = _utcnow,
        actor: str = "deployer",
    ) -> None:
        self.cfg = cfg
        self.deploy = cfg.deploy
        self.store = store
        self.probe = probe
        self.clock = clock
        self.actor = actor
        self.deployments = DeploymentStore(store)
        self.registry = AdapterRegistry(store)
        self.live = LiveComparison(store)
        self._lock = threading.RLock()

    # --- the loop ----------------------------------------------------------------------------------

    def tick(self) -> Deployment | None:
        """Advance the active deployment by one decision, or start one for the oldest adapter
        validated for production that no deployment has taken up. Returns the deployment as it is
        after the tick (None: nothing to do)."""
        with self._lock:
            latest = self.deployments.list(limit=1)
            if latest and not latest[0].active:
                self._settle(latest[0])  # the registry moves of a final decision, if a crash cut them off
            d = self.deployments.active() or self._start_next()
            if d is None:
                return None
            try:
                self._settle(d)
                return self._advance(d)
            except StaleDeploymentError as exc:
                log.info("%s; deciding again at the next tick", exc)
                return self.deployments.get(d.id)

    def _advance(self, d: Deployment) -> Deployment:
        if d.state == "preloading":
            return self._preload(d)
        if d.state == "canary":
            return self._judge_canary(d)
        if d.state == "watching":
            return self._watch(d)
        return d  # paused, awaiting_operator: an operator decides

    def _start_next(self) -> Deployment | None:
        champion = self.registry.champion()
        for validation in self.deployments.undeployed_validations("production"):
            adapter_id = validation["adapter_id"]
            if adapter_id == champion:
                continue  # already serving: made champion by hand
            if self.registry.get(adapter_id) is None:
                log.warning("validation %s names adapter %s, which is not registered", validation["id"], adapter_id)
                continue
            strategy = self.cfg.model.deployment_strategy
            common = {"actor": self.actor, "previous_champion": champion, "validation_id": validation["id"]}
            try:
                if strategy == "manual":
                    return self._create(
                        adapter_id,
                        strategy,
                        "awaiting_operator",
                        reason=f"validated for production ({validation['id']}); model.deployment_strategy is "
                        "manual: waiting for an operator to promote or roll back",
                        **common,
                    )
                after = "promote" if strategy == "immediate" else "canary"
                return self._create(
                    adapter_id,
                    strategy,
                    "preloading",
                    reason=f"validated for production ({validation['id']}); model.deployment_strategy is "
                    f"{strategy}: loading it on every Generator replica and smoke-testing it",
                    evidence={"after_preload": after},
                    **common,
                )
            except ValueError:  # another process started a deployment first: go on with that one
                return self.deployments.active()
        return None

    def _preload(self, d: Deployment) -> Deployment:
        waited = self._in_state_s(d)
        loaded, where = self.probe.loaded_everywhere(d.adapter_id)
        smoke_ok, smoke = False, "not run before the adapter is loaded everywhere"
        if loaded:
            smoke_ok, smoke = self.probe.smoke_test(d.adapter_id)
        evidence = {"loaded": where, "smoke_test": smoke, "waited_s": round(waited, 1)}
        if loaded and smoke_ok:
            if d.evidence.get("after_preload") == "promote":
                requested = d.evidence.get("requested_by") or self.actor
                reason = f"loaded on every replica and smoke-tested ({smoke}); champion now"
                return self._promote(d, requested, reason, evidence, baseline=self._kept_baseline(d))
            return self._start_canary(d, evidence)
        problem = where if not loaded else f"smoke test failed: {smoke}"
        if waited > self.deploy.smoke_timeout_s:
            reason = f"not ready within {self.deploy.smoke_timeout_s:g} s (deploy.smoke_timeout_s): {problem}"
            return self._end(d, "failed", "fail", reason, evidence, self.actor)
        return self._hold(d, "loading" if not loaded else "smoke_failed", f"preloading: {problem}", evidence)

    def _start_canary(self, d: Deployment, evidence: dict[str, Any]) -> Deployment:
        share = self.deploy.canary_share
        d = self._transition(
            d,
            "canary",
            actor=self.actor,
            decision="canary",
            reason=f"loaded on every replica and smoke-tested; the challenger answers {share:.0%} of the sessions "
            "asking for champion (deploy.canary_share)",
            evidence=evidence,
            share=share,
            merge_evidence={"preloaded": True, "canary_share": share, "canary_active_s": 0.0},
        )
        self._settle(d)
        return d

    def _judge_canary(self, d: Deployment) -> Deployment:
        live = self.live.canary(d.id)
        decision = decide_canary(live, self.deploy)
        minutes = self._canary_seconds(d) / 60
        decision.evidence["canary_minutes"] = round(minutes, 2)
        if decision.action == "rollback":
            return self._end(d, "rolled_back", "rollback", decision.reason, decision.evidence, self.actor)
        if decision.action == "promote":
            return self._promote(d, self.actor, decision.reason, decision.evidence, baseline=live.champion)
        if minutes > self.deploy.max_canary_minutes:
            reason = (
                f"inconclusive after {minutes:.1f} min of canary (deploy.max_canary_minutes "
                f"{self.deploy.max_canary_minutes:g}): {decision.reason}"
            )
            if self.deploy.on_timeout == "rollback":
                return self._end(d, "rolled_back", "timeout", reason, decision.evidence, self.actor)
            d = self._transition(
                d,
                "awaiting_operator",
                actor=self.actor,
                decision="timeout",
                reason=reason + "; traffic back on the champion, waiting for an operator (deploy.on_timeout: wait)",
                evidence=decision.evidence,
                share=0.0,
                merge_evidence={"canary_active_s": self._canary_seconds(d), "baseline": live.champion.to_json()},
            )
            self._settle(d)
            return d
        return self._hold(d, decision.code, decision.reason, decision.evidence)

    def _watch(self, d: Deployment) -> Deployment:
        current = self.live.served_since(d.adapter_id, d.adapter_id, d.state_since)
        baseline = ArmEvidence.from_json(d.evidence.get("baseline"))
        decision = decide_watch(baseline, current, self.deploy)
        minutes = self._in_state_s(d) / 60
        decision.evidence["watch_minutes"] = round(minutes, 2)
        if decision.action == "rollback":
            back = self._previous(d) or f"the base model {self.cfg.model.base_model}"
            reason = f"dropped after promotion: {decision.reason}; champion back to {back}"
            return self._end(d, "rolled_back", "rollback", reason, decision.evidence, self.actor)
        if minutes >= self.deploy.watch_minutes:
            reason = (
                f"watched for {minutes:.1f} min (deploy.watch_minutes {self.deploy.watch_minutes:g}) without a "
                f"significant drop; {decision.reason}"
            )
            return self._end(d, "completed", "complete", reason, decision.evidence, self.actor)
        return self._hold(d, decision.code, decision.reason, decision.evidence)

    # --- moves -------------------------------------------------------------------------------------

    def _promote(
        self, d: Deployment, actor: str, reason: str, evidence: dict[str, Any], *, baseline: ArmEvidence | None
    ) -> Deployment:
        """Champion alias to the adapter (after the transition to ``watching`` commits); the champion
        it replaces is kept as the previous one, with its baseline for the watch."""
        previous = self.registry.champion()
        if baseline is None:
            model_version = previous or self.cfg.model.base_model
            # The store's timestamps are wall-clock time, whatever clock this deployer measures durations on.
            now = datetime.now(UTC)
            baseline = self.live.served_before(model_version, previous, now, BASELINE_INTERACTIONS)
        d = self._transition(
            d,
            "watching",
            actor=actor,
            decision="promote",
            reason=reason,
            evidence=evidence,
            share=0.0,
            merge_evidence={
                "previous_champion": previous,
                "baseline": baseline.to_json(),
                "promoted": True,
                "preloaded": True,
                "canary_active_s": self._canary_seconds(d),
            },
        )
        self._settle(d, reason)
        return d

    def _end(
        self, d: Deployment, state: str, decision: str, reason: str, evidence: Mapping[str, Any], actor: str
    ) -> Deployment:
        d = self._transition(d, state, actor=actor, decision=decision, reason=reason, evidence=evidence, share=0.0)
        self._settle(d, reason)
        return d

    def _hold(self, d: Deployment, code: str, reason: str, evidence: Mapping[str, Any]) -> Deployment:
        """Record a hold when its reason changed or :data:`HOLD_RECORD_S` passed since the last."""
        now = self.clock()
        last = d.evidence.get("last_hold") or {}
        same = last.get("code") == code and last.get("state") == d.state and last.get("at")
        if same and (now - datetime.fromisoformat(last["at"])).total_seconds() < HOLD_RECORD_S:
            return d
        return self._transition(
            d,
            d.state,
            actor=self.actor,
            decision="hold",
            reason=reason,
            evidence=evidence,
            merge_evidence={"last_hold": {"code": code, "state": d.state, "at": now.isoformat()}},
        )

    def _settle(self, d: Deployment, reason: str | None = None) -> None:
        """Make the registry's aliases and statuses agree with ``d``'s state; only those nobody has
        moved since ``d``'s last change of state (a hand-made move after it is left alone)."""
        aliases = self.registry.aliases()
        want_alias: dict[str, str | None] = {}
        want_status: dict[str, str] = {}
        a, previous = d.adapter_id, self._previous(d)
        if aliases.get("challenger") == a and d.state not in ("canary", "paused"):
            want_alias["challenger"] = None
        if d.state in ("canary", "paused"):
            want_alias["challenger"] = a
            want_status[a] = "challenger"
        elif d.state in ("watching", "completed"):
            want_alias["champion"] = a
            want_status[a] = "champion"
            if previous:
                want_status[previous] = "retired"
        elif d.state in ("rolled_back", "cancelled"):
            want_status[a] = "rejected"
            if d.evidence.get("promoted"):
                if aliases.get("champion") == a:
                    want_alias["champion"] = previous
                if previous:
                    want_status[previous] = "champion"
        since = d.state_since
        for alias in ("champion", "challenger"):  # the new champion named before the challenger alias goes
            if alias not in want_alias:
                continue
            target = want_alias[alias]
            if aliases.get(alias) != target and not self._moved_since("alias", alias, since):
                why = reason or self._last_reason(d)
                self.registry.set_alias(alias, target, self.actor, f"deployment {d.id} {d.state}: {why}")
        for adapter_id, status in want_status.items():
            row = self.registry.get(adapter_id)
            if row is not None and row["status"] != status and not self._moved_since("status", adapter_id, since):
                why = reason or self._last_reason(d)
                self.registry.set_status(adapter_id, status, self.actor, f"deployment {d.id} {d.state}: {why}")

    def _moved_since(self, kind: Literal["alias", "status"], target: str, since: datetime) -> bool:
        if kind == "alias":
            rows = self.store._fetch(
                "SELECT created_at AS at FROM alias_history WHERE alias = ? ORDER BY id DESC LIMIT 1", [target]
            )
        else:
            rows = self.store._fetch(
                "SELECT timestamp AS at FROM audit_log WHERE action = 'adapter.status' AND target = ? "
                "ORDER BY id DESC LIMIT 1",
                [target],
            )
        return bool(rows) and _as_time(rows[0]["at"]) >= since

    def _create(self, adapter_id: str, strategy: str, state: str, **options: Any) -> Deployment:
        evidence = {**options.pop("evidence", {}), "entered": {"state": state, "at": self.clock().isoformat()}}
        return self.deployments.create(adapter_id, strategy, state, evidence=evidence, **options)

    def _transition(self, d: Deployment, to_state: str, **options: Any) -> Deployment:
        """:meth:`DeploymentStore.transition`, keeping the time of a change of state on this
        deployer's clock (the store stamps its own; durations are measured on one clock)."""
        if to_state != d.state:
            merge = dict(options.pop("merge_evidence", None) or {})
            merge["entered"] = {"state": to_state, "at": self.clock().isoformat()}
            options["merge_evidence"] = merge
        return self.deployments.transition(d, to_state, **options)

    def _in_state_s(self, d: Deployment) -> float:
        """Seconds since ``d`` entered its state, on this deployer's clock."""
        entered = d.evidence.get("entered") or {}
        start = _as_time(entered["at"]) if entered.get("state") == d.state else d.state_since
        return max(0.0, (self.clock() - start).total_seconds())

    def _last_reason(self, d: Deployment) -> str:
        decisions = self.deployments.decisions(d.id)
        return decisions[-1]["reason"] if decisions else d.state

    def _previous(self, d: Deployment) -> str | None:
        """The champion the adapter replaced (what a rollback after promotion goes back to)."""
        return d.evidence.get("previous_champion", d.previous_champion)

    def _kept_baseline(self, d: Deployment) -> ArmEvidence | None:
        return ArmEvidence.from_json(d.evidence["baseline"]) if d.evidence.get("baseline") else None

    def _canary_seconds(self, d: Deployment) -> float:
        """Time spent in ``canary`` (pauses not counted)."""
        spent = float(d.evidence.get("canary_active_s") or 0.0)
        if d.state == "canary":
            spent += self._in_state_s(d)
        return spent

    # --- operators -----------------------------------------------------------------------------------

    def promote(self, adapter_id: str, actor: str, reason: str) -> Deployment:
        """An operator makes ``adapter_id`` champion: at once from a canary (even an inconclusive
        one: the operator's call); through preloading and the smoke test otherwise (a manual
        deployment, a staging verdict, a canary that timed out), which the next tick completes.

        Raises:
            ValueError: an empty actor or reason; another adapter's deployment is active; the
                adapter is already champion or being watched.
            AdapterNotRegisteredError: no such adapter.
            StaleDeploymentError: the deployment changed while this decided.
        """
        _check_text("actor", actor)
        _check_text("reason", reason)
        with self._lock:
            d = self.deployments.active()
            if d is not None and d.adapter_id != adapter_id:
                raise ValueError(
                    f"adapter_id {adapter_id!r}: deployment {d.id} of {d.adapter_id} is active ({d.state}); "
                    "roll it back first"
                )
            why = f"operator {actor}: {reason}"
            if d is None:
                if self.registry.get(adapter_id) is None:
                    raise AdapterNotRegisteredError(f"adapter_id {adapter_id!r} is not registered")
                champion = self.registry.champion()
                if champion == adapter_id:
                    raise ValueError(f"adapter_id {adapter_id!r} is already the champion")
                validation = self.deployments.latest_validation(adapter_id)
                return self._create(
                    adapter_id,
                    "manual",
                    "preloading",
                    actor=actor,
                    reason=f"{why}; loading it on every Generator replica and smoke-testing it first",
                    previous_champion=champion,
                    validation_id=validation["id"] if validation else None,
                    evidence={"after_preload": "promote", "requested_by": actor},
                )
            if d.state in ("canary", "paused"):
                live = self.live.canary(d.id)
                return self._promote(d, actor, why, {"arms": live.to_json()}, baseline=live.champion)
            if d.state in ("preloading", "awaiting_operator"):
                return self._transition(
                    d,
                    "preloading",
                    actor=actor,
                    decision="promote",
                    reason=f"{why}; champion once loaded on every replica and smoke-tested",
                    share=0.0,
                    merge_evidence={"after_preload": "promote", "requested_by": actor},
                )
            raise ValueError(f"adapter_id {adapter_id!r}: deployment {d.id} has already promoted it ({d.state})")

    def rollback(self, deployment_id: str | None, actor: str, reason: str) -> Deployment:
        """An operator ends a deployment (the active one when ``deployment_id`` is None): one that
        has served traffic is rolled back (the champion it replaced restored), one that has not is
        cancelled; either way the adapter's status becomes ``rejected`` with the reason.

        Raises:
            ValueError: an empty actor or reason, no active deployment, or one that has ended.
            DeploymentNotFoundError: no such deployment.
            StaleDeploymentError: the deployment changed while this decided.
        """
        _check_text("actor", actor)
        _check_text("reason", reason)
        with self._lock:
            d = self._target(deployment_id)
            served = d.state in ("canary", "paused", "watching") or bool(
                d.evidence.get("promoted") or d.evidence.get("canary_share")
            )
            evidence: dict[str, Any] = {}
            if d.state in ("canary", "paused"):
                evidence = {"arms": self.live.canary(d.id).to_json()}
            elif d.state == "watching":
                evidence = {"current": self.live.served_since(d.adapter_id, d.adapter_id, d.state_since).to_json()}
            state = "rolled_back" if served else "cancelled"
            return self._end(d, state, "rollback", f"operator {actor}: {reason}", evidence, actor)

    def pause(self, deployment_id: str | None, actor: str, reason: str) -> Deployment:
        """Stop a canary's traffic (share 0) without deciding; its time limit stops too.

        Raises:
            ValueError: an empty actor or reason, or a deployment that is not in ``canary``.
        """
        _check_text("actor", actor)
        _check_text("reason", reason)
        with self._lock:
            d = self._target(deployment_id)
            if d.state != "canary":
                raise ValueError(f"deployment {d.id} is {d.state}; only a canary can be paused")
            return self._transition(
                d,
                "paused",
                actor=actor,
                decision="pause",
                reason=f"operator {actor}: {reason}",
                share=0.0,
                merge_evidence={"canary_active_s": self._canary_seconds(d)},
            )

    def resume(self, deployment_id: str | None, actor: str, reason: str) -> Deployment:
        """Send a paused canary its share of sessions again.

        Raises:
            ValueError: an empty actor or reason, or a deployment that is not ``paused``.
        """
        _check_text("actor", actor)
        _check_text("reason", reason)
        with self._lock:
            d = self._target(deployment_id)
            if d.state != "paused":
                raise ValueError(f"deployment {d.id} is {d.state}; only a paused canary can be resumed")
            share = float(d.evidence.get("canary_share") or self.deploy.canary_share)
            return self._transition(
                d,
                "canary",
                actor=actor,
                decision="resume",
                reason=f"operator {actor}: {reason}",
                share=share,
            )

    def status(self) -> dict[str, Any]:
        """What ``kaizen deploy status`` and ``GET /v1/deployments`` show: the strategy, the
        aliases, the active deployment with its latest decisions and live evidence, adapters
        waiting for a deployment, and the recent deployments."""
        with self._lock:
            d = self.deployments.active()
            out: dict[str, Any] = {
                "strategy": self.cfg.model.deployment_strategy,
                "aliases": self.registry.aliases(),
                "active": d.to_json() if d else None,
                "waiting": [v["adapter_id"] for v in self.deployments.undeployed_validations("production")],
                "recent": [x.to_json() for x in self.deployments.list(limit=10)],
            }
            if d is not None:
                out["decisions"] = self.deployments.decisions(d.id)[-10:]
                if d.state in ("canary", "paused"):
                    live = decide_canary(self.live.canary(d.id), self.deploy)
                    out["live"] = {
                        "rule": live.action,
                        "reason": live.reason,
                        "canary_minutes": round(self._canary_seconds(d) / 60, 2),
                        **live.evidence,
                    }
                elif d.state == "watching":
                    current = self.live.served_since(d.adapter_id, d.adapter_id, d.state_since)
                    live = decide_watch(ArmEvidence.from_json(d.evidence.get("baseline")), current, self.deploy)
                    out["live"] = {"rule": live.action, "reason": live.reason, **live.evidence}
            return out

    def _target(self, deployment_id: str | None) -> Deployment:
        if deployment_id is None:
            d = self.deployments.active()
            if d is None:
                raise ValueError("deployment_id: no deployment is active")
        else:
            d = self.deployments.get(deployment_id)
        if not d.active:
            raise ValueError(
                f"deployment {d.id} has ended ({d.state}); to change what serves now, move the champion alias"
            )
        return d


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _as_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
