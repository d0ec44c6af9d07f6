"""A completion recorded as Kaizen's ``interaction`` event, the collector's input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.generation.protocol import ChatCompletionRequest, Generation

__all__ = ["interaction_event"]


def interaction_event(
    request: ChatCompletionRequest,
    generation: Generation,
    *,
    session_id: str,
    event_id: str | None = None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """The Kaizen ``interaction`` event that records a completion, ready for the collector.

    Its id is the completion's (``chatcmpl-…``), so an agent can send feedback about the answer
    it got with ``interaction_id`` set to the response's ``id``.

    Args:
        request: the request answered.
        generation: what :meth:`GeneratorService.complete` (or a finished stream) gave.
        session_id: the agent's session.
        event_id: default the completion's id.
        timestamp: default now (UTC).
    """
    users = [m for m in request.messages if m.role == "user"]
    systems = [m for m in request.messages if m.role == "system"]
    body: dict[str, Any] = {
        "session_id": session_id,
        "sequence_number": sum(m.role == "assistant" for m in request.messages),
        # The user's words, not the prompt rendered with the chat template: a dataset renders its
        # rows with the template again (as the system prompt, kept in metadata, too).
        "input": {"raw": (users or request.messages)[-1].text()},
        "output": {
            "content": generation.text,
            "generation_time_ms": round(generation.generation_time_ms, 3),
            "token_count": generation.completion_tokens,
            "streaming": generation.streaming,
        },
        "metadata": {
            "model_version": generation.model_version,
            "temperature": request.temperature,
            "max_tokens": generation.max_tokens,
            "stop_sequences": request.stop_sequences,
            "system_prompt": systems[0].text() if systems else None,
        },
    }
    if request.user is not None:
        body["user_id"] = request.user
    return {
        "id": event_id or generation.completion.id,
        "type": "interaction",
        "timestamp": (timestamp or datetime.now(UTC)).isoformat(),
        "body": body,
    }
