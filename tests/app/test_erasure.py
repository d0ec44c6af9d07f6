"""Erasure of a session's or a user's data: from the store (both engines), from the SQLite file and
its write-ahead log, with the datasets that held it marked stale, audited."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.config import KaizenConfig
from app.ingest import IngestPipeline
from app.privacy.erasure import STALE_FILE, erase

SECRET = "ERASE-ME-7f3a9c"  # text only the erased session's interactions carry
CFG = {"privacy": {"hmac_key": "erasure-test", "data_minimization": False}}  # user ids kept (hashed)


def interaction(i: int, session: str, user: str, text: str) -> dict[str, Any]:
    return {
        "id": f"it-{session}-{i}",
        "type": "interaction",
        "timestamp": datetime.now(UTC).isoformat(),
        "body": {
            "session_id": session,
            "user_id": user,
            "input": {"raw": f"{text} question {i}"},
            "output": {"content": f"{text} answer {i}"},
            "tool_calls": [{"tool_name": "shell", "output": f"{text} tool output"}],
            "feedback": {"explicit": {"rating": 4, "correction": f"{text} corrected"}},
            "outcome": {"tests_pass": True},
        },
    }


def record(store, cfg: KaizenConfig) -> None:
    events = [interaction(i, "alice-session", "alice", SECRET) for i in range(3)]
    events += [interaction(i, "bob-session", "bob", "kept") for i in range(2)]
    prepared = IngestPipeline(cfg).prepare(events)
    assert all(r.status == "accepted" for r in prepared.finish(store.write(prepared.to_commit)))


def write_dataset(root: Path, dataset_id: str, ids: list[str]) -> Path:
    folder = root / "datasets" / dataset_id
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"interaction_id": ids}), folder / "train.parquet")
    pq.write_table(pa.table({"interaction_id": pa.array([], pa.string())}), folder / "validation.parquet")
    (folder / "manifest.json").write_text(json.dumps({"dataset_id": dataset_id}))
    return folder


def test_erasing_a_user_removes_everything_recorded_of_them(store, tmp_path: Path) -> None:
    cfg = KaizenConfig.model_validate({**CFG, "model": {"storage_root": str(tmp_path)}})
    record(store, cfg)
    held = write_dataset(tmp_path, "ds-1", ["it-alice-session-0", "it-bob-session-0", "it-alice-session-2"])
    untouched = write_dataset(tmp_path, "ds-2", ["it-bob-session-1"])

    done = erase(cfg, store, user_id="alice", actor="admin@test", reason="user asked")
    assert done["interactions"] == 3 and done["target"].startswith("user:") and "alice" not in done["target"]
    assert done["deleted"]["interactions"] == 3 and done["deleted"]["tool_usage"] == 3
    assert done["deleted"]["feedback"] == 3 and done["deleted"]["outcomes"] == 3
    assert done["stale_datasets"] == {"ds-1": 2}
    assert json.loads((held / STALE_FILE).read_text())["erased_rows"] == 2 and not (untouched / STALE_FILE).exists()
    for table in ("interactions", "tool_usage", "feedback", "outcomes", "context_snapshots"):
        rows = store._fetch(f"SELECT * FROM {table}")
        assert SECRET not in json.dumps(rows, default=str), table
    assert store.count("interactions") == 2 and store.get_interaction("it-bob-session-1") is not None
    (entry,) = store.audit_entries(action="data.erase")
    assert entry["actor"] == "admin@test" and entry["details"]["interactions"] == 3 and "alice" not in str(entry)

    # Nothing left to erase: done, and said so.
    assert erase(cfg, store, user_id="alice", actor="admin@test")["interactions"] == 0
    with pytest.raises(ValueError, match="session id or a user id"):
        erase(cfg, store, actor="admin@test")


def test_delete_session_leaves_no_text_in_the_database_file_or_its_log(tmp_path: Path) -> None:
    from tests.conftest import LocalServer

    db = tmp_path / "kaizen.db"
    cfg = KaizenConfig.model_validate(
        {**CFG, "store": {"sqlite_path": str(db)}, "model": {"storage_root": str(tmp_path)}}
    )
    server = LocalServer(cfg).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            events = [interaction(i, "alice-session", "alice", SECRET) for i in range(3)]
            events += [interaction(0, "bob-session", "bob", "kept")]
            assert http.post("/v1/events", json={"events": events}).status_code == 200
            assert SECRET.encode() in _files(db)  # written: in the file or its log
            r = http.delete("/v1/sessions/alice-session", params={"reason": "GDPR request 12"})
            assert r.status_code == 200 and r.json()["interactions"] == 3
            assert http.get("/v1/interactions/it-alice-session-0").status_code == 404
            assert http.get("/v1/interactions/it-bob-session-0").status_code == 200
            assert SECRET.encode() not in _files(db)
            audit = http.get("/v1/audit", params={"action": "data.erase"}).json()["entries"]
            assert len(audit) == 1 and audit[0]["details"]["reason"] == "GDPR request 12"
    finally:
        server.stop()


def _files(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))
