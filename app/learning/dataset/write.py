"""The files of a training dataset: the rows as a :data:`DATASET_SCHEMA` table (:func:`to_table`),
the manifest (:class:`DatasetManifest`) and :func:`write_dataset`, which publishes
``train.parquet``, ``validation.parquet``, ``train.jsonl``, ``validation.jsonl`` and
``manifest.json`` under ``<storage_root>/datasets/<dataset_id>/``.

Columns (:data:`DATASET_SCHEMA`) are the seed's training-dataset schema plus ``messages``:
``instruction`` is the user's request and ``input`` Alpaca's optional extra context (empty: the
store keeps none apart from the request); ``domain`` is ``[language, task, *frameworks]``;
``project_context`` is compact JSON of the project's descriptive fields; ``features`` is compact
JSON of the classification's measurements and the request's MiniLM embedding (float16, base64),
read back with :func:`~app.learning.dataset.features.decode_features`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from app.artifacts import (
    KINDS,
    MANIFEST_FILE,
    TRAINING_ROW_SCHEMA,
    artifact_exists,
    artifact_uri,
    file_sha256,
    publish,
)
from app.learning.dataset.batch import as_text, num_rows, take

__all__ = [
    "DATASETS_DIRNAME",
    "DATASET_SCHEMA",
    "DATA_FILES",
    "LEARNING_TYPE",
    "MANIFEST_FILE",
    "DatasetManifest",
    "Funnel",
    "QualityHistogram",
    "QueryInfo",
    "content_hash",
    "count_rows",
    "dataset_uri",
    "quality_histogram",
    "to_table",
    "write_dataset",
]

LEARNING_TYPE = "interaction"
"""``learning_type`` of rows taken from real interactions (SSR's rehearsal rows say ``rehearsal``)."""
DATASETS_DIRNAME = KINDS["dataset"].dirname
DATA_FILES = ("train.parquet", "validation.parquet", "train.jsonl", "validation.jsonl")

DATASET_SCHEMA = TRAINING_ROW_SCHEMA
"""The seed's training-dataset schema (timestamps in UTC) plus ``messages``: a JSON list of
OpenAI / ChatML chat messages. It is :data:`app.artifacts.TRAINING_ROW_SCHEMA`, the one schema of a
training row that datasets, rehearsal sets and the trainer's reader share."""


def _timestamp(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def to_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """The rows as a :data:`DATASET_SCHEMA` table, in interaction-id order."""
    n = num_rows(batch)
    order = sorted(range(n), key=lambda i: as_text(batch["interaction_id"][i])) if n else []
    rows = take(batch, order) if n else {}

    def col(name: str) -> list[Any]:
        return [as_text(v) for v in rows[name]] if n else []

    domains = (
        [
            [as_text(lang), as_text(task), *[f for f in as_text(fw).split(",") if f]]
            for lang, task, fw in zip(rows["language"], rows["task"], rows["frameworks"])
        ]
        if n
        else []
    )
    arrays = {
        "interaction_id": col("interaction_id"),
        "timestamp": [_timestamp(t) for t in col("timestamp")],
        "instruction": col("instruction"),
        "input": col("input"),
        "output": col("output"),
        "quality_score": [float(q) for q in rows["quality_score"]] if n else [],
        "domain": domains,
        "complexity": col("complexity"),
        "learning_type": [LEARNING_TYPE] * n,
        "project_context": col("project_context"),
        "features": col("features"),
        "messages": col("messages"),
    }
    return pa.table({f.name: pa.array(arrays[f.name], type=f.type) for f in DATASET_SCHEMA}, schema=DATASET_SCHEMA)


def content_hash(*tables: pa.Table) -> str:
    """SHA-256 of the rows of the tables in order, every column, as canonical JSON (independent
    of the Parquet encoding, the dataset id and the time it was built)."""
    digest = hashlib.sha256()
    for table in tables:
        for row in table.to_pylist():
            digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
            digest.update(b"\n")
    return digest.hexdigest()


class QualityHistogram(BaseModel):
    """Quality scores of the rows written, in bins of 0.05."""

    model_config = ConfigDict(extra="forbid")

    edges: list[float] = Field(description="Bin edges, 0.0 to 1.0; a bin holds [left, right), the last also 1.0.")
    counts: list[int] = Field(description="Rows per bin.")
    mean: float | None = Field(description="Mean score (None without rows).")
    min: float | None = Field(description="Lowest score.")
    max: float | None = Field(description="Highest score.")


def quality_histogram(scores: Sequence[float] | np.ndarray) -> QualityHistogram:
    """The histogram of :class:`QualityHistogram` over ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    edges = np.round(np.linspace(0.0, 1.0, 21), 2)
    counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=edges)
    return QualityHistogram(
        edges=[float(e) for e in edges],
        counts=[int(c) for c in counts],
        mean=round(float(scores.mean()), 6) if scores.size else None,
        min=float(scores.min()) if scores.size else None,
        max=float(scores.max()) if scores.size else None,
    )


class Funnel(BaseModel):
    """Rows left after each stage, and what each stage removed."""

    model_config = ConfigDict(extra="forbid")

    scored: int = Field(description="Scored interactions in the window (the ids read).")
    above_threshold: int = Field(description="Read, with an answer, at or above their inclusion threshold.")
    exact_duplicates: int = Field(description="Removed: same normalised request and answer as a better row.")
    near_duplicates: int = Field(description="Removed: MinHash Jaccard at or above the threshold with a better row.")
    over_group_cap: int = Field(description="Removed by the balance: beyond their group's cap.")
    not_selected: int = Field(description="Removed by the diverse selection.")
    selected: int = Field(description="Rows written (train + validation).")
    train: int = Field(description="Rows in train.parquet.")
    validation: int = Field(description="Rows in validation.parquet.")


class QueryInfo(BaseModel):
    """Which interactions the dataset came from."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(description="Store engine: sqlite or postgres.")
    quality_status: str = Field(description="Status of the interactions read.")
    since: datetime | None = Field(description="Inclusive start of the window, if any.")
    until: datetime | None = Field(description="Exclusive end of the window, if any.")
    threshold: float = Field(description="Base inclusion threshold.")
    domain_adjustments: dict[str, float] = Field(description="Threshold adjustments per domain.")
    thresholds: dict[str, float] = Field(
        description="Inclusion threshold per 'language/complexity' ('*': a domain without an adjustment)."
    )


class DatasetManifest(BaseModel):
    """``manifest.json`` of a training dataset, beside its data files."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(description="The dataset's id, also its folder name.")
    created_at: datetime = Field(description="When it was written, in UTC.")
    uri: str = Field(description="Its folder: <storage_root>/datasets/<dataset_id>.")
    rows: int = Field(description="Rows written (train + validation).")
    content_hash: str = Field(description="SHA-256 of the rows, train then validation (content_hash()).")
    files: dict[str, str] = Field(description="SHA-256 of each data file, by name.")
    columns: dict[str, str] = Field(description="Parquet columns and their Arrow types.")
    funnel: Funnel = Field(description="Rows after each stage.")
    counts: dict[str, dict[str, int]] = Field(
        description="Rows written per domain (language), framework, task, complexity and split."
    )
    balance: dict[str, Any] = Field(description="Balance groups (rows per group before the cap), the cap, the share.")
    quality_histogram: QualityHistogram = Field(description="Quality scores of the rows written.")
    query: QueryInfo = Field(description="Which interactions it came from.")
    options: dict[str, Any] = Field(description="The DatasetConfig used.")
    seconds: float = Field(description="Time the build took.")


def count_rows(table: pa.Table) -> dict[str, dict[str, int]]:
    """``counts`` of a manifest for one table: rows per language, framework, task and complexity."""
    domains = table.column("domain").to_pylist()
    return {
        "domain": dict(sorted(Counter(d[0] for d in domains).items())),
        "framework": dict(sorted(Counter(f for d in domains for f in d[2:]).items())),
        "task": dict(sorted(Counter(d[1] for d in domains).items())),
        "complexity": dict(sorted(Counter(table.column("complexity").to_pylist()).items())),
    }


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"messages": json.loads(messages)}, ensure_ascii=False) + "\n"
            for messages in table.column("messages").to_pylist()
        )


def dataset_uri(storage_root: str, dataset_id: str) -> str:
    """Where a dataset lives: ``<storage_root>/datasets/<dataset_id>``."""
    return artifact_uri(storage_root, "dataset", dataset_id)


def write_dataset(
    storage_root: str, train: pa.Table, validation: pa.Table, manifest: DatasetManifest
) -> DatasetManifest:
    """Write ``train.parquet``, ``validation.parquet`` (zstd), ``train.jsonl``, ``validation.jsonl``
    (one ``{"messages": [...]}`` per line, OpenAI's chat fine-tuning format) and ``manifest.json``
    under ``<storage_root>/datasets/<manifest.dataset_id>/``, filling in the manifest's ``uri``,
    ``files``, ``content_hash``, ``rows`` and ``columns``.

    A local root gets the folder built beside its target and renamed into place in one step; a
    URI root (``s3://…``) gets the files uploaded with ``manifest.json`` last, which is what makes
    the dataset exist for a reader.

    Raises:
        FileExistsError: a dataset with this id is already there.
    """
    import pyarrow.parquet as pq

    uri = dataset_uri(storage_root, manifest.dataset_id)
    exists = f"dataset_id {manifest.dataset_id!r} is already stored at {uri}"
    if artifact_exists(uri):
        raise FileExistsError(exists)

    def write(staging: Path) -> DatasetManifest:
        pq.write_table(train, staging / "train.parquet", compression="zstd")
        pq.write_table(validation, staging / "validation.parquet", compression="zstd")
        _write_jsonl(train, staging / "train.jsonl")
        _write_jsonl(validation, staging / "validation.jsonl")
        filled = manifest.model_copy(
            update={
                "uri": uri,
                "rows": train.num_rows + validation.num_rows,
                "content_hash": content_hash(train, validation),
                "files": {name: file_sha256(staging / name) for name in DATA_FILES},
                "columns": {f.name: str(f.type) for f in DATASET_SCHEMA},
            }
        )
        (staging / MANIFEST_FILE).write_text(filled.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return filled

    try:
        return publish(uri, write)
    except FileExistsError as exc:
        raise FileExistsError(exists) from exc
