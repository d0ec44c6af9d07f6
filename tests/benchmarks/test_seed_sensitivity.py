"""``benchmarks/seed_sensitivity.py``: its clean task sets."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.seed_sensitivity import task_sets
from benchmarks.tasks import SELECTION_TASKS


def _inputs(rows: list[dict]) -> list[str]:
    return [json.loads(r["messages"])[0]["content"] for r in rows]


def test_the_sets_are_clean_drawn_by_their_seed_and_never_hold_a_test_input() -> None:
    data = task_sets(per_task=5, validation_per_task=2, test_per_task=10, data_seed=3)
    assert len(data["train"]) == 15 and len(data["validation"]) == 6
    assert set(data["tests"]) == {t.name for t in SELECTION_TASKS}
    tested = {x for rows in data["tests"].values() for x in _inputs(rows)}
    seen = _inputs(data["train"]) + _inputs(data["validation"])
    assert len(set(seen)) == len(seen) and not tested & set(seen)
    # Every answer is its task's: the sets are clean.
    tasks = {t.instruction: t for t in SELECTION_TASKS}
    for row in data["train"] + data["validation"]:
        user, assistant = json.loads(row["messages"])
        task = tasks[user["content"].split(":")[0]]
        assert assistant["content"] == task.answer(tuple(user["content"].split(":", 1)[1].split()))
    assert task_sets(5, 2, 10, 3) == data and task_sets(5, 2, 10, 4)["train"] != data["train"]


def test_a_dataset_folder_is_read_with_or_without_its_wrong_answers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from benchmarks.seed_sensitivity import dataset_sets

    def row(request: str, answer: str) -> dict:
        turns = [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
        return {"messages": json.dumps(turns)}

    good, wrong = row("front: a b c d", "a b"), row("trim: a b c d", "a b c d")
    pq.write_table(pa.Table.from_pylist([good, wrong]), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist([row("head: a b c d", "a")]), tmp_path / "validation.parquet")
    kept = dataset_sets(tmp_path, drop_poor=False, test_per_task=5)
    assert kept["train"] == [good, wrong] and kept["poor"] == [1, 0] and len(kept["tests"]["trim"]) == 5
    assert dataset_sets(tmp_path, drop_poor=True, test_per_task=5)["train"] == [good]
    pq.write_table(pa.Table.from_pylist([row("reverse: a b", "b a")]), tmp_path / "validation.parquet")
    with pytest.raises(ValueError, match="'reverse: a b' is no request of head, front, trim"):
        dataset_sets(tmp_path, drop_poor=False, test_per_task=5)


def test_random_rows_can_cover_the_hard_words_requests_as_sparsely_as_a_selection() -> None:
    from benchmarks.seed_sensitivity import hard_limited_sets
    from benchmarks.tasks import words_of

    tasks = {t.instruction: t for t in SELECTION_TASKS}
    hard = {"apple", "river", "stone"}

    def first_words(rows: list[dict]) -> list[str]:
        return [words_of(tasks[x.split(":")[0]], x)[0] for x in _inputs(rows)]

    data = hard_limited_sets(10, 2, 5, data_seed=3, hard=hard, hard_first=1)
    assert len(data["train"]) == 30 and sum(w in hard for w in first_words(data["train"])) <= 1
    assert sum(w in hard for w in first_words(task_sets(20, 2, 5, 3)["train"])) > 1  # what was left out
    per_task = sorted(x.split(":")[0] for x in _inputs(data["train"]))
    assert per_task == sorted([t.instruction for t in SELECTION_TASKS] * 10)
