"""Erasure: a session's or a user's data removed on request (``DELETE /v1/sessions/{id}``,
``kaizen erase --session ID | --user ID``).

Every interaction of the session or user goes, with its context, tool usage, feedback, outcomes,
redaction counts, quality scores and ratings (:meth:`InteractionStore.delete_interactions`), and
the database is scrubbed after it (SQLite: ``secure_delete``, VACUUM and an emptied write-ahead
log; PostgreSQL: VACUUM), so the text is in neither the database file nor its log. Datasets
already built from those interactions are not rewritten (an adapter's training set is its
record) but marked stale: ``stale.json`` beside their manifest says how many of their rows were
erased and when, and the next cycle builds from the store, which no longer has them. The erasure
is audited (``data.erase``) under the session's or user's hash, never the id itself.

The session and user ids are matched through the same keyed hash ingestion stored
(``privacy.hmac_key``); with ``privacy.data_minimization`` no user id is kept, so erasure goes
by session.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.config import KaizenConfig
from app.privacy import PrivacyFilter
from app.store import InteractionStore

__all__ = ["STALE_FILE", "erase", "mark_stale_datasets"]

STALE_FILE = "stale.json"


def erase(
    cfg: KaizenConfig,
    store: InteractionStore,
    *,
    session_id: str | None = None,
    user_id: str | None = None,
    actor: str,
    reason: str = "",
) -> dict[str, Any]:
    """Erase a session's or a user's interactions (exactly one of the two ids); what was done:
    ``{target, interactions, deleted (rows per table), stale_datasets}``.

    Raises:
        ValueError: neither or both ids given, or an empty one.
    """
    if (session_id is None) == (user_id is None) or not (session_id or user_id):
        raise ValueError("give a session id or a user id")
    hashed = PrivacyFilter(hmac_key=cfg.hmac_key()).hash_id(session_id or user_id or "")
    target = f"session:{hashed}" if session_id else f"user:{hashed}"
    ids = store.interactions_of(session_hash=hashed) if session_id else store.interactions_of(user_hash=hashed)
    deleted = store.delete_interactions(ids) if ids else {}
    if ids:
        store.scrub()
    stale = mark_stale_datasets(cfg.model.storage_root, set(ids), target) if ids else {}
    result = {"target": target, "interactions": len(ids), "deleted": deleted, "stale_datasets": stale}
    store.audit(actor, "data.erase", target, {**result, "reason": reason})
    return result


def mark_stale_datasets(storage_root: str, ids: set[str], target: str) -> dict[str, int]:
    """Mark the local datasets holding any of ``ids`` as stale (``stale.json``, the count added to
    any earlier erasure's); the erased rows per dataset id. A dataset on a remote root is left as
    it is (its rows are in the store no more, and the next build leaves them out)."""
    from app.privacy.retention import dataset_interaction_ids

    if "://" in storage_root:
        return {}
    stale: dict[str, int] = {}
    for dataset_id, held in sorted(dataset_interaction_ids(storage_root).items()):
        folder = Path(storage_root) / "datasets" / dataset_id
        erased = len(held & ids)
        if not erased or not (folder / "manifest.json").exists():
            continue
        marker = folder / STALE_FILE
        earlier = json.loads(marker.read_text()) if marker.exists() else {"erased_rows": 0, "erasures": []}
        earlier["erased_rows"] += erased
        earlier["erasures"].append({"at": datetime.now(UTC).isoformat(), "target": target, "rows": erased})
        marker.write_text(json.dumps(earlier, indent=2))
        stale[dataset_id] = erased
    return stale
