"""Writing (``app.learning.dataset.write``): the Arrow tables, the manifest and the files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.learning.dataset.batch import take
from app.learning.dataset.options import DatasetConfig
from app.learning.dataset.select import assign_split
from app.learning.dataset.write import (
    DATASET_SCHEMA,
    PREFERENCE_SCHEMA,
    DatasetManifest,
    Funnel,
    QueryInfo,
    content_hash,
    count_rows,
    openai_preference,
    quality_histogram,
    to_preference_table,
    to_table,
    write_dataset,
)
from tests.app.learning.dataset.samples import prepared_rows


def test_table_and_files(tmp_path: Path) -> None:
    batch = assign_split(prepared_rows(6), 0.3)
    table = to_table(batch)
    assert table.schema == DATASET_SCHEMA
    assert table.column("interaction_id").to_pylist() == sorted(batch["interaction_id"])
    assert table.column("domain").to_pylist()[0] == ["python", "generation", "click"]
    assert table.column("timestamp")[0].as_py() == datetime(2025, 1, 2, 3, 4, 5, 123456)
    assert table.column("learning_type").to_pylist() == ["interaction"] * 6
    assert content_hash(table) == content_hash(to_table(take(batch, np.arange(6)[::-1])))
    assert count_rows(table)["complexity"] == {"simple": 6}
    assert count_rows(table)["learning_type"] == {"interaction": 6}

    val = batch["split"] == "validation"
    train, validation = to_table(take(batch, ~val)), to_table(take(batch, val))
    manifest = _manifest(batch, train, validation)
    written = write_dataset(str(tmp_path), train, validation, manifest)
    folder = tmp_path / "datasets" / "ds-unit"
    assert written.uri == str(folder) and written.rows == 6
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "train.jsonl",
        "train.parquet",
        "train_preferences.jsonl",
        "train_preferences.parquet",
        "validation.jsonl",
        "validation.parquet",
        "validation_preferences.jsonl",
        "validation_preferences.parquet",
    ]
    assert DatasetManifest.model_validate_json((folder / "manifest.json").read_text()) == written
    assert pq.read_table(folder / "train.parquet").equals(train)
    assert written.content_hash == content_hash(train, validation)
    lines = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert [line["messages"] for line in lines] == [json.loads(m) for m in train.column("messages").to_pylist()]
    assert written.quality_histogram.counts[16] == 6  # 0.80 lies in [0.80, 0.85)
    # No corrections: the preference files are there, and empty.
    assert pq.read_table(folder / "train_preferences.parquet").schema == PREFERENCE_SCHEMA
    assert pq.read_table(folder / "train_preferences.parquet").num_rows == 0
    assert (folder / "validation_preferences.jsonl").read_text() == ""
    assert (written.funnel.train_pairs, written.funnel.validation_pairs) == (0, 0)
    with pytest.raises(FileExistsError):
        write_dataset(str(tmp_path), train, validation, manifest)


def test_the_pairs_of_each_split_are_written_as_parquet_and_openai_preference_jsonl(tmp_path: Path) -> None:
    n = 8
    fixed = [f"```python\ndef f{i}():\n    return {i} + 1\n```" if i % 2 else "" for i in range(n)]
    batch = assign_split(
        prepared_rows(n, correction=fixed, rejected=[bool(c) for c in fixed], quality_score=[0.8] * n), 0.3
    )
    val = batch["split"] == "validation"
    train, validation = to_table(take(batch, ~val)), to_table(take(batch, val))
    pairs = {"train": to_preference_table(take(batch, ~val)), "validation": to_preference_table(take(batch, val))}
    assert pairs["train"].num_rows + pairs["validation"].num_rows == 4 and pairs["validation"].num_rows >= 1

    written = write_dataset(str(tmp_path), train, validation, _manifest(batch, train, validation), pairs)

    folder = Path(written.uri)
    for split, table in pairs.items():
        assert pq.read_table(folder / f"{split}_preferences.parquet").equals(table)
        lines = [json.loads(line) for line in (folder / f"{split}_preferences.jsonl").read_text().splitlines()]
        assert lines == [openai_preference(row) for row in table.to_pylist()]
        for line, row in zip(lines, table.to_pylist()):
            assert line["preferred_output"] == [{"role": "assistant", "content": row["chosen"]}]
            assert line["input"]["messages"][-1]["role"] == "user"
    train_ids = set(train.column("interaction_id").to_pylist())
    assert set(pairs["train"].column("interaction_id").to_pylist()) <= train_ids  # a pair is in its row's split
    assert written.funnel.train_pairs == pairs["train"].num_rows
    assert written.funnel.validation_pairs == pairs["validation"].num_rows
    assert written.content_hash == content_hash(train, validation, pairs["train"], pairs["validation"])
    assert written.content_hash != content_hash(train, validation)
    assert written.preference_columns == {f.name: str(f.type) for f in PREFERENCE_SCHEMA}
    assert sorted(written.files) == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert count_rows(pa.concat_tables([train, validation]))["learning_type"] == {"correction": 4, "interaction": 4}


def test_a_correction_of_an_empty_answer_is_a_target_but_no_pair() -> None:
    batch = prepared_rows(2, output=["", "print(1)"], correction=["print(2)", "print(3)"], rejected=[True, True])
    assert [str(o) for o in batch["output"]] == ["print(2)", "print(3)"]
    pairs = to_preference_table(batch)
    assert pairs.column("rejected").to_pylist() == ["print(1)"]


def _manifest(batch: dict[str, np.ndarray], train: pa.Table, validation: pa.Table) -> DatasetManifest:
    table = pa.concat_tables([train, validation])
    n = table.num_rows
    return DatasetManifest(
        dataset_id="ds-unit",
        created_at="2025-01-01T00:00:00Z",
        uri="",
        rows=0,
        content_hash="",
        files={},
        columns={},
        funnel=Funnel(
            scored=n,
            above_threshold=n,
            exact_duplicates=0,
            near_duplicates=0,
            over_group_cap=0,
            not_selected=0,
            selected=n,
            train=train.num_rows,
            validation=validation.num_rows,
        ),
        counts=count_rows(table),
        balance={},
        quality_histogram=quality_histogram(batch["quality_score"]),
        query=QueryInfo(
            engine="sqlite",
            quality_status="scored",
            since=None,
            until=None,
            threshold=0.7,
            domain_adjustments={},
            thresholds={},
        ),
        options=DatasetConfig().model_dump(mode="json"),
        seconds=0.0,
    )
