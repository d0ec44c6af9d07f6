from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store import InteractionStore
from app.store.postgres import PostgresStore
from app.store.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InteractionStore]:
    """A migrated store of each engine."""
    if request.param == "sqlite":
        opened: InteractionStore = SQLiteStore(tmp_path / "kaizen.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_dsn"))
    opened.migrate()
    yield opened
    opened.close()
