"""SQLite engine: the embedded default (one node). WAL with ``synchronous=NORMAL``: a commit is
durable against a process crash, and readers never block the writer."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from app.store.base import InteractionStore, _iso

__all__ = ["SQLiteStore"]


class SQLiteStore(InteractionStore):
    """An :class:`InteractionStore` in one SQLite file (``:memory:`` for a private one)."""

    engine = "sqlite"
    placeholder = "?"
    types: ClassVar[dict[str, str]] = {
        "TS": "TEXT",  # ISO 8601 UTC with a fixed offset, so text order is time order
        "JSON": "TEXT",
        "BOOL": "INTEGER",
        "REAL": "REAL",
        "ID": "INTEGER PRIMARY KEY AUTOINCREMENT",
    }

    def __init__(self, path: str | Path = "data/kaizen.db", busy_timeout_ms: int = 30_000):
        super().__init__()
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the threads of this process, serialised by a lock: SQLite has
        # one writer anyway, and group commit keeps the lock's hold short.
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_ms / 1000, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # A deleted row's bytes are overwritten, not left in free pages (erasure, retention).
        self._conn.execute("PRAGMA secure_delete=ON")

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading.
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    @contextmanager
    def _read_transaction(self) -> Iterator[Any]:
        # A deferred transaction only reads a WAL snapshot: it never takes the write lock, so the
        # scorer's and the queries' reads never make a collector's commit wait.
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN DEFERRED")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")
                cur.close()

    def scrub(self) -> None:
        """After a deletion of personal data: rebuild the file without the free pages (VACUUM)
        and empty the write-ahead log, whose page images still hold what was written."""
        with self._lock:
            self._conn.execute("VACUUM")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _encode(self, value: Any) -> Any:
        if isinstance(value, (dict, list, tuple)):
            return json.dumps(value, separators=(",", ":"), default=str)
        if isinstance(value, datetime):
            return _iso(value)
        return value

    def _day_expr(self, column: str) -> str:
        return f"substr({column}, 1, 10)"

    def close(self) -> None:
        with self._lock:
            self._conn.close()
