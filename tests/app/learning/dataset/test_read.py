"""Stage 1 (``app.learning.dataset.read``): a stored interaction as a flat row."""

from __future__ import annotations

import json

import numpy as np

from app.learning.dataset.read import interaction_row


def test_interaction_row_flattens_a_stored_interaction() -> None:
    record = {
        "id": "a1",
        "timestamp": "2025-01-02T03:04:05+00:00",
        "input_raw": "raw",
        "input_processed": None,
        "output_content": "answer",
        "system_prompt": "Be brief.",
        "quality_score": 0.8,
        "quality_confidence": None,
        "context": {"technologies": ["python"]},
        "tool_usage": [
            {
                "tool_name": "read_file",
                "invocation_order": 0,
                "parameters_raw": {"path": "a.py"},
                "success": True,
                "output": "x = 1",
                "error": None,
                "exit_code": 0,
                "duration_ms": 3.0,
            }
        ],
    }
    row = interaction_row(record)
    assert row["input"] == "raw" and row["system_prompt"] == "Be brief." and np.isnan(row["quality_confidence"])
    assert json.loads(row["tool_usage_json"])[0]["parameters_raw"] == {"path": "a.py"}
    assert interaction_row({**record, "input_processed": "sent"})["input"] == "sent"
    assert interaction_row({**record, "quality_score": None}) is None
    assert interaction_row({**record, "output_content": "  "}) is None
    # No answer, but the user wrote one: a training target.
    unanswered = interaction_row({**record, "output_content": "", "feedback": [{"correction": "x = 2"}]})
    assert (unanswered["output"], unanswered["correction"], unanswered["rejected"]) == ("", "x = 2", True)
    assert (row["correction"], row["rejected"]) == ("", False)  # no feedback: nothing said against it


def test_interaction_row_carries_the_users_verdict_from_the_feedback_rows() -> None:
    record = {"id": "a2", "input_raw": "q", "output_content": "wrong", "quality_score": 0.9, "tool_usage": []}
    feedback = [
        {"rating": 4, "thumbs": None, "correction": None, "accepted": True},
        {"rating": None, "thumbs": "down", "correction": "right", "accepted": None},
    ]
    assert {k: interaction_row({**record, "feedback": feedback})[k] for k in ("correction", "rejected")} == {
        "correction": "right",
        "rejected": True,
    }
    declined = interaction_row({**record, "feedback": [{"accepted": False, "correction": None}]})
    assert (declined["correction"], declined["rejected"]) == ("", True)
