"""Users' verdicts and corrections (``app.learning.dataset.preferences``): a correction becomes
the training target and the model's answer the rejected side of a pair; an answer turned down
without a correction is never a target."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.learning.dataset.classification import classify
from app.learning.dataset.filter import filter_quality
from app.learning.dataset.options import threshold_manager
from app.learning.dataset.preferences import (
    CORRECTION_QUALITY,
    apply_corrections,
    drop_rejected,
    feedback_verdict,
)
from app.learning.dataset.write import openai_preference, to_preference_table, to_table
from tests.app.learning.dataset.samples import prepared_rows, read_rows

FIXED = "```python\ndef f1():\n    return 1 + 1\n```"


@pytest.mark.parametrize(
    ("feedback", "rejected"),
    [
        ([], False),
        ([{"accepted": True, "rating": 5}], False),
        ([{"rating": 3}], False),  # lukewarm is not a rejection
        ([{"modified": True}], False),  # used after changes
        ([{"rating": 2}], True),
        ([{"thumbs": "down"}], True),
        ([{"accepted": False}], True),
        ([{"abandoned": True}], True),
        ([{"explicit": {"thumbs": "down"}}], True),  # a nested feedback body
        ([{"thumbs": "down"}, {"thumbs": "up"}], False),  # the latest value of a signal counts
        ([{"accepted": True}, {"abandoned": True}], True),  # any signal that still says no
    ],
)
def test_what_turns_an_answer_down(feedback: list[dict], rejected: bool) -> None:
    verdict = feedback_verdict(feedback, "the answer")
    assert verdict.rejected is rejected and verdict.correction == ""


def test_a_correction_turns_the_answer_down_unless_it_is_the_answer() -> None:
    verdict = feedback_verdict([{"correction": "first"}, {"rating": 5, "correction": None}, {"correction": "second"}])
    assert verdict.correction == "second" and verdict.rejected
    assert feedback_verdict([{"explicit": {"correction": "nested"}}]).correction == "nested"
    assert feedback_verdict([{"correction": "   "}]) == feedback_verdict([])
    same = feedback_verdict([{"correction": "Return  X\n"}], "return x")
    assert same.correction == "" and not same.rejected


def test_a_correction_is_the_target_and_a_rejected_answer_is_no_target() -> None:
    batch = read_rows(
        4,
        quality_score=[0.9, 0.2, 0.95, 0.9],
        correction=["", FIXED, "", ""],
        rejected=[False, True, True, False],  # id-01 corrected, id-02 turned down without a correction
    )
    answers = list(batch["output"])

    out = filter_quality(classify(apply_corrections(batch)), threshold_manager(0.7))

    # The corrected row passes the threshold its stored score (0.2, the rejected answer's) would fail.
    assert list(out["interaction_id"]) == ["id-00", "id-01", "id-02", "id-03"]
    assert list(out["source"]) == ["interaction", "correction", "interaction", "interaction"]
    assert out["output"][1] == FIXED and out["rejected_output"][1] == answers[1] and out["rejected_output"][0] == ""
    assert out["quality_score"][1] == out["quality_confidence"][1] == CORRECTION_QUALITY
    assert out["answer_quality"][1] == 0.2 and out["quality_score"][0] == 0.9
    kept, removed = drop_rejected(out)
    assert removed == 1 and list(kept["interaction_id"]) == ["id-00", "id-01", "id-03"] and "rejected" not in kept

    # dataset.corrections=false: the corrected answer is one more rejected answer.
    ignored = apply_corrections(batch, use_corrections=False)
    assert list(ignored["source"]) == ["interaction"] * 4 and list(ignored["output"]) == answers
    assert drop_rejected(ignored)[1] == 2
    assert drop_rejected({}) == ({}, 0)


def test_a_corrected_row_makes_a_training_row_and_a_preference_pair() -> None:
    batch = prepared_rows(
        3,
        quality_score=[0.8, 0.1, 0.8],
        correction=["", FIXED, ""],
        rejected=[False, True, False],
        system_prompt=["Be brief."] * 3,
    )
    table = to_table(batch)
    assert table.column("learning_type").to_pylist() == ["interaction", "correction", "interaction"]
    row = table.to_pylist()[1]
    assert row["output"] == FIXED and row["quality_score"] == CORRECTION_QUALITY
    assert json.loads(row["messages"])[-1] == {"role": "assistant", "content": FIXED}

    pairs = to_preference_table(batch)
    assert pairs.num_rows == 1
    pair = pairs.to_pylist()[0]
    assert pair["interaction_id"] == "id-01" and pair["chosen"] == FIXED
    assert pair["rejected"] == "```python\ndef f1():\n    return 1\n```" and pair["rejected_quality_score"] == 0.1
    assert json.loads(pair["prompt"]) == json.loads(row["messages"])[:-1]
    assert [m["role"] for m in json.loads(pair["prompt"])] == ["system", "user"]
    assert pair["domain"] == row["domain"] and pair["complexity"] == row["complexity"]
    assert openai_preference(pair) == {
        "input": {"messages": json.loads(pair["prompt"])},
        "preferred_output": [{"role": "assistant", "content": FIXED}],
        "non_preferred_output": [{"role": "assistant", "content": pair["rejected"]}],
    }
    assert to_preference_table(prepared_rows(2)).num_rows == 0
    assert np.all(prepared_rows(2)["source"] == "interaction")
