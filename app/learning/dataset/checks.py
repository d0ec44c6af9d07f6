"""The dataset checks of a learning cycle (the seed's "Dataset Quality OK?"): a set written by
``jobs/build_dataset.py`` is trained on only when it is large enough, not mostly the same requests,
not one group of requests crowding out the rest, and not full of redaction placeholders.

:func:`check_dataset` measures each on the written rows (``train.parquet`` and
``validation.parquet``) and returns a :class:`DatasetCheck` per rule; a cycle stops with
:class:`DatasetRejected`, whose message names every failed check, its measure and its limit
(``learn.min_train_rows``, ``learn.max_duplicate_share``, ``learn.max_group_share``,
``learn.max_redacted_share``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from app.learning.dataset.dedup import normalize_text

__all__ = ["REDACTION_MARK", "DatasetCheck", "DatasetRejected", "check_dataset", "failed_checks"]

REDACTION_MARK = "[REDACTED:"
"""What the privacy filter leaves in place of what it removed (app/privacy)."""


@dataclass(frozen=True)
class DatasetCheck:
    """One rule: what was measured, its limit, and whether the set passed it."""

    name: str
    measured: float
    limit: float
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DatasetRejected(RuntimeError):
    """The dataset failed one or more checks; ``checks`` holds them all (failed and passed)."""

    def __init__(self, dataset_id: str, checks: list[DatasetCheck]) -> None:
        self.dataset_id, self.checks = dataset_id, checks
        failed = "; ".join(f"{c.name}: {c.detail}" for c in failed_checks(checks))
        super().__init__(f"dataset {dataset_id} failed its checks: {failed}")


def failed_checks(checks: list[DatasetCheck]) -> list[DatasetCheck]:
    return [c for c in checks if not c.passed]


def check_dataset(
    folder: Path,
    *,
    min_train_rows: int,
    max_duplicate_share: float,
    max_group_share: float,
    max_redacted_share: float,
    group_by: tuple[str, ...] = ("language", "task", "complexity"),
) -> list[DatasetCheck]:
    """The checks of the dataset in ``folder``, each measured on all its rows (train and validation).

    * ``size``: rows in ``train.parquet``, at least ``min_train_rows``;
    * ``duplicates``: the share of rows whose request (normalised: case, Unicode form, spaces) another
      row already has, at most ``max_duplicate_share``. The builder removes rows whose request *and*
      answer repeat; this catches a set that is one request asked over and over;
    * ``balance``: the largest group's share of the rows (rows alike in ``group_by``, as the builder
      balances them), at most ``max_group_share``; a set of one group has nothing to balance and passes;
    * ``redactions``: the share of rows whose request, context or answer holds a redaction placeholder,
      at most ``max_redacted_share``: answers learned from such rows teach the model to write them.
    """
    columns = ["instruction", "input", "output", "domain", "complexity"]
    paths = [folder / f"{split}.parquet" for split in ("train", "validation")]
    tables = [pq.read_table(path, columns=columns) for path in paths if path.exists()]
    train = pq.read_metadata(paths[0]).num_rows
    rows = [r for t in tables for r in t.to_pylist()]
    total = max(1, len(rows))

    requests = Counter(normalize_text(r["instruction"] or "") for r in rows)
    repeated = sum(n - 1 for n in requests.values())
    groups = Counter(_group(r, group_by) for r in rows)
    largest_group, largest = groups.most_common(1)[0] if groups else ("-", 0)
    redacted = sum(any(REDACTION_MARK in (r[k] or "") for k in ("instruction", "input", "output")) for r in rows)

    duplicate_share, group_share, redacted_share = repeated / total, largest / total, redacted / total
    return [
        DatasetCheck(
            "size",
            train,
            min_train_rows,
            train >= min_train_rows,
            f"{train} training rows (learn.min_train_rows: at least {min_train_rows})",
        ),
        DatasetCheck(
            "duplicates",
            round(duplicate_share, 4),
            max_duplicate_share,
            duplicate_share <= max_duplicate_share,
            f"{repeated} of {len(rows)} rows repeat another row's request ({duplicate_share:.0%}; "
            f"learn.max_duplicate_share: at most {max_duplicate_share:.0%})",
        ),
        DatasetCheck(
            "balance",
            round(group_share, 4),
            max_group_share,
            len(groups) < 2 or group_share <= max_group_share,
            f"the largest of {len(groups)} groups ({largest_group}) holds {largest} of {len(rows)} rows "
            f"({group_share:.0%}; learn.max_group_share: at most {max_group_share:.0%}"
            f"{', one group: nothing to balance' if len(groups) < 2 else ''})",
        ),
        DatasetCheck(
            "redactions",
            round(redacted_share, 4),
            max_redacted_share,
            redacted_share <= max_redacted_share,
            f"{redacted} of {len(rows)} rows hold a redaction placeholder ({redacted_share:.0%}; "
            f"learn.max_redacted_share: at most {max_redacted_share:.0%})",
        ),
    ]


def _group(row: dict[str, Any], by: tuple[str, ...]) -> str:
    domain = row["domain"] or []
    parts = {
        "language": domain[0] if domain else "",
        "task": domain[1] if len(domain) > 1 else "",
        "complexity": row["complexity"] or "",
    }
    return "/".join(parts[name] for name in by) or "all"
