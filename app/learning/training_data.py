"""The rows of a fine-tuning run, read on the driver: a Parquet file or a dataset folder per set,
each set's hash for the lineage, and the checks of the rows against the options.

* :func:`read_rows`: the ``messages`` column of a Parquet file or folder, and its hash;
* :func:`read_datasets`: every set of a run as a Ray Dataset (:class:`TrainingData`);
* :func:`check_data`: errors for rows that cannot be trained on as configured, warnings for
  what is odd;
* :func:`add_data_arguments`: the command-line flags that name the sets (``jobs.finetune`` and
  ``jobs.sweep``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.learning.training import FinetuneConfig
from app.model.storage import file_sha256

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

__all__ = [
    "DATASETS",
    "MANIFEST_FILE",
    "TrainingData",
    "add_data_arguments",
    "check_data",
    "data_hash",
    "read_datasets",
    "read_rows",
]

log = logging.getLogger("kaizen.finetune")

MANIFEST_FILE = "manifest.json"
DATASETS = ("train", "validation", "rehearsal", "fisher", "heldout")
"""The sets a run takes: rows to train on, to validate on, of earlier domains to mix in, to
estimate the Fisher information on, and of earlier domains to measure forgetting on."""


@dataclass
class TrainingData:
    """The rows of a run as Ray Datasets, with what the lineage needs to know of them."""

    datasets: dict[str, ray.data.Dataset]
    """``train`` and, when given, ``validation``, ``rehearsal`` and ``fisher``."""
    rows: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each set's ``manifest.json`` (of its Parquet files when it has none)."""
    paths: dict[str, str] = field(default_factory=dict)


def _parquet_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
    )


def data_hash(files: Sequence[Path], manifest: Path | None) -> str:
    """SHA-256 of a data set's ``manifest.json``, or where it has none, of its files' names and
    SHA-256s (so the same files give the same hash wherever they lie)."""
    if manifest is not None and manifest.is_file():
        return file_sha256(manifest)
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def read_rows(path: Path, split: str | None = None) -> tuple[pa.Table, str]:
    """The ``messages`` column of a Parquet file or folder, and the set's hash (:func:`data_hash`).

    A folder is read as its ``<split>.parquet`` or ``<split>/`` when ``split`` is given and
    present, else every Parquet file under it (hidden and ``_`` names skipped); its
    ``manifest.json`` (for a file, the one beside it) is the set's manifest.

    Raises:
        FileNotFoundError: no Parquet file there.
        ValueError: no ``messages`` column, or rows without messages.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file():
        files, manifest = [path], path.parent / MANIFEST_FILE
    elif path.is_dir():
        manifest = path / MANIFEST_FILE
        root = path
        if split is not None:
            root = next((p for p in (path / f"{split}.parquet", path / split) if p.exists()), path)
        files = [root] if root.is_file() else _parquet_files(root)
        if root == path and split == "train":
            # A dataset folder without a train split: its other splits are still not training rows.
            files = [
                f for f in files if f.relative_to(path).parts[0].removesuffix(".parquet") not in ("validation", "test")
            ]
    else:
        files, manifest = [], path / MANIFEST_FILE
    if not files:
        raise FileNotFoundError(f"no Parquet rows at {path} (a .parquet file or a folder holding them)")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        if "messages" not in names:
            raise ValueError(f"{f}: no 'messages' column (it has: {', '.join(names)})")
        tables.append(pq.read_table(f, columns=["messages"]))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    nulls = table.column("messages").null_count
    if nulls:
        raise ValueError(f"{path}: {nulls} of {table.num_rows} rows have no messages")
    return table, data_hash(files, manifest)


def read_datasets(
    train: Path,
    validation: Path | None = None,
    rehearsal: Path | None = None,
    fisher_data: Path | None = None,
    heldout: Path | None = None,
) -> TrainingData:
    """Read the run's rows on the driver into Ray Datasets (``ray.data.from_items``: blocks
    built here, so no read or metadata task competes with the training workers for CPUs; the
    sets of a LoRA run are small). See :func:`read_rows`.

    Without ``validation``, a training folder's ``validation.parquet`` or ``validation/`` is used.
    ``heldout`` holds rows of earlier domains that are never trained on (a dataset folder: its
    validation split): the rise of their loss is the run's measure of forgetting.
    """
    import ray.data

    data = TrainingData(datasets={})
    train = Path(train)
    found = None
    if validation is None and train.is_dir():
        found = validation = next((p for p in (train / "validation.parquet", train / "validation") if p.exists()), None)
    sources = {
        "train": (train, "train"),
        "validation": (validation, "validation"),
        "rehearsal": (rehearsal, "rehearsal"),
        "fisher": (fisher_data, None),
        "heldout": (heldout, "validation"),
    }
    for name, (path, split) in sources.items():
        if path is None:
            continue
        table, digest = read_rows(Path(path), split)
        if path is found and table.num_rows == 0:
            log.warning("%s is empty: training without validation", path)
            continue
        data.datasets[name] = ray.data.from_items(table.to_pylist())
        data.rows[name] = table.num_rows
        data.hashes[name] = digest
        data.paths[name] = str(path)
    return data


def check_data(opts: FinetuneConfig, data: TrainingData) -> list[str]:
    """Errors for data that cannot be trained on as configured; warnings for what is odd."""
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
    warnings = []
    if opts.rehearsal_ratio > 0 and "rehearsal" not in data.datasets:
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
