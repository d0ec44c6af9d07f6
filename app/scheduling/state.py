"""What the scheduler keeps in the store: learning cycles as rows of ``training_runs`` (migration 1),
and its decisions in ``audit_log`` (action ``training.decision``).

A row's life (``status``):

* ``scheduled``: a trigger fired or an operator asked, and the cycle waits (for the running one to
  end, resources, the off-peak window, a back-off). There is at most one: triggers that fire
  meanwhile are merged into it;
* ``running``: launched with a data cut-off; at most one at a time (:meth:`TrainingRunStore.claim`
  refuses a second in the same transaction that would start it);
* ``succeeded``, ``failed``, ``cancelled`` (a scheduled cycle whose triggers stopped holding).

The row's JSON columns hold what the table has no column for. ``config``: ``triggers`` (each
trigger that fired: its reason and when it first and last fired), ``requests`` (operators' manual
requests), ``scheduled_at``, ``data_cutoff`` (the cycle learns the interactions before it; the next
cycle's new data is what came after), ``needs`` (the resources it waited for) and ``launch`` (how it
was started: a Ray job's id, or a process with its log). ``metrics``: ``stages`` (each stage as the
cycle reported it), ``reason`` (why it ended so) and ``record`` (the cycle's own record, when it
printed one).

Times are the scheduler's clock (what its durations, back-off and window are measured on).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from app.store.base import InteractionStore

__all__ = [
    "DECISION_ACTION",
    "FINAL_STATUSES",
    "SCHEDULER_ACTOR",
    "STATUSES",
    "TRIGGER_ORDER",
    "RunStatus",
    "StaleRunError",
    "TrainingRun",
    "TrainingRunNotFoundError",
    "TrainingRunStore",
    "as_time",
    "new_run_id",
]

SCHEDULER_ACTOR = "kaizen-scheduler"
"""The scheduler actor's name in ``ray.namespace`` (``actors/scheduler.py``); the HTTP API reaches
it by this name."""

RunStatus = Literal["scheduled", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[str, ...] = get_args(RunStatus)
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
TRIGGER_ORDER = ("volume", "quality", "time")
"""The automatic triggers in the order their reasons are given (of those that first fired together)."""
DECISION_ACTION = "training.decision"
"""The ``audit_log`` action of every scheduler decision."""


class TrainingRunNotFoundError(LookupError):
    """A training run id the store has no row for."""


class StaleRunError(RuntimeError):
    """The run changed since it was read, or another cycle runs (another process decided first)."""


def new_run_id(now: datetime | None = None) -> str:
    """``run-YYYYMMDD-HHMMSS-<6 hex>``: sortable by time, apart between processes in one second."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"run-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def as_time(value: Any) -> datetime:
    """A stored timestamp (a datetime from PostgreSQL, ISO 8601 text from SQLite or JSON) in UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class TrainingRun:
    """One learning cycle's row (see the module docstring for its JSON columns)."""

    id: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    adapter_id: str | None

    @property
    def triggers(self) -> dict[str, dict[str, Any]]:
        """The triggers that fired for it, by name: ``{reason, first_at, last_at}``, in the order
        they first fired (PostgreSQL's JSON keeps no key order of its own)."""
        found = dict(self.config.get("triggers") or {})

        def first(name: str) -> tuple[str, int, str]:
            rank = TRIGGER_ORDER.index(name) if name in TRIGGER_ORDER else len(TRIGGER_ORDER)
            return (str(found[name].get("first_at", "")), rank, name)

        return {name: found[name] for name in sorted(found, key=first)}

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Operators' manual requests merged into it: ``{actor, reason, at}``."""
        return list(self.config.get("requests") or [])

    @property
    def manual(self) -> bool:
        """Whether an operator asked for it (a manual request is not held by the window or a back-off)."""
        return bool(self.requests)

    @property
    def trigger(self) -> str:
        """The trigger that started it: ``manual`` when an operator asked, else the first that fired."""
        if self.manual:
            return "manual"
        names = list(self.triggers)
        return names[0] if names else "unknown"

    @property
    def data_cutoff(self) -> datetime | None:
        value = self.config.get("data_cutoff")
        return as_time(value) if value else None

    @property
    def launched(self) -> bool:
        return bool(self.config.get("launch"))

    def reasons(self) -> list[str]:
        """Why it was scheduled, in words: each trigger's reason, then each request."""
        out = [f"{name}: {t.get('reason', '')}" for name, t in self.triggers.items()]
        out += [f"manual: {r.get('actor')}: {r.get('reason')}" for r in self.requests]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "trigger": self.trigger,
            "reasons": self.reasons(),
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "data_cutoff": self.data_cutoff.isoformat() if self.data_cutoff else None,
            "adapter_id": self.adapter_id,
            "config": self.config,
            "metrics": self.metrics,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TrainingRun:
        return cls(
            id=row["id"],
            status=row["status"],
            started_at=as_time(row["started_at"]),
            finished_at=as_time(row["finished_at"]) if row.get("finished_at") else None,
            config=dict(row.get("config") or {}),
            metrics=dict(row.get("metrics") or {}),
            adapter_id=row.get("adapter_id"),
        )


class TrainingRunStore:
    """Training runs and the scheduler's decisions in the interaction store's database (SQLite or
    PostgreSQL)."""

    def __init__(self, store: InteractionStore) -> None:
        self.store = store

    # --- reads ---------------------------------------------------------------------------------

    def get(self, run_id: str) -> TrainingRun:
        rows = self.store._fetch("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if not rows:
            raise TrainingRunNotFoundError(f"training run {run_id!r} does not exist")
        return TrainingRun.from_row(rows[0])

    def list(self, limit: int = 20, status: str | None = None) -> list[TrainingRun]:
        """The most recent runs, newest first (only those with ``status`` when given)."""
        if status is None:
            rows = self.store._fetch("SELECT * FROM training_runs ORDER BY started_at DESC, id DESC LIMIT ?", [limit])
        else:
            rows = self.store._fetch(
                "SELECT * FROM training_runs WHERE status = ? ORDER BY started_at DESC, id DESC LIMIT ?",
                [_check_status(status), limit],
            )
        return [TrainingRun.from_row(r) for r in rows]

    def running(self) -> TrainingRun | None:
        """The cycle running now, if any (there is at most one)."""
        runs = self.list(limit=1, status="running")
        return runs[0] if runs else None

    def scheduled(self) -> TrainingRun | None:
        """The cycle waiting to start, if any (there is at most one)."""
        runs = self.list(limit=1, status="scheduled")
        return runs[0] if runs else None

    def last_started(self) -> TrainingRun | None:
        """The cycle launched last (running or ended), if any; a cancelled one never started."""
        rows = self.store._fetch(
            "SELECT * FROM training_runs WHERE status IN ('running', 'succeeded', 'failed') "
            "ORDER BY started_at DESC, id DESC LIMIT 1"
        )
        return TrainingRun.from_row(rows[0]) if rows else None

    def last_succeeded(self) -> TrainingRun | None:
        rows = self.store._fetch(
            "SELECT * FROM training_runs WHERE status = 'succeeded' ORDER BY finished_at DESC, id DESC LIMIT 1"
        )
        return TrainingRun.from_row(rows[0]) if rows else None

    def failures_in_a_row(self, limit: int = 32) -> list[TrainingRun]:
        """The failed cycles since the last one that succeeded, newest first (at most ``limit``)."""
        rows = self.store._fetch(
            "SELECT * FROM training_runs WHERE status IN ('succeeded', 'failed') "
            "ORDER BY finished_at DESC, id DESC LIMIT ?",
            [limit],
        )
        out = []
        for row in rows:
            if row["status"] == "succeeded":
                break
            out.append(TrainingRun.from_row(row))
        return out

    # --- changes -------------------------------------------------------------------------------

    def schedule(
        self,
        now: datetime,
        *,
        triggers: Mapping[str, str] | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> TrainingRun:
        """Merge fired ``triggers`` (name → reason) and an operator's ``request`` into the scheduled
        cycle, creating it when there is none (one scheduled cycle at a time)."""
        at = now.isoformat()
        with self.store._transaction() as cur:
            self._lock(cur)
            rows = self.store._execute(
                cur, "SELECT * FROM training_runs WHERE status = 'scheduled' ORDER BY started_at DESC LIMIT 1"
            )
            config = dict(rows[0]["config"] or {}) if rows else {"scheduled_at": at, "triggers": {}, "requests": []}
            merged = dict(config.get("triggers") or {})
            for name, reason in (triggers or {}).items():
                first = (merged.get(name) or {}).get("first_at", at)
                merged[name] = {"reason": reason, "first_at": first, "last_at": at}
            config["triggers"] = merged
            if request is not None:
                config["requests"] = [*(config.get("requests") or []), {**dict(request), "at": at}]
            if rows:
                run_id = rows[0]["id"]
                self.store._execute(cur, "UPDATE training_runs SET config = ? WHERE id = ?", [config, run_id])
            else:
                run_id = new_run_id(now)
                self.store._execute(
                    cur,
                    "INSERT INTO training_runs (id, status, started_at, config, metrics) VALUES (?, ?, ?, ?, ?)",
                    [run_id, "scheduled", now, config, {}],
                )
        return self.get(run_id)

    def claim(self, run: TrainingRun, now: datetime, *, data_cutoff: datetime, needs: Mapping[str, Any]) -> TrainingRun:
        """Move the scheduled ``run`` to ``running`` with its data cut-off, unless another cycle
        runs or the run is no longer scheduled (both checked in the same statement).

        Raises:
            StaleRunError: another cycle runs, or the run changed state since it was read.
        """
        with self.store._transaction() as cur:
            self._lock(cur)
            rows = self.store._execute(cur, "SELECT * FROM training_runs WHERE id = ?", [run.id])
            if not rows or rows[0]["status"] != "scheduled":
                raise StaleRunError(f"training run {run.id} is no longer scheduled")
            config = {
                **dict(rows[0]["config"] or {}),
                "data_cutoff": data_cutoff.isoformat(),
                "needs": dict(needs),
                "launched_at": now.isoformat(),
            }
            updated = self.store._execute(
                cur,
                "UPDATE training_runs SET status = 'running', started_at = ?, config = ? WHERE id = ? "
                "AND status = 'scheduled' AND NOT EXISTS (SELECT 1 FROM training_runs WHERE status = 'running') "
                "RETURNING id",
                [now, config, run.id],
            )
            if not updated:
                raise StaleRunError(f"training run {run.id} cannot start: another cycle is running")
        return self.get(run.id)

    def set_launch(self, run_id: str, launch: Mapping[str, Any]) -> TrainingRun:
        """Keep how the running cycle was started (what its outcome is read back from)."""
        return self._merge(run_id, config={"launch": dict(launch)})

    def record_stage(self, run_id: str, stage: str, info: Mapping[str, Any]) -> TrainingRun:
        """Keep one stage of a cycle (``metrics.stages[stage]``), e.g. as the cycle reports it."""
        return self._merge(run_id, stage=(stage, info))

    def finish(
        self,
        run: TrainingRun,
        status: Literal["succeeded", "failed", "cancelled"],
        now: datetime,
        *,
        reason: str,
        metrics: Mapping[str, Any] | None = None,
        adapter_id: str | None = None,
    ) -> TrainingRun:
        """End ``run`` with ``status`` and why; ``metrics`` are merged into its metrics.

        Raises:
            ValueError: a status that is not final, or a run that has already ended.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(sorted(FINAL_STATUSES))}")
        with self.store._transaction() as cur:
            rows = self.store._execute(cur, "SELECT * FROM training_runs WHERE id = ?", [run.id])
            if not rows:
                raise TrainingRunNotFoundError(f"training run {run.id!r} does not exist")
            if rows[0]["status"] in FINAL_STATUSES:
                raise ValueError(f"training run {run.id} has already ended ({rows[0]['status']})")
            kept, new = dict(rows[0]["metrics"] or {}), dict(metrics or {})
            # A stage the cycle kept as it ran keeps what it said; the outcome's figures join it.
            stages = {
                name: {**dict((kept.get("stages") or {}).get(name) or {}), **dict(info)}
                for name, info in (new.get("stages") or {}).items()
            }
            merged = {**kept, **new, "stages": {**dict(kept.get("stages") or {}), **stages}, "reason": reason}
            self.store._execute(
                cur,
                "UPDATE training_runs SET status = ?, finished_at = ?, metrics = ?, adapter_id = ? WHERE id = ?",
                [status, now, merged, adapter_id or rows[0].get("adapter_id"), run.id],
            )
        return self.get(run.id)

    # --- decisions -----------------------------------------------------------------------------

    def decide(
        self,
        now: datetime,
        actor: str,
        code: str,
        reason: str,
        details: Mapping[str, Any],
        run_id: str | None = None,
    ) -> None:
        """Audit one decision (``training.decision``; target: the run it is about, else ``scheduler``)."""
        self.store.audit(
            actor, DECISION_ACTION, run_id or "scheduler", {"code": code, "reason": reason, **details}, now=now
        )

    def decisions(self, limit: int = 20, run_id: str | None = None) -> list[dict[str, Any]]:
        """The scheduler's latest decisions, oldest first: ``{at, actor, target, code, reason, ...}``."""
        sql, params = "SELECT * FROM audit_log WHERE action = ?", [DECISION_ACTION]
        if run_id is not None:
            sql += " AND target = ?"
            params.append(run_id)
        rows = self.store._fetch(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])
        out = []
        for row in reversed(rows):
            details = dict(row.get("details") or {})
            out.append(
                {"at": as_time(row["timestamp"]).isoformat(), "actor": row["actor"], "target": row["target"], **details}
            )
        return out

    def last_decision(self) -> dict[str, Any] | None:
        found = self.decisions(limit=1)
        return found[0] if found else None

    # --- helpers -------------------------------------------------------------------------------

    def _merge(
        self,
        run_id: str,
        *,
        config: Mapping[str, Any] | None = None,
        stage: tuple[str, Mapping[str, Any]] | None = None,
    ) -> TrainingRun:
        """Merge keys into a run's config, or one stage into its metrics, in one transaction."""
        with self.store._transaction() as cur:
            rows = self.store._execute(cur, "SELECT config, metrics FROM training_runs WHERE id = ?", [run_id])
            if not rows:
                raise TrainingRunNotFoundError(f"training run {run_id!r} does not exist")
            metrics = dict(rows[0]["metrics"] or {})
            if stage is not None:
                metrics["stages"] = {**dict(metrics.get("stages") or {}), stage[0]: dict(stage[1])}
            self.store._execute(
                cur,
                "UPDATE training_runs SET config = ?, metrics = ? WHERE id = ?",
                [{**dict(rows[0]["config"] or {}), **dict(config or {})}, metrics, run_id],
            )
        return self.get(run_id)

    def _lock(self, cur: Any) -> None:
        # One scheduled and one running cycle at a time: two schedulers must not both see none.
        if self.store.engine == "postgres":
            cur.execute("LOCK TABLE training_runs IN SHARE ROW EXCLUSIVE MODE")
        # SQLite: the store's BEGIN IMMEDIATE already holds the write lock.


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    return status
