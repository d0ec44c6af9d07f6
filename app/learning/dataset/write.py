"""The files of a training dataset: the rows as a :data:`DATASET_SCHEMA` table (:func:`to_table`),
the preference pairs of the corrected rows as a :data:`PREFERENCE_SCHEMA` table
(:func:`to_preference_table`), the manifest (:class:`DatasetManifest`) and :func:`write_dataset`,
which publishes ``train.parquet``, ``validation.parquet``, ``train.jsonl``, ``validation.jsonl``,
``train_preferences.parquet``, ``validation_preferences.parquet``, ``train_preferences.jsonl``,
``validation_preferences.jsonl`` and ``manifest.json`` under ``<storage_root>/datasets/<dataset_id>/``.

Columns (:data:`DATASET_SCHEMA`) are the seed's training-dataset schema plus ``messages``:
``instruction`` is the user's request and ``input`` Alpaca's optional extra context (empty: the
store keeps none apart from the request); ``domain`` is ``[language, task, *frameworks]``;
``project_context`` is compact JSON of the project's descriptive fields; ``features`` is compact
JSON of the classification's measurements and the request's MiniLM embedding (float16, base64),
read back with :func:`~app.learning.dataset.features.decode_features`; ``learning_type`` is
``interaction`` (the model's answer is the target) or ``correction`` (a user's correction is).

The preference files hold one pair per corrected row of the split (:data:`PREFERENCE_SCHEMA`):
Parquet for training (``finetune.objective``), and JSONL in OpenAI's preference fine-tuning format
(``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``).
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
    PREFERENCE_ROW_SCHEMA,
    TRAINING_ROW_SCHEMA,
    artifact_exists,
    artifact_uri,
    file_sha256,
    publish,
)
from app.learning.dataset.batch import as_text, num_rows, take
from app.learning.dataset.preferences import SOURCE_CORRECTION, SOURCE_INTERACTION

__all__ = [
    "DATASETS_DIRNAME",
    "DATASET_SCHEMA",
    "DATA_FILES",
    "LEARNING_TYPE",
    "MANIFEST_FILE",
    "PREFERENCE_FILES",
    "PREFERENCE_SCHEMA",
    "DatasetManifest",
    "Funnel",
    "LossFilterInfo",
    "ProbeRound",
    "QualityHistogram",
    "QueryInfo",
    "content_hash",
    "count_rows",
    "dataset_uri",
    "openai_preference",
    "preference_split",
    "quality_histogram",
    "to_preference_table",
    "to_table",
    "write_dataset",
]

LEARNING_TYPE = SOURCE_INTERACTION
"""``learning_type`` of rows whose target is the answer a real interaction gave (a user's
correction says ``correction``, SSR's rehearsal rows ``rehearsal``)."""
DATASETS_DIRNAME = KINDS["dataset"].dirname
SPLITS = ("train", "validation")


def preference_split(split: str) -> str:
    """The name of a split's preference pairs: ``<split>_preferences`` (``<split>_preferences.parquet``
    and ``.jsonl`` in the dataset's folder; :func:`app.artifacts.find_split` reads it by that name)."""
    return f"{split}_preferences"


PREFERENCE_FILES = tuple(f"{preference_split(s)}.{ext}" for ext in ("parquet", "jsonl") for s in SPLITS)
DATA_FILES = ("train.parquet", "validation.parquet", "train.jsonl", "validation.jsonl", *PREFERENCE_FILES)

PREFERENCE_SCHEMA = PREFERENCE_ROW_SCHEMA
"""A preference pair: :data:`app.artifacts.PREFERENCE_ROW_SCHEMA`."""

DATASET_SCHEMA = TRAINING_ROW_SCHEMA
"""The seed's training-dataset schema (timestamps in UTC) plus ``messages``: a JSON list of
OpenAI / ChatML chat messages. It is :data:`app.artifacts.TRAINING_ROW_SCHEMA`, the one schema of a
training row that datasets, rehearsal sets and the trainer's reader share."""


def _timestamp(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _in_id_order(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = num_rows(batch)
    return take(batch, sorted(range(n), key=lambda i: as_text(batch["interaction_id"][i]))) if n else {}


def _domains(rows: Mapping[str, np.ndarray]) -> list[list[str]]:
    """``domain``: ``[language, task, *frameworks]`` of each row."""
    if not num_rows(rows):
        return []
    return [
        [as_text(lang), as_text(task), *[f for f in as_text(fw).split(",") if f]]
        for lang, task, fw in zip(rows["language"], rows["task"], rows["frameworks"])
    ]


def to_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """The rows as a :data:`DATASET_SCHEMA` table, in interaction-id order; ``learning_type`` is the
    row's ``source`` (``interaction`` or ``correction``) where the batch has one."""
    n = num_rows(batch)
    rows = _in_id_order(batch)

    def col(name: str) -> list[Any]:
        return [as_text(v) for v in rows[name]] if n else []

    domains = _domains(rows)
    arrays = {
        "interaction_id": col("interaction_id"),
        "timestamp": [_timestamp(t) for t in col("timestamp")],
        "instruction": col("instruction"),
        "input": col("input"),
        "output": col("output"),
        "quality_score": [float(q) for q in rows["quality_score"]] if n else [],
        "domain": domains,
        "complexity": col("complexity"),
        "learning_type": col("source") if "source" in batch else [LEARNING_TYPE] * n,
        "project_context": col("project_context"),
        "features": col("features"),
        "messages": col("messages"),
    }
    return pa.table({f.name: pa.array(arrays[f.name], type=f.type) for f in DATASET_SCHEMA}, schema=DATASET_SCHEMA)


def to_preference_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """The preference pairs of the batch's corrected rows (``source`` ``correction``) as a
    :data:`PREFERENCE_SCHEMA` table, in interaction-id order: the row's ``messages`` before the
    answer are the prompt, the correction (the row's answer) is chosen, the model's answer
    (``rejected_output``) rejected. A correction of an empty answer is a training target but no pair
    (nothing was said to prefer it to). A batch without corrections gives an empty table."""
    if not num_rows(batch) or "source" not in batch:
        return PREFERENCE_SCHEMA.empty_table()
    pairs = [
        as_text(s) == SOURCE_CORRECTION and bool(as_text(r).strip())
        for s, r in zip(batch["source"], batch["rejected_output"])
    ]
    rows = _in_id_order(take(batch, np.asarray(pairs, dtype=bool)))
    if not num_rows(rows):
        return PREFERENCE_SCHEMA.empty_table()
    prompts = []
    for messages in rows["messages"]:
        conversation = json.loads(as_text(messages))
        prompts.append(json.dumps(conversation[:-1], ensure_ascii=False))  # the last message is the answer
    arrays = {
        "interaction_id": [as_text(v) for v in rows["interaction_id"]],
        "timestamp": [_timestamp(as_text(t)) for t in rows["timestamp"]],
        "prompt": prompts,
        "chosen": [as_text(v) for v in rows["output"]],
        "rejected": [as_text(v) for v in rows["rejected_output"]],
        "rejected_quality_score": [float(q) for q in rows["answer_quality"]],
        "domain": _domains(rows),
        "complexity": [as_text(v) for v in rows["complexity"]],
    }
    return pa.table(
        {f.name: pa.array(arrays[f.name], type=f.type) for f in PREFERENCE_SCHEMA}, schema=PREFERENCE_SCHEMA
    )


def openai_preference(row: Mapping[str, Any]) -> dict[str, Any]:
    """A :data:`PREFERENCE_SCHEMA` row as a line of OpenAI's preference fine-tuning JSONL:
    ``{"input": {"messages": [...]}, "preferred_output": [assistant], "non_preferred_output": [assistant]}``."""
    return {
        "input": {"messages": json.loads(row["prompt"])},
        "preferred_output": [{"role": "assistant", "content": row["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": row["rejected"]}],
    }


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
    above_threshold: int = Field(
        description="Read, with an answer, at or above their inclusion threshold (corrections pass it)."
    )
    rejected: int = Field(
        0,
        description=(
            "Removed: answers at or above the threshold that the user turned down without a correction "
            "(thumbs down, not accepted, abandoned, 2 stars or fewer); with dataset.corrections false, corrected "
            "ones too."
        ),
    )
    exact_duplicates: int = Field(description="Removed: same normalised request and answer as a better row.")
    near_duplicates: int = Field(description="Removed: MinHash Jaccard at or above the threshold with a better row.")
    over_group_cap: int = Field(description="Removed by the balance: beyond their group's cap.")
    implausible: int = Field(
        0, description="Removed by the loss filter (dataset.loss_filter_ratio): answers a probe found implausible."
    )
    not_selected: int = Field(description="Removed by the diverse selection.")
    selected: int = Field(description="Rows written (train + validation).")
    train: int = Field(description="Rows in train.parquet.")
    validation: int = Field(description="Rows in validation.parquet.")
    train_pairs: int = Field(0, description="Preference pairs in train_preferences.parquet (corrected train rows).")
    validation_pairs: int = Field(0, description="Preference pairs in validation_preferences.parquet.")


class ProbeRound(BaseModel):
    """The loss filter's probe after one round of training."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(description="The probe's optimizer steps so far.")
    median_loss: float = Field(description="Median loss per answer token over the pool at that step.")


class LossFilterInfo(BaseModel):
    """What the loss filter did (a manifest's ``loss_filter``)."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(description="Rows the probe trained on and judged.")
    steps: int = Field(description="The probe's optimizer steps.")
    loss_fell: bool | None = Field(description="Whether the probe's training loss fell; if not, nothing was dropped.")
    median_loss: float | None = Field(description="Median loss per answer token over the judged rows.")
    limit: float | None = Field(description="The loss above which a row was implausible: ratio times the median.")
    over_limit: int = Field(description="Rows (not corrections) above the limit.")
    dropped: int = Field(description="Rows removed: those over the limit, at most max_share of the rows.")
    rounds: list[ProbeRound] = Field(
        default_factory=list, description="After each round of the probe's training: its step and the median loss."
    )
    learned: bool | None = Field(
        None,
        description=(
            "Whether the probe's last median loss was at most dataset.loss_filter_learned_loss (it stopped "
            "there); False: it trained to loss_filter_max_steps without getting there, and judged with what it had."
        ),
    )
    dropped_rows: dict[str, float] = Field(
        description="The removed rows' interaction ids and losses, highest loss first (for review)."
    )
    train_time_s: float = Field(description="The probe's training time.")
    scoring_s: float = Field(description="Time to measure every row's loss.")


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
    content_hash: str = Field(
        description="SHA-256 of the rows: train, validation, then their preference pairs (content_hash())."
    )
    files: dict[str, str] = Field(description="SHA-256 of each data file, by name.")
    columns: dict[str, str] = Field(description="Parquet columns and their Arrow types.")
    preference_columns: dict[str, str] = Field(
        default_factory=dict, description="Columns of the <split>_preferences.parquet files and their Arrow types."
    )
    funnel: Funnel = Field(description="Rows after each stage.")
    counts: dict[str, dict[str, int]] = Field(
        description="Rows written per domain (language), framework, task, complexity, learning type and split."
    )
    balance: dict[str, Any] = Field(description="Balance groups (rows per group before the cap), the cap, the share.")
    quality_histogram: QualityHistogram = Field(description="Quality scores of the rows written.")
    query: QueryInfo = Field(description="Which interactions it came from.")
    loss_filter: LossFilterInfo | None = Field(
        None, description="What the loss filter did (dataset.loss_filter_ratio); None: it was off."
    )
    options: dict[str, Any] = Field(description="The DatasetConfig used.")
    seconds: float = Field(description="Time the build took.")


def count_rows(table: pa.Table) -> dict[str, dict[str, int]]:
    """``counts`` of a manifest for one table: rows per language, framework, task, complexity and
    learning type (``interaction`` or ``correction``)."""
    domains = table.column("domain").to_pylist()
    return {
        "domain": dict(sorted(Counter(d[0] for d in domains).items())),
        "framework": dict(sorted(Counter(f for d in domains for f in d[2:]).items())),
        "task": dict(sorted(Counter(d[1] for d in domains).items())),
        "complexity": dict(sorted(Counter(table.column("complexity").to_pylist()).items())),
        "learning_type": dict(sorted(Counter(table.column("learning_type").to_pylist()).items())),
    }


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"messages": json.loads(messages)}, ensure_ascii=False) + "\n"
            for messages in table.column("messages").to_pylist()
        )


def _write_preference_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(openai_preference(row), ensure_ascii=False) + "\n" for row in table.to_pylist())


def dataset_uri(storage_root: str, dataset_id: str) -> str:
    """Where a dataset lives: ``<storage_root>/datasets/<dataset_id>``."""
    return artifact_uri(storage_root, "dataset", dataset_id)


def write_dataset(
    storage_root: str,
    train: pa.Table,
    validation: pa.Table,
    manifest: DatasetManifest,
    pairs: Mapping[str, pa.Table] | None = None,
) -> DatasetManifest:
    """Write ``train.parquet``, ``validation.parquet`` (zstd), ``train.jsonl``, ``validation.jsonl``
    (one ``{"messages": [...]}`` per line, OpenAI's chat fine-tuning format), each split's
    preference pairs (``pairs``, by split: ``train_preferences.parquet`` and ``.jsonl`` in OpenAI's
    preference format; empty files for a split without pairs) and ``manifest.json`` under
    ``<storage_root>/datasets/<manifest.dataset_id>/``, filling in the manifest's ``uri``,
    ``files``, ``content_hash``, ``rows``, ``columns``, ``preference_columns`` and the funnel's pair
    counts.

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
    pairs = {split: (pairs or {}).get(split, PREFERENCE_SCHEMA.empty_table()) for split in SPLITS}

    def write(staging: Path) -> DatasetManifest:
        pq.write_table(train, staging / "train.parquet", compression="zstd")
        pq.write_table(validation, staging / "validation.parquet", compression="zstd")
        _write_jsonl(train, staging / "train.jsonl")
        _write_jsonl(validation, staging / "validation.jsonl")
        for split, table in pairs.items():
            pq.write_table(table, staging / f"{preference_split(split)}.parquet", compression="zstd")
            _write_preference_jsonl(table, staging / f"{preference_split(split)}.jsonl")
        funnel = manifest.funnel.model_copy(
            update={"train_pairs": pairs["train"].num_rows, "validation_pairs": pairs["validation"].num_rows}
        )
        filled = manifest.model_copy(
            update={
                "uri": uri,
                "rows": train.num_rows + validation.num_rows,
                "content_hash": content_hash(train, validation, pairs["train"], pairs["validation"]),
                "files": {name: file_sha256(staging / name) for name in DATA_FILES},
                "columns": {f.name: str(f.type) for f in DATASET_SCHEMA},
                "preference_columns": {f.name: str(f.type) for f in PREFERENCE_SCHEMA},
                "funnel": funnel,
            }
        )
        (staging / MANIFEST_FILE).write_text(filled.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return filled

    try:
        return publish(uri, write)
    except FileExistsError as exc:
        raise FileExistsError(exists) from exc
