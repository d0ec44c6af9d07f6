"""``app/generation/recording.py``: a completion, whole or streamed, as Kaizen's interaction event."""

from __future__ import annotations

import pytest

from app.generation import GeneratorService, interaction_event
from app.schemas import EventEnvelope, Interaction, parse_event_body
from tests.app.generation.common import ANSWER, request


def test_interaction_event_records_the_completion(service: GeneratorService) -> None:
    req = request(
        "Sort a list.",
        messages=[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}],
        stop=["\n\n\n"],
        temperature=0.0,
        user="dev-1",
    )
    generation = service.complete(req)
    event = interaction_event(req, generation, session_id="session-1")

    envelope = EventEnvelope.model_validate(event)
    assert envelope.id == generation.completion.id and envelope.type == "interaction"
    interaction = parse_event_body("interaction", envelope.body)
    assert isinstance(interaction, Interaction)
    assert interaction.session_id == "session-1" and interaction.user_id == "dev-1"
    # The user's words; the rendered prompt is not what a dataset should wrap in the template again.
    assert interaction.input.raw == "Sort a list." and interaction.input.processed is None
    assert "<|im_start|>" in generation.prompt
    assert interaction.output.content == generation.text
    assert interaction.output.token_count == generation.completion_tokens
    assert interaction.output.generation_time_ms == pytest.approx(generation.generation_time_ms, abs=0.01)
    assert interaction.output.streaming is False
    meta = interaction.metadata
    assert (meta.model_version, meta.temperature, meta.max_tokens) == ("tiny", 0.0, 12)
    assert meta.stop_sequences == ["\n\n\n"] and meta.system_prompt == "You write Python."

    stream = service.stream(req.model_copy(update={"stream": True}), "a1")
    list(stream)
    streamed = parse_event_body("interaction", interaction_event(req, stream.generation, session_id="s")["body"])
    assert streamed.output.streaming and streamed.metadata.model_version == "a1"
    assert streamed.output.content == ANSWER
