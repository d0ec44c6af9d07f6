"""The Generator's core: OpenAI chat completions from a base model and its LoRA adapters.

:class:`GeneratorService` loads one base model into a
:class:`~app.generation.engine.GenerationEngine` and keeps up to ``max_adapters`` LoRA adapters
from the :class:`~app.model.adapters.AdapterStore` attached to it
(:class:`~app.generation.adapter_cache.AdapterCache`, least recently used evicted). It answers
OpenAI chat-completion requests (:class:`~app.generation.protocol.ChatCompletionRequest`) with
the adapter the caller names, or the plain base model for ``None``: whole (``complete``), several
in one ``generate`` call (``complete_batch``), or as chunks while they are generated
(``stream``). Each answer comes as a :class:`~app.generation.protocol.Generation`: the OpenAI
response plus the timings and counts the recorder needs, which
:func:`~app.generation.recording.interaction_event` turns into the Kaizen event that records it.
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

import threading
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from app.generation.adapter_cache import AdapterCache
from app.generation.engine import Continuation, GenerationEngine, Prompt, Sampling
from app.generation.processors import FirstTokenClock, TimedTextStreamer, first_stop, stop_prefix_length
from app.generation.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionStream,
    FinishReason,
    Generation,
    GenerationRequestError,
    Usage,
)
from app.model.adapters import AdapterManifest, AdapterStore

__all__ = ["DEFAULT_MAX_TOKENS", "GeneratorService", "PreparedRequest"]

DEFAULT_MAX_TOKENS = 2048
"""Completion tokens allowed when a request sets no ``max_tokens`` (and the context has room)."""


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

    def engine_prompt(self) -> Prompt:
        """The request as the engine takes it: ids, limit, stop strings and sampling."""
        r = self.request
        sampling = Sampling(r.temperature, r.top_p, r.presence_penalty, r.frequency_penalty)
        return Prompt(self.prompt_ids, self.max_new_tokens, tuple(r.stop_sequences), sampling)


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
        self.engine = GenerationEngine.load(base_model, root=root, device=device)
        config_context = getattr(self.engine.model.config, "max_position_embeddings", None)
        self.max_context_tokens = max_context_tokens or config_context
        if not self.max_context_tokens:
            raise ValueError(f"{base_model!r} has no max_position_embeddings: pass max_context_tokens")
        self.adapters = AdapterCache(self.engine, self.adapter_store, base_model=base_model, capacity=max_adapters)

    def __repr__(self) -> str:
        return f"GeneratorService({self.base_model!r}, adapters={self.loaded_adapters()})"

    @property
    def model(self) -> Any:
        """The model answering: the base model, or a ``PeftModel`` while adapters are attached."""
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def device(self) -> Any:
        return self.engine.device

    # --- adapters ------------------------------------------------------------------------------

    def loaded_adapters(self) -> list[str]:
        """Ids of the attached adapters, least recently used first."""
        return self.adapters.loaded()

    def load_adapter(self, adapter_id: str) -> AdapterManifest:
        """Attach a stored adapter (a no-op apart from marking it used if it is attached).

        Safe from any thread: the adapter is fetched first, then attached between generations,
        evicting the least recently used one if ``max_adapters`` are attached.

        Raises:
            UnknownModelError: no such adapter in the store.
            GenerationRequestError: the adapter was trained on another base model.
        """
        return self.adapters.load(adapter_id)

    def unload_adapter(self, adapter_id: str) -> bool:
        """Detach an adapter and free its memory; False if it was not attached."""
        return self.adapters.unload(adapter_id)

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
            prompt, prompt_ids = self.engine.chat_prompt(messages, **kwargs)
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
            self.adapters.fetch(adapter_id)
        groups: list[list[int]] = []
        shared = [i for i, p in enumerate(prepared) if p.greedy or p.request.seed is None]
        if shared:
            groups.append(shared)
        groups.extend([i] for i, p in enumerate(prepared) if not p.greedy and p.request.seed is not None)

        results: list[Generation | None] = [None] * len(prepared)
        with self.adapters.using(adapter_id):
            for group in groups:
                batch = [prepared[i] for i in group]
                clock = FirstTokenClock()
                seed = batch[0].request.seed if len(batch) == 1 and not batch[0].greedy else None
                rows = self.engine.generate([p.engine_prompt() for p in batch], streamer=clock, seed=seed)
                elapsed = _ms(time.perf_counter() - start)
                ttft = _ms(clock.first_token_at - start) if clock.first_token_at else None
                for i, p, row in zip(group, batch, rows, strict=True):
                    results[i] = self._generation(p, row, adapter_id, elapsed, ttft)
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
            self.adapters.fetch(adapter_id)
        streamer = TimedTextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with self.adapters.using(adapter_id):
                    (result["continuation"],) = self.engine.generate(
                        [prepared.engine_prompt()], streamer=streamer, cancel=cancel, seed=request.seed
                    )
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
        streamer: TimedTextStreamer,
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
                    cut = first_stop(received, stops)
                    if cut is not None:
                        visible, stopped = received[:cut], True
                        cancel.set()
                    else:
                        # Hold back a tail that may be the start of a stop string.
                        visible = received[: len(received) - stop_prefix_length(received, stops)]
                if len(visible) > len(sent):
                    yield chunk(ChoiceDelta(content=visible[len(sent) :]))
                    sent = visible
            worker.join()
            if "error" in result:
                raise result["error"]
            outcome: Continuation = result["continuation"]
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

    def _generation(
        self,
        prepared: PreparedRequest,
        outcome: Continuation,
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


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _ms(seconds: float) -> float:
    return seconds * 1000.0
