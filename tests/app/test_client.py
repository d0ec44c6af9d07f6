"""KaizenClient against a real local server: batching, retries, spool and replay, flush timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.client import KaizenClient
from tests.conftest import free_port


def make_client(url: str, spool: Path, **kw) -> KaizenClient:
    opts = dict(
        batch_size=50,
        flush_interval_s=0.02,
        timeout_s=2,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        probe_interval_s=0.2,
        spool_dir=spool,
    )
    opts.update(kw)
    return KaizenClient(url, **opts)


def record_some(client: KaizenClient, n: int, prefix: str = "i") -> list[str]:
    ids = []
    for k in range(n):
        iid = client.record_interaction(f"session-{k % 7}", f"prompt {k}", f"response {k}", id=f"{prefix}-{k}")
        client.record_feedback(iid, rating=4, accepted=True, id=f"{prefix}-{k}-fb")
        ids.append(iid)
    return ids


def test_records_are_batched_and_all_stored(local_server, tmp_path: Path) -> None:
    client = make_client(local_server.url, tmp_path / "spool")
    ids = record_some(client, 230)
    tool = client.record_tool_usage(ids[0], "read_file", parameters={"path": "a.py"}, success=True, duration_ms=3.5)
    client.record_outcome(ids[0], code_compiles=True, tests_pass=True)
    assert client.flush(timeout=20)
    store = local_server.service.store
    assert store.existing_ids(ids) == set(ids)
    got = store.get_interaction(ids[0])
    assert got["feedback"][0]["rating"] == 4 and got["tool_usage"][0]["id"] == tool
    assert got["outcome"]["tests_pass"] is True
    assert client.stats["accepted"] == 460 + 2 and client.stats["rejected"] == 0
    client.close()


def test_recording_never_raises_and_rejections_are_kept(local_server, tmp_path: Path) -> None:
    client = make_client(local_server.url, tmp_path / "spool")
    # Invalid for the server, or not even JSON: none of it raises into the caller.
    assert client.record_interaction("s", "p", "r", metadata={"temperature": "hot"}) is not None
    assert client.record_interaction("s", "p", "r", metadata={"model_version": object()}) is not None
    client.record_feedback("x", rating=99)
    assert client.flush(timeout=10)
    assert client.stats["rejected"] == 2 and client.stats["accepted"] == 1
    rejected = (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 2 and "metadata.temperature" in rejected[0]
    client.close()


def test_server_down_spools_then_replays_exactly_once(local_server, tmp_path: Path) -> None:
    client = make_client(local_server.url, tmp_path / "spool")
    first = record_some(client, 40, "before")
    assert client.flush(timeout=10)
    local_server.stop()
    during = record_some(client, 120, "during")
    assert not client.flush(timeout=1.0)  # cannot deliver, returns at the deadline
    assert client.stats["spooled"] > 0 and client.spooled_events() > 0
    local_server.start()
    assert client.flush(timeout=20)
    assert client.spooled_events() == 0 and client.stats["replayed"] > 0
    store = local_server.service.store
    assert store.existing_ids(first + during) == set(first + during)
    assert store.count("interactions") == 160 and store.count("feedback") == 160
    client.close()


def test_flush_timeout_never_hangs_when_nothing_listens(tmp_path: Path) -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}", tmp_path / "spool", max_retries=5)
    record_some(client, 10)
    start = time.monotonic()
    assert client.flush(timeout=0.5) is False
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    client.close(timeout=0.5)
    assert time.monotonic() - start < 3
    # Nothing is lost: whatever was not delivered waits in the spool.
    assert client.spooled_events() == 10 * 2


def test_spool_left_by_a_dead_client_is_replayed_by_the_next(local_server, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    dead = make_client(f"http://127.0.0.1:{free_port()}", spool)
    ids = record_some(dead, 25, "orphan")
    dead.close(timeout=0.3)
    assert dead.spooled_events() == 50
    fresh = make_client(local_server.url, spool)
    assert fresh.flush(timeout=15)
    assert local_server.service.store.existing_ids(ids) == set(ids)
    fresh.close()


def test_record_cost_is_small(local_server, tmp_path: Path) -> None:
    # Not a timing assertion (benchmarks/collector.py measures it): recording must not do I/O.
    client = make_client(local_server.url, tmp_path / "spool", flush_interval_s=60, batch_size=10_000)
    record_some(client, 100)
    assert client.pending == 200  # still queued: nothing was sent on the caller's thread
    assert client.flush(timeout=10)
    client.close()


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_construction_is_a_clear_error(batch_size: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        KaizenClient("http://127.0.0.1:1", batch_size=batch_size, spool_dir=tmp_path)


def test_interpreter_exit_flushes(local_server, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "from app.client import KaizenClient\n"
        f"c = KaizenClient({local_server.url!r}, flush_interval_s=60, batch_size=10_000, spool_dir={str(tmp_path)!r})\n"
        "for k in range(25):\n"
        "    c.record_interaction('s', 'p', 'r', id=f'exit-{k}')\n"
    )  # no flush(), no close(): the atexit hook must deliver them
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    ids = [f"exit-{k}" for k in range(25)]
    assert local_server.service.store.existing_ids(ids) == set(ids)


def test_from_config_takes_the_batch_size_and_the_overhead_budget(tmp_path: Path) -> None:
    from app.config import KaizenConfig

    cfg = KaizenConfig.model_validate({"performance": {"batch_size": 7, "max_collection_overhead_ms": 2.5}})
    client = KaizenClient.from_config("http://127.0.0.1:1", cfg, spool_dir=tmp_path, flush_interval_s=60)
    assert client.batch_size == 7 and client.max_overhead_ms == 2.5
    assert KaizenClient.from_config("http://127.0.0.1:1", cfg, spool_dir=tmp_path, batch_size=3).batch_size == 3
    client.close(timeout=0)


@pytest.mark.parametrize("budget_ms, over", [(1e-6, 4), (10_000.0, 0)])
def test_record_calls_over_the_overhead_budget_are_counted(tmp_path: Path, budget_ms: float, over: int) -> None:
    from app.config import KaizenConfig

    cfg = KaizenConfig.model_validate({"performance": {"max_collection_overhead_ms": budget_ms}})
    client = KaizenClient.from_config("http://127.0.0.1:1", cfg, spool_dir=tmp_path, flush_interval_s=60)
    iid = client.record_interaction("s", "p", "r")
    client.record_feedback(iid, rating=5)
    client.record_tool_usage(iid, "read_file")
    client.record_outcome(iid, tests_pass=True)
    # One count per call: record_interaction's own enqueue is not timed a second time.
    assert client.stats["recorded"] == 4 and client.stats["over_budget"] == over
    client.close(timeout=0)
