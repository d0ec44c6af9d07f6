"""The collector's HTTP API as a FastAPI app over a plain :class:`CollectorService`.

``create_api(service)`` is what the Serve deployment mounts (``app/serve/collector.py``) and what
tests run under plain uvicorn. Under Serve, writes are group-committed with ``@serve.batch``:
concurrent requests share one transaction. Either way a 2xx is sent only after the commit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.config import KaizenConfig
from app.deployment.routing import Route, Router
from app.deployment.state import DeploymentStore
from app.ingest import IngestPipeline
from app.quality.streaming import CircuitBreaker, StreamingAssessor
from app.registry import AdapterRegistry
from app.schemas import EventResult
from app.serve.deployments_api import add_deployment_routes
from app.serve.errors import public_reason
from app.serve.openai_api import GenerationBackend, add_openai_routes
from app.serve.training_api import add_training_routes
from app.store import InteractionStore, StoredEvent, open_store

__all__ = ["CollectorService", "create_api"]

log = logging.getLogger("kaizen.collector")
Role = Literal["agent", "operator"]
_SCORE_NOW_SLACK_S = 5.0  # beyond quality.assessment_timeout_ms: the call to the scorer and its queue


class CollectorService:
    """Ingestion and queries: validation and privacy (``IngestPipeline``), commit, store."""

    def __init__(
        self,
        cfg: KaizenConfig,
        store: InteractionStore | None = None,
        commit: Callable[[list[StoredEvent]], Awaitable[list[bool]]] | None = None,
        on_committed: Callable[[list[str]], Any] | None = None,
        assess: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
        generator: GenerationBackend | None = None,
        score_now: Callable[[list[str]], Awaitable[Any]] | None = None,
    ):
        self.cfg = cfg
        self.pipeline = IngestPipeline(cfg)
        self.store = store or open_store(cfg.store)
        self.started = time.time()
        self.keys: list[tuple[bytes, Role]] = []
        for entry in cfg.security.api_keys:
            key = entry.key or (os.environ.get(entry.key_env) if entry.key_env else None)
            if key:
                self.keys.append((key.encode(), entry.role))
        # Under Serve, ``commit`` is the deployment's @serve.batch method (group commit across
        # concurrent requests); without Serve each request commits on its own.
        self._commit = commit or self._commit_direct
        # The scorer's hand-off of committed interactions: fire and forget after the commit
        # (performance.async_processing), or scores awaited before the answer (score_now); nothing
        # with quality.real_time=false. Its ad-hoc assessment too; without a scorer deployment
        # (plain uvicorn) assessments run here and nothing is handed off.
        self.on_committed = on_committed
        self.score_now = score_now
        self.assess = assess or self._assess_here
        # The OpenAI-compatible routes exist when there is a generator to answer them.
        self.generator = generator
        # Streaming assessments of this process share one breaker and one embedding thread: a slow
        # embedder trips the breaker for every stream at once.
        self.stream_breaker = CircuitBreaker()
        self.stream_executor = ThreadPoolExecutor(1, thread_name_prefix="kaizen-stream")

    async def _assess_here(self, payload: dict[str, Any]) -> dict[str, Any]:
        from app.quality import Calibration, assess_text

        row = await asyncio.to_thread(self.store.active_calibration)
        calibration = Calibration.from_row(row) if row else None
        score = await asyncio.to_thread(assess_text, **payload, calibration=calibration)
        return score.model_dump(mode="json")

    def stream_assessor(self, prompt: str, context: dict[str, Any] | None) -> StreamingAssessor:
        """A streaming assessor for one response, with this process's breaker and budget."""
        q = self.cfg.quality
        return StreamingAssessor(
            prompt,
            context,
            window_chars=q.stream_window_chars,
            budget_ms=q.stream_budget_ms,
            breaker=self.stream_breaker,
            executor=self.stream_executor,
        )

    # --- auth ----------------------------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        return bool(self.keys)

    def role_of(self, presented: str | None) -> Role | None:
        if presented is None:
            return None
        for key, role in self.keys:
            if hmac.compare_digest(key, presented.encode()):
                return role
        return None

    # --- writes --------------------------------------------------------------------------------

    async def _commit_direct(self, events: list[StoredEvent]) -> list[bool]:
        # The write blocks; a worker thread keeps the event loop parsing the next requests.
        return await asyncio.to_thread(self.store.write, events)

    async def commit_group(self, batches: list[list[StoredEvent]]) -> list[list[bool]]:
        """Commit the events of several requests in one transaction (the body of the Serve
        deployment's ``@serve.batch`` method); one list of flags per request."""
        written = await self._commit_direct([ev for batch in batches for ev in batch])
        out, start = [], 0
        for batch in batches:
            out.append(written[start : start + len(batch)])
            start += len(batch)
        return out

    async def ingest(self, raw_events: Sequence[Any]) -> list[EventResult]:
        """Validate, filter and commit a batch; one result per event, in order."""
        prepared = self.pipeline.prepare(raw_events)
        written = await self._commit(prepared.to_commit) if prepared.to_commit else []
        results = prepared.finish(written)
        # New interactions, and interactions whose feedback or outcome just arrived, need a score.
        ids = list(
            dict.fromkeys(
                ev.interaction_id for ev, new in zip(prepared.to_commit, written) if new and ev.interaction_id
            )
        )
        if not ids or not self.cfg.quality.real_time:
            return results  # real_time off: they stay pending for python -m jobs.score
        try:
            if self.cfg.performance.async_processing:
                if self.on_committed is not None:
                    self.on_committed(ids)
            elif self.score_now is not None:
                # Inline: the answer waits for the scores. The scorer keeps to the budget; the slack
                # covers reaching it, and a scorer that does not answer leaves them to the sweep.
                budget_s = self.cfg.quality.assessment_timeout_ms / 1000.0
                await asyncio.wait_for(self.score_now(ids), timeout=budget_s + _SCORE_NOW_SLACK_S)
        except Exception:  # scoring is best effort here; the scorer's sweep catches up
            log.exception("handing committed interactions to the scorer failed")
        return results

    # --- reads ---------------------------------------------------------------------------------

    def hash_session(self, session_id: str) -> str:
        return self.pipeline.privacy.hash_id(session_id)


class AssessRequest(BaseModel):
    """``POST /v1/quality/assess``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=1_000_000)
    response: str = Field(max_length=1_000_000)
    feedback: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    generation_time_ms: float | None = Field(None, ge=0)
    context: dict[str, Any] | None = None
    execute: bool = Field(True, description="Run the examples and tests found, in the sandbox.")


class StreamRequest(BaseModel):
    """``POST /v1/quality/stream``: a response as the chunks it was generated in."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=1_000_000)
    chunks: list[str] = Field(max_length=100_000)
    context: dict[str, Any] | None = None


class StreamStart(BaseModel):
    """The first message on ``/v1/quality/stream`` (WebSocket)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=1_000_000)
    context: dict[str, Any] | None = None


class ReviewRequest(BaseModel):
    """``POST /v1/review/{id}``: a person's rating of an interaction."""

    model_config = ConfigDict(extra="forbid")
    rating: int = Field(ge=1, le=5, description="1 (useless) to 5 (exemplary).")
    rater: str = Field("operator", min_length=1, max_length=200, description="Who rated it.")
    comment: str | None = Field(None, max_length=10_000)
    dimensions: (
        dict[
            Literal["user_satisfaction", "functional_correctness", "code_quality", "context_relevance", "efficiency"],
            Annotated[int, Field(ge=1, le=5)],
        ]
        | None
    ) = Field(None, description="Optional 1-5 ratings per dimension.")


def _error(status: int, field: str | None, reason: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"field": field, "reason": reason}})


def _summary(results: list[EventResult]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "results": [r.model_dump(exclude_none=True) for r in results],
        "counts": counts,
    }


def create_api(service: CollectorService) -> FastAPI:
    """The FastAPI app of the collector (OpenAPI at ``/openapi.json``)."""
    cfg = service.cfg
    api = FastAPI(
        title="Kaizen",
        version="0.1.0",
        description="Collects coding-agent interactions: privacy-filtered, durable, idempotent.",
    )

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path", "[key]")]
        return _error(422, ".".join(loc) or None, err["msg"])

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            return _error(exc.status_code, exc.detail.get("field"), exc.detail.get("reason", ""))
        return _error(exc.status_code, None, str(exc.detail))

    def authorize(headers: Mapping[str, str], role: Role) -> Role:
        if not service.auth_required:
            return "operator"
        presented = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if presented is None and auth.lower().startswith("bearer "):
            presented = auth[7:].strip()
        got = service.role_of(presented)
        if got is None:
            raise HTTPException(401, {"field": "authorization", "reason": "missing or unknown API key"})
        if role == "operator" and got != "operator":
            raise HTTPException(403, {"field": "authorization", "reason": "needs the operator role"})
        return got

    def require(role: Role):
        async def check(request: Request) -> Role:
            return authorize(request.headers, role)

        return Depends(check)

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        limit = cfg.collection.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, {"field": "body", "reason": f"body of {declared} bytes exceeds {limit}"})
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, {"field": "body", "reason": f"body of {len(body)} bytes exceeds {limit}"})
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, {"field": "body", "reason": f"not valid JSON: {exc}"}) from None

    @api.post("/v1/events", summary="Record a batch of events", dependencies=[require("agent")])
    async def post_events(request: Request) -> JSONResponse:
        """Body ``{"events": [{id, type, timestamp, body}, ...]}``. Answers per event: accepted,
        duplicate, excluded, sampled_out, or rejected with the field and the reason. 200 when no
        event was rejected, 207 otherwise; every accepted event is committed before the answer."""
        data = await read_json(request)
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise HTTPException(422, {"field": "events", "reason": "expected an object with an 'events' list"})
        events = data["events"]
        if len(events) > cfg.collection.max_events_per_batch:
            raise HTTPException(
                413,
                {"field": "events", "reason": f"{len(events)} events exceed {cfg.collection.max_events_per_batch}"},
            )
        try:
            results = await service.ingest(events)
        except Exception as exc:  # the store failed: nothing was committed, the client retries
            log.exception("commit failed")
            raise HTTPException(
                503, {"field": None, "reason": f"store unavailable, retry: {type(exc).__name__}"}
            ) from None
        status = 207 if any(r.status == "rejected" for r in results) else 200
        return JSONResponse(status_code=status, content=_summary(results))

    async def post_single(request: Request, event_type: str) -> JSONResponse:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise HTTPException(422, {"field": "body", "reason": "expected a JSON object"})
        body = dict(body)
        event = {
            "id": body.pop("id", None) or uuid.uuid4().hex,
            "type": event_type,
            "timestamp": body.pop("timestamp", None) or datetime.now(UTC).isoformat(),
            "body": body,
        }
        try:
            (result,) = await service.ingest([event])
        except Exception as exc:
            log.exception("commit failed")
            raise HTTPException(
                503, {"field": None, "reason": f"store unavailable, retry: {type(exc).__name__}"}
            ) from None
        if result.status == "rejected":
            field = result.field or ""
            field = field[5:] if field.startswith("body.") else field
            return _error(422, field or None, result.reason or "rejected")
        status = 201 if result.status == "accepted" else 200
        return JSONResponse(status_code=status, content=result.model_dump(exclude_none=True))

    @api.post("/v1/interactions", summary="Record one interaction", dependencies=[require("agent")])
    async def post_interaction(request: Request) -> JSONResponse:
        """The interaction body itself; optional ``id`` and ``timestamp`` at its top level."""
        return await post_single(request, "interaction")

    @api.post("/v1/feedback", summary="Record feedback on an interaction", dependencies=[require("agent")])
    async def post_feedback(request: Request) -> JSONResponse:
        return await post_single(request, "feedback")

    @api.post("/v1/tool-usage", summary="Record one tool invocation", dependencies=[require("agent")])
    async def post_tool_usage(request: Request) -> JSONResponse:
        return await post_single(request, "tool_usage")

    @api.post("/v1/outcomes", summary="Record outcome metrics", dependencies=[require("agent")])
    async def post_outcome(request: Request) -> JSONResponse:
        return await post_single(request, "outcome")

    @api.post("/v1/quality/assess", summary="Score a prompt and response", dependencies=[require("agent")])
    async def assess_quality(body: AssessRequest) -> dict[str, Any]:
        """The quality score of a prompt and response, with its five dimensions and confidence."""
        try:
            return await service.assess(body.model_dump(exclude_none=True))
        except ValueError as exc:  # from the scorer replica, Ray's wrapper (its traceback) taken off
            raise HTTPException(422, {"field": "response", "reason": public_reason(exc)}) from None

    @api.post(
        "/v1/quality/stream",
        summary="Provisional scores of a response, window by window",
        dependencies=[require("agent")],
    )
    async def stream_quality_post(body: StreamRequest) -> dict[str, Any]:
        """The windows a streaming assessment emits for these chunks, the last one marked final
        (the same as the WebSocket at this path, for a response already generated)."""
        assessor = service.stream_assessor(body.prompt, body.context)

        def run() -> list[dict[str, Any]]:
            windows = [w for chunk in body.chunks for w in assessor.feed(chunk)]
            return [w.as_dict() for w in windows + [assessor.finish()]]

        return {"windows": await asyncio.to_thread(run)}

    @api.websocket("/v1/quality/stream")
    async def stream_quality(ws: WebSocket) -> None:
        """Send ``{"prompt", "context"?}``, then ``{"chunk"}`` messages as the response is generated,
        then ``{"done": true}``. Each completed window is answered with its provisional score; the
        last answer has ``final: true``. A bad message is answered with ``{"error": {field, reason}}``
        and closes the socket (code 1008)."""
        try:
            authorize(ws.headers, "agent")
        except HTTPException as exc:
            await ws.close(code=1008, reason=exc.detail["reason"])
            return
        await ws.accept()

        async def fail(field: str | None, reason: str) -> None:
            await ws.send_json({"error": {"field": field, "reason": reason}})
            await ws.close(code=1008)

        try:
            try:
                start = StreamStart.model_validate(await ws.receive_json())
            except (ValueError, KeyError) as exc:
                await fail("prompt", f"the first message must be {{prompt, context?}}: {exc}")
                return
            assessor = service.stream_assessor(start.prompt, start.context)
            while True:
                try:
                    message = await ws.receive_json()
                except (ValueError, KeyError) as exc:
                    await fail("chunk", f"not a JSON message: {exc}")
                    return
                if not isinstance(message, dict):
                    await fail("chunk", "expected an object {chunk} or {done: true}")
                    return
                if message.get("done"):
                    final = await asyncio.to_thread(assessor.finish)
                    await ws.send_json(final.as_dict())
                    await ws.close()
                    return
                chunk = message.get("chunk")
                if not isinstance(chunk, str):
                    await fail("chunk", "expected a string")
                    return
                for window in await asyncio.to_thread(assessor.feed, chunk):
                    await ws.send_json(window.as_dict())
        except WebSocketDisconnect:
            return

    @api.get("/v1/review", dependencies=[require("operator")])
    async def review_queue(
        limit: int = Query(50, ge=1, le=500),
        max_confidence: float | None = Query(None, gt=0, le=1, description="Default: quality.review_confidence_below."),
    ) -> dict[str, Any]:
        """Scored interactions whose confidence is low and that no person has rated, least
        confident first. Rate one with ``POST /v1/review/{id}``; ``kaizen calibrate`` uses the ratings."""
        bound = max_confidence if max_confidence is not None else cfg.quality.review_confidence_below
        rows = await asyncio.to_thread(service.store.review_queue, bound, limit)
        return {"interactions": rows, "count": len(rows), "max_confidence": bound}

    @api.post("/v1/review/{interaction_id}", status_code=201, dependencies=[require("operator")])
    async def review(interaction_id: str, body: ReviewRequest) -> dict[str, Any]:
        """Add a person's rating (1-5) of an interaction; stored on a 0-1 scale for calibration."""
        scale = (body.rating - 1) / 4.0
        dims = {k: (v - 1) / 4.0 for k, v in body.dimensions.items()} if body.dimensions else None
        try:
            rating_id = await asyncio.to_thread(
                service.store.add_rating, interaction_id, scale, body.rater, body.comment, dims
            )
        except KeyError:
            raise HTTPException(
                404, {"field": "interaction_id", "reason": f"no interaction {interaction_id!r}"}
            ) from None
        return {"id": rating_id, "interaction_id": interaction_id, "rating": scale}

    @api.get("/v1/interactions/{interaction_id}", dependencies=[require("agent")])
    async def get_interaction(interaction_id: str) -> dict[str, Any]:
        """The interaction with its context, tool usage, feedback and merged outcome."""
        record = await asyncio.to_thread(service.store.get_interaction, interaction_id)
        if record is None:
            raise HTTPException(404, {"field": "interaction_id", "reason": f"no interaction {interaction_id!r}"})
        return record

    @api.get("/v1/interactions", dependencies=[require("operator")])
    async def list_interactions(
        session_id: str | None = Query(None, description="Raw session id (hashed here)."),
        since: datetime | None = Query(None, description="Inclusive lower time bound."),
        until: datetime | None = Query(None, description="Exclusive upper time bound."),
        min_quality: float | None = Query(None, ge=0, le=1),
        max_quality: float | None = Query(None, ge=0, le=1),
        quality_status: str | None = Query(None),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        """Interactions by session, time range and quality range, oldest first."""
        rows = await asyncio.to_thread(
            service.store.query_interactions,
            session_hash=service.hash_session(session_id) if session_id else None,
            since=since,
            until=until,
            min_quality=min_quality,
            max_quality=max_quality,
            quality_status=quality_status,
            limit=limit,
            offset=offset,
        )
        return {"interactions": rows, "count": len(rows)}

    @api.get("/v1/stats", dependencies=[require("operator")])
    async def stats() -> dict[str, Any]:
        """Interactions per day, redactions per kind, and the store engine."""
        return await asyncio.to_thread(service.store.stats)

    if service.generator is not None:
        registry = AdapterRegistry(service.store)

        async def record(event: dict[str, Any]) -> None:
            await service.ingest([event])

        deployments = DeploymentStore(service.store)

        def record_failure(model: str, where: Route, status: int, reason: str) -> None:
            deployments.record_failure(
                model=model,
                adapter_id=where.adapter_id,
                serving_arm=where.serving_arm,
                deployment_id=where.deployment_id,
                status=status,
                reason=reason,
            )

        add_openai_routes(
            api,
            service.generator,
            base_model=cfg.model.base_model,
            route=Router(registry, deployments, cfg.model.base_model).route,
            list_models=lambda: (registry.list(), registry.aliases()),
            record=record if cfg.serve.generator.record else None,
            record_failure=record_failure,
            dependencies=[require("agent")],
        )

    add_deployment_routes(api, cfg, service.store, [require("operator")])
    add_training_routes(api, cfg, service.store, [require("operator")])

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok", "uptime_s": round(time.time() - service.started, 1)}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the store answers a query."""
        ok = await asyncio.to_thread(service.store.ping)
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ready" if ok else "store unavailable", "engine": service.store.engine},
        )

    return api
