"""The ingest pipeline's rows: privacy.data_minimization decides what reaches the store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.config import KaizenConfig
from app.ingest import TOOL_OUTPUT_CHARS, IngestPipeline

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
LONG_OUTPUT = "line of build output\n" * 1000  # 21,000 characters


def pipeline(**privacy: Any) -> IngestPipeline:
    return IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "k", **privacy}}))


def rows(p: IngestPipeline, body: dict[str, Any], type: str = "interaction") -> dict[str, list[dict[str, Any]]]:
    event = {"id": "ev-1", "type": type, "timestamp": NOW.isoformat(), "body": body}
    prepared = p.prepare([event], now=NOW)
    (stored,) = prepared.to_commit
    return stored.rows


BODY = {
    "session_id": "s1",
    "user_id": "dev-42",
    "input": {"raw": "Why does the build fail?"},
    "output": {"content": "The import is missing."},
    "context": {
        "project_type": "library",
        "technologies": ["python"],
        "working_directory": "/srv/acme-payroll",
        "git": {"branch": "main", "stash_count": 0},
    },
    "tool_calls": [
        {
            "tool_name": "shell",
            "parameters_raw": {"cmd": "make"},
            "parameters_processed": {"argv": ["make"]},
            "output": LONG_OUTPUT,
            "error": "short error",
            "resource_usage": {"cpu_ms": 120.0},
        }
    ],
    "feedback": {"explicit": {"rating": 4, "comment": "my manager will love this", "correction": "add the import"}},
}


def test_minimization_stores_only_what_learning_reads() -> None:
    got = rows(pipeline(), BODY)
    (interaction,) = got["interactions"]
    assert interaction["user_hash"] is None and interaction["session_hash"]
    (context,) = got["context_snapshots"]
    assert "working_directory" not in context["project_context"]
    assert context["project_context"]["technologies"] == ["python"]  # what dataset and scoring read stays
    assert context["project_context"]["git"] == {"branch": "main", "stash_count": 0}
    (tool,) = got["tool_usage"]
    assert tool["parameters_processed"] is None and tool["resource_usage"] is None
    assert tool["parameters_raw"] == {"cmd": "make"} and tool["error"] == "short error"
    assert len(tool["output"]) <= TOOL_OUTPUT_CHARS and tool["output"].startswith(LONG_OUTPUT[:1000])
    kept = len(tool["output"].rsplit("\n[...", 1)[0])
    assert tool["output"].endswith(f"[... {len(LONG_OUTPUT) - kept} more characters]")
    (feedback,) = got["feedback"]
    assert feedback["comment"] is None and feedback["rating"] == 4 and feedback["correction"] == "add the import"


def test_without_minimization_everything_is_stored_as_sent() -> None:
    got = rows(pipeline(data_minimization=False), BODY)
    assert got["interactions"][0]["user_hash"] == pipeline().privacy.hash_id("dev-42")
    assert got["context_snapshots"][0]["project_context"]["working_directory"] == "/srv/acme-payroll"
    (tool,) = got["tool_usage"]
    assert tool["output"] == LONG_OUTPUT and tool["parameters_processed"] == {"argv": ["make"]}
    assert tool["resource_usage"] == {"cpu_ms": 120.0}
    assert got["feedback"][0]["comment"] == "my manager will love this"


def test_minimization_applies_to_tool_usage_and_feedback_sent_on_their_own() -> None:
    tool = {"interaction_id": "ev-0", "tool_name": "cat", "output": LONG_OUTPUT, "resource_usage": {"io_bytes": 9.0}}
    assert len(rows(pipeline(), tool, "tool_usage")["tool_usage"][0]["output"]) <= TOOL_OUTPUT_CHARS
    assert rows(pipeline(data_minimization=False), tool, "tool_usage")["tool_usage"][0]["output"] == LONG_OUTPUT
    feedback = {"interaction_id": "ev-0", "explicit": {"thumbs": "up", "comment": "thanks"}}
    assert rows(pipeline(), feedback, "feedback")["feedback"][0]["comment"] is None


@pytest.mark.parametrize("limit", [500, 5000])
def test_tool_outputs_keep_what_the_dataset_section_keeps(limit: int) -> None:
    cfg = KaizenConfig.model_validate({"privacy": {"hmac_key": "k"}, "dataset": {"max_tool_output_chars": limit}})
    (tool,) = rows(IngestPipeline(cfg), BODY)["tool_usage"]
    assert limit - 40 <= len(tool["output"]) <= limit


def test_the_default_cut_is_the_dataset_default() -> None:
    from app.learning.dataset import DatasetConfig

    assert DatasetConfig().max_tool_output_chars == TOOL_OUTPUT_CHARS
