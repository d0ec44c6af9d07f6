from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import EventEnvelope, Interaction, format_validation_error, parse_event_body

GOOD = {
    "session_id": "s1",
    "input": {"raw": "fix the bug", "type": "command", "intent": "fix_bug", "complexity": "moderate"},
    "output": {"content": "done", "format": "text", "generation_time_ms": 10, "token_count": 3},
}


def test_interaction_accepts_snake_and_camel_case() -> None:
    camel = {
        "sessionId": "s1",
        "sequenceNumber": 2,
        "input": {"raw": "x"},
        "output": {"content": "y", "generationTime": 12.5, "tokenCount": 4, "streaming": True},
        "metadata": {"modelVersion": "v1", "maxTokens": 100, "stopSequences": ["\n"], "systemPrompt": "be nice"},
    }
    it = Interaction.model_validate(camel)
    assert it.session_id == "s1" and it.output.generation_time_ms == 12.5 and it.metadata.max_tokens == 100
    assert Interaction.model_validate(GOOD).input.type == "command"


@pytest.mark.parametrize(
    "patch, field, reason",
    [
        ({"input": {"raw": "x", "type": "chat"}}, "input.type", "Input should be"),
        ({"output": {"content": 5}}, "output.content", "string"),
        ({"session_id": ""}, "session_id", "at least 1"),
        ({"sessionn_id": "s"}, "sessionn_id", "unknown field"),
        ({"output": {"content": "y", "token_count": -1}}, "output.token_count", "greater than or equal"),
        ({"output": {"content": "y", "generation_time_ms": float("nan")}}, "output.generation_time_ms", "finite"),
    ],
)
def test_interaction_errors_name_the_field(patch: dict, field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as err:
        Interaction.model_validate({**GOOD, **patch})
    got_field, got_reason = format_validation_error(err.value)
    assert got_field == field and reason in got_reason


def test_missing_field_is_named() -> None:
    with pytest.raises(ValidationError) as err:
        Interaction.model_validate({"session_id": "s", "input": {"raw": "x"}})
    assert format_validation_error(err.value, "body") == ("body.output", "required field is missing")


def test_feedback_ranges_and_interaction_id() -> None:
    assert parse_event_body("feedback", {"interaction_id": "a", "explicit": {"rating": 5, "thumbs": "up"}})
    with pytest.raises(ValidationError):
        parse_event_body("feedback", {"interaction_id": "a", "explicit": {"rating": 6}})
    with pytest.raises(ValueError, match="interaction_id"):
        parse_event_body("outcome", {"tests_pass": True})


def test_envelope_validates_type_id_and_timestamp() -> None:
    ok = EventEnvelope.model_validate(
        {"id": "e-1", "type": "interaction", "timestamp": "2026-01-01T00:00:00", "body": {}}
    )
    assert ok.timestamp.tzinfo is not None  # naive times are taken as UTC
    for bad, field in [
        ({"type": "click"}, "type"),
        ({"id": "has space"}, "id"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"body": []}, "body"),
    ]:
        with pytest.raises(ValidationError) as err:
            EventEnvelope.model_validate(
                {"id": "e", "type": "feedback", "timestamp": "2026-01-01T00:00:00Z", "body": {}, **bad}
            )
        assert format_validation_error(err.value)[0] == field
