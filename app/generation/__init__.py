"""Generation: the OpenAI protocol, the engine every ``generate`` call goes through, and the Generator.

============================  ==================================================================
``protocol``                  OpenAI's chat-completion requests, responses and request errors
``engine``                    :class:`GenerationEngine`: prompts in, continuations out (chat
                              template, left padding, sampling, stop strings, end of sequence)
``processors``                ``generate``'s plug-ins: per-row sampling, SSR's top-k/top-p, stops
``adapter_cache``             the LoRA adapters attached to the engine's model, LRU evicted
``service``                   :class:`GeneratorService`: chat completions from the base model or
                              an adapter, whole, batched or streamed (what Serve wraps)
``recording``                 :func:`interaction_event`: a completion as Kaizen's event
============================  ==================================================================

The Generator (``app/serve/generator.py``) and Self-Synthesized Rehearsal (``jobs/synthesize.py``)
both generate through :class:`GenerationEngine`, so end-of-sequence handling, padding, sampling and
stop strings exist once.
"""

import importlib
from typing import TYPE_CHECKING, Any

# What each name is imported from, on first use (PEP 562): the protocol and recording need no torch,
# and the Serve replicas that only speak the protocol (the collector, the scorer) do not load the
# model stack (torch, transformers, peft: seconds of start-up for each replica) by importing them.
_SOURCES = {
    "AdapterCache": "adapter_cache",
    **dict.fromkeys(
        ("END_OF_TURN_TOKENS", "Continuation", "GenerationEngine", "Prompt", "Sampling", "TopKSampling"), "engine"
    ),
    **dict.fromkeys(
        (
            "ChatCompletion",
            "ChatCompletionChunk",
            "ChatCompletionRequest",
            "ChatMessage",
            "CompletionStream",
            "Generation",
            "GenerationRequestError",
            "UnknownModelError",
            "parse_request",
        ),
        "protocol",
    ),
    "interaction_event": "recording",
    **dict.fromkeys(("DEFAULT_MAX_TOKENS", "GeneratorService", "PreparedRequest"), "service"),
}

if TYPE_CHECKING:
    from app.generation.adapter_cache import AdapterCache
    from app.generation.engine import (
        END_OF_TURN_TOKENS,
        Continuation,
        GenerationEngine,
        Prompt,
        Sampling,
        TopKSampling,
    )
    from app.generation.protocol import (
        ChatCompletion,
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatMessage,
        CompletionStream,
        Generation,
        GenerationRequestError,
        UnknownModelError,
        parse_request,
    )
    from app.generation.recording import interaction_event
    from app.generation.service import DEFAULT_MAX_TOKENS, GeneratorService, PreparedRequest


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "END_OF_TURN_TOKENS",
    "AdapterCache",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionStream",
    "Continuation",
    "Generation",
    "GenerationEngine",
    "GenerationRequestError",
    "GeneratorService",
    "PreparedRequest",
    "Prompt",
    "Sampling",
    "TopKSampling",
    "UnknownModelError",
    "interaction_event",
    "parse_request",
]
