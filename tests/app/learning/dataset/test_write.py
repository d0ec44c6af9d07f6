"""Writing (``app.learning.dataset.write``): the Arrow table, the manifest and the files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.learning.dataset.batch import take
from app.learning.dataset.options import DatasetConfig
from app.learning.dataset.select import assign_split
from app.learning.dataset.write import (
    DATASET_SCHEMA,
    DatasetManifest,
    Funnel,
    QueryInfo,
    content_hash,
    count_rows,
    quality_histogram,
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

    val = batch["split"] == "validation"
    train, validation = to_table(take(batch, ~val)), to_table(take(batch, val))
    manifest = DatasetManifest(
        dataset_id="ds-unit",
        created_at="2025-01-01T00:00:00Z",
        uri="",
        rows=0,
        content_hash="",
        files={},
        columns={},
        funnel=Funnel(
            scored=6,
            above_threshold=6,
            exact_duplicates=0,
            near_duplicates=0,
            over_group_cap=0,
            not_selected=0,
            selected=6,
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
    written = write_dataset(str(tmp_path), train, validation, manifest)
    folder = tmp_path / "datasets" / "ds-unit"
    assert written.uri == str(folder) and written.rows == 6
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "train.jsonl",
        "train.parquet",
        "validation.jsonl",
        "validation.parquet",
    ]
    assert DatasetManifest.model_validate_json((folder / "manifest.json").read_text()) == written
    assert pq.read_table(folder / "train.parquet").equals(train)
    assert written.content_hash == content_hash(train, validation)
    lines = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert [line["messages"] for line in lines] == [json.loads(m) for m in train.column("messages").to_pylist()]
    assert written.quality_histogram.counts[16] == 6  # 0.80 lies in [0.80, 0.85)
    with pytest.raises(FileExistsError):
        write_dataset(str(tmp_path), train, validation, manifest)
