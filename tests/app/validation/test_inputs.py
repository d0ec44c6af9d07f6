"""What is validated against what, on which rows: the candidate and its baseline from the
registry (SQLite), the candidate's own validation split, the earlier domains of the champion's
lineage, and stored rows as cases. The adapters' weights are never loaded here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.model.adapters import AdapterStore
from app.registry import AdapterRegistry
from app.store.sqlite import SQLiteStore
from app.validation.inputs import NothingToValidate, cases_from_table, choose_subjects, earlier_sets, own_set


def _rows(n: int, answer: str = "ok", start: int = 0) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "interaction_id": f"i{i}",
                "messages": json.dumps(
                    [{"role": "user", "content": f"task {i}"}, {"role": "assistant", "content": answer}]
                ),
            }
            for i in range(start, start + n)
        ]
    )


def _dataset(root: Path, name: str, *, validation: bool = True) -> Path:
    folder = root / "datasets" / name
    folder.mkdir(parents=True)
    pq.write_table(_rows(4), folder / "train.parquet")
    if validation:
        pq.write_table(_rows(3, start=10), folder / "validation.parquet")
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    db = SQLiteStore(tmp_path / "k.db")
    db.migrate()
    yield {"root": tmp_path, "adapters": AdapterStore(tmp_path), "registry": AdapterRegistry(db)}
    db.close()


def _adapter(
    env: dict[str, Any], adapter_id: str, *, status: str = "candidate", base: str = "tiny", **lineage: Any
) -> None:
    """A stored and registered adapter whose files are stand-ins (nothing loads them here)."""
    files = env["root"] / "peft" / adapter_id
    files.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_dropout": 0.0}
    (files / "adapter_config.json").write_text(json.dumps(config))
    (files / "adapter_model.safetensors").write_bytes(b"stand-in")
    manifest = env["adapters"].save(files, base_model=base, adapter_id=adapter_id, lineage=lineage)
    env["registry"].register(manifest, env["adapters"].uri(adapter_id), status=status, actor="test")


def test_the_newest_candidate_against_the_champion_or_the_base_model(env: dict[str, Any]) -> None:
    registry = env["registry"]
    with pytest.raises(NothingToValidate, match="nothing to validate"):
        choose_subjects(registry, env["adapters"], "tiny")
    _adapter(env, "adp-old")
    _adapter(env, "adp-new")
    _adapter(env, "adp-done", status="validated")
    chosen = choose_subjects(registry, env["adapters"], "tiny")
    assert (chosen.candidate, chosen.baseline, chosen.baseline_name) == ("adp-new", None, "base:tiny")

    registry.set_alias("champion", "adp-done", actor="test", reason="test")
    chosen = choose_subjects(registry, env["adapters"], "tiny", "adp-old")
    assert (chosen.candidate, chosen.baseline, chosen.baseline_name) == ("adp-old", "adp-done", "adp-done")


def test_bad_adapters_are_named(env: dict[str, Any]) -> None:
    registry, adapters = env["registry"], env["adapters"]
    _adapter(env, "adp-a")
    _adapter(env, "adp-other-base", base="qwen")
    _adapter(env, "adp-live", status="challenger")
    for adapter_id, reason in [
        ("adp-missing", "'adp-missing' is not registered"),
        ("../etc", "is not an adapter id"),
        ("adp-other-base", "trained on base model 'qwen'"),
        ("adp-live", "has status 'challenger': it is in use"),
    ]:
        with pytest.raises(ValueError, match=r"^adapter: ") as caught:
            choose_subjects(registry, adapters, "tiny", adapter_id)
        assert reason in str(caught.value)

    registry.set_alias("champion", "adp-a", actor="test", reason="test")
    with pytest.raises(ValueError, match="'adp-a' is the champion; there is nothing to compare it with"):
        choose_subjects(registry, adapters, "tiny", "adp-a")

    # Registered, but its files are gone from the store.
    manifest = adapters.manifest("adp-a").model_copy(update={"adapter_id": "adp-ghost"})
    registry.register(manifest, "/nowhere", actor="test")
    with pytest.raises(ValueError, match="adapter: adapter 'adp-ghost' is registered but not stored"):
        choose_subjects(registry, adapters, "tiny", "adp-ghost")


def test_the_own_split_is_the_lineage_datasets_validation_split(env: dict[str, Any]) -> None:
    root = env["root"]
    folder = _dataset(root, "ds-a")
    _adapter(env, "adp-folder", dataset_uri=str(folder))
    _adapter(env, "adp-file", dataset_uri=str(folder / "train.parquet"))  # trained from the split file
    _adapter(env, "adp-bare")
    _adapter(env, "adp-noval", dataset_uri=str(_dataset(root, "ds-b", validation=False)))

    for adapter_id in ("adp-folder", "adp-file"):
        own = own_set(env["adapters"], adapter_id, limit=2)
        assert (own.name, own.role, own.rows_read, own.rows_skipped) == ("ds-a", "own", 3, 1)
        assert own.source == str(folder / "validation.parquet")
        assert [c.case_id for c in own.cases] == ["i10", "i11"] and own.cases[0].reference == "ok"

    with pytest.raises(ValueError, match="adapter: 'adp-bare' names no dataset in its lineage"):
        own_set(env["adapters"], "adp-bare", limit=5)
    with pytest.raises(ValueError, match="adapter: 'adp-noval' was trained on .*ds-b, which has no validation split"):
        own_set(env["adapters"], "adp-noval", limit=5)

    given = root / "given.parquet"
    pq.write_table(_rows(2, answer="given"), given)
    own = own_set(env["adapters"], "adp-bare", limit=5, rows=str(given))
    assert own.name == "validation" and [c.reference for c in own.cases] == ["given", "given"]
    with pytest.raises(ValueError, match="validation: .* neither a Parquet file nor a folder with a validation split"):
        own_set(env["adapters"], "adp-bare", limit=5, rows=str(root / "datasets" / "ds-b"))
    empty = root / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps([{"role": "user", "content": "q"}])}]), empty)
    with pytest.raises(ValueError, match="holds no row with an assistant answer"):
        own_set(env["adapters"], "adp-bare", limit=5, rows=str(empty))


def test_the_earlier_domains_walk_the_champions_lineage(env: dict[str, Any]) -> None:
    root = env["root"]
    first, second, own = (_dataset(root, name) for name in ("ds-first", "ds-second", "ds-own"))
    rehearsal = root / "rehearsal" / "ssr-1"
    rehearsal.mkdir(parents=True)
    pq.write_table(_rows(5, answer="old"), rehearsal / "rehearsal.parquet")
    (rehearsal / "manifest.json").write_text("{}")
    gone = root / "datasets" / "ds-gone"
    _adapter(env, "adp-1", status="retired", dataset_uri=str(first))
    _adapter(env, "adp-2", status="retired", dataset_uri=str(gone), parent_adapter_id="adp-1")
    _adapter(
        env,
        "adp-3",
        status="validated",
        dataset_uri=str(second),
        rehearsal_uri=str(rehearsal),
        parent_adapter_id="adp-2",
    )
    _adapter(env, "adp-4", status="retired", dataset_uri=str(own), parent_adapter_id="adp-3")

    sets, notes = earlier_sets(env["adapters"], "adp-3", limit=4)
    assert [(s.name, s.role, len(s.cases)) for s in sets] == [
        ("ds-second", "earlier", 3),
        ("ssr-1", "earlier", 4),
        ("ds-first", "earlier", 3),
    ]
    assert sets[1].cases[0].reference == "old"
    assert notes == [f"adp-2's dataset {gone} has no validation split (or is gone)"]

    # The candidate's own dataset is not an earlier domain, even where the champion has it.
    sets, _ = earlier_sets(env["adapters"], "adp-4", limit=4, exclude=[str(own), str(second)])
    assert [s.name for s in sets] == ["ssr-1", "ds-first"]
    _adapter(env, "adp-5", dataset_uri=str(second / "train.parquet"))  # a candidate trained on ds-second again
    sets, _ = earlier_sets(env["adapters"], "adp-3", limit=4, candidate="adp-5", exclude=[str(rehearsal)])
    assert [s.name for s in sets] == ["ds-first"]
    assert earlier_sets(env["adapters"], None, limit=4) == ([], [])


def test_stored_rows_become_cases() -> None:
    rows = [
        {
            "interaction_id": "multi",
            "messages": json.dumps(
                [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "one"},
                    {"role": "tool", "content": "tool says"},
                    {"role": "user", "content": "Write sq(x). sq(3) -> 9"},
                    {"role": "assistant", "content": "```python\ndef sq(x):\n    return x * x\n```"},
                ]
            ),
        },
        {"interaction_id": "no-answer", "messages": json.dumps([{"role": "user", "content": "hello?"}])},
        {
            "interaction_id": "fields",
            "messages": None,
            "instruction": "Explain",
            "input": "git rebase",
            "output": "It...",
        },
        {
            "interaction_id": "blank",
            "messages": json.dumps([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]),
        },
        {"interaction_id": "over", "instruction": "a", "output": "b"},
    ]
    cases, skipped = cases_from_table(rows, 2, prefix="t")
    assert [c.case_id for c in cases] == ["multi", "fields"] and skipped == 3
    multi, fields = cases
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "tool", "user"]
    assert multi.messages[3]["tool_call_id"] == "call-3"  # the Generator needs one
    assert multi.request_text == "Write sq(x). sq(3) -> 9" and multi.tests == ("assert (sq(3)) == (9)",)
    assert multi.reference.startswith("```python")
    assert fields.messages == ({"role": "user", "content": "Explain\n\ngit rebase"},) and fields.reference == "It..."
