"""The adapter registry on both store engines: registration, statuses, alias moves with their
history and audit rows, resolution, errors, and concurrent moves of one alias."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.model.adapters import AdapterManifest
from app.registry import STATUSES, AdapterNotRegisteredError, AdapterRegistry, champion_adapter
from app.store import InteractionStore
from app.store.postgres import PostgresStore
from app.store.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "postgres"])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], InteractionStore]]:
    """Opens a connection to one migrated database per call: several calls act as several processes."""
    opened: list[InteractionStore] = []

    def open_() -> InteractionStore:
        if request.param == "sqlite":
            store: InteractionStore = SQLiteStore(tmp_path / "k.db")
        else:
            store = PostgresStore(request.getfixturevalue("pg_dsn"))
        store.migrate()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def registry(open_db: Callable[[], InteractionStore]) -> AdapterRegistry:
    return AdapterRegistry(open_db())


def _manifest(adapter_id: str, day: int = 1) -> AdapterManifest:
    return AdapterManifest(
        adapter_id=adapter_id,
        base_model="tiny",
        created_at=datetime(2025, 1, day, 12, tzinfo=UTC),
        peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
        lineage={"dataset_manifest_hash": f"hash-{adapter_id}", "metrics": {"loss": 1.5}},
        files={"adapter_config.json": "0" * 64, "adapter_model.safetensors": "1" * 64},
    )


def _register(registry: AdapterRegistry, *ids: str) -> None:
    for day, adapter_id in enumerate(ids, start=1):
        registry.register(_manifest(adapter_id, day), f"s3://bucket/adapters/{adapter_id}", actor="learn-job")


def test_register_get_and_list(registry: AdapterRegistry) -> None:
    row = registry.register(_manifest("adp-a"), "s3://bucket/adapters/adp-a", actor="learn-job")
    assert row["id"] == "adp-a" and row["base_model"] == "tiny" and row["status"] == "candidate"
    assert row["uri"] == "s3://bucket/adapters/adp-a"
    assert row["manifest"] == _manifest("adp-a").model_dump(mode="json")
    assert datetime.fromisoformat(row["created_at"]) == datetime(2025, 1, 1, 12, tzinfo=UTC)
    registry.register(
        _manifest("adp-b", 2).model_dump(mode="json"), "/data/adapters/adp-b", "validated", actor="import"
    )

    assert registry.get("adp-a") == row and registry.get("adp-none") is None
    assert [r["id"] for r in registry.list()] == ["adp-a", "adp-b"]
    assert [r["id"] for r in registry.list(status="validated")] == ["adp-b"]
    assert registry.list(status="retired") == []
    audit = registry.audit()
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        ("learn-job", "adapter.register", "adp-a"),
        ("import", "adapter.register", "adp-b"),
    ]
    assert audit[0]["details"] == {
        "uri": "s3://bucket/adapters/adp-a",
        "status": "candidate",
        "base_model": "tiny",
    }


def test_set_status_is_audited_and_checked(registry: AdapterRegistry) -> None:
    _register(registry, "adp-a")
    row = registry.set_status("adp-a", "validated", actor="validate-job", reason="passed all gates")
    assert row["status"] == "validated" and registry.get("adp-a")["status"] == "validated"
    registry.set_status("adp-a", "retired", "operator", "superseded")
    assert [(a["action"], a["actor"], a["details"]) for a in registry.audit("adp-a")][1:] == [
        (
            "adapter.status",
            "validate-job",
            {"from": "candidate", "to": "validated", "reason": "passed all gates"},
        ),
        ("adapter.status", "operator", {"from": "validated", "to": "retired", "reason": "superseded"}),
    ]

    with pytest.raises(ValueError, match="status 'promoted' is not one of " + ", ".join(STATUSES)):
        registry.set_status("adp-a", "promoted", "operator", "typo")
    with pytest.raises(AdapterNotRegisteredError, match="adapter_id 'adp-none' is not registered"):
        registry.set_status("adp-none", "validated", "operator", "no such adapter")
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        registry.set_status("adp-a", "validated", "operator", " ")
    with pytest.raises(ValueError, match="status 'great'"):
        registry.list(status="great")
    with pytest.raises(ValueError, match="status 'live'"):
        registry.register(_manifest("adp-b"), "s3://x", "live", actor="learn-job")
    with pytest.raises(ValueError, match="adapter_id 'adp-a' is already registered"):
        registry.register(_manifest("adp-a"), "s3://elsewhere", actor="learn-job")
    assert registry.get("adp-a")["status"] == "retired" and registry.get("adp-b") is None
    assert len(registry.audit("adp-a")) == 3  # the refused calls wrote nothing


def test_alias_moves_are_recorded_with_previous_actor_and_reason(registry: AdapterRegistry) -> None:
    _register(registry, "adp-a", "adp-b")
    first = registry.set_alias("champion", "adp-a", actor="deployer", reason="first champion")
    assert (first["alias"], first["adapter_id"], first["previous_adapter_id"]) == ("champion", "adp-a", None)
    registry.set_alias("challenger", "adp-b", "deployer", "canary 10%")
    second = registry.set_alias("champion", "adp-b", actor="operator", reason="challenger won")
    assert second["previous_adapter_id"] == "adp-a" and second["id"] > first["id"]
    registry.set_alias("challenger", None, "deployer", "promoted, canary over")

    assert registry.aliases() == {"champion": "adp-b"}
    history = registry.alias_history()
    assert [(h["alias"], h["adapter_id"], h["previous_adapter_id"], h["actor"], h["reason"]) for h in history] == [
        ("champion", "adp-a", None, "deployer", "first champion"),
        ("challenger", "adp-b", None, "deployer", "canary 10%"),
        ("champion", "adp-b", "adp-a", "operator", "challenger won"),
        ("challenger", None, "adp-b", "deployer", "promoted, canary over"),
    ]
    assert history[0] == first and history[2] == second
    assert all(datetime.fromisoformat(h["created_at"]).tzinfo is not None for h in history)
    assert [h["adapter_id"] for h in registry.alias_history("champion")] == ["adp-a", "adp-b"]

    audit = registry.audit("champion")
    assert [(a["action"], a["actor"], a["details"]) for a in audit] == [
        ("alias.set", "deployer", {"from": None, "to": "adp-a", "reason": "first champion"}),
        ("alias.set", "operator", {"from": "adp-a", "to": "adp-b", "reason": "challenger won"}),
    ]
    assert [a["action"] for a in registry.audit("challenger")] == ["alias.set", "alias.clear"]


def test_resolve(registry: AdapterRegistry) -> None:
    _register(registry, "adp-a", "adp-b")
    assert registry.resolve("champion") is None  # not set yet
    registry.set_alias("champion", "adp-a", "deployer", "first champion")
    assert registry.resolve("champion") == "adp-a"
    assert registry.resolve("challenger") is None
    assert registry.resolve("adp-b") == "adp-b"
    assert registry.resolve("adp-unknown") is None
    assert registry.resolve("canary") is None


def test_champion_is_what_the_champion_alias_names(registry: AdapterRegistry) -> None:
    _register(registry, "adp-a", "adp-b")
    assert registry.champion() is None  # none yet: the base model serves
    registry.set_alias("challenger", "adp-b", "deployer", "canary")
    assert registry.champion() is None
    registry.set_alias("champion", "adp-a", "deployer", "first champion")
    assert registry.champion() == "adp-a"
    registry.set_alias("champion", None, "operator", "rolled back to the base")
    assert registry.champion() is None


def test_champion_adapter_opens_the_configured_store_once_and_closes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.registry
    from app.config import KaizenConfig

    cfg = KaizenConfig.model_validate({"store": {"sqlite_path": str(tmp_path / "k.db")}, "privacy": {"hmac_key": "k"}})
    opened: list[InteractionStore] = []
    closed: list[InteractionStore] = []
    open_store = app.registry.open_store

    def counted(store_cfg):
        store = open_store(store_cfg)
        opened.append(store)
        really_close = store.close

        def close() -> None:
            closed.append(store)
            really_close()

        store.close = close
        return store

    monkeypatch.setattr(app.registry, "open_store", counted)
    assert champion_adapter(cfg) is None  # a fresh database: migrated, no champion
    db = SQLiteStore(tmp_path / "k.db")
    try:
        registry = AdapterRegistry(db)
        _register(registry, "adp-a")
        registry.set_alias("champion", "adp-a", "deployer", "first champion")
    finally:
        db.close()
    assert champion_adapter(cfg) == "adp-a"
    assert len(opened) == 2 and closed == opened


def test_bad_alias_moves_are_refused_and_write_nothing(registry: AdapterRegistry) -> None:
    _register(registry, "adp-a")
    registry.set_alias("champion", "adp-a", "deployer", "first champion")
    with pytest.raises(ValueError, match="alias 'canary' is not one of champion, challenger"):
        registry.set_alias("canary", "adp-a", "deployer", "no such alias")
    with pytest.raises(AdapterNotRegisteredError, match="adapter_id 'adp-ghost' is not registered"):
        registry.set_alias("champion", "adp-ghost", "deployer", "typo")
    with pytest.raises(ValueError, match="actor must be a non-empty string"):
        registry.set_alias("champion", "adp-a", "", "no actor")
    with pytest.raises(ValueError, match="alias 'canary'"):
        registry.alias_history("canary")
    assert registry.aliases() == {"champion": "adp-a"}
    assert len(registry.alias_history()) == 1 and len(registry.audit("champion")) == 1


def test_concurrent_moves_of_one_alias_keep_an_unbroken_history(
    open_db: Callable[[], InteractionStore],
) -> None:
    """Two writers on their own connections (as two processes would be) move ``champion`` back
    and forth; every move's previous adapter must be the one the move before it set."""
    registries = [AdapterRegistry(open_db()), AdapterRegistry(open_db())]
    _register(registries[0], "adp-a", "adp-b")
    moves = 12
    start = threading.Barrier(len(registries))
    errors: list[BaseException] = []

    def mover(registry: AdapterRegistry, name: str) -> None:
        try:
            start.wait()
            for i in range(moves):
                registry.set_alias("champion", ("adp-a", "adp-b")[i % 2], actor=name, reason=f"move {i}")
        except BaseException as exc:  # reported below: an exception in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(r, f"writer-{n}")) for n, r in enumerate(registries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors

    history = registries[0].alias_history("champion")
    assert len(history) == 2 * moves
    assert history[0]["previous_adapter_id"] is None
    for before, after in itertools.pairwise(history):
        assert after["previous_adapter_id"] == before["adapter_id"], (before, after)
    assert registries[1].aliases() == {"champion": history[-1]["adapter_id"]}
    audit = registries[1].audit("champion")
    assert [a["details"]["from"] for a in audit] == [h["previous_adapter_id"] for h in history]
