"""The Generator's core: OpenAI chat completions from a base model and its LoRA adapters.

:class:`GeneratorService` loads one base model (``tiny``, a local checkpoint or a cached hub id,
through :func:`app.model.load_model`) and keeps up to ``max_adapters`` LoRA adapters from the
:class:`~app.model.adapters.AdapterStore` attached to it, evicting the least recently used. It
answers OpenAI chat-completion requests (:class:`ChatCompletionRequest`) with the adapter the
caller names, or the plain base model for ``None``: whole (``complete``), several in one
``generate`` call (``complete_batch``), or as chunks while they are generated (``stream``). Each
answer comes as a :class:`Generation`: the OpenAI response plus the timings and counts the
recorder needs, which :func:`interaction_event` turns into the Kaizen event that records it.
The request's ``model`` is only echoed: the caller (the Serve deployment, through the adapter
registry) decides which adapter answers.

This is plain Python, used by the tests as it is; a thin Ray Serve deployment wraps it.

Semantics worth knowing:

* Sampling follows the request alone, as OpenAI's API does: ``temperature`` 0 is greedy, otherwise
  ``temperature`` and ``top_p`` sample; the model's own ``generation_config`` defaults (a real
  Qwen2.5 sets ``top_k=20``, ``repetition_penalty=1.05``) do not apply. ``presence_penalty`` and
  ``frequency_penalty`` are applied with OpenAI's formula, to the tokens generated so far. A
  ``seed`` makes sampling reproducible: a seeded request is generated on its own, since a batch
  shares one random generator.
* Requests of one batch may differ in every parameter: temperature, top-p, penalties, stop strings
  and ``max_tokens`` are applied per row (left-padded), so a batch gives what each request alone
  would give (for greedy requests the same tokens, up to floating-point differences between batch
  shapes: none on a CPU in fp32, rare near-ties in bf16 on a GPU).
* ``finish_reason`` is ``stop`` at ``<|im_end|>``/``<|endoftext|>`` or a stop string (the text is
  cut before it), ``length`` when ``max_tokens`` ran out. ``completion_tokens`` counts the tokens
  generated, the end-of-turn token or the one completing a stop string included.
* ``tools`` are rendered into the prompt by the chat template (omitted when ``tool_choice`` is
  ``"none"``); no other ``tool_choice`` is enforced and tool calls in the output are returned as
  text, not parsed into ``tool_calls``.
* Control tokens written inside messages (``<|im_start|>`` …) are encoded as plain text where the
  installed transformers can (``sanitize_control_tokens``), so a message cannot forge a turn.
* One lock serialises the model: a generation holds it from start to end, and attaching or
  deleting an adapter waits for it, so an adapter never changes under a running generation.
  Adapters are fetched from the store before the lock is taken.
"""

from __future__ import annotations

import gc
import inspect
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from jinja2 import TemplateError
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer

from app.model import load_model
from app.model.adapters import AdapterManifest, AdapterNotFoundError, AdapterStore, check_adapter_id
from app.schemas import format_validation_error

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionStream",
    "Generation",
    "GenerationRequestError",
    "GeneratorService",
    "UnknownModelError",
    "interaction_event",
    "parse_request",
]

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end a completion besides the model's own eos ids (Qwen2.5's ChatML)."""
DEFAULT_MAX_TOKENS = 2048
"""Completion tokens allowed when a request sets no ``max_tokens`` (and the context has room)."""


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
    model_config = ConfigDict(extra="forbid")


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


# --- the service -------------------------------------------------------------------------------


@dataclass
class PreparedRequest:
    """A request checked against the model: its prompt, rendered and tokenized, and the
    completion limit it runs under (what :meth:`GeneratorService.prepare` gives)."""

    request: ChatCompletionRequest
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int

    @property
    def greedy(self) -> bool:
        return self.request.temperature == 0


@dataclass
class _Outcome:
    text: str
    finish_reason: FinishReason
    completion_tokens: int


class GeneratorService:
    """A base model, its attached LoRA adapters, and chat completions from either.

    Args:
        base_model: what :func:`app.model.load_model` loads (``tiny``, a path, a cached hub id);
            adapters must have been trained on the same name (their manifest's ``base_model``).
        root: the storage root for profiles and the tokenizer, and of the default adapter store.
        adapter_store: where adapters come from (default ``AdapterStore(root)``).
        max_adapters: adapters kept attached at once; loading one more evicts the least recently
            used.
        max_context_tokens: prompt plus completion tokens allowed (default the model config's
            ``max_position_embeddings``).
        device: default ``cuda`` where available, else ``cpu``.
        default_max_tokens: the completion limit of requests that set none (capped by the room
            the prompt leaves in the context).
    """

    def __init__(
        self,
        base_model: str = "tiny",
        *,
        root: str | Path = "data",
        adapter_store: AdapterStore | None = None,
        max_adapters: int = 4,
        max_context_tokens: int | None = None,
        device: str | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
        self.base_model = base_model
        self.adapter_store = adapter_store if adapter_store is not None else AdapterStore(root)
        self.max_adapters = max_adapters
        self.default_max_tokens = default_max_tokens
        self.model, self.tokenizer = load_model(base_model, root=root, device=device)
        self.device = next(self.model.parameters()).device
        config_context = getattr(self.model.config, "max_position_embeddings", None)
        self.max_context_tokens = max_context_tokens or config_context
        if not self.max_context_tokens:
            raise ValueError(f"{base_model!r} has no max_position_embeddings: pass max_context_tokens")

        self._eos_ids = self._end_of_turn_ids()
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self._eos_ids[0]
        # The request alone decides how to sample (as OpenAI's API does): the checkpoint's own
        # defaults (top_k, repetition_penalty...) would otherwise fill whatever a call leaves unset.
        self.model.generation_config = GenerationConfig(eos_token_id=self._eos_ids, pad_token_id=self._pad_id)
        self._sanitize = "sanitize_control_tokens" in inspect.signature(self.tokenizer.apply_chat_template).parameters

        self._lock = threading.Lock()  # the model: one generation, or one adapter change, at a time
        self._adapters_lock = threading.Lock()  # the table below, so reading it never waits for a generation
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter id -> PEFT adapter name, LRU first
        self._names = 0

    def __repr__(self) -> str:
        return f"GeneratorService({self.base_model!r}, adapters={self.loaded_adapters()})"

    # --- adapters ------------------------------------------------------------------------------

    def loaded_adapters(self) -> list[str]:
        """Ids of the attached adapters, least recently used first."""
        with self._adapters_lock:
            return list(self._adapters)

    def load_adapter(self, adapter_id: str) -> AdapterManifest:
        """Attach a stored adapter (a no-op apart from marking it used if it is attached).

        Safe from any thread: the adapter is fetched first, then attached between generations,
        evicting the least recently used one if ``max_adapters`` are attached.

        Raises:
            UnknownModelError: no such adapter in the store.
            GenerationRequestError: the adapter was trained on another base model.
        """
        manifest = self._fetch(adapter_id)
        with self._lock:
            self._attach_locked(adapter_id)
        return manifest

    def unload_adapter(self, adapter_id: str) -> bool:
        """Detach an adapter and free its memory; False if it was not attached."""
        with self._lock:
            if adapter_id not in self.loaded_adapters():
                return False
            self._detach_locked(adapter_id)
            return True

    def _fetch(self, adapter_id: str) -> AdapterManifest:
        """The manifest of a stored adapter for this base model, its files local (outside the lock:
        a download must not hold up generation)."""
        try:
            check_adapter_id(adapter_id)
            manifest = self.adapter_store.manifest(adapter_id)
            self.adapter_store.local_path(adapter_id)
        except (AdapterNotFoundError, ValueError) as exc:
            raise UnknownModelError(
                f"no adapter {adapter_id!r} in {self.adapter_store.root} ({exc}); attached: {self.loaded_adapters()}"
            ) from None
        if manifest.base_model != self.base_model:
            raise GenerationRequestError(
                "model",
                f"adapter {adapter_id!r} was trained on base model {manifest.base_model!r}, "
                f"but this generator serves {self.base_model!r}",
            )
        return manifest

    def _attach_locked(self, adapter_id: str) -> str:
        with self._adapters_lock:
            name = self._adapters.get(adapter_id)
            if name is not None:
                self._adapters.move_to_end(adapter_id)
                return name
        while len(self._adapters) >= self.max_adapters:
            self._detach_locked(next(iter(self._adapters)))
        # PEFT adapter names become module keys, where '.' is not allowed (adapter ids may have it).
        self._names += 1
        name = f"kaizen_{self._names}"
        self.model = self.adapter_store.attach(self.model, adapter_id, adapter_name=name)
        with self._adapters_lock:
            self._adapters[adapter_id] = name
        return name

    def _detach_locked(self, adapter_id: str) -> None:
        with self._adapters_lock:
            name = self._adapters.pop(adapter_id)
            remaining = len(self._adapters)
        if remaining:
            if self.model.active_adapter == name:  # PEFT would warn, then pick one itself
                self.model.set_adapter(next(iter(self._adapters.values())))
            self.model.delete_adapter(name)
        else:
            # PEFT cannot delete a model's last adapter; unwrapping gives back the base model.
            self.model = self.model.unload()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def _weights(self, adapter_id: str | None) -> Iterator[None]:
        """Under the model lock: make ``adapter_id`` (None: the base model) the one that answers."""
        if adapter_id is None:
            with self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext():
                yield
            return
        name = self._attach_locked(adapter_id)
        # set_adapter marks the adapter trainable; harmless here, generate runs without gradients.
        self.model.set_adapter(name)
        yield

    # --- requests ------------------------------------------------------------------------------

    def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        """Render and tokenize the prompt and check it against the context window.

        Raises:
            GenerationRequestError: ``messages`` fill the context, or ``max_tokens`` does not fit.
        """
        messages = [m.template_dict() for m in request.messages]
        kwargs: dict[str, Any] = {}
        if request.tools and request.tool_choice != "none":
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
            if request.tool_choice is not None:
                tool_choice = request.tool_choice
                kwargs["tool_choice"] = tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump()
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            if self._sanitize:
                encoded = self.tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    sanitize_control_tokens=True,
                    **kwargs,
                )
                prompt_ids = list(encoded["input_ids"])
            else:
                prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        except (TemplateError, TypeError, ValueError) as exc:  # the template's own checks say what is wrong
            raise GenerationRequestError("messages", f"the chat template rejected them: {exc}") from None

        room = self.max_context_tokens - len(prompt_ids)
        limit = request.completion_limit
        if room < 1:
            raise GenerationRequestError(
                "messages",
                f"the prompt is {len(prompt_ids)} tokens, and the context window is {self.max_context_tokens}",
                code="context_length_exceeded",
            )
        if limit is not None and limit > room:
            field = "max_tokens" if request.max_tokens is not None else "max_completion_tokens"
            raise GenerationRequestError(
                field,
                f"{limit} completion tokens do not fit: the prompt is {len(prompt_ids)} tokens and the context "
                f"window {self.max_context_tokens}, which leaves {room}",
                code="context_length_exceeded",
            )
        max_new = limit if limit is not None else min(self.default_max_tokens, room)
        return PreparedRequest(request, prompt, prompt_ids, max_new)

    def complete(self, request: ChatCompletionRequest, adapter_id: str | None = None) -> Generation:
        """Answer one request whole (its ``stream`` flag is not looked at here).

        Returns:
            The :class:`Generation`; its ``completion`` is the OpenAI response.

        Raises:
            GenerationRequestError: the request does not fit the context window.
            UnknownModelError: ``adapter_id`` is not in the adapter store.
        """
        return self.complete_batch([request], adapter_id)[0]

    def complete_batch(
        self, requests: Sequence[ChatCompletionRequest], adapter_id: str | None = None
    ) -> list[Generation]:
        """Answer several requests with one adapter, in one left-padded ``generate`` call.

        Each request keeps its own parameters (see the module docstring); seeded sampled requests
        are generated one by one so that their seed alone decides their output. Raises as
        :meth:`complete` does, before anything is generated.
        """
        start = time.perf_counter()
        if not requests:
            return []
        prepared = [self.prepare(r) for r in requests]
        if adapter_id is not None and adapter_id not in self.loaded_adapters():
            self._fetch(adapter_id)
        groups: list[list[int]] = []
        shared = [i for i, p in enumerate(prepared) if p.greedy or p.request.seed is None]
        if shared:
            groups.append(shared)
        groups.extend([i] for i, p in enumerate(prepared) if not p.greedy and p.request.seed is not None)

        results: list[Generation | None] = [None] * len(prepared)
        with self._lock, self._weights(adapter_id):
            for group in groups:
                batch = [prepared[i] for i in group]
                clock = _FirstTokenClock()
                seed = batch[0].request.seed if len(batch) == 1 and not batch[0].greedy else None
                rows = self._generate(batch, streamer=clock, seed=seed)
                elapsed = _ms(time.perf_counter() - start)
                ttft = _ms(clock.first_token_at - start) if clock.first_token_at else None
                for i, p, row in zip(group, batch, rows, strict=True):
                    results[i] = self._generation(p, self._outcome(p, row), adapter_id, elapsed, ttft)
        return [r for r in results if r is not None]

    def stream(self, request: ChatCompletionRequest, adapter_id: str | None = None) -> CompletionStream:
        """Answer one request as chunks while it is generated (in a thread of its own).

        The request is checked before this returns (raising as :meth:`complete` does); errors
        during generation are raised from the iteration. The chunks' content joins into the text
        :meth:`complete` gives.
        """
        start = time.perf_counter()
        prepared = self.prepare(request)
        if adapter_id is not None and adapter_id not in self.loaded_adapters():
            self._fetch(adapter_id)
        streamer = _TimedTextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with self._lock, self._weights(adapter_id):
                    result["rows"] = self._generate([prepared], streamer=streamer, cancel=cancel, seed=request.seed)
                result["done_at"] = time.perf_counter()
            except BaseException as exc:  # raised again in the consumer's thread
                result["error"] = exc
                streamer.end()  # wakes the consumer; a second end() after generate's own is harmless

        # Started now, not on the first read: generation overlaps whatever the caller does first.
        worker = threading.Thread(target=run, name="kaizen-generate", daemon=True)
        worker.start()
        chunks = self._chunks(prepared, adapter_id, start, streamer, cancel, worker, result)
        return CompletionStream(chunks, cancel)

    def _chunks(
        self,
        prepared: PreparedRequest,
        adapter_id: str | None,
        start: float,
        streamer: _TimedTextStreamer,
        cancel: threading.Event,
        worker: threading.Thread,
        result: dict[str, Any],
    ) -> Generator[ChatCompletionChunk, None, Generation]:
        request = prepared.request
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: ChoiceDelta, finish: FinishReason | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=request.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            )

        stops = request.stop_sequences
        sent = ""
        try:
            yield chunk(ChoiceDelta(role="assistant", content=""))
            received = ""
            stopped = False
            for piece in streamer:
                if stopped:
                    continue  # drained until the generation notices the cancel
                received += piece
                visible = received
                if stops:
                    cut = _first_stop(received, stops)
                    if cut is not None:
                        visible, stopped = received[:cut], True
                        cancel.set()
                    else:
                        # Hold back a tail that may be the start of a stop string.
                        visible = received[: len(received) - _stop_prefix_length(received, stops)]
                if len(visible) > len(sent):
                    yield chunk(ChoiceDelta(content=visible[len(sent) :]))
                    sent = visible
            worker.join()
            if "error" in result:
                raise result["error"]
            outcome = self._outcome(prepared, result["rows"][0])
            # The final text is decoded from all the tokens, as complete() does; what was sent is
            # its prefix, and whatever was held back follows now.
            if len(outcome.text) > len(sent) and outcome.text.startswith(sent):
                yield chunk(ChoiceDelta(content=outcome.text[len(sent) :]))
            yield chunk(ChoiceDelta(), outcome.finish_reason)
            elapsed = _ms(result["done_at"] - start)  # not counting how slowly the chunks were read
            ttft = _ms(streamer.first_token_at - start) if streamer.first_token_at else None
            generation = self._generation(
                prepared,
                outcome,
                adapter_id,
                elapsed,
                ttft,
                completion_id=completion_id,
                created=created,
                streaming=True,
            )
            if request.stream_options is not None and request.stream_options.include_usage:
                yield ChatCompletionChunk(
                    id=completion_id,
                    created=created,
                    model=request.model,
                    choices=[],
                    usage=generation.completion.usage,
                )
            return generation
        finally:
            cancel.set()  # a consumer that stops reading stops the generation

    # --- generation ----------------------------------------------------------------------------

    def _generate(
        self,
        batch: list[PreparedRequest],
        *,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
        seed: int | None = None,
    ) -> list[list[int]]:
        """Run ``generate`` on the batch (model lock held); each row's generated token ids."""
        width = max(len(p.prompt_ids) for p in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):  # left padding: every row's next token is at the same column
            input_ids[row, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
            attention_mask[row, width - len(p.prompt_ids) :] = 1

        requests = [p.request for p in batch]
        processors = LogitsProcessorList()
        if any(r.presence_penalty or r.frequency_penalty for r in requests):
            processors.append(_Penalties(requests, width, self.device))
        sample = not all(p.greedy for p in batch)
        if sample:
            processors.append(_RowTemperatureTopP(requests, self.device))
        criteria = StoppingCriteriaList([_RowStop(batch, width, self.tokenizer, cancel)])
        config = GenerationConfig(
            max_new_tokens=max(p.max_new_tokens for p in batch),
            do_sample=sample,
            # Sampling is all in _RowTemperatureTopP, row by row; generate's own warpers stay off.
            **({"temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {}),
            eos_token_id=self._eos_ids,
            pad_token_id=self._pad_id,
        )
        # A seed is applied to a copy of the random state, so it leaves no trace on later calls.
        cuda = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda) if seed is not None else nullcontext(), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=criteria,
                streamer=streamer,
            )
        return output[:, width:].tolist()

    def _outcome(self, prepared: PreparedRequest, row: list[int]) -> _Outcome:
        """A row's text, finish reason and token count, from its generated ids."""
        ids = row[: prepared.max_new_tokens]
        end = next((i for i, token in enumerate(ids) if token in self._eos_ids), None)
        if end is not None:
            kept, count, reason = ids[:end], end + 1, "stop"
        else:
            # Shorter than the limit without an end token: stopped by a stop string (below).
            kept, count = ids, len(ids)
            reason = "length" if len(ids) >= prepared.max_new_tokens else "stop"
        text = self._decode(kept)
        cut = _first_stop(text, prepared.request.stop_sequences)
        if cut is not None:
            stops = prepared.request.stop_sequences
            # The tokens up to the one that completed the stop string (the rest, if any, are
            # padding after the row stopped): the fewest whose text holds it.
            low, high = 1, len(kept)
            while low < high:
                mid = (low + high) // 2
                if _first_stop(self._decode(kept[:mid]), stops) is not None:
                    high = mid
                else:
                    low = mid + 1
            text, count, reason = text[:cut], low, "stop"
        return _Outcome(text, reason, count)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generation(
        self,
        prepared: PreparedRequest,
        outcome: _Outcome,
        adapter_id: str | None,
        elapsed_ms: float,
        ttft_ms: float | None,
        *,
        completion_id: str | None = None,
        created: int | None = None,
        streaming: bool = False,
    ) -> Generation:
        prompt_tokens = len(prepared.prompt_ids)
        completion = ChatCompletion(
            id=completion_id or _completion_id(),
            created=created if created is not None else int(time.time()),
            model=prepared.request.model,
            choices=[
                Choice(
                    index=0, message=ChatCompletionMessage(content=outcome.text), finish_reason=outcome.finish_reason
                )
            ],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                total_tokens=prompt_tokens + outcome.completion_tokens,
            ),
        )
        return Generation(
            completion=completion,
            generation_time_ms=elapsed_ms,
            ttft_ms=ttft_ms,
            adapter_id=adapter_id,
            base_model=self.base_model,
            max_tokens=prepared.max_new_tokens,
            prompt=prepared.prompt,
            streaming=streaming,
        )

    def _end_of_turn_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        ids.append(self.tokenizer.eos_token_id)
        for token in END_OF_TURN_TOKENS:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != self.tokenizer.unk_token_id:
                ids.append(token_id)
        unique = list(dict.fromkeys(i for i in ids if i is not None))
        if not unique:
            raise ValueError(f"{self.base_model!r} has no end-of-sequence token to stop generation at")
        return unique


# --- generate's plug-ins -------------------------------------------------------------------------


class _Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, per row, on the tokens generated so far:
    ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``."""

    def __init__(self, requests: list[ChatCompletionRequest], prompt_width: int, device: torch.device) -> None:
        self.prompt_width = prompt_width
        self.presence = torch.tensor([[r.presence_penalty] for r in requests], device=device)
        self.frequency = torch.tensor([[r.frequency_penalty] for r in requests], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


_TOP_P_CANDIDATES = 1024


class _RowTemperatureTopP(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with each row's own values; a row with
    temperature 0 keeps only its most likely token, so sampling it is greedy."""

    def __init__(self, requests: list[ChatCompletionRequest], device: torch.device) -> None:
        self.greedy = torch.tensor([r.temperature == 0 for r in requests], device=device)
        self.temperature = torch.tensor([[r.temperature or 1.0] for r in requests], device=device)
        self.top_p = torch.tensor([[r.top_p if r.temperature > 0 else 1.0] for r in requests], device=device)
        self.any_greedy = any(r.temperature == 0 for r in requests)
        # Sorting the whole vocabulary costs more than the tiny model's forward pass: only when needed.
        self.any_top_p = any(r.top_p < 1 and r.temperature > 0 for r in requests)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.any_greedy:
            best = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(dim=-1, keepdim=True), True)
            greedy_drop = self.greedy[:, None] & ~best
        scores = scores / self.temperature.to(scores.dtype)
        if self.any_top_p:
            probs = scores.softmax(dim=-1)
            # The smallest probability a row keeps, found among the likeliest tokens: top_p's mass
            # is usually within the first few hundred, and sorting all 150k costs tens of ms.
            ranked = probs.topk(min(_TOP_P_CANDIDATES, probs.shape[-1]), dim=-1).values
            if bool(((ranked.sum(dim=-1, keepdim=True) < self.top_p) & (self.top_p < 1)).any()):
                ranked = probs.sort(dim=-1, descending=True).values
            kept = ((ranked.cumsum(dim=-1) - ranked) < self.top_p).sum(dim=-1, keepdim=True).clamp(min=1)
            smallest = ranked.gather(1, kept - 1)
            drop = (probs < smallest) & (self.top_p < 1)  # rounding must not cut the tail of a top_p=1 row
            scores = scores.masked_fill(drop, float("-inf"))
        if self.any_greedy:
            scores = scores.masked_fill(greedy_drop, float("-inf"))
        return scores


class _RowStop(StoppingCriteria):
    """Ends each row at its own ``max_tokens`` or stop strings, and every row when cancelled."""

    def __init__(
        self, batch: list[PreparedRequest], prompt_width: int, tokenizer: Any, cancel: threading.Event | None
    ) -> None:
        self.prompt_width = prompt_width
        self.max_new = [p.max_new_tokens for p in batch]
        self.stops = [p.request.stop_sequences for p in batch]
        # A stop string of n characters spans at most 4n tokens (one per UTF-8 byte), so
        # decoding that many of the last tokens is enough to see it when it completes.
        self.windows = [4 * max(map(len, s)) + 1 if s else 0 for s in self.stops]
        self.tokenizer = tokenizer
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = [generated >= limit for limit in self.max_new]
        for row, stops in enumerate(self.stops):
            if stops and not done[row]:
                tail = input_ids[row, -min(self.windows[row], generated) :].tolist()
                done[row] = _first_stop(self.tokenizer.decode(tail, skip_special_tokens=True), stops) is not None
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _FirstTokenClock(BaseStreamer):
    """Notes when the first generated token arrives (``generate`` puts the prompt first)."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _TimedTextStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that also notes when the first generated token arrives."""

    first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().put(value)


# --- recording ----------------------------------------------------------------------------------


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
        "input": {"raw": (users or request.messages)[-1].text(), "processed": generation.prompt},
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


# --- helpers ---------------------------------------------------------------------------------------


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The longest end of ``text`` that a stop string begins with (it may complete later)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
