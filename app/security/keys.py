"""API keys and roles: who may call what, keys kept only as salted hashes, and per-key rate limits.

Roles, each including the one before it:

* ``agent``: record interactions and feedback, chat, score a response;
* ``operator``: read the data, review it, train and deploy;
* ``admin``: manage keys, erase a user's or a session's data, read the audit log.

A key is ``kz_<id>_<secret>``: the id finds its row (``api_keys``: name, role, salt, the salted
SHA-256 of the secret, its rate limit, when it was created and revoked) and the secret is compared
by hash in constant time. The key itself is shown once, by ``kaizen keys create``, and stored
nowhere. A config may also name keys by environment variable (``security.api_keys``: ``key_env``
and a role), for a deployment whose secrets come from its platform; a key is never written in a
config. Authentication is required as soon as any key exists.

Rate limits are token buckets per key (``security.rate_limit_per_s`` and
``security.rate_limit_burst``; a key's own ``rate_per_s`` overrides the rate): each collector
replica keeps its own buckets, so with ``n`` replicas a key may reach ``n`` times its rate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from app.store import InteractionStore

__all__ = [
    "KEY_PATTERN",
    "OPEN",
    "ROLES",
    "ApiKey",
    "Authenticator",
    "KeyStore",
    "RateLimiter",
    "Role",
    "allows",
]

Role = Literal["agent", "operator", "admin"]
ROLES: tuple[Role, ...] = ("agent", "operator", "admin")
KEY_PATTERN = re.compile(r"^kz_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
CACHE_S = 5.0
"""How long a replica trusts what it read of ``api_keys`` (a revocation takes effect within it)."""


def allows(role: Role, needed: Role) -> bool:
    """Whether a key of ``role`` may do what ``needed`` may (each role includes the ones before it)."""
    return ROLES.index(role) >= ROLES.index(needed)


def _digest(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key as the server knows it (never the key itself)."""

    id: str
    name: str
    role: Role
    rate_per_s: float | None = None
    source: Literal["store", "env", "open"] = "store"

    @property
    def label(self) -> str:
        """How the audit log names the key: its id and name, never the secret."""
        return f"key:{self.id} ({self.name})"


OPEN = ApiKey(id="open", name="no authentication", role="admin", source="open")
"""The caller when no key exists: the API is open (bind it to localhost), every caller may do all."""


class KeyStore:
    """The ``api_keys`` table: create (the key shown once), list, revoke; every change audited."""

    def __init__(self, store: InteractionStore):
        self.store = store

    def create(self, name: str, role: Role, actor: str, rate_per_s: float | None = None) -> tuple[dict[str, Any], str]:
        """A new key: its row (without salt and hash) and the key, which is stored nowhere.

        Raises:
            ValueError: an empty name, an unknown role, or a rate that is not positive.
        """
        if not name.strip():
            raise ValueError("name: must not be empty")
        if role not in ROLES:
            raise ValueError(f"role: one of {', '.join(ROLES)}, not {role!r}")
        if rate_per_s is not None and not rate_per_s > 0:
            raise ValueError("rate_per_s: must be above 0")
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
        now = datetime.now(UTC)
        with self.store._transaction() as cur:
            self.store._execute(
                cur,
                "INSERT INTO api_keys (id, name, role, salt, hash, rate_per_s, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [key_id, name.strip(), role, salt, _digest(salt, secret), rate_per_s, now, actor],
            )
            self.store.audit(actor, "key.create", key_id, {"name": name.strip(), "role": role}, cur=cur, now=now)
        return self.get(key_id), f"kz_{key_id}_{secret}"

    def get(self, key_id: str) -> dict[str, Any]:
        rows = self.store._fetch(
            "SELECT id, name, role, rate_per_s, created_at, created_by, revoked_at FROM api_keys WHERE id = ?",
            [key_id],
        )
        if not rows:
            raise KeyError(key_id)
        return rows[0]

    def list(self, include_revoked: bool = True) -> list[dict[str, Any]]:
        sql = "SELECT id, name, role, rate_per_s, created_at, created_by, revoked_at FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        return self.store._fetch(sql + " ORDER BY created_at")

    def revoke(self, key_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        """Revoke a key (it stops working within :data:`CACHE_S` on every replica).

        Raises:
            KeyError: no key by that id.
        """
        self.get(key_id)
        now = datetime.now(UTC)
        with self.store._transaction() as cur:
            self.store._execute(
                cur, "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", [now, key_id]
            )
            self.store.audit(actor, "key.revoke", key_id, {"reason": reason}, cur=cur, now=now)
        return self.get(key_id)

    def active(self) -> dict[str, dict[str, Any]]:
        """The keys not revoked, with their salts and hashes, by id (what :class:`Authenticator` checks)."""
        rows = self.store._fetch("SELECT id, name, role, salt, hash, rate_per_s FROM api_keys WHERE revoked_at IS NULL")
        return {r["id"]: r for r in rows}


class Authenticator:
    """A presented key to its :class:`ApiKey`, or None: the store's keys (read again every
    :data:`CACHE_S`) and the config's keys named by environment variable."""

    def __init__(
        self,
        store: InteractionStore | None,
        env_keys: list[tuple[str, Role]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.keys = KeyStore(store) if store is not None else None
        self.env_keys = [
            (os.environ[name].encode(), ApiKey(id=f"env-{name}", name=name, role=role, source="env"))
            for name, role in env_keys
            if os.environ.get(name)
        ]
        self.clock = clock
        self._cached: dict[str, dict[str, Any]] = {}
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def _store_keys(self, unknown_id: str | None = None) -> dict[str, dict[str, Any]]:
        """The store's active keys as last read; read again when older than :data:`CACHE_S`, or
        when a key id not among them is presented (a key just created elsewhere) and the last read
        is over a second old (guessed ids cannot make every request a read)."""
        if self.keys is None:
            return {}
        with self._lock:
            age = self.clock() - self._read_at
            if age > CACHE_S or (unknown_id is not None and unknown_id not in self._cached and age > 1.0):
                self._cached, self._read_at = self.keys.active(), self.clock()
            return self._cached

    @property
    def required(self) -> bool:
        """Whether requests need a key (any key exists)."""
        return bool(self.env_keys) or bool(self._store_keys())

    def identify(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        found = None
        for key, known in self.env_keys:
            if hmac.compare_digest(key, presented.encode()):
                found = known
        match = KEY_PATTERN.match(presented)
        row = self._store_keys(match.group(1)).get(match.group(1)) if match else None
        if row is not None and hmac.compare_digest(_digest(row["salt"], match.group(2)), row["hash"]):
            found = ApiKey(id=row["id"], name=row["name"], role=row["role"], rate_per_s=row.get("rate_per_s"))
        return found


class RateLimiter:
    """Token buckets, one per key: ``rate`` tokens a second up to ``burst``; a request takes one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, rate: float | None = None) -> float:
        """Take a token for ``key``: 0.0 when there was one, else the seconds until there is.
        A rate of 0 is no limit."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return 0.0
        burst = max(self.burst, 1.0)
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
