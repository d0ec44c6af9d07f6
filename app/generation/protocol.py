"""OpenAI's chat-completion protocol, the subset the Generator speaks: requests, responses, errors.

:class:`ChatCompletionRequest` is ``POST /v1/chat/completions`` (anything a local model cannot
honour is refused by name); :class:`ChatCompletion` and :class:`ChatCompletionChunk` are the
answers (``openai.types.chat`` parses them); :class:`GenerationRequestError` names the field and
the reason, with the HTTP status an API should answer. :class:`Generation` is a finished
completion with the timings and counts the recorder needs, and :class:`CompletionStream` the
chunks of a streamed one. Pydantic only: nothing here loads a model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from app.schemas import format_validation_error

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatMessage",
    "Choice",
    "ChoiceDelta",
    "ChunkChoice",
    "CompletionStream",
    "FinishReason",
    "Generation",
    "GenerationRequestError",
    "UnknownModelError",
    "Usage",
    "parse_request",
]


# --- errors ----------------------------------------------------------------------------------


class GenerationRequestError(ValueError):
    """A request that cannot be served as asked: names the field and the reason.

    ``status_code`` is what an HTTP layer should answer (422 for a malformed request, 400 for one
    the model cannot serve, 404 for an unknown model); :meth:`to_openai` is OpenAI's error body.
    """

    def __init__(self, field: str, reason: str, status_code: int = 400, code: str | None = None) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.status_code = status_code
        self.code = code

    def to_openai(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers."""
        return {
            "error": {"message": str(self), "type": "invalid_request_error", "param": self.field, "code": self.code}
        }


class UnknownModelError(GenerationRequestError):
    """An adapter that is neither loaded nor in the adapter store."""

    def __init__(self, reason: str) -> None:
        super().__init__("model", reason, status_code=404, code="model_not_found")


# --- request -----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # Unknown fields refused by name; strict types: "1" is no number, 0 no boolean.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextContentPart(_Strict):
    """One part of a message's content; only text parts are supported."""

    type: Literal["text"] = Field(description="Always 'text'.")
    text: str = Field(description="The text.")


class ToolCallFunction(_Strict):
    name: str = Field(description="The function called.")
    arguments: str = Field(description="Its arguments, a JSON object as a string (as OpenAI sends them).")


class ToolCall(_Strict):
    """A tool call an assistant message made earlier in the conversation."""

    id: str = Field(description="The call's id, which the tool message answering it repeats.")
    type: Literal["function"] = Field("function", description="Always 'function'.")
    function: ToolCallFunction = Field(description="The function and its arguments.")


class ChatMessage(_Strict):
    """One message of the conversation, as OpenAI's API takes it."""

    role: Literal["system", "user", "assistant", "tool"] = Field(description="Who wrote it.")
    content: str | list[TextContentPart] | None = Field(
        None,
        validate_default=True,
        description="Text, or a list of text parts (joined with newlines); null only for an assistant.",
    )
    name: str | None = Field(None, description="The author's name; passed to the chat template.")
    tool_calls: list[ToolCall] | None = Field(None, description="Tool calls of an assistant message.")
    tool_call_id: str | None = Field(
        None, validate_default=True, description="The call a tool message answers; required for role 'tool'."
    )

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"part {i} has type {kind!r}; only 'text' content parts are supported")
        elif value is not None and not isinstance(value, str):
            raise ValueError("must be a string, a list of text parts, or null")
        return value

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role in ("system", "user", "tool"):
            raise ValueError(f"required for a {role} message")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _assistant_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_needs_id(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") == "tool":
            raise ValueError("required for a tool message: the id of the tool call it answers")
        return value

    def text(self) -> str:
        """The content as one string (text parts joined with newlines; null is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it: content a string; tool-call arguments
        parsed into objects, as Qwen's template (and most others) expects them."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        return message


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, description="The function's name.")
    description: str | None = Field(None, description="What it does, for the model.")
    parameters: dict[str, Any] | None = Field(None, description="Its arguments, as a JSON schema.")
    strict: bool | None = Field(None, description="Accepted; structured outputs are not enforced.")


class Tool(_Strict):
    """A tool the model may call, rendered into the prompt by the chat template."""

    type: Literal["function"] = Field(description="Always 'function'.")
    function: FunctionDefinition = Field(description="The function.")


class NamedFunction(_Strict):
    name: str = Field(description="The function to call.")


class NamedToolChoice(_Strict):
    type: Literal["function"] = Field(description="Always 'function'.")
    function: NamedFunction = Field(description="The function the model should call.")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the token usage (and no choices).")


StopString = Annotated[str, Field(min_length=1)]

# Fields that OpenAI's API takes as null for "the default"; some clients send nulls explicitly.
_NULL_MEANS_DEFAULT = ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty")


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``: the subset of OpenAI's request that a local model can honour.

    Anything else is refused by name rather than ignored: unknown fields, ``n`` other than 1, a
    non-empty ``logit_bias``.
    """

    model: str = Field(min_length=1, description="The model asked for; echoed in the response.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy; higher samples more freely.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: 2048, or the room left).")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    stop: list[StopString] | None = Field(
        None, max_length=4, description="Up to 4 strings that end the completion (not included in it)."
    )
    stream: bool = Field(False, description="Answer as server-sent chunks.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only with stream.")
    n: int = Field(1, description="Choices to generate; only 1 is supported.")
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    user: str | None = Field(None, max_length=500, description="The end user; recorded as the interaction's user_id.")
    tools: list[Tool] | None = Field(None, description="Tools the model may call (rendered into the prompt).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'none' leaves the tools out of the prompt; the others are passed to the template."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Penalises tokens already generated, once.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Penalises tokens by how often they were generated.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be empty or null.")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and any(data.get(k, 0) is None for k in _NULL_MEANS_DEFAULT):
            return {k: v for k, v in data.items() if not (k in _NULL_MEANS_DEFAULT and v is None)}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("max_completion_tokens")
    @classmethod
    def _same_as_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and value != other:
            raise ValueError(f"is {value} but max_tokens is {other}; set one of them")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported (got {value}); send separate requests for more choices")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported; leave it out or send {}")
        return value

    @property
    def completion_limit(self) -> int | None:
        """``max_tokens`` or ``max_completion_tokens``, whichever was given."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])


def parse_request(payload: Mapping[str, Any]) -> ChatCompletionRequest:
    """Validate a request body; a :class:`GenerationRequestError` (422) names the first bad field."""
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        field, reason = format_validation_error(exc)
        raise GenerationRequestError(field or "body", reason.removeprefix("Value error, "), status_code=422) from None


# --- response ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class Choice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's ``chat.completion`` response (``openai.types.chat.ChatCompletion`` parses it)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One ``chat.completion.chunk`` of a stream (``openai.types.chat.ChatCompletionChunk``).

    The first carries the role, the next ones content, the last choice chunk the finish reason;
    with ``stream_options.include_usage`` a final chunk with no choices carries the usage.
    """

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


@dataclass(frozen=True)
class Generation:
    """A finished completion with what the recorder needs beside it."""

    completion: ChatCompletion
    generation_time_ms: float
    """From the call to the last token, waiting for the model included."""
    ttft_ms: float | None
    """From the call to the first generated token (None if none was)."""
    adapter_id: str | None
    """The adapter that answered; None for the base model."""
    base_model: str
    max_tokens: int
    """The completion limit applied (the request's, or the default)."""
    prompt: str
    """The prompt as rendered by the chat template."""
    streaming: bool = False

    @property
    def text(self) -> str:
        return self.completion.choices[0].message.content or ""

    @property
    def finish_reason(self) -> str:
        return self.completion.choices[0].finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self.completion.usage.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.completion.usage.completion_tokens

    @property
    def model_version(self) -> str:
        """What answered: the adapter id, or the base model's name."""
        return self.adapter_id or self.base_model


class CompletionStream(Iterator[ChatCompletionChunk]):
    """The chunks of a streamed completion; :attr:`generation` is set once they are all read.

    Closing it early (or dropping it unread) stops the generation at its next token.
    """

    def __init__(self, chunks: Generator[ChatCompletionChunk, None, Generation], cancel: threading.Event) -> None:
        self._chunks = chunks
        self._cancel = cancel
        self.generation: Generation | None = None

    def __iter__(self) -> CompletionStream:
        return self

    def __next__(self) -> ChatCompletionChunk:
        try:
            return next(self._chunks)
        except StopIteration as stop:
            if stop.value is not None:
                self.generation = stop.value
            raise

    def close(self) -> None:
        self._cancel.set()
        self._chunks.close()

    def __del__(self) -> None:
        self._cancel.set()


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
