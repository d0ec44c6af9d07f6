"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` (plain and server-sent events) and
``GET /v1/models``, mounted on the collector's ingress.

``model`` may name the base model, an adapter id or an alias (``champion``, ``challenger``); it is
routed at each request (:class:`app.deployment.routing.Router`: a request for ``champion`` may go
to a canary's challenger), so moving an alias takes effect at once, and the interaction recorded
says which adapter and which arm answered. A request that fails on the server's side is counted
against its adapter and arm (``record_failure``), which is how a canary sees a challenger fail. The
generation runs behind a :class:`GenerationBackend`: the Generator deployment's handle under Serve
(:class:`HandleBackend`), or a :class:`GeneratorService` in this process (:class:`LocalBackend`,
tests and ``uvicorn``). Each completion comes back with its interaction event, which is recorded
through the collector's own ingestion after the reply has gone out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from app.deployment.routing import Route
from app.generation.protocol import ChatCompletion, ChatCompletionRequest, GenerationRequestError, parse_request
from app.generation.recording import interaction_event
from app.serve.contract import AUTH, OpenAIErrorBody, errors, json_body
from app.serve.errors import json_problem
from app.serve.headers import RECORD_HEADER, SESSION_HEADER

if TYPE_CHECKING:
    from app.generation.service import GeneratorService

__all__ = ["GenerationBackend", "HandleBackend", "LocalBackend", "add_openai_routes", "generate_items"]

log = logging.getLogger("kaizen.generator")


class GenerationBackend(Protocol):
    """Where completions are generated. Each item is a dict: ``{"completion": ...}`` and
    ``{"event": ...}`` for a whole answer; ``{"chunk": ...}`` items then ``{"event": ...}`` for a
    stream; ``{"error": {...}, "status": int}`` first and alone when the request cannot be served."""

    async def complete(self, payload: dict[str, Any], adapter_id: str | None, session: str) -> dict[str, Any]: ...

    def stream(
        self, payload: dict[str, Any], adapter_id: str | None, session: str
    ) -> AsyncIterator[dict[str, Any]]: ...

    async def loaded_adapters(self) -> list[str]: ...


def _error_item(exc: GenerationRequestError) -> dict[str, Any]:
    return {"error": {**exc.to_openai()["error"], "field": exc.field, "reason": exc.reason}, "status": exc.status_code}


def generate_items(
    service: GeneratorService, payload: dict[str, Any], adapter_id: str | None, session: str, stream: bool
) -> Any:
    """The items of one request, computed in the calling thread (see :class:`GenerationBackend`)."""
    try:
        request = parse_request(payload)
        if not stream:
            generation = service.complete(request, adapter_id)
            yield {
                "completion": generation.completion.model_dump(mode="json", exclude_none=True),
                "event": interaction_event(request, generation, session_id=session),
            }
            return
        chunks = service.stream(request, adapter_id)
    except GenerationRequestError as exc:
        yield _error_item(exc)
        return
    try:
        for chunk in chunks:
            yield {"chunk": chunk.model_dump(mode="json", exclude_none=True)}
    finally:
        chunks.close()
    if chunks.generation is not None:
        yield {"event": interaction_event(request, chunks.generation, session_id=session)}


async def _iterate_in_thread(make: Callable[[], Any]) -> AsyncIterator[dict[str, Any]]:
    """Drive a blocking generator in a thread, yielding its items to the event loop."""
    items: queue.Queue[Any] = queue.Queue(maxsize=64)
    done = object()
    cancelled = threading.Event()

    def run() -> None:
        gen = make()
        try:
            for item in gen:
                if cancelled.is_set():
                    break
                items.put(item)
        except Exception as exc:  # surfaced to the reader
            items.put(exc)
        finally:
            gen.close()
            items.put(done)

    threading.Thread(target=run, name="kaizen-generate", daemon=True).start()
    try:
        while True:
            item = await asyncio.to_thread(items.get)
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancelled.set()


class LocalBackend:
    """A :class:`GeneratorService` in this process; generation runs in worker threads."""

    def __init__(self, service: GeneratorService):
        self.service = service

    async def complete(self, payload: dict[str, Any], adapter_id: str | None, session: str) -> dict[str, Any]:
        items = await asyncio.to_thread(lambda: list(generate_items(self.service, payload, adapter_id, session, False)))
        merged: dict[str, Any] = {}
        for item in items:
            merged.update(item)
        return merged

    def stream(self, payload: dict[str, Any], adapter_id: str | None, session: str) -> AsyncIterator[dict[str, Any]]:
        return _iterate_in_thread(lambda: generate_items(self.service, payload, adapter_id, session, True))

    async def loaded_adapters(self) -> list[str]:
        return self.service.loaded_adapters()


class HandleBackend:
    """The Generator deployment, through its handle: requests for an adapter go to a replica that
    has it loaded (Serve's model multiplexing)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def _for(self, adapter_id: str | None, stream: bool = False) -> Any:
        return self.handle.options(multiplexed_model_id=adapter_id or "", stream=stream)

    async def complete(self, payload: dict[str, Any], adapter_id: str | None, session: str) -> dict[str, Any]:
        return await self._for(adapter_id).complete.remote(payload, session)

    async def stream(
        self, payload: dict[str, Any], adapter_id: str | None, session: str
    ) -> AsyncIterator[dict[str, Any]]:
        async for item in self._for(adapter_id, stream=True).stream.remote(payload, session):
            yield item

    async def loaded_adapters(self) -> list[str]:
        return await self.handle.loaded_adapters.remote()


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``: the base model, an adapter, or an alias."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time it was registered (0 for the base model and aliases).")
    owned_by: str
    root: str = Field(description="The base model; for an alias, the adapter it points at.")
    parent: str | None = Field(None, description="The base model an adapter or alias is trained on.")
    status: str | None = Field(None, description="An adapter's registry status.")
    loaded: bool | None = Field(None, description="Whether an adapter is loaded in a generator replica now.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _error_response(status: int, field: str | None, reason: str, code: str | None = None) -> JSONResponse:
    # Both conventions: OpenAI's clients read message/type/param/code, Kaizen's read field/reason.
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": f"{field}: {reason}" if field else reason,
                "type": "invalid_request_error",
                "param": field,
                "code": code,
                "field": field,
                "reason": reason,
            }
        },
    )


def add_openai_routes(
    api: FastAPI,
    backend: GenerationBackend,
    *,
    base_model: str,
    route: Callable[[str, str], Route | None],
    list_models: Callable[[], tuple[list[dict[str, Any]], dict[str, str]]],
    record: Callable[[dict[str, Any]], Any] | None,
    record_failure: Callable[[str, Route, int, str], None] | None,
    dependencies: list[Any],
) -> None:
    """Mount the routes on ``api``.

    Args:
        route: a ``model`` name and a session to the :class:`Route` that answers, None when the
            name is unknown.
        list_models: the registry's adapters (``id``, ``created_at``, ``status``) and aliases.
        record: called with each completion's interaction event, after the reply (fire and forget).
        record_failure: called (in a worker thread, after the reply) with the model name, the route,
            the status and the reason of a request that failed on the server's side.
    """
    background: set[asyncio.Task[Any]] = set()

    def later(what: str, call: Callable[[], Any]) -> None:
        async def run() -> None:
            try:
                result = call()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # the reply has gone; only the learning loop or the canary misses it
                log.exception("%s failed", what)

        task = asyncio.create_task(run())
        background.add(task)
        task.add_done_callback(background.discard)

    def record_later(event: dict[str, Any] | None, where: Route) -> None:
        if record is None or event is None:
            return
        if where.serving_arm is not None:
            metadata = event["body"].setdefault("metadata", {})
            metadata["serving_arm"] = where.serving_arm
            metadata["deployment_id"] = where.deployment_id
        later(f"recording completion {event.get('id')}", lambda: record(event))

    def failed(model: str, where: Route, status: int, reason: str) -> None:
        if record_failure is not None and status >= 500:
            later("recording a failed request", lambda: asyncio.to_thread(record_failure, model, where, status, reason))

    async def route_of(model: Any, session: str) -> Route:
        if not isinstance(model, str) or not model:
            raise GenerationRequestError("model", "a model name is required", status_code=422)
        where = await asyncio.to_thread(route, model, session)
        if where is None:
            raise GenerationRequestError(
                "model",
                f"no model {model!r}: not the base model {base_model!r}, an adapter id, or an alias",
                status_code=404,
                code="model_not_found",
            )
        return where

    @api.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completion",
        dependencies=dependencies,
        response_model=ChatCompletion,
        responses={
            200: {
                "description": "The completion; with `stream: true`, server-sent `chat.completion.chunk` events "
                "ending with `data: [DONE]`.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **errors(*AUTH, 413),
            **errors(400, 404, 422, 503, model=OpenAIErrorBody),
        },
        openapi_extra=json_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Any:
        """OpenAI's chat-completions API; ``stream: true`` answers with server-sent events. The
        ``X-Kaizen-Session`` header (else ``user``) groups the recorded interactions by session;
        ``X-Kaizen-Record: false`` answers without recording the completion."""
        try:
            payload = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error_response(400, "body", json_problem(exc))
        if not isinstance(payload, dict):
            return _error_response(422, "body", "expected a JSON object")
        session = request.headers.get(SESSION_HEADER) or str(payload.get("user") or "openai-api")
        recorded = request.headers.get(RECORD_HEADER, "true").strip().lower() not in ("false", "0", "no")
        model = payload.get("model")
        try:
            where = await route_of(model, session)
        except GenerationRequestError as exc:
            return _error_response(exc.status_code, exc.field, exc.reason, exc.code)
        if not payload.get("stream"):
            try:
                result = await backend.complete(payload, where.adapter_id, session)
            except Exception:
                log.exception("completion for %r failed", model)
                failed(model, where, 503, "the generator did not answer")
                return _error_response(503, "model", "the generator could not answer; retry", "unavailable")
            if "error" in result:
                failed(model, where, result["status"], str(result["error"].get("reason", "")))
                return JSONResponse(status_code=result["status"], content={"error": result["error"]})
            if recorded:
                record_later(result.get("event"), where)
            return JSONResponse(content=result["completion"])
        items = backend.stream(payload, where.adapter_id, session).__aiter__()
        try:
            first = await items.__anext__()
        except Exception:
            log.exception("stream for %r failed", model)
            failed(model, where, 503, "the generator did not answer")
            return _error_response(503, "model", "the generator could not answer; retry", "unavailable")
        if "error" in first:
            failed(model, where, first["status"], str(first["error"].get("reason", "")))
            return JSONResponse(status_code=first["status"], content={"error": first["error"]})

        async def sse() -> AsyncIterator[str]:
            item: dict[str, Any] | None = first
            while item is not None:
                if "chunk" in item:
                    yield f"data: {json.dumps(item['chunk'], separators=(',', ':'))}\n\n"
                elif "event" in item and recorded:
                    record_later(item["event"], where)
                item = await anext(items, None)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.get(
        "/v1/models",
        summary="The base model, its adapters and aliases",
        dependencies=dependencies,
        response_model=ModelList,
        response_model_exclude_none=True,
        responses=errors(*AUTH, 503),
    )
    async def models() -> dict[str, Any]:
        """OpenAI's model list: the base model, every registered adapter, and each alias (with
        the adapter it points at in ``root``)."""
        adapters, aliases = await asyncio.to_thread(list_models)
        loaded = set(await backend.loaded_adapters())
        data = [{"id": base_model, "object": "model", "created": 0, "owned_by": "kaizen", "root": base_model}]
        for row in adapters:
            data.append(
                {
                    "id": row["id"],
                    "object": "model",
                    "created": _epoch(row.get("created_at")),
                    "owned_by": "kaizen",
                    "root": base_model,
                    "parent": base_model,
                    "status": row.get("status"),
                    "loaded": row["id"] in loaded,
                }
            )
        for alias, adapter_id in aliases.items():
            data.append(
                {
                    "id": alias,
                    "object": "model",
                    "created": 0,
                    "owned_by": "kaizen",
                    "root": adapter_id,
                    "parent": base_model,
                }
            )
        return {"object": "list", "data": data}


def _epoch(value: Any) -> int:
    from datetime import datetime

    if isinstance(value, str):
        return int(datetime.fromisoformat(value).timestamp())
    if isinstance(value, datetime):
        return int(value.timestamp())
    return 0
