"""What deployment keeps in the store: validation verdicts, deployments (a state machine each,
with every decision and its evidence), failed requests per serving arm, and which adapters each
Generator replica has loaded.

A deployment's row is changed only by :meth:`DeploymentStore.transition`, which compares the
``version`` the caller read with the stored one in the same transaction (optimistic concurrency):
the deployer actor, the CLI and the HTTP API may act on one deployment at once, and the second
to move it gets :class:`StaleDeploymentError` instead of overwriting a decision it did not see.

States (:data:`ACTIVE_STATES` until it ends in one of :data:`FINAL_STATES`):

* ``preloading``: the adapter is being loaded on every Generator replica and smoke-tested;
* ``canary``: the ``challenger`` alias names it and it answers ``share`` of the sessions that ask
  for ``champion``;
* ``paused``: an operator stopped the canary's traffic (share 0) without deciding;
* ``awaiting_operator``: nothing moves until an operator promotes or rolls back (``manual``
  strategy, a staging verdict, or an inconclusive canary past its time with ``on_timeout: wait``);
* ``watching``: promoted to champion, watched against the previous champion;
* ``completed``, ``rolled_back``, ``failed`` (it never served: load or smoke test failed),
  ``cancelled``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from app.artifacts import new_id
from app.store.base import InteractionStore, where_clause

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "HEARTBEAT_S",
    "STATES",
    "CanaryRoute",
    "Deployment",
    "DeploymentNotFoundError",
    "DeploymentStore",
    "StaleDeploymentError",
    "State",
    "Verdict",
    "in_canary",
]

State = Literal[
    "preloading",
    "canary",
    "paused",
    "awaiting_operator",
    "watching",
    "completed",
    "rolled_back",
    "failed",
    "cancelled",
]
STATES: tuple[str, ...] = get_args(State)
FINAL_STATES = frozenset({"completed", "rolled_back", "failed", "cancelled"})
ACTIVE_STATES = frozenset(STATES) - FINAL_STATES
HEARTBEAT_S = 2.0
"""How often a Generator replica preloads the adapters in use and says which it has loaded; a
replica not heard from for three of these is taken as gone."""
Verdict = Literal["production", "staging", "rejected"]
VERDICTS: tuple[str, ...] = get_args(Verdict)


class DeploymentNotFoundError(LookupError):
    """A deployment id the store has no row for."""


class StaleDeploymentError(RuntimeError):
    """The deployment changed since it was read (another process decided first)."""


@dataclass(frozen=True)
class Deployment:
    """One deployment's row."""

    id: str
    adapter_id: str
    previous_champion: str | None
    strategy: str
    state: str
    share: float
    version: int
    validation_id: str | None
    started_at: datetime
    updated_at: datetime
    state_since: datetime
    finished_at: datetime | None
    evidence: dict[str, Any]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def seconds_in_state(self, now: datetime | None = None) -> float:
        return ((now or datetime.now(UTC)) - self.state_since).total_seconds()

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("started_at", "updated_at", "state_since", "finished_at"):
            out[k] = out[k].isoformat() if out[k] is not None else None
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Deployment:
        return cls(
            id=row["id"],
            adapter_id=row["adapter_id"],
            previous_champion=row.get("previous_champion"),
            strategy=row["strategy"],
            state=row["state"],
            share=float(row.get("share") or 0.0),
            version=int(row["version"]),
            validation_id=row.get("validation_id"),
            started_at=_time(row["started_at"]),
            updated_at=_time(row["updated_at"]),
            state_since=_time(row["state_since"]),
            finished_at=_time(row["finished_at"]) if row.get("finished_at") else None,
            evidence=dict(row.get("evidence") or {}),
        )


@dataclass(frozen=True)
class CanaryRoute:
    """What a request for ``champion`` needs to know while a canary runs."""

    deployment_id: str
    challenger: str
    share: float


def in_canary(session: str, deployment_id: str, share: float) -> bool:
    """Whether ``session`` belongs to the canary share of ``deployment_id``: sticky (the same
    session always lands on the same arm of one deployment) and independent between deployments."""
    digest = hashlib.sha256(f"{deployment_id}\x00{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class DeploymentStore:
    """Deployments, validations, failed requests and replica heartbeats in the interaction
    store's database (SQLite or PostgreSQL; tables from migration 3)."""

    def __init__(self, store: InteractionStore) -> None:
        self.store = store

    # --- validations ---------------------------------------------------------------------------

    def record_validation(
        self,
        adapter_id: str,
        baseline: str,
        verdict: str,
        summary: Mapping[str, Any],
        report_uri: str | None = None,
        *,
        actor: str,
        validation_id: str | None = None,
    ) -> dict[str, Any]:
        """Keep a validation's verdict and summary (audited with the summary); returns its row.
        ``validation_id`` is the report's id when the report was published first (default: a new one)."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        vid = validation_id or new_id("validation")
        now = datetime.now(UTC)
        with self.store._transaction() as cur:
            (row,) = self.store._execute(
                cur,
                "INSERT INTO validations (id, adapter_id, baseline, verdict, summary, report_uri, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING *",
                [vid, adapter_id, baseline, verdict, dict(summary), report_uri, now],
            )
            self._audit(
                cur,
                actor,
                "validation.verdict",
                adapter_id,
                {"validation_id": vid, "verdict": verdict, "report_uri": report_uri, "summary": dict(summary)},
            )
        return row

    def validations(self, adapter_id: str | None = None) -> list[dict[str, Any]]:
        """Validations, oldest first (of one adapter when given)."""
        if adapter_id is None:
            return self.store._fetch("SELECT * FROM validations ORDER BY created_at, id")
        return self.store._fetch("SELECT * FROM validations WHERE adapter_id = ? ORDER BY created_at, id", [adapter_id])

    def latest_validation(self, adapter_id: str) -> dict[str, Any] | None:
        rows = self.validations(adapter_id)
        return rows[-1] if rows else None

    def undeployed_validations(self, verdict: str = "production") -> list[dict[str, Any]]:
        """Each adapter's latest validation with ``verdict`` that no deployment has taken up yet
        (none started since it), oldest first: an adapter whose deployment failed (say, a smoke
        test timed out) and that is validated again is deployed again."""
        rows = self.store._fetch(
            "SELECT v.* FROM validations v WHERE v.verdict = ? "
            "AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.adapter_id = v.adapter_id "
            "AND d.started_at >= v.created_at) "
            "AND NOT EXISTS (SELECT 1 FROM validations w WHERE w.adapter_id = v.adapter_id "
            "AND (w.created_at > v.created_at OR (w.created_at = v.created_at AND w.id > v.id))) "
            "ORDER BY v.created_at, v.id",
            [verdict],
        )
        return rows

    # --- deployments ---------------------------------------------------------------------------

    def create(
        self,
        adapter_id: str,
        strategy: str,
        state: str,
        *,
        actor: str,
        reason: str,
        previous_champion: str | None = None,
        validation_id: str | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> Deployment:
        """Start a deployment in ``state`` (its first decision recorded as ``start``).

        Raises:
            ValueError: a bad state, or another deployment is still active (one at a time).
        """
        _check_state(state)
        did = new_id("deployment")
        now = datetime.now(UTC)
        with self.store._transaction() as cur:
            self._lock(cur)
            marks = ", ".join("?" * len(ACTIVE_STATES))
            busy = self.store._execute(
                cur, f"SELECT id, adapter_id FROM deployments WHERE state IN ({marks})", sorted(ACTIVE_STATES)
            )
            if busy:
                raise ValueError(
                    f"adapter_id {adapter_id!r}: deployment {busy[0]['id']} of {busy[0]['adapter_id']} is still "
                    "active; one deployment at a time (roll it back or wait for it to finish)"
                )
            self.store._execute(
                cur,
                "INSERT INTO deployments (id, adapter_id, previous_champion, strategy, state, share, version, "
                "validation_id, started_at, updated_at, state_since, evidence) "
                "VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?)",
                [
                    did,
                    adapter_id,
                    previous_champion,
                    strategy,
                    state,
                    validation_id,
                    now,
                    now,
                    now,
                    dict(evidence or {}),
                ],
            )
            self._decide(cur, did, actor, "start", None, state, reason, evidence or {}, now)
        return self.get(did)

    def get(self, deployment_id: str) -> Deployment:
        rows = self.store._fetch("SELECT * FROM deployments WHERE id = ?", [deployment_id])
        if not rows:
            raise DeploymentNotFoundError(f"deployment {deployment_id!r} does not exist")
        return Deployment.from_row(rows[0])

    def list(self, limit: int = 50) -> list[Deployment]:
        """The most recent deployments, newest first."""
        rows = self.store._fetch("SELECT * FROM deployments ORDER BY started_at DESC, id DESC LIMIT ?", [limit])
        return [Deployment.from_row(r) for r in rows]

    def active(self) -> Deployment | None:
        """The deployment still in progress, if any (there is at most one)."""
        marks = ", ".join("?" * len(ACTIVE_STATES))
        rows = self.store._fetch(
            f"SELECT * FROM deployments WHERE state IN ({marks}) ORDER BY started_at DESC", sorted(ACTIVE_STATES)
        )
        return Deployment.from_row(rows[0]) if rows else None

    def transition(
        self,
        deployment: Deployment,
        to_state: str,
        *,
        actor: str,
        decision: str,
        reason: str,
        evidence: Mapping[str, Any] | None = None,
        share: float | None = None,
        merge_evidence: Mapping[str, Any] | None = None,
    ) -> Deployment:
        """Move ``deployment`` (as read, at its ``version``) to ``to_state`` and record the decision
        with its evidence; ``share`` sets the canary share, ``merge_evidence`` is kept on the
        deployment's own row (e.g. the previous champion's baseline for the watch). A decision that
        keeps the state (``hold``) is recorded too.

        Raises:
            StaleDeploymentError: the row changed since ``deployment`` was read.
            ValueError: a bad state, or a deployment that has already ended.
        """
        _check_state(to_state)
        if not deployment.active:
            raise ValueError(f"deployment {deployment.id} has ended ({deployment.state}); nothing more is decided")
        now = datetime.now(UTC)
        state_since = deployment.state_since if to_state == deployment.state else now
        row_evidence = {**deployment.evidence, **dict(merge_evidence or {})}
        with self.store._transaction() as cur:
            updated = self.store._execute(
                cur,
                "UPDATE deployments SET state = ?, share = ?, version = version + 1, updated_at = ?, "
                "state_since = ?, finished_at = ?, evidence = ? WHERE id = ? AND version = ? RETURNING id",
                [
                    to_state,
                    deployment.share if share is None else share,
                    now,
                    state_since,
                    now if to_state in FINAL_STATES else None,
                    row_evidence,
                    deployment.id,
                    deployment.version,
                ],
            )
            if not updated:
                raise StaleDeploymentError(
                    f"deployment {deployment.id} changed since it was read (version {deployment.version}); "
                    "read it again and decide on what it is now"
                )
            self._decide(cur, deployment.id, actor, decision, deployment.state, to_state, reason, evidence or {}, now)
        return self.get(deployment.id)

    def decisions(self, deployment_id: str) -> list[dict[str, Any]]:
        """Every decision about a deployment, oldest first."""
        return self.store._fetch(
            "SELECT * FROM deployment_decisions WHERE deployment_id = ? ORDER BY id", [deployment_id]
        )

    def canary_route(self) -> CanaryRoute | None:
        """The running canary's split, or None when requests for ``champion`` are not split."""
        rows = self.store._fetch(
            "SELECT id, adapter_id, share FROM deployments WHERE state = 'canary' AND share > 0 "
            "ORDER BY started_at DESC LIMIT 1"
        )
        if not rows:
            return None
        return CanaryRoute(rows[0]["id"], rows[0]["adapter_id"], float(rows[0]["share"]))

    # --- serving evidence ----------------------------------------------------------------------

    def record_failure(
        self,
        *,
        model: str,
        adapter_id: str | None,
        serving_arm: str | None,
        deployment_id: str | None,
        status: int,
        reason: str,
    ) -> None:
        """A request the Generator could not answer (5xx or a failed adapter load), by arm."""
        with self.store._transaction() as cur:
            self.store._execute(
                cur,
                "INSERT INTO request_failures (created_at, model, adapter_id, serving_arm, deployment_id, status, "
                "reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [datetime.now(UTC), model, adapter_id, serving_arm, deployment_id, status, reason[:500]],
            )

    def failures(
        self, *, deployment_id: str | None = None, adapter_id: str | None = None, since: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Failed requests of a deployment's arms, or of an adapter, since a time; oldest first."""
        where, params = where_clause(
            [("deployment_id = ?", deployment_id), ("adapter_id = ?", adapter_id), ("created_at >= ?", since)]
        )
        return self.store._fetch(f"SELECT * FROM request_failures{where} ORDER BY id", params)

    def heartbeat(self, replica_id: str, adapters: Sequence[str]) -> None:
        """A Generator replica says which adapters it has loaded now."""
        with self.store._transaction() as cur:
            self.store._execute(
                cur,
                "INSERT INTO generator_replicas (replica_id, adapters, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (replica_id) DO UPDATE SET adapters = excluded.adapters, updated_at = excluded.updated_at",
                [replica_id, sorted(adapters), datetime.now(UTC)],
            )

    def wanted_adapters(self) -> list[str]:
        """The adapters every Generator replica keeps loaded: the ``champion`` and ``challenger``
        aliases', the active deployment's, and the champion it replaced (for a rollback at once)."""
        wanted = [r["adapter_id"] for r in self.store._fetch("SELECT adapter_id FROM adapter_aliases ORDER BY alias")]
        active = self.active()
        if active is not None:
            wanted += [active.adapter_id] + ([active.previous_champion] if active.previous_champion else [])
        return list(dict.fromkeys(wanted))

    def replicas(self, max_age_s: float = 3 * HEARTBEAT_S) -> dict[str, list[str]]:
        """The replicas heard from within ``max_age_s``, with their loaded adapters."""
        since = datetime.now(UTC) - timedelta(seconds=max_age_s)
        rows = self.store._fetch("SELECT * FROM generator_replicas WHERE updated_at >= ?", [since])
        return {r["replica_id"]: list(r["adapters"]) for r in rows}

    def forget_replica(self, replica_id: str) -> None:
        with self.store._transaction() as cur:
            self.store._execute(cur, "DELETE FROM generator_replicas WHERE replica_id = ?", [replica_id])

    def audit(self, target: str | None = None) -> list[dict[str, Any]]:
        """Deployment and validation audit rows, oldest first."""
        sql = "SELECT * FROM audit_log WHERE (action LIKE ? OR action LIKE ?)"
        params: list[Any] = ["deployment.%", "validation.%"]
        if target is not None:
            sql += " AND target = ?"
            params.append(target)
        return self.store._fetch(sql + " ORDER BY id", params)

    # --- helpers -------------------------------------------------------------------------------

    def _lock(self, cur: Any) -> None:
        # One active deployment at a time: two creators must not both see none active.
        if self.store.engine == "postgres":
            cur.execute("LOCK TABLE deployments IN SHARE ROW EXCLUSIVE MODE")
        # SQLite: the store's BEGIN IMMEDIATE already holds the write lock.

    def _decide(
        self,
        cur: Any,
        deployment_id: str,
        actor: str,
        decision: str,
        from_state: str | None,
        to_state: str,
        reason: str,
        evidence: Mapping[str, Any],
        now: datetime,
    ) -> None:
        self.store._execute(
            cur,
            "INSERT INTO deployment_decisions (deployment_id, created_at, actor, decision, from_state, to_state, "
            "reason, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [deployment_id, now, actor, decision, from_state, to_state, reason, dict(evidence)],
        )
        self._audit(
            cur,
            actor,
            f"deployment.{decision}",
            deployment_id,
            {"from": from_state, "to": to_state, "reason": reason},
        )

    def _audit(self, cur: Any, actor: str, action: str, target: str, details: Mapping[str, Any]) -> None:
        self.store.audit(actor, action, target, details, cur=cur)


def _check_state(state: str) -> str:
    if state not in STATES:
        raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
    return state


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
