"""The HTTP contract's shared parts: the error body every route answers with, the statuses a route
documents, the request bodies of the routes that read their JSON themselves, and response models.

What ``/openapi.json`` publishes is what a client generator (the TypeScript agent's) works from,
so every route names its request and response models and every status it can answer; the
schemathesis run in ``tests/app/serve/test_contract.py`` holds the app to it.

Routes that ingest (``/v1/events`` and the single-event routes, ``/v1/chat/completions``) read
their body themselves: they bound its size before parsing, and a bad event is answered in the
batch's results instead of failing the request. :func:`json_body` publishes their body's model
all the same, and :func:`publish` puts the models it names into the document's components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from app.schemas import EventResult, Feedback, Id, Interaction, IsoDatetime, Outcome, ToolUsage, json_int

__all__ = [
    "AUTH",
    "BODY",
    "STATUS_TEXT",
    "ErrorBody",
    "ErrorDetail",
    "EventBatch",
    "EventBatchResult",
    "OpenAIErrorBody",
    "errors",
    "json_body",
    "publish",
]

STATUS_TEXT: dict[int, str] = {
    400: "The body is not valid JSON.",
    401: "No API key, or an unknown one (`X-API-Key` or `Authorization: Bearer`).",
    403: "The key's role may not do this.",
    404: "Nothing by that id or name.",
    409: "The request conflicts with the current state; read it again and retry.",
    413: "The body, or its number of events, is over the limit (`collection.max_body_bytes`, "
    "`collection.max_events_per_batch`).",
    422: "A field is missing, of the wrong type or out of range; `field` names it.",
    429: "Over the key's rate limit; retry after `Retry-After` seconds.",
    503: "A dependency (the store, the scheduler, the generator) is unavailable; retry.",
}

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (`kaizen keys create`)."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key, in a header."},
}
"""How a key is sent; required once any key exists (with none, the API is open: bound to localhost)."""

AUTH = (401, 429)
"""What every route behind an API key can answer besides its own statuses."""
BODY = (400, 413, 422)
"""What every route with a JSON body can answer besides its own statuses."""


class ErrorDetail(BaseModel):
    field: str | None = Field(description="The request field at fault (dotted path), or null.")
    reason: str = Field(description="Why, for a person; never the server's internals.")


class ErrorBody(BaseModel):
    """Every error answer of Kaizen's own routes."""

    error: ErrorDetail


class OpenAIErrorDetail(ErrorDetail):
    message: str = Field(description="`field: reason`, as OpenAI's clients read it.")
    type: str = Field(description="OpenAI's error type, e.g. `invalid_request_error`.")
    param: str | None = Field(description="The parameter at fault (OpenAI's name for `field`).")
    code: str | None = Field(description="A machine-readable code, e.g. `model_not_found`.")


class OpenAIErrorBody(BaseModel):
    """The error answers of the OpenAI-compatible routes: both OpenAI's fields and Kaizen's."""

    error: OpenAIErrorDetail


def errors(*codes: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route for these error statuses."""
    return {code: {"model": model, "description": STATUS_TEXT[code]} for code in sorted(set(codes))}


# --- request bodies of the routes that read their own JSON --------------------------------------


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Id = Field(description="Unique per event; a retried event with the same id is a duplicate, not a copy.")
    timestamp: IsoDatetime = Field(description="When it happened (ISO 8601, from the year 2000 on).")


class InteractionEvent(_Event):
    """An interaction; its event id is the interaction's id."""

    type: Literal["interaction"]
    body: Interaction


class FeedbackEvent(_Event):
    """Feedback on an interaction (``body.interaction_id`` names it)."""

    type: Literal["feedback"]
    body: Feedback


class ToolUsageEvent(_Event):
    """One tool invocation of an interaction (``body.interaction_id`` names it)."""

    type: Literal["tool_usage"]
    body: ToolUsage


class OutcomeEvent(_Event):
    """Outcome metrics of an interaction (``body.interaction_id`` names it)."""

    type: Literal["outcome"]
    body: Outcome


class EventBatch(BaseModel):
    """``POST /v1/events``: events of any type, validated one by one (a bad event is answered in
    the results and spoils nothing else)."""

    model_config = ConfigDict(extra="forbid")
    events: list[
        Annotated[InteractionEvent | FeedbackEvent | ToolUsageEvent | OutcomeEvent, Field(discriminator="type")]
    ] = Field(description="Up to `collection.max_events_per_batch` events.")


class _Submitted(BaseModel):
    """What the single-event routes take besides the record: its event id and time (defaults: new,
    now)."""

    id: Id | None = Field(None, description="The event id (for an interaction, its id); retries reuse it.")
    timestamp: IsoDatetime | None = Field(None, description="When it happened (ISO 8601); default now.")


class InteractionSubmission(Interaction, _Submitted):
    """``POST /v1/interactions``: an interaction, optionally with its id and time."""


class FeedbackSubmission(Feedback, _Submitted):
    """``POST /v1/feedback``."""

    interaction_id: Id = Field(description="The interaction it is about.")


class ToolUsageSubmission(ToolUsage, _Submitted):
    """``POST /v1/tool-usage``."""

    interaction_id: Id = Field(description="The interaction it belongs to.")


class OutcomeSubmission(Outcome, _Submitted):
    """``POST /v1/outcomes``."""

    interaction_id: Id = Field(description="The interaction it measures.")


_BODIES: dict[str, type[BaseModel]] = {}


def json_body(model: type[BaseModel], description: str | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself: the body's schema is
    ``model``'s, put into the components by :func:`publish`."""
    _BODIES[model.__name__] = model
    body: dict[str, Any] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
    }
    if description:
        body["description"] = description
    return {"requestBody": body}


def publish(api: FastAPI) -> None:
    """Make ``api.openapi()`` carry the schemas of the bodies its routes' :func:`json_body` name
    (and of the models they use) as components, and document every error as :class:`ErrorBody`."""
    build: Callable[[], dict[str, Any]] = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        named = {ref.rsplit("/", 1)[-1] for ref in _body_refs(document)}
        for model in (m for name, m in _BODIES.items() if name in named):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in schema.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas[model.__name__] = schema
        # FastAPI documents its own 422 body ({detail: [...]}) where a route has parameters; every
        # error here is answered as ErrorBody (the handlers in app/serve/api.py).
        for path in document.get("paths", {}).values():
            for operation in path.values():
                answer = operation.get("responses", {}).get("422") if isinstance(operation, dict) else None
                if answer is not None and "HTTPValidationError" in str(answer):
                    operation["responses"]["422"] = {
                        "description": STATUS_TEXT[422],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                    }
        # Every route that answers 401 takes a key, either way it may be sent.
        document["components"]["securitySchemes"] = SECURITY_SCHEMES
        for path in document.get("paths", {}).values():
            for operation in path.values():
                if isinstance(operation, dict) and "401" in operation.get("responses", {}):
                    operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
        for name, definition in schemas["ErrorBody"].pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        api.openapi_schema = document
        return document

    api.openapi = openapi  # type: ignore[method-assign]


# --- responses ------------------------------------------------------------------------------------


class EventBatchResult(BaseModel):
    """The answer to a batch: one result per event, in order, and the count per status."""

    results: list[EventResult]
    counts: dict[str, int] = Field(description="Events per status: accepted, duplicate, rejected, ...")


class Health(BaseModel):
    status: Literal["ok"]
    uptime_s: float


class Readiness(BaseModel):
    status: Literal["ready", "store unavailable"]
    engine: str = Field(description="The store's engine: sqlite or postgres.")


def _body_refs(document: dict[str, Any]) -> list[str]:
    refs = []
    for path in document.get("paths", {}).values():
        for operation in path.values():
            if isinstance(operation, dict):
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    ref = media.get("schema", {}).get("$ref")
                    if ref:
                        refs.append(ref)
    return refs


class InteractionRecord(BaseModel):
    """A stored interaction as the read routes answer it (text as the privacy filter left it, ids
    hashed); columns without a value are null."""

    model_config = ConfigDict(extra="allow")
    id: str
    session_hash: str | None = Field(None, description="The session id's keyed hash.")
    user_hash: str | None = Field(None, description="The user id's keyed hash (none with data_minimization).")
    timestamp: str | None = Field(None, description="When it happened (ISO 8601).")
    received_at: str | None = None
    sequence_number: int | None = None
    input_raw: str | None = None
    input_processed: str | None = None
    input_type: str | None = None
    intent: str | None = None
    complexity: str | None = None
    output_content: str | None = None
    output_format: str | None = None
    generation_time_ms: float | None = None
    token_count: int | None = None
    streaming: bool | None = None
    model_version: str | None = Field(None, description="The model or adapter that answered.")
    temperature: float | None = None
    max_tokens: int | None = None
    stop_sequences: list[str] | None = None
    system_prompt: str | None = None
    redaction_count: int | None = None
    quality_score: float | None = None
    quality_confidence: float | None = None
    quality_status: str | None = Field(None, description="pending, scored or no_evidence.")
    serving_arm: str | None = None
    deployment_id: str | None = None


class InteractionDetail(InteractionRecord):
    """``GET /v1/interactions/{id}``: the interaction with what is attached to it."""

    context: dict[str, Any] | None = Field(None, description="The project context snapshot.")
    tool_usage: list[dict[str, Any]] = Field(default_factory=list, description="Tool invocations, in order.")
    feedback: list[dict[str, Any]] = Field(default_factory=list, description="Feedback events, oldest first.")
    outcome: dict[str, Any] | None = Field(None, description="The outcome fields, later reports winning.")


class InteractionList(BaseModel):
    interactions: list[InteractionRecord]
    count: int


class ReviewQueue(InteractionList):
    max_confidence: float = Field(description="The confidence bound the queue was read with.")


class Stats(BaseModel):
    """``GET /v1/stats``."""

    model_config = ConfigDict(extra="allow")
    engine: str
    schema_version: int
    events: int
    interactions: int
    feedback: int
    tool_usage: int
    outcomes: int
    quality_status: dict[str, int] = Field(description="Interactions per quality status.")
    per_day: list[dict[str, Any]] = Field(description="`{day, interactions}`, oldest first.")
    redactions: dict[str, int] = Field(description="Redactions per kind (never the values).")


class AuditLog(BaseModel):
    entries: list[dict[str, Any]] = Field(description="`{id, timestamp, actor, action, target, details}`, newest first")
    count: int


# --- the routes' own bodies and answers ------------------------------------------------------------


class AssessRequest(BaseModel):
    """``POST /v1/quality/assess``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(max_length=1_000_000)
    response: str = Field(
        max_length=1_000_000, pattern=r"\S", description="The answer to score: not empty, not only spaces."
    )
    feedback: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    generation_time_ms: float | None = Field(None, ge=0)
    context: dict[str, Any] | None = None
    execute: bool = Field(True, description="Run the examples and tests found, in the sandbox.")


class StreamRequest(BaseModel):
    """``POST /v1/quality/stream``: a response as the chunks it was generated in."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(max_length=1_000_000)
    chunks: list[str] = Field(max_length=100_000)
    context: dict[str, Any] | None = None


class StreamStart(BaseModel):
    """The first message on ``/v1/quality/stream`` (WebSocket)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(max_length=1_000_000)
    context: dict[str, Any] | None = None


class ReviewRequest(BaseModel):
    """``POST /v1/review/{id}``: a person's rating of an interaction."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rating: json_int(1, 5) = Field(description="1 (useless) to 5 (exemplary).")
    rater: str = Field("operator", min_length=1, max_length=200, description="Who rated it.")
    comment: str | None = Field(None, max_length=10_000)
    dimensions: (
        dict[
            Literal["user_satisfaction", "functional_correctness", "code_quality", "context_relevance", "efficiency"],
            json_int(1, 5),
        ]
        | None
    ) = Field(None, description="Optional 1-5 ratings per dimension.")


class Erasure(BaseModel):
    target: str = Field(description="`session:` or `user:` and the id's keyed hash (the id itself is kept nowhere).")
    interactions: int = Field(description="Interactions erased.")
    deleted: dict[str, int] = Field(description="Rows deleted per table.")
    stale_datasets: dict[str, int] = Field(description="Datasets that held some of them: their erased rows.")


class StreamWindows(BaseModel):
    windows: list[dict[str, Any]] = Field(description="Each window's provisional score; the last is final.")


class RatingCreated(BaseModel):
    id: str
    interaction_id: str
    rating: float = Field(description="The rating on the 0-1 scale calibration uses.")
