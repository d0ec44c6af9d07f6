"""The scheduler: decides when a learning cycle starts, starts it, and follows it to its end.

At every check (:meth:`Scheduler.tick`, every ``training.check_interval_s`` in the actor):

1. a running cycle's outcome is read back from its launcher; a cycle that ended is recorded
   (``succeeded`` with its adapter, or ``failed`` with the reason);
2. the triggers are measured (:mod:`app.scheduling.triggers`: volume, quality, time) on the data
   after the data cut-off of the running cycle, else of the last cycle that succeeded;
3. a trigger that fires schedules a cycle, or is merged into the one already scheduled (one cycle
   runs at a time: what fires during it starts the next); an operator's :meth:`Scheduler.request`
   (the manual trigger) does the same;
4. the scheduled cycle starts when nothing holds it: a running cycle; a back-off after failed cycles
   (``training.backoff_minutes``, doubled per failure in a row, at most ``training.interval_hours``);
   the off-peak window (``training.window``); resources (:mod:`app.scheduling.resources`: what the
   cycle needs against what the Ray cluster has free beside Serve). A manual request is held by
   the running cycle and by resources only. A scheduled cycle whose triggers stopped firing and
   that no operator asked for is cancelled;
5. the cycle starts with a data cut-off (now): it learns what came before it.

``enabled: false`` starts nothing (not even a request); ``training.auto_training: false`` starts only
what an operator asks for. Either way every check still measures the triggers and records what it
would start and why.

Every decision goes to the audit log (``training.decision``, :class:`TrainingRunStore.decide`) with
its reason and evidence; one that only repeats the last (the same code, triggers and blockers) is
recorded again at most every :data:`DECISION_REPEAT_S`. The cycles are rows of ``training_runs``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from app.config import KaizenConfig
from app.scheduling.launcher import CycleLauncher, CycleOutcome
from app.scheduling.resources import ClusterResources, CycleNeeds, OffPeakWindow, ResourceCheck, check_resources
from app.scheduling.state import StaleRunError, TrainingRun, TrainingRunStore, as_time
from app.scheduling.triggers import DataEvidence, TriggerCheck, check_triggers, measure
from app.store.base import InteractionStore

__all__ = ["DECISION_REPEAT_S", "Backoff", "Plan", "Scheduler", "request_cycle"]

log = logging.getLogger("kaizen.scheduler")

DECISION_REPEAT_S = 3600.0
"""A decision that repeats the last one (nothing fired; still waiting for the same thing) is
recorded again at most this often (seconds), so that the audit log says the scheduler is alive
without a row per check."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Backoff:
    """The wait after ``failures`` failed cycles in a row, the last ended at ``last_failed_at``."""

    failures: int
    minutes: float
    last_failed_at: datetime
    until: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "failures": self.failures,
            "minutes": self.minutes,
            "last_failed_at": self.last_failed_at.isoformat(),
            "until": self.until.isoformat(),
        }


@dataclass(frozen=True)
class Plan:
    """One check's view of everything a decision depends on."""

    now: datetime
    evidence: DataEvidence
    checks: list[TriggerCheck]
    running: TrainingRun | None
    scheduled: TrainingRun | None
    backoff: Backoff | None
    window: OffPeakWindow | None
    resources: ResourceCheck

    @property
    def fired(self) -> list[TriggerCheck]:
        return [c for c in self.checks if c.fired]

    def blockers(self, manual: bool) -> list[tuple[str, str]]:
        """What holds a cycle back now, as ``(code, reason)``: the running cycle, then (unless an
        operator asked for it) the back-off and the window, then the resources."""
        out = []
        if self.running is not None:
            out.append(("running", f"cycle {self.running.id} is running (one at a time): this one starts after it"))
        if not manual and self.backoff is not None and self.now < self.backoff.until:
            b = self.backoff
            out.append(
                (
                    "backoff",
                    f"backing off after {b.failures} failed cycle{'s' if b.failures > 1 else ''} in a row (the last "
                    f"at {b.last_failed_at.isoformat(timespec='seconds')}): {b.minutes:g} min "
                    "(training.backoff_minutes doubled per failure, at most training.interval_hours), until "
                    f"{b.until.isoformat(timespec='seconds')}",
                )
            )
        if not manual and self.window is not None and not self.window.contains(self.now):
            opens = self.window.next_start(self.now).isoformat(timespec="minutes")
            out.append(("window", f"outside the off-peak window {self.window} (training.window): it opens at {opens}"))
        if not self.resources.ok:
            out.append(("resources", self.resources.reason))
        return out


class Scheduler:
    """The training decision engine (see the module docstring).

    Args:
        cfg: reads ``enabled``, the ``training`` section, the inclusion threshold
            (``dataset.threshold`` or ``quality.threshold``), ``model.base_model`` and what a cycle
            needs (``finetune``, ``ssr``, ``sweep``, ``learn``).
        store: the interaction store (interactions, registry, training runs and the audit log).
        launcher: starts a cycle and reports its end (:class:`CycleLauncher`).
        resources: the Ray cluster's free resources (:class:`ClusterResources`).
        clock: the current time (UTC); every time the scheduler writes and every duration it
            measures (intervals, back-off, window) is on it; tests move it.
        actor: the name automatic decisions are recorded under.

    Thread-safe: one lock serialises its methods (the actor's timer and operators' calls).
    """

    def __init__(
        self,
        cfg: KaizenConfig,
        store: InteractionStore,
        launcher: CycleLauncher,
        *,
        resources: ClusterResources,
        clock: Callable[[], datetime] = _utcnow,
        actor: str = "scheduler",
    ) -> None:
        self.cfg = cfg
        self.training = cfg.training
        self.store = store
        self.launcher = launcher
        self.resources = resources
        self.clock = clock
        self.actor = actor
        self.runs = TrainingRunStore(store)
        self.needs = CycleNeeds.of(cfg)
        self.window = OffPeakWindow.parse(cfg.training.window) if cfg.training.window else None
        self.last_check: datetime | None = None
        self._lock = threading.RLock()

    # --- the loop ----------------------------------------------------------------------------------

    def tick(self) -> TrainingRun | None:
        """One check (see the module docstring). Returns the cycle running or scheduled after it
        (the one it started, if it started one), or None."""
        with self._lock:
            now = self.clock()
            self.last_check = now
            running = self.runs.running()
            if running is not None and self._ended(running, now):
                running = None
            return self._act(self._plan(now, running))

    def _plan(self, now: datetime, running: TrainingRun | None) -> Plan:
        last_ok = self.runs.last_succeeded()
        cutoff = running.data_cutoff if running is not None else (last_ok.data_cutoff if last_ok else None)
        last = self.runs.last_started()
        evidence = measure(self.store, self.cfg, now, cutoff=cutoff, last_cycle_at=last.started_at if last else None)
        return Plan(
            now=now,
            evidence=evidence,
            checks=check_triggers(evidence, self.training),
            running=running,
            scheduled=self.runs.scheduled(),
            backoff=self._backoff(),
            window=self.window,
            resources=check_resources(self.needs, self.resources.available()),
        )

    def _act(self, plan: Plan) -> TrainingRun | None:
        now, fired, scheduled = plan.now, plan.fired, plan.scheduled
        if not self.cfg.enabled:
            self._would(plan, "enabled is false (the master switch): no cycle starts")
            return plan.running or scheduled
        if fired:
            if self.training.auto_training:
                scheduled = self.runs.schedule(now, triggers={c.name: c.reason for c in fired})
            elif scheduled is None:
                self._would(plan, "training.auto_training is false: the scheduler starts no cycle by itself")
                return plan.running
        if scheduled is None:
            self._note(plan, "no_trigger", "no trigger fired: " + "; ".join(c.reason for c in plan.checks))
            return plan.running
        if plan.running is not None:
            reason = f"{self._why(scheduled)}; waiting: {plan.blockers(scheduled.manual)[0][1]}"
            self._note(plan, "waiting", reason, scheduled, blockers=plan.blockers(scheduled.manual))
            return scheduled
        if not scheduled.manual and not (fired and self.training.auto_training):
            why = (
                "training.auto_training is false: a cycle scheduled by a trigger does not start"
                if not self.training.auto_training
                else "its triggers no longer fire: " + "; ".join(c.reason for c in plan.checks)
            )
            run = self.runs.finish(scheduled, "cancelled", now, reason=why)
            self._record(plan, "cancelled", f"cycle {run.id} cancelled: {why}", run)
            return None
        blockers = plan.blockers(scheduled.manual)
        if blockers:
            reason = f"{self._why(scheduled)}; waiting: " + "; ".join(text for _, text in blockers)
            self._note(plan, "waiting", reason, scheduled, blockers=blockers)
            return scheduled
        return self._launch(plan, scheduled)

    def _launch(self, plan: Plan, scheduled: TrainingRun) -> TrainingRun | None:
        now = plan.now
        try:
            run = self.runs.claim(scheduled, now, data_cutoff=now, needs=plan.resources.needs.to_json())
        except StaleRunError as exc:  # another process started or changed it: look again at the next check
            log.info("%s; deciding again at the next check", exc)
            return self.runs.running() or self.runs.scheduled()
        try:
            launch = dict(self.launcher.launch(run))
        except Exception as exc:
            why = f"the cycle could not be started: {type(exc).__name__}: {exc}"
            log.exception("starting cycle %s failed", run.id)
            run = self.runs.finish(run, "failed", now, reason=why)
            self._record(plan, "failed", f"cycle {run.id} failed: {why}", run)
            return run
        run = self.runs.set_launch(run.id, {**launch, "at": now.isoformat()})
        reason = (
            f"started cycle {run.id} ({run.trigger}): {'; '.join(run.reasons())}; data cut-off "
            f"{now.isoformat(timespec='seconds')}; {plan.resources.reason}"
        )
        self._record(plan, "started", reason, run, launch=launch)
        return run

    def _ended(self, run: TrainingRun, now: datetime) -> bool:
        """Record the end of the running cycle if it ended; whether it did."""
        if not run.launched:  # claimed by a scheduler that stopped before its launcher answered
            outcome: CycleOutcome | None = CycleOutcome("failed", "the scheduler stopped before the cycle started")
        else:
            outcome = self.launcher.outcome(run)
        if outcome is None:
            return False
        run = self.runs.finish(
            run, outcome.status, now, reason=outcome.reason, metrics=outcome.metrics, adapter_id=outcome.adapter_id
        )
        took = (now - run.started_at).total_seconds() / 60
        self.runs.decide(
            now,
            self.actor,
            outcome.status,
            f"cycle {run.id} {outcome.status} after {took:.1f} min: {outcome.reason}",
            {"adapter_id": outcome.adapter_id, "stages": outcome.metrics.get("stages", {})},
            run.id,
        )
        return True

    def _backoff(self) -> Backoff | None:
        failures = self.runs.failures_in_a_row()
        if not failures or failures[0].finished_at is None:
            return None
        k = len(failures)
        minutes = min(self.training.backoff_minutes * 2 ** (k - 1), self.training.interval_hours * 60)
        last = failures[0].finished_at
        return Backoff(k, minutes, last, last + timedelta(minutes=minutes))

    # --- recording -----------------------------------------------------------------------------------

    def _why(self, run: TrainingRun) -> str:
        return f"cycle {run.id} scheduled ({run.trigger}): " + "; ".join(run.reasons())

    def _would(self, plan: Plan, not_started: str) -> None:
        """Record what the scheduler would do, were it allowed to start cycles."""
        fired = plan.fired
        scheduled = plan.scheduled
        if not fired and scheduled is None:
            self._note(
                plan,
                "no_trigger",
                "no trigger fired: " + "; ".join(c.reason for c in plan.checks) + f" ({not_started})",
            )
            return
        what = [f"{c.name}: {c.reason}" for c in fired] + (scheduled.reasons() if scheduled else [])
        blockers = plan.blockers(manual=bool(scheduled and scheduled.manual))
        then = (
            "would wait: " + "; ".join(text for _, text in blockers)
            if blockers
            else "would start it now: " + plan.resources.reason
        )
        reason = f"would start a learning cycle ({'; '.join(what)}); {then}; not started: {not_started}"
        self._note(plan, "would_start", reason, blockers=blockers)

    def _details(self, plan: Plan, blockers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        return {
            "triggers": [c.to_json() for c in plan.checks],
            "blockers": [{"code": code, "reason": text} for code, text in blockers or []],
            "evidence": plan.evidence.to_json(),
            "resources": plan.resources.to_json(),
        }

    def _record(self, plan: Plan, code: str, reason: str, run: TrainingRun | None = None, **extra: Any) -> None:
        self.runs.decide(plan.now, self.actor, code, reason, {**self._details(plan), **extra}, run.id if run else None)

    def _note(
        self,
        plan: Plan,
        code: str,
        reason: str,
        run: TrainingRun | None = None,
        *,
        blockers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Record a decision that may only repeat the last one: when its code, run, triggers or
        blockers changed, or :data:`DECISION_REPEAT_S` after the last was recorded."""
        key = [code, run.id if run else None, sorted(c.name for c in plan.fired), [b for b, _ in blockers or []]]
        last = self.runs.last_decision()
        if last and last.get("key") == key and (plan.now - as_time(last["at"])).total_seconds() < DECISION_REPEAT_S:
            return
        details = {**self._details(plan, blockers), "key": key}
        self.runs.decide(plan.now, self.actor, code, reason, details, run.id if run else None)

    # --- operators -----------------------------------------------------------------------------------

    def request(self, actor: str, reason: str) -> TrainingRun:
        """An operator asks for a cycle (``kaizen learn --now``, ``POST /v1/training/runs``): it is
        scheduled (or merged into the scheduled one) and starts at the next check that finds no
        cycle running and the resources free, whatever the window, a back-off or
        ``training.auto_training`` say (:func:`request_cycle`)."""
        with self._lock:
            return request_cycle(self.cfg, self.runs, actor, reason, self.clock())

    def status(self) -> dict[str, Any]:
        """What ``kaizen training status`` and ``GET /v1/training`` show (nothing is decided or
        started by asking): the switches, the running and the scheduled cycle, each trigger's
        answer now, what holds the next cycle back, the last decisions, the last and next check,
        and the recent cycles."""
        with self._lock:
            now = self.clock()
            plan = self._plan(now, self.runs.running())
            scheduled = plan.scheduled
            window = None
            if self.window is not None:
                window = {
                    "hours": str(self.window),
                    "open": self.window.contains(now),
                    "opens_at": self.window.next_start(now).isoformat(),
                }
            next_check = (
                (self.last_check + timedelta(seconds=self.training.check_interval_s)).isoformat()
                if self.last_check
                else None
            )
            return {
                "enabled": self.cfg.enabled,
                "auto_training": self.training.auto_training,
                "now": now.isoformat(),
                "running": plan.running.to_json() if plan.running else None,
                "scheduled": scheduled.to_json() if scheduled else None,
                "triggers": [c.to_json() for c in plan.checks],
                "evidence": plan.evidence.to_json(),
                "blockers": [
                    {"code": code, "reason": text} for code, text in plan.blockers(bool(scheduled and scheduled.manual))
                ],
                "backoff": plan.backoff.to_json() if plan.backoff and now < plan.backoff.until else None,
                "window": window,
                "resources": plan.resources.to_json(),
                "last_decision": self.runs.last_decision(),
                "decisions": self.runs.decisions(limit=10),
                "last_check": self.last_check.isoformat() if self.last_check else None,
                "next_check": next_check,
                "check_interval_s": self.training.check_interval_s,
                "recent": [r.to_json() for r in self.runs.list(limit=10)],
            }


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def request_cycle(cfg: KaizenConfig, runs: TrainingRunStore, actor: str, reason: str, now: datetime) -> TrainingRun:
    """Schedule a cycle an operator asked for (merged into the one already scheduled), with the
    decision that says so. Kept in the store, it waits there for the scheduler's next check: a
    request made while no scheduler runs is served when one starts.

    Raises:
        ValueError: an empty actor or reason, or ``enabled`` is false.
    """
    _check_text("actor", actor)
    _check_text("reason", reason)
    if not cfg.enabled:
        raise ValueError("enabled is false (the master switch): no cycle starts, not even on request")
    run = runs.schedule(now, request={"actor": actor, "reason": reason})
    running = runs.running()
    when = (
        f"it starts after cycle {running.id}, which is running"
        if running is not None
        else "it starts at the next check once the resources are free"
    )
    runs.decide(now, actor, "requested", f"operator {actor} asked for a cycle: {reason}; {when}", {}, run.id)
    return run
