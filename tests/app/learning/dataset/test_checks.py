"""The dataset checks that stop a learning cycle: each rule passes a sound set and fails the set
that breaks it, with the measure and the limit in its words."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.artifacts import TRAINING_ROW_SCHEMA
from app.learning.dataset.checks import DatasetRejected, check_dataset, failed_checks

LIMITS = {"min_train_rows": 10, "max_duplicate_share": 0.5, "max_group_share": 0.8, "max_redacted_share": 0.3}


def _row(i: int, request: str, answer: str = "", language: str = "python", task: str = "generation") -> dict:
    return {
        "interaction_id": f"i{i}",
        "timestamp": None,
        "instruction": request,
        "input": "",
        "output": answer or f"def f{i}():\n    return {i}",
        "quality_score": 0.9,
        "domain": [language, task],
        "complexity": "simple",
        "learning_type": "interaction",
        "project_context": "{}",
        "features": "{}",
        "messages": "[]",
    }


def _write(folder: Path, rows: list[dict], validation: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows[validation:], schema=TRAINING_ROW_SCHEMA), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:validation], schema=TRAINING_ROW_SCHEMA), folder / "validation.parquet")
    return folder


def _sound(n: int = 20) -> list[dict]:
    languages = ["python", "typescript", "go"]
    return [_row(i, f"write function number {i}", language=languages[i % 3]) for i in range(n)]


def _by_name(folder: Path, **limits: float) -> dict:
    return {c.name: c for c in check_dataset(folder, **{**LIMITS, **limits})}


def test_a_sound_set_passes_every_check(tmp_path: Path) -> None:
    checks = _by_name(_write(tmp_path / "ok", _sound()))
    assert set(checks) == {"size", "duplicates", "balance", "redactions"}
    assert not failed_checks(list(checks.values()))
    assert checks["size"].measured == 18 and checks["duplicates"].measured == 0.0
    assert checks["balance"].measured == pytest.approx(7 / 20)


def test_too_small(tmp_path: Path) -> None:
    size = _by_name(_write(tmp_path / "small", _sound(8)))["size"]
    assert not size.passed and size.measured == 6 and "learn.min_train_rows: at least 10" in size.detail


def test_the_same_request_over_and_over(tmp_path: Path) -> None:
    # Different answers to one request pass the builder's exact dedup; the check sees the repeats,
    # after normalising case and spaces.
    rows = _sound(8) + [
        _row(100 + i, "  Fix   the BUG  " if i % 2 else "fix the bug", f"answer {i}") for i in range(12)
    ]
    dup = _by_name(_write(tmp_path / "dup", rows))["duplicates"]
    assert not dup.passed and dup.measured == pytest.approx(11 / 20)
    assert "11 of 20 rows repeat another row's request" in dup.detail


def test_one_group_crowding_out_the_rest(tmp_path: Path) -> None:
    rows = [_row(i, f"request {i}", language="python" if i else "go") for i in range(20)]
    balance = _by_name(_write(tmp_path / "skewed", rows))["balance"]
    assert (
        not balance.passed
        and balance.measured == pytest.approx(19 / 20)
        and "python/generation/simple" in balance.detail
    )
    # A set of one group has nothing to balance.
    single = [_row(i, f"request {i}") for i in range(20)]
    assert _by_name(_write(tmp_path / "single", single))["balance"].passed
    # Grouped by language alone, the same skew still fails; by nothing, there is one group.
    assert not check_dataset(tmp_path / "skewed", **LIMITS, group_by=("language",))[2].passed
    assert check_dataset(tmp_path / "skewed", **LIMITS, group_by=())[2].passed


def test_full_of_redaction_placeholders(tmp_path: Path) -> None:
    rows = _sound(20)
    for i in range(7):
        rows[i]["output"] = "token = '[REDACTED:api_key]'"
    red = _by_name(_write(tmp_path / "red", rows))["redactions"]
    assert not red.passed and red.measured == pytest.approx(7 / 20) and "7 of 20 rows" in red.detail
    assert _by_name(tmp_path / "red", max_redacted_share=0.4)["redactions"].passed


def test_the_rejection_names_every_failed_check(tmp_path: Path) -> None:
    checks = check_dataset(_write(tmp_path / "bad", _sound(8)), **{**LIMITS, "max_group_share": 0.3})
    error = DatasetRejected("ds-1", checks)
    text = str(error)
    assert text.startswith("dataset ds-1 failed its checks: size: ") and "balance: " in text
    assert "duplicates" not in text and error.checks == checks
