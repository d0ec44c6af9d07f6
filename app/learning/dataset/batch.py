"""The batch every stage takes and returns: a ``dict`` of equal-length NumPy arrays (Ray Data's
``numpy`` batch format); how to build one from rows and back, take rows of it, and order it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Batch", "as_text", "batch_to_rows", "best_first", "num_rows", "object_array", "rows_to_batch", "take"]

Batch = dict[str, np.ndarray]


def object_array(values: Iterable[Any]) -> np.ndarray:
    """A 1-D object array (never NumPy's fixed-width strings, which copy every text to the longest)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def as_text(value: Any) -> str:
    """A cell as text: ``""`` for None and NaN (a missing value after Arrow or pandas), else ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def num_rows(batch: Mapping[str, Any]) -> int:
    """Rows in a batch (0 for ``{}``, what an empty ``take_all`` gives)."""
    return len(next(iter(batch.values()))) if batch else 0


def take(batch: Mapping[str, np.ndarray], index: np.ndarray | Sequence[int]) -> Batch:
    """The rows at ``index`` (positions or a boolean mask) of every column."""
    index = np.asarray(index)
    if index.dtype != bool:
        index = index.astype(np.int64)
    return {name: np.asarray(col)[index] for name, col in batch.items()}


def rows_to_batch(rows: Sequence[Mapping[str, Any]]) -> Batch:
    """Rows (``Dataset.take_all()``) as one batch: arrays stacked, numbers as float or int, the rest objects."""
    if not rows:
        return {}
    batch: Batch = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if isinstance(values[0], np.ndarray):
            batch[name] = np.stack(values)
        elif all(isinstance(v, (bool, np.bool_)) for v in values):
            batch[name] = np.asarray(values, dtype=bool)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            batch[name] = np.asarray(values, dtype=np.int64)
        elif all(isinstance(v, (int, float, np.integer, np.floating)) or v is None for v in values):
            batch[name] = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            batch[name] = object_array(values)
    return batch


def batch_to_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """A batch as rows (for ``ray.data.from_items``); array cells stay arrays, scalars become Python's."""
    names = list(batch)
    rows = []
    for i in range(num_rows(batch)):
        row = {}
        for name in names:
            value = batch[name][i]
            row[name] = value.item() if isinstance(value, np.generic) else value
        rows.append(row)
    return rows


def best_first(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Row order by quality (best first), ties by id: which of duplicates is kept."""
    ids = np.asarray([as_text(i) for i in batch["interaction_id"]], dtype=object)
    order = sorted(range(len(ids)), key=lambda i: (-float(batch["quality_score"][i]), ids[i]))
    return np.asarray(order, dtype=np.int64)
