"""The store's upkeep of what it holds, apart from ingestion and queries: re-sealing every
encrypted value with the newest data key (``kaizen keys rotate-data``), and deleting interactions
with everything recorded of them (erasure, retention), with the daily aggregates retention keeps.
A mixin of :class:`app.store.base.InteractionStore`, whose transaction and SQL helpers it uses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from app.privacy.encryption import ENCRYPTED_COLUMNS
from app.store.schema import ERASABLE_TABLES, JSON_COLUMNS

__all__ = ["DataUpkeep"]


class DataUpkeep:
    """Rotation, erasure and retention over the engine's transactions (see the module docstring)."""

    # --- encryption at rest --------------------------------------------------------------------

    def rotate_encryption(self, batch: int = 500, progress: Any = None) -> dict[str, int]:
        """Re-seal every encrypted column with the cipher's newest key (plain values sealed for
        the first time), a batch of rows per transaction so writers wait at most one batch; the
        values rewritten per table.

        Raises:
            ValueError: the store has no cipher (``privacy.encryption`` is off).
        """
        if self.cipher is None:
            raise ValueError("privacy.encryption is off: there is nothing to rotate")
        done: dict[str, int] = {}
        for table, columns in ENCRYPTED_COLUMNS.items():
            key = "interaction_id" if table == "context_snapshots" else "id"
            last, done[table] = "", 0
            while True:
                with self._transaction() as cur:
                    cur.execute(
                        self._sql(
                            f"SELECT {key}, {', '.join(columns)} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?"
                        ),
                        [last, batch],
                    )
                    rows = cur.fetchall()
                    for row in rows:
                        values = []
                        for column, raw in zip(columns, row[1:]):
                            value = json.loads(raw) if column in JSON_COLUMNS and isinstance(raw, str) else raw
                            values.append(self._encode(self.cipher.rotate(value, column)))
                        sets = ", ".join(f"{c} = ?" for c in columns)
                        cur.execute(self._sql(f"UPDATE {table} SET {sets} WHERE {key} = ?"), [*values, row[0]])
                done[table] += len(rows)
                if progress is not None:
                    progress(table, done[table])
                if len(rows) < batch:
                    break
                last = rows[-1][0]
        return done

    # --- erasure ------------------------------------------------------------------------------

    def interactions_of(self, *, session_hash: str | None = None, user_hash: str | None = None) -> list[str]:
        """The ids of a session's or a user's interactions (by their hashes)."""
        if (session_hash is None) == (user_hash is None):
            raise ValueError("give a session or a user")
        column, value = ("session_hash", session_hash) if session_hash is not None else ("user_hash", user_hash)
        return [r["id"] for r in self._fetch(f"SELECT id FROM interactions WHERE {column} = ?", [value])]

    def delete_interactions(self, ids: Sequence[str], chunk: int = 500) -> dict[str, int]:
        """Delete interactions with everything recorded of them (context, tool usage, feedback,
        outcomes, redaction counts, scores, ratings, their ingestion events), in one transaction;
        the rows deleted per table. Call :meth:`scrub` after it for the bytes to go too."""
        counts = {table: 0 for table in ERASABLE_TABLES}
        with self._transaction() as cur:
            for start in range(0, len(ids), chunk):
                part = list(ids[start : start + chunk])
                marks = ", ".join("?" for _ in part)
                for table in ERASABLE_TABLES:
                    column = ERASABLE_TABLES[table]
                    cur.execute(self._sql(f"DELETE FROM {table} WHERE {column} IN ({marks})"), part)
                    counts[table] += max(cur.rowcount, 0)
        return counts

    def interactions_before(self, cutoff: datetime, limit: int = 10_000) -> list[str]:
        """The ids of interactions older than ``cutoff``, oldest first (what retention considers)."""
        sql = "SELECT id FROM interactions WHERE timestamp < ? ORDER BY timestamp LIMIT ?"
        rows = self._fetch(sql, [cutoff, limit])
        return [r["id"] for r in rows]

    def aggregate_days(self, ids: Sequence[str], now: datetime, chunk: int = 500) -> dict[str, int]:
        """Add the interactions ``ids`` to ``daily_aggregates`` (per UTC day: how many, how many
        scored, the sums of their quality and confidence, how many had feedback or a correction),
        with nothing that names a person or a session; the interactions per day added. Called
        before the raw rows are deleted, in one transaction."""
        day = self._day_expr("i.timestamp")
        per_day: dict[str, dict[str, float]] = {}
        with self._transaction() as cur:
            for start in range(0, len(ids), chunk):
                part = list(ids[start : start + chunk])
                marks = ", ".join("?" for _ in part)
                rows = self._execute(
                    cur,
                    f"SELECT {day} AS day, COUNT(*) AS n, "
                    "SUM(CASE WHEN i.quality_status = 'scored' THEN 1 ELSE 0 END) AS scored, "
                    "SUM(COALESCE(i.quality_score, 0)) AS q, SUM(COALESCE(i.quality_confidence, 0)) AS c, "
                    "SUM(CASE WHEN EXISTS (SELECT 1 FROM feedback f WHERE f.interaction_id = i.id) THEN 1 ELSE 0 END) "
                    "AS fb, SUM(CASE WHEN EXISTS (SELECT 1 FROM feedback f WHERE f.interaction_id = i.id "
                    "AND f.correction IS NOT NULL) THEN 1 ELSE 0 END) AS corr "
                    f"FROM interactions i WHERE i.id IN ({marks}) GROUP BY {day}",
                    part,
                )
                for r in rows:
                    acc = per_day.setdefault(r["day"], {"n": 0, "scored": 0, "q": 0.0, "c": 0.0, "fb": 0, "corr": 0})
                    for k in acc:
                        acc[k] += r[k] or 0
            for d, acc in per_day.items():
                found = self._execute(cur, "SELECT day FROM daily_aggregates WHERE day = ?", [d])
                values = [int(acc["n"]), int(acc["scored"]), float(acc["q"]), float(acc["c"]), int(acc["fb"])]
                values += [int(acc["corr"]), now]
                if found:
                    self._execute(
                        cur,
                        "UPDATE daily_aggregates SET interactions = interactions + ?, scored = scored + ?, "
                        "quality_sum = quality_sum + ?, confidence_sum = confidence_sum + ?, "
                        "with_feedback = with_feedback + ?, corrected = corrected + ?, updated_at = ? WHERE day = ?",
                        [*values, d],
                    )
                else:
                    self._execute(
                        cur,
                        "INSERT INTO daily_aggregates (interactions, scored, quality_sum, confidence_sum, "
                        "with_feedback, corrected, updated_at, day) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [*values, d],
                    )
        return {d: int(acc["n"]) for d, acc in sorted(per_day.items())}

    def daily_aggregates(self) -> list[dict[str, Any]]:
        """The kept per-day aggregates, oldest first, with the mean quality and confidence of the
        scored interactions."""
        rows = self._fetch("SELECT * FROM daily_aggregates ORDER BY day")
        for r in rows:
            r["mean_quality"] = r["quality_sum"] / r["scored"] if r["scored"] else None
            r["mean_confidence"] = r["confidence_sum"] / r["scored"] if r["scored"] else None
        return rows
