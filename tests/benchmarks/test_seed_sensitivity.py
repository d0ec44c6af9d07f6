"""``benchmarks/seed_sensitivity.py``: its clean task sets."""

from __future__ import annotations

import json

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
