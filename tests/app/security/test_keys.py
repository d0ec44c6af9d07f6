from __future__ import annotations

import sqlite3

import pytest

from app.security.keys import KEY_PATTERN, Authenticator, KeyStore, RateLimiter, allows


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_roles_include_the_ones_before_them() -> None:
    assert allows("admin", "operator") and allows("admin", "agent") and allows("operator", "agent")
    assert not allows("agent", "operator") and not allows("operator", "admin")


def test_a_key_is_shown_once_and_stored_only_as_a_salted_hash(store) -> None:
    keys = KeyStore(store)
    row, key = keys.create("ci runner", "operator", actor="alice", rate_per_s=2.5)
    assert KEY_PATTERN.match(key) and key.startswith(f"kz_{row['id']}_")
    assert row["role"] == "operator" and row["rate_per_s"] == 2.5 and row["revoked_at"] is None
    secret = key.split("_", 2)[2]
    stored = store._fetch("SELECT * FROM api_keys")
    assert len(stored) == 1 and secret not in str(stored) and key not in str(stored)
    # Two keys never share a salt, so equal secrets would not share a hash either.
    keys.create("other", "agent", actor="alice")
    assert len({r["salt"] for r in store._fetch("SELECT salt FROM api_keys")}) == 2
    audit = store.audit_entries(action="key.")
    assert [a["action"] for a in audit] == ["key.create", "key.create"] and secret not in str(audit)
    with pytest.raises(ValueError, match="role"):
        keys.create("x", "root", actor="alice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        keys.create(" ", "agent", actor="alice")


def test_the_authenticator_takes_store_and_environment_keys_and_forgets_revoked_ones(store, monkeypatch) -> None:
    clock = Clock()
    keys = KeyStore(store)
    auth = Authenticator(store, [("KZ_TEST_AGENT", "agent"), ("KZ_TEST_UNSET", "admin")], clock=clock)
    assert not auth.required  # no key anywhere: the API is open
    monkeypatch.setenv("KZ_TEST_AGENT", "env-secret")
    auth = Authenticator(store, [("KZ_TEST_AGENT", "agent"), ("KZ_TEST_UNSET", "admin")], clock=clock)
    assert auth.required and auth.identify("env-secret").role == "agent"
    row, key = keys.create("laptop", "admin", actor="alice")
    found = auth.identify(key)  # a key created after the last read is found at once
    assert found is not None and found.id == row["id"] and found.role == "admin" and found.source == "store"
    assert auth.identify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
    assert auth.identify(f"kz_{'0' * 12}_{key.split('_', 2)[2]}") is None  # another id
    assert auth.identify(None) is None and auth.identify("") is None
    keys.revoke(row["id"], actor="alice", reason="lost laptop")
    assert auth.identify(key) is not None  # trusted for the cache's few seconds
    clock.now += 6
    assert auth.identify(key) is None
    assert [a["action"] for a in store.audit_entries(action="key.")][:1] == ["key.revoke"]
    with pytest.raises(KeyError):
        keys.revoke("nope", actor="alice")


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)  # empty: one token in half a second
    assert limiter.take("other") == 0.0  # each key its own bucket
    clock.now += 0.5
    assert limiter.take("k") == 0.0 and limiter.take("k") > 0
    assert limiter.take("k", rate=0) == 0.0  # a key without a limit
    clock.now += 100
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0] and limiter.take("k") > 0  # capped at the burst


def test_the_sqlite_file_holds_no_key(tmp_path) -> None:
    from app.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "k.db")
    store.migrate()
    _, key = KeyStore(store).create("x", "agent", actor="t")
    store.close()
    raw = (tmp_path / "k.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("k.db-*"))
    assert key.split("_", 2)[2].encode() not in raw
    with sqlite3.connect(tmp_path / "k.db") as db:
        assert db.execute("SELECT count(*) FROM api_keys").fetchone() == (1,)
