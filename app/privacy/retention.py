"""Retention: what Kaizen keeps, and for how long (the seed's data-protection policy).

* Raw interactions older than ``collection.retention_days`` are removed with everything recorded
  of them, unless a kept dataset (one still under ``<storage_root>/datasets``) holds them: an
  adapter's training set stays its record. Before they go, their day's aggregates (how many, how
  many scored, the sums of quality and confidence, how many had feedback or a correction) are added
  to ``daily_aggregates``, which names no session, user or interaction. The database is scrubbed
  after (SQLite ``secure_delete`` and VACUUM, PostgreSQL VACUUM).
* Adapters beyond ``model.max_checkpoints`` (the newest are kept) that are neither champion nor
  challenger nor the champion before the current one are retired and their files removed; their
  registry rows, validation reports and datasets stay, with the audit trail.

``run_retention`` is what ``kaizen retention run`` and ``python -m jobs.retention`` do, and what
the scheduler runs once a day. Every run is audited (``retention.run``) with what it removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.config import KaizenConfig
from app.store import InteractionStore

__all__ = [
    "EVERY",
    "RetentionResult",
    "dataset_interaction_ids",
    "kept_dataset_ids",
    "prune_adapters",
    "retain",
    "retention_due",
    "run_retention",
]

BATCH = 5_000
EVERY = timedelta(days=1)
"""How often the scheduler runs retention."""


@dataclass
class RetentionResult:
    cutoff: str
    considered: int = 0
    kept_in_datasets: int = 0
    deleted: dict[str, int] = field(default_factory=dict)
    aggregated_days: dict[str, int] = field(default_factory=dict)
    retired_adapters: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def dataset_interaction_ids(storage_root: str) -> dict[str, set[str]]:
    """The interaction ids each dataset under ``<storage_root>/datasets`` holds (its train and
    validation rows), by dataset id; a local or a remote root."""
    import pyarrow.dataset as pads

    from app.artifacts import locate

    folder = locate(storage_root).child("datasets")
    held: dict[str, set[str]] = {}
    if "://" not in storage_root and not Path(folder.path).is_dir():
        return held
    for child in folder.filesystem.get_file_info(_selector(folder.path)):
        if child.type.name != "Directory":
            continue
        ids = held.setdefault(child.base_name, set())
        for split in ("train.parquet", "validation.parquet"):
            path = f"{child.path}/{split}"
            if folder.filesystem.get_file_info(path).type.name == "File":
                table = pads.dataset(path, filesystem=folder.filesystem).to_table(columns=["interaction_id"])
                ids.update(v for v in table.column(0).to_pylist() if v)
    return held


def kept_dataset_ids(storage_root: str) -> set[str]:
    """The interaction ids any kept dataset holds (what retention leaves in the store)."""
    return set().union(*dataset_interaction_ids(storage_root).values())


def _selector(path: str) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, allow_not_found=True)


def run_retention(
    cfg: KaizenConfig, store: InteractionStore, *, actor: str = "retention", now: datetime | None = None
) -> RetentionResult:
    """One retention run (see the module docstring); what it did, also audited."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=cfg.collection.retention_days)
    result = RetentionResult(cutoff=cutoff.isoformat())
    protected = kept_dataset_ids(cfg.model.storage_root)
    seen: set[str] = set()
    while True:
        batch = [i for i in store.interactions_before(cutoff, limit=BATCH + len(seen)) if i not in seen]
        if not batch:
            break
        seen.update(batch)
        result.considered += len(batch)
        kept = [i for i in batch if i in protected]
        result.kept_in_datasets += len(kept)
        gone = [i for i in batch if i not in protected]
        if gone:
            for day, n in store.aggregate_days(gone, now).items():
                result.aggregated_days[day] = result.aggregated_days.get(day, 0) + n
            for table, n in store.delete_interactions(gone).items():
                result.deleted[table] = result.deleted.get(table, 0) + n
        if len(batch) < BATCH:
            break
    if result.deleted.get("interactions"):
        store.scrub()
    result.retired_adapters = prune_adapters(cfg, store, actor=actor)
    store.audit(actor, "retention.run", None, result.to_json(), now=now)
    return result


def prune_adapters(cfg: KaizenConfig, store: InteractionStore, *, actor: str) -> list[str]:
    """Retire the adapters beyond ``model.max_checkpoints`` (newest kept) that no alias names and
    that were not the champion before the current one, removing their files; their ids."""
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry

    registry = AdapterRegistry(store)
    adapters = sorted(registry.list(), key=lambda a: (a["created_at"], a["id"]), reverse=True)
    protected = set(registry.aliases().values())
    champion_moves = [m for m in registry.alias_history("champion") if m.get("adapter_id")]
    if champion_moves and champion_moves[-1].get("previous_adapter_id"):
        protected.add(champion_moves[-1]["previous_adapter_id"])
    files = AdapterStore(cfg.model.storage_root)
    retired = []
    for row in adapters[cfg.model.max_checkpoints :]:
        if row["id"] in protected:
            continue
        removed = files.delete(row["id"])
        if row["status"] != "retired":
            reason = f"beyond model.max_checkpoints={cfg.model.max_checkpoints}: files removed by retention"
            registry.set_status(row["id"], "retired", actor, reason)
        if removed or row["status"] != "retired":
            retired.append(row["id"])
    return retired


def retention_due(store: InteractionStore, now: datetime, every: timedelta = EVERY) -> bool:
    """Whether the last retention run (its ``retention.run`` audit entry) is ``every`` ago or more,
    or there was none: the store remembers, so a restarted scheduler does not run it again."""
    last = store.audit_entries(action="retention.run", limit=1)
    if not last:
        return True
    at = last[0]["timestamp"]
    at = datetime.fromisoformat(at) if isinstance(at, str) else at
    return now - (at if at.tzinfo else at.replace(tzinfo=UTC)) >= every


def retain(cfg: KaizenConfig, *, actor: str = "retention") -> RetentionResult:
    """One retention run on the configured store (opened, migrated and closed here): what
    ``python -m jobs.retention`` and ``kaizen retention run`` do."""
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        store.migrate()
        return run_retention(cfg, store, actor=actor)
    finally:
        store.close()
