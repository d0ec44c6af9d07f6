"""PostgreSQL engine (psycopg 3): for collectors on several nodes sharing one database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from app.store.base import InteractionStore
from app.store.schema import ERASABLE_TABLES

__all__ = ["PostgresStore"]

_MIGRATION_LOCK_KEY = 0x4B41495A454E  # "KAIZEN": advisory lock id shared by every migrator


class PostgresStore(InteractionStore):
    """An :class:`InteractionStore` on PostgreSQL through a connection pool."""

    engine = "postgres"
    placeholder = "%s"
    types: ClassVar[dict[str, str]] = {
        "TS": "TIMESTAMPTZ",
        "JSON": "JSONB",
        "BOOL": "BOOLEAN",
        "REAL": "DOUBLE PRECISION",
        "ID": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    }

    def __init__(self, dsn: str, pool_size: int = 4, connect_timeout_s: float = 10.0, sslmode: str | None = None):
        super().__init__()
        self.dsn = dsn
        kwargs: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout_s))}
        if sslmode is not None:
            kwargs["sslmode"] = sslmode  # over the DSN's: store.postgres_sslmode
        # One connection by hand first: a server that refuses (no such database, a password, TLS
        # required) fails here at once with its reason, where the pool would retry until its
        # timeout and then say only that it timed out.
        psycopg.connect(dsn, **kwargs).close()
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            timeout=connect_timeout_s,
            kwargs=kwargs,
        )
        self._pool.open(wait=True, timeout=connect_timeout_s)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def _lock_migrations(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK_KEY])

    def _encode(self, value: Any) -> Any:
        if isinstance(value, (dict, list)):
            return Jsonb(value)
        if isinstance(value, tuple):
            return Jsonb(list(value))
        return value

    def _day_expr(self, column: str) -> str:
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def scrub(self) -> None:
        """After a deletion of personal data: VACUUM the tables that held it, so the dead tuples'
        space is reclaimed and reused (VACUUM runs outside a transaction)."""
        with self._pool.connection() as conn:
            conn.autocommit = True
            try:
                for table in ERASABLE_TABLES:
                    conn.execute(f"VACUUM {table}")
            finally:
                conn.autocommit = False

    def close(self) -> None:
        self._pool.close()
