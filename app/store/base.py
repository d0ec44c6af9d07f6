"""The interaction store's engine-independent half: the migration runner (the schema itself is in
:mod:`app.store.schema`), batched idempotent writes, and the queries. ``SQLiteStore`` and
``PostgresStore`` supply a connection and a SQL dialect.

Every write is one transaction. The ``events`` ledger holds every accepted event id, so a retried
event is reported as a duplicate and written once. Feedback, tool usage and outcomes reference
their interaction by id without a foreign key, so they attach whichever arrives first.
"""

from __future__ import annotations

import json
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from app.privacy.encryption import ENCRYPTED_COLUMNS, DataCipher
from app.store.schema import BOOL_COLUMNS, JSON_COLUMNS, MIGRATIONS, OUTCOME_FIELDS, WRITABLE_TABLES
from app.store.upkeep import DataUpkeep

__all__ = ["MIGRATIONS", "WRITABLE_TABLES", "InteractionStore", "StoredEvent"]


@dataclass
class StoredEvent:
    """An accepted, privacy-filtered event ready to commit: its ledger entry and its rows."""

    id: str
    type: str
    timestamp: datetime
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    interaction_id: str | None = None  # the interaction it is, or attaches to


_ROWS_PER_STATEMENT = 200  # rows per multi-row INSERT: well under both engines' parameter limits
ENCRYPTED = {c for columns in ENCRYPTED_COLUMNS.values() for c in columns}


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat()
    return value


class InteractionStore(DataUpkeep, ABC):
    """One interface over SQLite and PostgreSQL (see module docstring)."""

    engine: str = "abstract"
    placeholder = "?"
    types: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._migrate_lock = threading.Lock()
        self.cipher: DataCipher | None = None
        """Set by ``open_store`` with ``privacy.encryption``: text fields are sealed on write and
        opened on read (:mod:`app.privacy.encryption`)."""

    # --- engine hooks ----------------------------------------------------------------------

    @abstractmethod
    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """Yield a cursor inside one transaction; commit on exit, roll back on error."""

    @abstractmethod
    def _encode(self, value: Any) -> Any:
        """Convert a Python value to what the driver stores."""

    @abstractmethod
    def _day_expr(self, column: str) -> str:
        """SQL for the UTC calendar day ('YYYY-MM-DD') of a timestamp column."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _decode_row(self, columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for col, value in zip(columns, row):
            if value is not None:
                if col in JSON_COLUMNS and isinstance(value, str):
                    value = json.loads(value)
                if self.cipher is not None and col in ENCRYPTED:
                    value = self.cipher.open(value)
                elif col in BOOL_COLUMNS:
                    value = bool(value)
                elif isinstance(value, datetime):
                    value = _iso(value)
            out[col] = value
        return out

    @contextmanager
    def _read_transaction(self) -> Iterator[Any]:
        """A cursor for reads; engines whose write transactions lock (SQLite) make it lighter."""
        with self._transaction() as cur:
            yield cur

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a query and return its rows (reads only: see ``_read_transaction``)."""
        with self._read_transaction() as cur:
            return self._execute(cur, sql, params)

    def _execute(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one statement on ``cur`` (inside a transaction the caller holds); the rows it
        returned, decoded as every read decodes them, if any."""
        cur.execute(self._sql(sql), [self._encode(p) for p in params])
        if cur.description is None:
            return []
        columns = [d[0] for d in cur.description]
        return [self._decode_row(columns, row) for row in cur.fetchall()]

    # --- schema ------------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, each in its own transaction.

        Returns:
            The versions applied now (empty when the schema is current).
        """
        with self._migrate_lock:
            with self._transaction() as cur:
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
                )
            applied = []
            for version, description, statements in MIGRATIONS:
                with self._transaction() as cur:
                    self._lock_migrations(cur)
                    cur.execute(self._sql("SELECT 1 FROM schema_migrations WHERE version = ?"), [version])
                    if cur.fetchone():
                        continue
                    for statement in statements:
                        cur.execute(statement.format(**self.types))
                    cur.execute(
                        self._sql("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)"),
                        [version, description, _iso(datetime.now(UTC))],
                    )
                    applied.append(version)
            return applied

    def _lock_migrations(self, cur: Any) -> None:
        """Serialise concurrent migrators (several replicas starting at once); engine-specific."""

    def schema_version(self) -> int:
        rows = self._fetch("SELECT MAX(version) AS v FROM schema_migrations")
        return int(rows[0]["v"] or 0)

    # --- writes ------------------------------------------------------------------------------

    def write(self, events: Sequence[StoredEvent]) -> list[bool]:
        """Commit a batch of events in one transaction, idempotently on event id.

        Returns:
            For each event, True if it was new and written, False if its id was already stored
            (or appeared earlier in the same batch).
        """
        if not events:
            return []
        first_index: dict[str, int] = {}
        for i, ev in enumerate(events):
            first_index.setdefault(ev.id, i)
        unique = [events[i] for i in sorted(first_index.values())]
        with self._transaction() as cur:
            inserted = self._insert_returning_ids(
                cur,
                "events",
                ("id", "type", "timestamp", "received_at"),
                [(ev.id, ev.type, ev.timestamp, ev.received_at) for ev in unique],
            )
            by_table: dict[str, list[dict[str, Any]]] = {}
            for ev in unique:
                if ev.id in inserted:
                    for table, rows in ev.rows.items():
                        by_table.setdefault(table, []).extend(rows)
            for table, rows in by_table.items():
                if table not in WRITABLE_TABLES:
                    raise ValueError(f"{table}: not a table ingestion may write")
                self._insert_rows(cur, table, rows)
        return [first_index[ev.id] == i and ev.id in inserted for i, ev in enumerate(events)]

    def _insert_many(
        self, cur: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], suffix: str
    ) -> list[Any]:
        """Multi-row INSERTs of at most ``_ROWS_PER_STATEMENT`` rows; the rows any RETURNING gave."""
        returned: list[Any] = []
        row_sql = "(" + ", ".join("?" * len(columns)) + ")"
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ROWS_PER_STATEMENT]
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row_sql] * len(chunk)) + suffix
            cur.execute(self._sql(sql), [self._encode(v) for row in chunk for v in row])
            if cur.description is not None:
                returned.extend(cur.fetchall())
        return returned

    def _insert_returning_ids(
        self, cur: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> set[str]:
        returned = self._insert_many(cur, table, columns, rows, " ON CONFLICT (id) DO NOTHING RETURNING id")
        return {r[0] for r in returned}

    def _insert_rows(self, cur: Any, table: str, rows: list[dict[str, Any]]) -> None:
        # Rows of one table may differ in which optional columns they carry: group by column set.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        if self.cipher is not None and table in ENCRYPTED_COLUMNS:
            rows = [{c: self.cipher.seal(c, v) for c, v in row.items()} for row in rows]
        for row in rows:
            groups.setdefault(tuple(row), []).append(row)
        for columns, group in groups.items():
            values = [[row[c] for c in columns] for row in group]
            self._insert_many(cur, table, columns, values, " ON CONFLICT DO NOTHING")

    def set_quality(
        self, interaction_id: str, overall: float | None, confidence: float | None, status: str = "scored"
    ) -> bool:
        """Record an interaction's current quality score; False if no such interaction."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "UPDATE interactions SET quality_score = ?, quality_confidence = ?, quality_status = ? WHERE id = ?"
                ),
                [overall, confidence, status, interaction_id],
            )
            return cur.rowcount > 0

    def save_scores(self, scores: Sequence[tuple[str, Any]]) -> int:
        """Store quality scores (``(interaction_id, QualityScore)``) in one transaction: a row per
        assessor version in ``quality_scores`` (replaced when re-scored) and the current score on
        the interaction. Returns how many interactions existed and were updated."""
        now = datetime.now(UTC)
        updated = 0
        with self._transaction() as cur:
            for interaction_id, score in scores:
                low, high = score.interval if score.interval else (None, None)
                cur.execute(
                    self._sql("DELETE FROM quality_scores WHERE interaction_id = ? AND assessor_version = ?"),
                    [interaction_id, score.assessor_version],
                )
                cur.execute(
                    self._sql(
                        "INSERT INTO quality_scores (interaction_id, assessor_version, overall, components, "
                        "confidence, interval_low, interval_high, cap, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ),
                    [
                        self._encode(v)
                        for v in (
                            interaction_id,
                            score.assessor_version,
                            score.overall,
                            dict(score.components),
                            score.confidence,
                            low,
                            high,
                            score.cap,
                            now,
                        )
                    ],
                )
                cur.execute(
                    self._sql(
                        "UPDATE interactions SET quality_score = ?, quality_confidence = ?, quality_status = ? "
                        "WHERE id = ?"
                    ),
                    [score.overall, score.confidence, "scored", interaction_id],
                )
                updated += cur.rowcount > 0
        return updated

    def quality_scores(self, interaction_id: str) -> list[dict[str, Any]]:
        """Every stored score of an interaction, newest first."""
        return self._fetch(
            "SELECT * FROM quality_scores WHERE interaction_id = ? ORDER BY created_at DESC", [interaction_id]
        )

    # --- human ratings and calibrations ---------------------------------------------------------

    def add_rating(
        self,
        interaction_id: str,
        rating: float,
        rater: str,
        comment: str | None = None,
        dimensions: dict[str, float] | None = None,
    ) -> str:
        """Store a human rating in [0, 1] of an interaction; returns the rating's id.

        Raises:
            KeyError: no such interaction.
        """
        rating_id = uuid.uuid4().hex
        with self._transaction() as cur:
            cur.execute(self._sql("SELECT 1 FROM interactions WHERE id = ?"), [interaction_id])
            if cur.fetchone() is None:
                raise KeyError(interaction_id)
            cur.execute(
                self._sql(
                    "INSERT INTO human_ratings (id, interaction_id, rating, rater, comment, dimensions, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)"
                ),
                [
                    self._encode(v)
                    for v in (rating_id, interaction_id, float(rating), rater, self._seal("comment", comment))
                    + (dimensions, datetime.now(UTC))
                ],
            )
        return rating_id

    def ratings(self, interaction_id: str | None = None) -> list[dict[str, Any]]:
        """Human ratings, oldest first (of one interaction, or all)."""
        if interaction_id is not None:
            return self._fetch(
                "SELECT * FROM human_ratings WHERE interaction_id = ? ORDER BY created_at, id", [interaction_id]
            )
        return self._fetch("SELECT * FROM human_ratings ORDER BY created_at, id")

    def mean_ratings(self) -> dict[str, float]:
        """Each rated interaction's mean human rating (several raters average out)."""
        rows = self._fetch("SELECT interaction_id, AVG(rating) AS r FROM human_ratings GROUP BY interaction_id")
        return {r["interaction_id"]: float(r["r"]) for r in rows}

    def review_queue(self, max_confidence: float, limit: int = 50) -> list[dict[str, Any]]:
        """Scored interactions below ``max_confidence`` that no person has rated yet, least
        confident first: where a human rating teaches calibration the most."""
        return self._fetch(
            "SELECT * FROM interactions WHERE quality_status = 'scored' AND quality_confidence < ? "
            "AND id NOT IN (SELECT interaction_id FROM human_ratings) "
            "ORDER BY quality_confidence, timestamp, id LIMIT ?",
            [max_confidence, int(limit)],
        )

    def save_calibration(
        self, version: str, method: str, params: dict[str, Any], metrics: dict[str, Any], activate: bool = True
    ) -> None:
        """Store a fitted calibration; when ``activate``, it becomes the one scorers use."""
        with self._transaction() as cur:
            if activate:
                cur.execute(
                    self._sql("UPDATE calibrations SET active = ? WHERE active = ?"),
                    [self._encode(False), self._encode(True)],
                )
            cur.execute(
                self._sql(
                    "INSERT INTO calibrations (version, created_at, method, params, metrics, active) "
                    "VALUES (?, ?, ?, ?, ?, ?)"
                ),
                [self._encode(v) for v in (version, datetime.now(UTC), method, params, metrics, activate)],
            )

    def active_calibration(self) -> dict[str, Any] | None:
        """The calibration scorers use now, or None (the seed's weights)."""
        rows = self._fetch("SELECT * FROM calibrations WHERE active = ? ORDER BY created_at DESC", [True])
        return rows[0] if rows else None

    def calibrations(self) -> list[dict[str, Any]]:
        """Every stored calibration, newest first."""
        return self._fetch("SELECT * FROM calibrations ORDER BY created_at DESC")

    # --- reads -------------------------------------------------------------------------------

    def get_interaction(self, interaction_id: str) -> dict[str, Any] | None:
        """The interaction with its context, tool usage, feedback and merged outcome, or None."""
        rows = self._fetch("SELECT * FROM interactions WHERE id = ?", [interaction_id])
        if not rows:
            return None
        record = rows[0]
        ctx = self._fetch("SELECT project_context FROM context_snapshots WHERE interaction_id = ?", [interaction_id])
        record["context"] = ctx[0]["project_context"] if ctx else None
        record["tool_usage"] = self._fetch(
            "SELECT * FROM tool_usage WHERE interaction_id = ? ORDER BY invocation_order, timestamp",
            [interaction_id],
        )
        record["feedback"] = self._fetch(
            "SELECT * FROM feedback WHERE interaction_id = ? ORDER BY timestamp", [interaction_id]
        )
        outcomes = self._fetch("SELECT * FROM outcomes WHERE interaction_id = ? ORDER BY timestamp", [interaction_id])
        record["outcome"] = _merge_outcomes(outcomes)
        record["redactions"] = {
            r["kind"]: r["count"]
            for r in self._fetch("SELECT kind, count FROM redactions WHERE event_id = ?", [interaction_id])
        }
        return record

    def query_interactions(
        self,
        *,
        session_hash: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        min_quality: float | None = None,
        max_quality: float | None = None,
        quality_status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Interactions matching every given filter, oldest first.

        ``since`` is inclusive and ``until`` exclusive; quality bounds are inclusive, and an
        interaction without a score never matches a quality bound.
        """
        where, params = self._interaction_filters(session_hash, since, until, min_quality, max_quality, quality_status)
        params.extend([int(limit), int(offset)])
        return self._fetch(f"SELECT * FROM interactions{where} ORDER BY timestamp, id LIMIT ? OFFSET ?", params)

    def interaction_ids(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        quality_status: str | None = None,
        after_id: str | None = None,
        limit: int = 10_000,
    ) -> list[str]:
        """Ids of matching interactions in id order, a page at a time (keyset: pass the last id
        of a page as ``after_id``), for jobs that walk the whole store."""
        where, params = self._interaction_filters(None, since, until, None, None, quality_status)
        if after_id is not None:
            where += (" AND " if where else " WHERE ") + "id > ?"
            params.append(after_id)
        params.append(int(limit))
        return [r["id"] for r in self._fetch(f"SELECT id FROM interactions{where} ORDER BY id LIMIT ?", params)]

    def all_interaction_ids(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        quality_status: str | None = None,
        limit: int | None = None,
        page_size: int = 10_000,
    ) -> list[str]:
        """Every matching id in id order (at most ``limit``), read with :meth:`interaction_ids`
        a page at a time so that no query holds the whole store."""
        ids: list[str] = []
        after = None
        while limit is None or len(ids) < limit:
            size = page_size if limit is None else min(page_size, limit - len(ids))
            page = self.interaction_ids(
                since=since, until=until, quality_status=quality_status, after_id=after, limit=size
            )
            if not page:
                break
            ids.extend(page)
            after = page[-1]
        return ids

    @staticmethod
    def _interaction_filters(
        session_hash: str | None,
        since: datetime | None,
        until: datetime | None,
        min_quality: float | None,
        max_quality: float | None,
        quality_status: str | None,
    ) -> tuple[str, list[Any]]:
        filters = [
            ("session_hash = ?", session_hash),
            ("timestamp >= ?", since),
            ("timestamp < ?", until),
            ("quality_score >= ?", min_quality),
            ("quality_score <= ?", max_quality),
            ("quality_status = ?", quality_status),
        ]
        clauses = [sql for sql, value in filters if value is not None]
        params: list[Any] = [value for _, value in filters if value is not None]
        return ((" WHERE " + " AND ".join(clauses)) if clauses else ""), params

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored interactions."""
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ", ".join("?" * len(chunk))
            found.update(r["id"] for r in self._fetch(f"SELECT id FROM interactions WHERE id IN ({marks})", chunk))
        return found

    def count(self, table: str = "interactions") -> int:
        if table not in WRITABLE_TABLES + ("events", "quality_scores"):
            raise ValueError(f"{table}: unknown table")
        return int(self._fetch(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])

    def stats(self, days: int = 14) -> dict[str, Any]:
        """What ``kaizen status`` shows: totals, interactions per day, redactions per kind."""
        day = self._day_expr("timestamp")
        per_day = self._fetch(
            f"SELECT {day} AS day, COUNT(*) AS n FROM interactions GROUP BY {day} ORDER BY day DESC LIMIT ?",
            [days],
        )
        redactions = self._fetch("SELECT kind, SUM(count) AS n FROM redactions GROUP BY kind ORDER BY SUM(count) DESC")
        status = self._fetch("SELECT quality_status AS status, COUNT(*) AS n FROM interactions GROUP BY quality_status")
        return {
            "engine": self.engine,
            "schema_version": self.schema_version(),
            "events": self.count("events"),
            "interactions": self.count("interactions"),
            "feedback": self.count("feedback"),
            "tool_usage": self.count("tool_usage"),
            "outcomes": self.count("outcomes"),
            "quality_status": {r["status"]: int(r["n"]) for r in status},
            "per_day": [{"day": r["day"], "interactions": int(r["n"])} for r in reversed(per_day)],
            "redactions": {r["kind"]: int(r["n"]) for r in redactions},
        }

    def _seal(self, column: str, value: Any) -> Any:
        return self.cipher.seal(column, value) if self.cipher is not None else value

    @abstractmethod
    def scrub(self) -> None:
        """Make deleted rows unreadable in the database's files (engine-specific)."""

    # --- the audit log ----------------------------------------------------------------------

    def audit(
        self,
        actor: str,
        action: str,
        target: str | None,
        details: Mapping[str, Any],
        *,
        cur: Any = None,
        now: datetime | None = None,
    ) -> None:
        """Add one entry to ``audit_log``: in the caller's transaction (``cur``) where the action's
        own writes are, else in one of its own."""
        row = [now or datetime.now(UTC), actor, action, target, dict(details)]
        sql = "INSERT INTO audit_log (timestamp, actor, action, target, details) VALUES (?, ?, ?, ?, ?)"
        if cur is not None:
            self._execute(cur, sql, row)
            return
        with self._transaction() as own:
            self._execute(own, sql, row)

    def audit_entries(
        self,
        *,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit entries, newest first: ``action`` is an exact action or a prefix ending in ``.``
        (``deployment.``), ``before_id`` pages back from an entry."""
        prefix = action is not None and action.endswith(".")
        where, params = where_clause(
            [
                ("action LIKE ?" if prefix else "action = ?", f"{action}%" if prefix else action),
                ("target = ?", target),
                ("timestamp >= ?", since),
                ("id < ?", before_id),
            ]
        )
        return self._fetch(f"SELECT * FROM audit_log{where} ORDER BY id DESC LIMIT ?", [*params, limit])

    def ping(self) -> bool:
        """True when the engine answers a trivial query."""
        try:
            self._fetch("SELECT 1 AS ok")
            return True
        except Exception:
            return False


def where_clause(conditions: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """`` WHERE a AND b`` of the conditions whose value is not None, and their values (empty when
    none is set)."""
    kept = [(sql, value) for sql, value in conditions if value is not None]
    return (" WHERE " + " AND ".join(sql for sql, _ in kept) if kept else ""), [value for _, value in kept]


def _merge_outcomes(outcomes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Later reports win, field by field; a field nobody reported stays None."""
    if not outcomes:
        return None
    merged: dict[str, Any] = {name: None for name in OUTCOME_FIELDS}
    for row in outcomes:
        for name in OUTCOME_FIELDS:
            if row.get(name) is not None:
                merged[name] = row[name]
    return merged
