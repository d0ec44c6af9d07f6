"""The rows of a fine-tuning run, read on the driver: a Parquet file or a dataset folder per set,
each set's hash for the lineage, and the checks of the rows against the options.

* :func:`read_rows`: the ``messages`` column of a Parquet file or folder (a preference set's
  ``prompt``, ``chosen`` and ``rejected``), and its hash;
* :func:`read_datasets`: every set of a run as a Ray Dataset (:class:`TrainingData`);
* :func:`check_data`: errors for rows that cannot be trained on as configured, warnings for
  what is odd;
* :func:`add_data_arguments`: the command-line flags that name the sets (``jobs.finetune`` and
  ``jobs.sweep``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.artifacts import find_split
from app.learning.training import OBJECTIVES_WITH_PAIRS, FinetuneConfig, no_pairs_error

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

__all__ = [
    "DATASETS",
    "PAIR_COLUMNS",
    "PREFERENCE_SPLIT",
    "TrainingData",
    "add_data_arguments",
    "check_data",
    "read_datasets",
    "read_rows",
]

log = logging.getLogger("kaizen.finetune")

DATASETS = ("train", "validation", "rehearsal", "fisher", "heldout", "preferences")
"""The sets a run takes: rows to train on, to validate on, of earlier domains to mix in, to
estimate the Fisher information on, of earlier domains to measure forgetting on, and preference
pairs (a correction preferred to the answer it replaced) for ``finetune.objective`` dpo or sft+dpo."""

PREFERENCE_SPLIT = "train_preferences"
"""A dataset folder's preference pairs for training: ``train_preferences.parquet``
(:func:`app.learning.dataset.write.preference_split` of ``train``)."""
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
"""What training reads of a preference pair (:data:`app.artifacts.PREFERENCE_ROW_SCHEMA`)."""


@dataclass
class TrainingData:
    """The rows of a run as Ray Datasets, with what the lineage needs to know of them."""

    datasets: dict[str, ray.data.Dataset]
    """``train`` and, when given, ``validation``, ``rehearsal`` and ``fisher``."""
    rows: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each set's ``manifest.json`` (of its Parquet files when it has none)."""
    paths: dict[str, str] = field(default_factory=dict)


def read_rows(path: Path, split: str | None = None, columns: tuple[str, ...] = ("messages",)) -> tuple[pa.Table, str]:
    """The ``columns`` (a training row's ``messages``; a preference pair's :data:`PAIR_COLUMNS`) of
    a Parquet file or folder (a local path or a URI), and the set's hash: the SHA-256 of its
    manifest, else of its files (:func:`app.artifacts.find_split` says which files a split is).

    Raises:
        FileNotFoundError: no Parquet file there.
        ValueError: a column missing, or rows without a value in it.
    """
    found = find_split(path, split)
    table = found.read(list(columns))
    for column in columns:
        nulls = table.column(column).null_count
        if nulls:
            raise ValueError(f"{path}: {nulls} of {table.num_rows} rows have no {column}")
    return table, found.data_hash


def read_datasets(
    train: Path,
    validation: Path | None = None,
    rehearsal: Path | None = None,
    fisher_data: Path | None = None,
    heldout: Path | None = None,
    *,
    preferences: bool = False,
) -> TrainingData:
    """Read the run's rows on the driver into Ray Datasets (``ray.data.from_items``: blocks
    built here, so no read or metadata task competes with the training workers for CPUs; the
    sets of a LoRA run are small). See :func:`read_rows`.

    Without ``validation``, a training folder's ``validation.parquet`` or ``validation/`` is used.
    ``heldout`` holds rows of earlier domains that are never trained on (a dataset folder: its
    validation split): the rise of their loss is the run's measure of forgetting. With
    ``preferences`` (an objective that trains on pairs), a training folder's
    ``train_preferences.parquet`` is the ``preferences`` set when it has pairs.
    """
    import ray.data

    data = TrainingData(datasets={})
    train = Path(train)
    found = None
    if validation is None and train.is_dir():
        found = validation = next((p for p in (train / "validation.parquet", train / "validation") if p.exists()), None)
    pairs = train / f"{PREFERENCE_SPLIT}.parquet" if preferences and train.is_dir() else None
    sources = {
        "train": (train, "train"),
        "validation": (validation, "validation"),
        "rehearsal": (rehearsal, "rehearsal"),
        "fisher": (fisher_data, None),
        "heldout": (heldout, "validation"),
        "preferences": (pairs if pairs is not None and pairs.exists() else None, PREFERENCE_SPLIT),
    }
    for name, (path, split) in sources.items():
        if path is None:
            continue
        columns = PAIR_COLUMNS if name == "preferences" else ("messages",)
        table, digest = read_rows(Path(path), split, columns)
        if path is found and table.num_rows == 0:
            log.warning("%s is empty: training without validation", path)
            continue
        if name == "preferences" and table.num_rows == 0:
            continue  # a dataset without corrections: check_data says what that means for the objective
        data.datasets[name] = ray.data.from_items(table.to_pylist())
        data.rows[name] = table.num_rows
        data.hashes[name] = digest
        data.paths[name] = str(path)
    return data


def check_data(opts: FinetuneConfig, data: TrainingData) -> list[str]:
    """Errors for data that cannot be trained on as configured; warnings for what is odd.

    Raises:
        ValueError: fewer rows of a set than workers; trials or attempts without validation; an objective
            that trains on preference pairs (``finetune.objective``) without any.
    """
    if opts.objective in OBJECTIVES_WITH_PAIRS and not data.rows.get("preferences"):
        raise no_pairs_error(opts.objective)
    for name, rows in data.rows.items():
        if rows < opts.num_workers:
            raise ValueError(
                f"finetune.num_workers: {opts.num_workers} workers need at least as many {name} rows "
                f"(each gets an equal shard), got {rows}"
            )
    if opts.trials > 1 and "validation" not in data.datasets:
        raise ValueError(
            f"finetune.trials: {opts.trials} trials are chosen between by their validation loss; give validation "
            "rows (--validation, or a dataset folder with a validation split) or set trials=1"
        )
    if opts.attempts > 1 and "validation" not in data.datasets:
        raise ValueError(
            f"finetune.attempts: {opts.attempts} attempts start over while the validation exact match says the task "
            "is not learned; give validation rows (--validation, or a dataset folder with a validation split) or "
            "set attempts=1"
        )
    warnings = []
    if opts.objective == "dpo" and "rehearsal" in data.datasets:
        warnings.append(
            "finetune.objective is dpo: the run trains on the preference pairs alone, and the rehearsal rows are "
            "not mixed in (use sft+dpo to train on both)"
        )
    elif opts.rehearsal_ratio > 0 and "rehearsal" not in data.datasets:
        warnings.append(
            f"finetune.rehearsal_ratio is {opts.rehearsal_ratio} but no rehearsal rows were given: "
            "the epochs hold the training rows alone"
        )
    if "validation" not in data.datasets and opts.early_stopping_patience > 0:
        warnings.append("no validation rows: no early stopping, and the last adapter is kept")
    return warnings


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name the sets a run reads (``jobs.finetune`` and ``jobs.sweep``)."""
    parser.add_argument("--train", required=True, type=Path, help="training rows: a dataset folder or a .parquet file")
    parser.add_argument("--validation", type=Path, help="validation rows (default: the dataset's validation split)")
    parser.add_argument("--rehearsal", type=Path, help="rehearsal rows of earlier domains (SSR output)")
    parser.add_argument(
        "--fisher-data", type=Path, help="earlier-task rows for the Fisher information (default: rehearsal)"
    )
    parser.add_argument("--heldout", type=Path, help="held-out rows of earlier domains: their loss measures forgetting")
