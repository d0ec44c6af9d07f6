"""The adapter registry: which adapters exist, what was decided about them, and which one serves.

Each adapter stored by :class:`app.model.adapters.AdapterStore` is registered here with its URI,
its manifest and a status (``candidate`` → ``validated`` → …, or ``rejected``). Two aliases name
the adapters in use: ``champion`` serves production traffic and ``challenger`` the canary share.
Status and aliases are independent: a status records a verdict about an adapter, an alias is what
serving follows, and the deployer decides how one leads to the other.

Every change is written with its actor and reason to ``audit_log``, and every alias move also to
``alias_history`` with the adapter it replaced, in the same transaction as the move itself, so
that two processes moving one alias at once still leave a complete, ordered chain of moves.

The champion is looked up here and nowhere else: :meth:`AdapterRegistry.champion` on an open
store, :func:`champion_adapter` from a config (opening and closing the store once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

from app.store import open_store
from app.store.base import InteractionStore

if TYPE_CHECKING:
    from app.config import KaizenConfig
    from app.model.adapters import AdapterManifest

__all__ = [
    "ALIASES",
    "STATUSES",
    "AdapterNotRegisteredError",
    "AdapterRegistry",
    "Alias",
    "Status",
    "champion_adapter",
    "registered_adapter",
]

Status = Literal["candidate", "validated", "champion", "challenger", "retired", "rejected"]
Alias = Literal["champion", "challenger"]
STATUSES: tuple[str, ...] = get_args(Status)
ALIASES: tuple[str, ...] = get_args(Alias)

# The audit_log actions this module writes (the table is shared with other components).
_ACTIONS = ("adapter.register", "adapter.status", "alias.set", "alias.clear")


class AdapterNotRegisteredError(LookupError):
    """An adapter id that the registry has no row for."""


class AdapterRegistry:
    """Adapters, their statuses and the ``champion``/``challenger`` aliases, in the interaction
    store's database (SQLite or PostgreSQL; tables from migration 1)."""

    def __init__(self, store: InteractionStore) -> None:
        self.store = store

    # --- adapters ------------------------------------------------------------------------------

    def register(
        self,
        manifest: AdapterManifest | Mapping[str, Any],
        uri: str,
        status: str = "candidate",
        *,
        actor: str,
    ) -> dict[str, Any]:
        """Record a stored adapter; returns its row (``id, base_model, uri, status, manifest,
        created_at``). ``created_at`` is the manifest's: when the adapter was made.

        Raises:
            ValueError: a bad status, an empty uri or actor, an invalid manifest, or an
                ``adapter_id`` that is already registered.
        """
        # Imported here: app.model pulls in torch, which reading the registry does not need.
        from app.model.adapters import AdapterManifest

        status = _check_status(status)
        actor = _check_text("actor", actor)
        uri = _check_text("uri", uri)
        manifest = AdapterManifest.model_validate(manifest)
        adapter_id = manifest.adapter_id
        with self.store._transaction() as cur:
            inserted = self._execute(
                cur,
                "INSERT INTO adapters (id, base_model, uri, status, manifest, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
                [
                    adapter_id,
                    manifest.base_model,
                    uri,
                    status,
                    manifest.model_dump(mode="json"),
                    manifest.created_at,
                ],
            )
            if not inserted:
                raise ValueError(f"adapter_id {adapter_id!r} is already registered; an adapter is registered once")
            self._audit(
                cur,
                actor,
                "adapter.register",
                adapter_id,
                {"uri": uri, "status": status, "base_model": manifest.base_model},
            )
        return self._require(adapter_id)

    def get(self, adapter_id: str) -> dict[str, Any] | None:
        """The adapter's row, or None when it is not registered."""
        rows = self.store._fetch("SELECT * FROM adapters WHERE id = ?", [adapter_id])
        return rows[0] if rows else None

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        """Registered adapters, oldest first; only those with ``status`` when given."""
        if status is None:
            return self.store._fetch("SELECT * FROM adapters ORDER BY created_at, id")
        return self.store._fetch(
            "SELECT * FROM adapters WHERE status = ? ORDER BY created_at, id", [_check_status(status)]
        )

    def set_status(self, adapter_id: str, status: str, actor: str, reason: str) -> dict[str, Any]:
        """Change an adapter's status (audited with the old and new status); returns its row.

        Raises:
            ValueError: a status not in :data:`STATUSES`, or an empty actor or reason.
            AdapterNotRegisteredError: no such adapter.
        """
        status = _check_status(status)
        actor, reason = _check_text("actor", actor), _check_text("reason", reason)
        with self.store._transaction() as cur:
            # FOR UPDATE: a concurrent change waits, so the audited "from" is the status replaced.
            rows = self._execute(cur, f"SELECT status FROM adapters WHERE id = ?{self._for_update}", [adapter_id])
            if not rows:
                raise self._unknown(adapter_id)
            previous = rows[0]["status"]
            self._execute(cur, "UPDATE adapters SET status = ? WHERE id = ?", [status, adapter_id])
            self._audit(cur, actor, "adapter.status", adapter_id, {"from": previous, "to": status, "reason": reason})
        return self._require(adapter_id)

    # --- aliases -------------------------------------------------------------------------------

    def set_alias(self, alias: str, adapter_id: str | None, actor: str, reason: str) -> dict[str, Any]:
        """Point ``champion`` or ``challenger`` at a registered adapter, or clear it with None.

        The previous target is read and the alias written, with its ``alias_history`` and
        ``audit_log`` rows, in one transaction that excludes every other alias move until it
        commits; a move to the adapter already aliased is still recorded, as it was asked for.

        Returns:
            The ``alias_history`` row: ``id, alias, adapter_id, previous_adapter_id, actor,
            reason, created_at``.

        Raises:
            ValueError: an alias other than ``champion`` or ``challenger``, or an empty actor or reason.
            AdapterNotRegisteredError: ``adapter_id`` is not registered (nothing is written).
        """
        alias = _check_alias(alias)
        actor, reason = _check_text("actor", actor), _check_text("reason", reason)
        now = datetime.now(UTC)
        with self.store._transaction() as cur:
            if self.store.engine == "postgres":
                # Row locks cannot cover an alias that has no row yet (never set, or cleared), so
                # lock the table: this mode conflicts with itself but not with plain reads.
                cur.execute("LOCK TABLE adapter_aliases IN SHARE ROW EXCLUSIVE MODE")
            # SQLite needs nothing more: the store's BEGIN IMMEDIATE already holds the write lock.
            if adapter_id is not None and not self._execute(cur, "SELECT id FROM adapters WHERE id = ?", [adapter_id]):
                raise self._unknown(adapter_id)
            rows = self._execute(cur, "SELECT adapter_id FROM adapter_aliases WHERE alias = ?", [alias])
            previous = rows[0]["adapter_id"] if rows else None
            if adapter_id is None:
                self._execute(cur, "DELETE FROM adapter_aliases WHERE alias = ?", [alias])
            else:
                self._execute(
                    cur,
                    "INSERT INTO adapter_aliases (alias, adapter_id, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (alias) DO UPDATE SET adapter_id = excluded.adapter_id, "
                    "updated_at = excluded.updated_at",
                    [alias, adapter_id, now],
                )
            (history,) = self._execute(
                cur,
                "INSERT INTO alias_history (alias, adapter_id, previous_adapter_id, actor, reason, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
                [alias, adapter_id, previous, actor, reason, now],
            )
            action = "alias.clear" if adapter_id is None else "alias.set"
            self._audit(cur, actor, action, alias, {"from": previous, "to": adapter_id, "reason": reason})
        return history

    def aliases(self) -> dict[str, str]:
        """The aliases that are set, with their adapter ids."""
        return {r["alias"]: r["adapter_id"] for r in self.store._fetch("SELECT alias, adapter_id FROM adapter_aliases")}

    def alias_history(self, alias: str | None = None) -> list[dict[str, Any]]:
        """Every alias move, oldest first (of one alias, or both)."""
        if alias is None:
            return self.store._fetch("SELECT * FROM alias_history ORDER BY id")
        return self.store._fetch("SELECT * FROM alias_history WHERE alias = ? ORDER BY id", [_check_alias(alias)])

    def resolve(self, name: str) -> str | None:
        """The adapter id that ``name`` stands for: an alias gives its adapter (None while unset),
        a registered adapter id gives itself, anything else None."""
        if name in ALIASES:
            rows = self.store._fetch("SELECT adapter_id FROM adapter_aliases WHERE alias = ?", [name])
            return rows[0]["adapter_id"] if rows else None
        return name if self.get(name) is not None else None

    def champion(self) -> str | None:
        """The adapter id the ``champion`` alias names (what serves production traffic and what the
        learning jobs continue from), or None while no champion is set (the base model serves)."""
        return self.resolve("champion")

    def audit(self, target: str | None = None) -> list[dict[str, Any]]:
        """The registry's audit rows, oldest first; only those about ``target`` (an adapter id
        or an alias) when given."""
        marks = ", ".join("?" * len(_ACTIONS))
        sql = f"SELECT * FROM audit_log WHERE action IN ({marks})"
        params: list[Any] = list(_ACTIONS)
        if target is not None:
            sql += " AND target = ?"
            params.append(target)
        return self.store._fetch(sql + " ORDER BY id", params)

    # --- helpers -------------------------------------------------------------------------------

    @property
    def _for_update(self) -> str:
        # SQLite has no row locks and needs none: its transactions already hold the write lock.
        return " FOR UPDATE" if self.store.engine == "postgres" else ""

    def _execute(self, cur: Any, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return self.store._execute(cur, sql, params)

    def _audit(self, cur: Any, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        self.store.audit(actor, action, target, details, cur=cur)

    def _require(self, adapter_id: str) -> dict[str, Any]:
        row = self.get(adapter_id)
        if row is None:
            raise self._unknown(adapter_id)
        return row

    def _unknown(self, adapter_id: str) -> AdapterNotRegisteredError:
        return AdapterNotRegisteredError(f"adapter_id {adapter_id!r} is not registered")


def champion_adapter(cfg: KaizenConfig) -> str | None:
    """The champion adapter's id (:meth:`AdapterRegistry.champion`) from the configured store,
    opened and closed once for the question; None while no champion is set."""
    store = open_store(cfg.store)
    try:
        return AdapterRegistry(store).champion()
    finally:
        store.close()


def registered_adapter(cfg: KaizenConfig, adapter_id: str) -> dict[str, Any] | None:
    """The registry's row of ``adapter_id`` (:meth:`AdapterRegistry.get`) from the configured
    store, opened and closed once for the question; None when it is not registered."""
    store = open_store(cfg.store)
    try:
        return AdapterRegistry(store).get(adapter_id)
    finally:
        store.close()


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    return status


def _check_alias(alias: str) -> str:
    if alias not in ALIASES:
        raise ValueError(f"alias {alias!r} is not one of {', '.join(ALIASES)}")
    return alias


def _check_text(field: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string, got {value!r}")
    return value
