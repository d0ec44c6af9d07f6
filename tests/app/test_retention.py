"""Retention: old raw interactions go (unless a kept dataset holds them) with their days'
aggregates kept, adapters beyond model.max_checkpoints are retired with their files, and the
scheduler's daily run is due once a day."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.config import KaizenConfig
from app.ingest import IngestPipeline
from app.privacy.retention import retention_due, run_retention
from app.registry import AdapterRegistry

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def interaction(i: int, days_ago: int) -> dict[str, Any]:
    return {
        "id": f"it-{i}",
        "type": "interaction",
        "timestamp": (NOW - timedelta(days=days_ago)).isoformat(),
        "body": {
            "session_id": f"s-{i}",
            "input": {"raw": f"OLD-TEXT question {i}"},
            "output": {"content": f"answer {i}"},
            "feedback": {"explicit": {"rating": 5, "correction": "better" if i % 2 else None}},
        },
    }


def test_old_interactions_go_their_aggregates_stay_and_kept_datasets_hold_theirs(store, tmp_path: Path) -> None:
    cfg = KaizenConfig.model_validate(
        {"privacy": {"hmac_key": "r"}, "collection": {"retention_days": 30}, "model": {"storage_root": str(tmp_path)}}
    )
    events = [interaction(i, 40) for i in range(4)] + [interaction(4, 35), interaction(5, 3)]
    prepared = IngestPipeline(cfg).prepare(events, now=NOW)
    assert all(r.status == "accepted" for r in prepared.finish(store.write(prepared.to_commit)))
    store.set_quality("it-0", 0.8, 0.5)
    store.set_quality("it-1", 0.4, 0.7)
    kept = tmp_path / "datasets" / "ds-kept"
    kept.mkdir(parents=True)
    pq.write_table(pa.table({"interaction_id": ["it-3"]}), kept / "train.parquet")
    (kept / "manifest.json").write_text(json.dumps({"dataset_id": "ds-kept"}))

    result = run_retention(cfg, store, now=NOW)
    assert result.considered == 5 and result.kept_in_datasets == 1
    assert result.deleted["interactions"] == 4 and result.deleted["feedback"] == 4
    assert sorted(r["id"] for r in store.query_interactions(limit=10)) == ["it-3", "it-5"]
    days = {d["day"]: d for d in store.daily_aggregates()}
    old = days[(NOW - timedelta(days=40)).date().isoformat()]
    assert old["interactions"] == 3 and old["scored"] == 2 and abs(old["mean_quality"] - 0.6) < 1e-9
    assert old["with_feedback"] == 3 and old["corrected"] == 1
    assert days[(NOW - timedelta(days=35)).date().isoformat()]["interactions"] == 1
    (entry,) = store.audit_entries(action="retention.run")
    assert entry["details"]["deleted"]["interactions"] == 4

    # A second run finds nothing new to remove and adds nothing twice.
    again = run_retention(cfg, store, now=NOW)
    assert again.deleted == {} and again.kept_in_datasets == 1
    assert sum(d["interactions"] for d in store.daily_aggregates()) == 4


def test_adapters_beyond_max_checkpoints_are_retired_with_their_files_but_not_the_aliased(
    store, tmp_path: Path, model_root: Path
) -> None:
    from app.model.adapters import AdapterStore
    from tests.conftest import train_answer_adapter

    cfg = KaizenConfig.model_validate(
        {"privacy": {"hmac_key": "r"}, "model": {"storage_root": str(tmp_path), "max_checkpoints": 1}}
    )
    files = AdapterStore(tmp_path)
    registry = AdapterRegistry(store)
    ids = []
    for i in range(4):
        manifest = train_answer_adapter(model_root, files, f"adp-{i}", "forty-two", ["q"])
        registry.register(manifest, files.uri(f"adp-{i}"), actor="test")
        ids.append(f"adp-{i}")
    registry.set_alias("champion", "adp-0", actor="test", reason="first")
    registry.set_alias("champion", "adp-1", actor="test", reason="second")  # adp-0: the previous champion
    result = run_retention(cfg, store, now=NOW)
    # Newest kept (adp-3), champion (adp-1), previous champion (adp-0): only adp-2 goes.
    assert result.retired_adapters == ["adp-2"]
    assert not files.exists("adp-2") and all(files.exists(a) for a in ("adp-0", "adp-1", "adp-3"))
    assert registry.get("adp-2")["status"] == "retired"
    assert run_retention(cfg, store, now=NOW).retired_adapters == []


def test_retention_is_due_once_a_day(store) -> None:
    assert retention_due(store, NOW)
    store.audit("scheduler", "retention.run", None, {}, now=NOW)
    assert not retention_due(store, NOW + timedelta(hours=23))
    assert retention_due(store, NOW + timedelta(hours=24))
