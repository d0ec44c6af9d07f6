"""Encryption at rest: the database files hold no plain text of what users sent (SQLite file and
write-ahead log, a PostgreSQL dump), what is read back through the store and the API is the plain
text, and the data keys rotate without losing a row."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import InvalidToken

from app.config import KaizenConfig
from app.ingest import IngestPipeline
from app.privacy.encryption import DataCipher, new_key
from app.store import open_store

PROMPT = "PLAINTEXT-PROMPT-5c1e how do I parse this"
CORRECTION = "PLAINTEXT-CORRECTION-77ab use json.loads"
TOOL_ARG = "PLAINTEXT-TOOL-ARG-9d0f"


def events() -> list[dict[str, Any]]:
    return [
        {
            "id": "enc-1",
            "type": "interaction",
            "timestamp": datetime.now(UTC).isoformat(),
            "body": {
                "session_id": "s1",
                "input": {"raw": PROMPT},
                "output": {"content": "PLAINTEXT-ANSWER-31aa"},
                "metadata": {"system_prompt": "PLAINTEXT-SYSTEM-0b2c", "stop_sequences": ["PLAINTEXT-STOP-4e"]},
                "context": {"project_type": "PLAINTEXT-PROJECT-8f"},
                "tool_calls": [{"tool_name": "grep", "parameters_raw": {"pattern": TOOL_ARG}, "output": "hits"}],
                "feedback": {"explicit": {"rating": 2, "correction": CORRECTION}},
            },
        }
    ]


def config(db: Path, **privacy: Any) -> KaizenConfig:
    return KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(db)},
            "privacy": {"hmac_key": "enc", "encryption": True, "data_minimization": False, **privacy},
        }
    )


def test_the_sqlite_files_hold_no_plain_text_and_the_api_reads_it_back(tmp_path: Path, monkeypatch) -> None:
    from tests.conftest import LocalServer

    monkeypatch.setenv("KAIZEN_DATA_KEYS", new_key())
    db = tmp_path / "kaizen.db"
    server = LocalServer(config(db)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/events", json={"events": events()}).status_code == 200
            record = http.get("/v1/interactions/enc-1").json()
            raw = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("kaizen.db*")))
    finally:
        server.stop()
    assert record["input_raw"] == PROMPT and record["system_prompt"] == "PLAINTEXT-SYSTEM-0b2c"
    assert record["feedback"][0]["correction"] == CORRECTION
    assert record["tool_usage"][0]["parameters_raw"] == {"pattern": TOOL_ARG}
    assert b"PLAINTEXT" not in raw and b"enc:v1:" in raw


def test_a_postgres_dump_holds_no_plain_text(pg_dsn: str, monkeypatch) -> None:
    monkeypatch.setenv("KAIZEN_DATA_KEYS", new_key())
    cfg = KaizenConfig.model_validate(
        {
            "store": {"engine": "postgres", "postgres_dsn": pg_dsn},
            "privacy": {"hmac_key": "enc", "encryption": True, "data_minimization": False},
        }
    )
    store = open_store(cfg.store)
    try:
        prepared = IngestPipeline(cfg).prepare(events())
        assert prepared.finish(store.write(prepared.to_commit))[0].status == "accepted"
        record = store.get_interaction("enc-1")
        assert record["input_raw"] == PROMPT and record["context"]["project_type"] == "PLAINTEXT-PROJECT-8f"
    finally:
        store.close()
    dump = subprocess.run(["pg_dump", "--data-only", pg_dsn], capture_output=True, text=True, check=True).stdout
    assert "enc-1" in dump and "PLAINTEXT" not in dump


def test_rotation_re_encrypts_every_value_and_the_old_key_can_go(tmp_path: Path, monkeypatch) -> None:
    old, new = new_key(), new_key()
    db = tmp_path / "kaizen.db"
    # Written before encryption was on: plain rows, which rotation seals too.
    plain = open_store(KaizenConfig.model_validate({"store": {"sqlite_path": str(db)}}).store)
    prepared = IngestPipeline(config(db)).prepare(events())
    prepared.finish(plain.write(prepared.to_commit))
    plain.close()

    monkeypatch.setenv("KAIZEN_DATA_KEYS", old)
    store = open_store(config(db).store)
    assert store.get_interaction("enc-1")["input_raw"] == PROMPT  # plain rows stay readable
    assert store.rotate_encryption(batch=1)["interactions"] == 1
    store.close()
    sealed_with_old = db.read_bytes()
    assert b"PLAINTEXT" not in sealed_with_old

    monkeypatch.setenv("KAIZEN_DATA_KEYS", f"{new},{old}")  # the new key first: it encrypts
    store = open_store(config(db).store)
    assert store.rotate_encryption()["feedback"] == 1
    store.close()

    monkeypatch.setenv("KAIZEN_DATA_KEYS", new)  # the old key gone
    store = open_store(config(db).store)
    record = store.get_interaction("enc-1")
    assert record["input_raw"] == PROMPT and record["feedback"][0]["correction"] == CORRECTION
    store.close()

    monkeypatch.setenv("KAIZEN_DATA_KEYS", old)  # a store sealed with another key cannot be read
    store = open_store(config(db).store)
    with pytest.raises(InvalidToken):
        store.get_interaction("enc-1")
    store.close()


def test_missing_or_bad_keys_are_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KAIZEN_DATA_KEYS", raising=False)
    with pytest.raises(ValueError, match=r"\$KAIZEN_DATA_KEYS holds no key"):
        open_store(config(tmp_path / "k.db").store)
    keys = tmp_path / "keys"
    keys.write_text("not-a-key\n")
    with pytest.raises(ValueError, match="not a Fernet key"):
        open_store(config(tmp_path / "k.db", encryption_key_file=str(keys)).store)
    cipher = DataCipher([new_key()])
    assert cipher.seal("input_raw", "") == "" and cipher.seal("input_raw", None) is None
    assert cipher.seal("rating", "5") == "5"  # not an encrypted column
    assert cipher.open(cipher.seal("parameters_raw", {"a": [1]})) == {"a": [1]}
