"""Stage 1 of ``jobs/build_dataset.py``: stored interactions as flat rows with the score, the
project context and the tool calls (the nested parts as JSON strings, so Arrow never unifies them),
and what the user's feedback said of the answer: a correction, and whether it was turned down
(:func:`~app.learning.dataset.preferences.feedback_verdict`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, rows_to_batch
from app.learning.dataset.preferences import feedback_verdict

__all__ = ["READ_COLUMNS", "ReadInteractions", "interaction_row"]

READ_COLUMNS = (
    "interaction_id",
    "timestamp",
    "input",
    "output",
    "system_prompt",
    "quality_score",
    "quality_confidence",
    "context_json",
    "tool_usage_json",
    "correction",
    "rejected",
)


def interaction_row(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """One stored interaction (``InteractionStore.get_interaction``) as a flat row, or None when it
    has no score, or no answer and no correction. The request is the prompt as sent to the model when the agent
    recorded one (``input.processed``), else what the user typed. ``correction`` is the answer the
    user wrote instead ("" without one) and ``rejected`` whether the user turned the answer down
    (:func:`~app.learning.dataset.preferences.feedback_verdict` of its feedback rows)."""
    output = as_text(record.get("output_content"))
    score, confidence = record.get("quality_score"), record.get("quality_confidence")
    verdict = feedback_verdict(record.get("feedback") or [], output)
    # No answer is nothing to learn, unless the user wrote the answer the model did not give.
    if score is None or not (output.strip() or verdict.correction):
        return None
    tools = [
        {
            key: tool.get(key)
            for key in ("tool_name", "invocation_order", "parameters_raw", "success", "output", "error", "exit_code")
        }
        for tool in record.get("tool_usage") or []
    ]
    return {
        "interaction_id": str(record["id"]),
        "timestamp": as_text(record.get("timestamp")),
        "input": as_text(record.get("input_processed")) or as_text(record.get("input_raw")),
        "output": output,
        "system_prompt": as_text(record.get("system_prompt")),
        "quality_score": float(score),
        "quality_confidence": np.nan if confidence is None else float(confidence),
        "context_json": json.dumps(record.get("context") or {}, sort_keys=True, default=str),
        "tool_usage_json": json.dumps(tools, sort_keys=True, default=str),
        "correction": verdict.correction,
        "rejected": verdict.rejected,
    }


def _empty_read_batch() -> Batch:
    def dtype(name: str) -> type:
        return np.float64 if "quality" in name else bool if name == "rejected" else object

    return {name: np.empty(0, dtype=dtype(name)) for name in READ_COLUMNS}


class ReadInteractions:
    """Stage 1 (an actor per reader): a batch of ``id`` to flat rows (:func:`interaction_row`),
    read with this actor's own store connection."""

    def __init__(self, store_config: Mapping[str, Any]):
        from app.config_sections import StoreConfig
        from app.store import open_store

        self.store = open_store(StoreConfig.model_validate(dict(store_config)), migrate=False)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        rows = []
        for interaction_id in batch["id"]:
            record = self.store.get_interaction(str(interaction_id))
            row = interaction_row(record) if record is not None else None
            if row is not None:
                rows.append(row)
        return rows_to_batch(rows) if rows else _empty_read_batch()
