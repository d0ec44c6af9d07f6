"""Shared fixtures: one local Ray per test session, real SQLite files, a real PostgreSQL database.

PostgreSQL is not optional: CI starts it (``.ci/run``), and a test that needs it fails, rather
than skips, when it cannot be reached.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import train_answer_adapter

__all__ = ["free_port", "ingest_samples", "train_answer_adapter", "wait_for"]

# The code passes local_files_only everywhere; this also stops any library that reads the
# variable from reaching for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train V2's controller polls its workers every 2 s, and a run's start, each report and its end
# wait for a poll: the tests' runs are a few steps long, so they poll often (the workers and the
# jobs' processes inherit this from the session's Ray).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

PG_ADMIN_DSN = os.environ.get("KAIZEN_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; its DSN."""
    import psycopg

    name = f"kaizen_test_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for the tests and is not reachable at {PG_ADMIN_DSN}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_dsn(pg_database: str) -> Iterator[str]:
    """The session database, emptied for each test."""
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    yield pg_database


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A migrated interaction store of each engine (a test using it runs once per engine)."""
    from app.store.postgres import PostgresStore
    from app.store.sqlite import SQLiteStore

    if request.param == "sqlite":
        opened: Any = SQLiteStore(tmp_path / "kaizen.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_dsn"))
    opened.migrate()
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root with ``models/qwen2.5-tokenizer`` and ``models/tiny`` built once per session
    (building the tokenizer and the tiny model takes several seconds)."""
    from app.model.profiles import ensure_profile_dir

    root = tmp_path_factory.mktemp("storage-root")
    ensure_profile_dir("tiny", root=root)
    return root


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (2 CPUs, as on CI)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="kaizen-tests", log_to_driver=False)
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


class LocalServer:
    """The collector's FastAPI app under uvicorn in a thread: a real HTTP server without Ray.

    ``stop()`` and ``start()`` take it down and bring it back on the same port, so client tests
    can exercise retries, spooling and replay.
    """

    def __init__(self, cfg, port: int | None = None):
        self.cfg = cfg
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread = None
        self.service = None

    def start(self) -> LocalServer:
        import threading

        import uvicorn

        from app.client import wait_until_ready
        from app.serve.api import CollectorService, create_api

        self.service = CollectorService(self.cfg)
        config = uvicorn.Config(create_api(self.service), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        if not wait_until_ready(self.url, timeout_s=20):
            raise RuntimeError("local server did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self.service.store.close()
            self._server = None


@pytest.fixture
def local_server(tmp_path: Path):
    from app.config import KaizenConfig

    cfg = KaizenConfig.model_validate(
        {"store": {"sqlite_path": str(tmp_path / "kaizen.db")}, "privacy": {"hmac_key": "test-key"}}
    )
    server = LocalServer(cfg).start()
    yield server
    server.stop()


def ingest_samples(store, n: int) -> list[str]:
    """Commit ``n`` sample interactions (and one with an empty answer) straight into a store; their ids."""
    from app.config import KaizenConfig
    from app.ingest import IngestPipeline
    from app.sample import sample_events

    pipeline = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "k"}}))
    events = sample_events(n, seed=5)
    events.append(
        {
            "id": "empty",
            "type": "interaction",
            "timestamp": datetime.now(UTC).isoformat(),
            "body": {"session_id": "s", "input": {"raw": "hi"}, "output": {"content": ""}},
        }
    )
    prepared = pipeline.prepare(events)
    assert all(r.status == "accepted" for r in prepared.finish(store.write(prepared.to_commit)))
    return [e["id"] for e in events]


def wait_for(what: str, check: Any, timeout_s: float = 60.0, every_s: float = 0.2) -> Any:
    """``check()``'s first truthy value, polled every ``every_s``; AssertionError naming ``what``
    past ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")
