"""What the generation tests share: the requests they send and the answer the adapter learns.

The tiny model's weights are random: greedy decoding repeats "\\n" forever, so most requests here
add ``presence_penalty=2``, which makes greedy text varied (and deterministic). The adapter is
trained in the tests to answer "The answer is 42." to anything.
"""

from __future__ import annotations

from typing import Any

from app.generation import ChatCompletionRequest

ANSWER = "The answer is 42."
PROMPTS = ("hi", "def fib(n):", "What is 2+2?")


def request(prompt: str = "hi", **fields: Any) -> ChatCompletionRequest:
    """A greedy request whose output on the tiny model is varied text (see the module docstring)."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "presence_penalty": 2.0,
        "max_tokens": 12,
        **fields,
    }
    return ChatCompletionRequest.model_validate(body)
