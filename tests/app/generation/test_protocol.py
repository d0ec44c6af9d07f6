"""``app/generation/protocol.py``: OpenAI's request as the Generator takes it, and the errors that
name a bad request's field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.generation import ChatCompletionRequest, GenerationRequestError, parse_request

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"n": 2}, "n", "only n=1 is supported"),
        ({"best_of": 2}, "best_of", "unknown field"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "set one of them"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "not supported"),
        ({"presence_penalty": -2.5}, "presence_penalty", "greater than or equal to -2"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "required for a user message"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
            "only 'text' content parts",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id", "required for a tool message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be"),
    ],
)
def test_bad_requests_name_the_field(change: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(GenerationRequestError) as info:
        parse_request({**GOOD, **change})
    assert (info.value.field, info.value.status_code) == (field, 422)
    assert reason in info.value.reason
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**GOOD, **change})


def test_accepted_request_forms() -> None:
    # What OpenAI's API also takes: nulls for defaults, text parts, a stop string, tool history.
    parsed = parse_request(
        {
            **GOOD,
            "temperature": None,
            "n": None,
            "stop": "\n\n",
            "logit_bias": {},
            "seed": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u1",
        }
    )
    assert parsed.temperature == 1.0 and parsed.n == 1 and parsed.stop == ["\n\n"] and parsed.completion_limit is None
    message = parse_request(
        {
            **GOOD,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}
            ],
        }
    ).messages[0]
    assert message.text() == "one\ntwo"
