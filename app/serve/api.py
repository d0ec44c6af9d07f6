"""The collector's HTTP API as a FastAPI app over a plain :class:`CollectorService`.

``create_api(service)`` is what the Serve deployment mounts (``app/serve/collector.py``) and what
tests run under plain uvicorn. Under Serve, writes are group-committed with ``@serve.batch``:
concurrent requests share one transaction. Either way a 2xx is sent only after the commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.config import KaizenConfig
from app.deployment.routing import Route, Router
from app.deployment.state import DeploymentStore
from app.ingest import IngestPipeline
from app.privacy.erasure import erase
from app.quality.streaming import CircuitBreaker, StreamingAssessor
from app.registry import AdapterRegistry
from app.schemas import EventResult, IsoDatetime, QualityScore
from app.security.keys import KEY_PATTERN, OPEN, ApiKey, Authenticator, RateLimiter, Role, allows
from app.serve import contract
from app.serve.contract import (
    AUTH,
    BODY,
    AssessRequest,
    Erasure,
    EventBatchResult,
    Health,
    RatingCreated,
    Readiness,
    ReviewRequest,
    StreamRequest,
    StreamStart,
    StreamWindows,
    errors,
    json_body,
)
from app.serve.deployments_api import add_deployment_routes
from app.serve.errors import json_problem, public_reason, unavailable
from app.serve.openai_api import GenerationBackend, add_openai_routes
from app.serve.training_api import add_training_routes
from app.store import InteractionStore, StoredEvent, open_store

__all__ = ["CollectorService", "create_api"]

log = logging.getLogger("kaizen.collector")
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
        self.auth = Authenticator(self.store, [(entry.key_env, entry.role) for entry in cfg.security.api_keys])
        self.limiter = RateLimiter(cfg.security.rate_limit_per_s, cfg.security.rate_limit_burst)
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

    def authorize(self, headers: Mapping[str, str], needed: Role, where: str, client: str | None) -> ApiKey:
        """The caller's key (``X-API-Key`` or ``Authorization: Bearer``), after
        its rate limit; without any key configured every caller may do everything.

        Raises:
            HTTPException: 401 (no key, an unknown or revoked one), 403 (the role may not), 429
                (over the key's rate, with ``Retry-After``), 503 (the store, which keeps the keys,
                does not answer). A refusal for the key is audited
                (``auth.failure``, with the key's id where it has one, never the key).
        """
        presented = headers.get("x-api-key")
        bearer = headers.get("authorization", "")
        if presented is None and bearer.lower().startswith("bearer "):
            presented = bearer[7:].strip()
        try:
            if not self.auth.required:
                return OPEN
            key = self.auth.identify(presented)
        except Exception:  # the keys live in the store: without it no key can be checked (fail closed)
            log.exception("reading the API keys failed")
            raise HTTPException(503, {"field": None, "reason": "API keys cannot be checked now; retry"}) from None
        if key is None:
            reason = "missing API key" if not presented else "unknown or revoked API key"
            self._audit_failure(where, client, reason, presented)
            raise HTTPException(401, {"field": "authorization", "reason": reason})
        wait = self.limiter.take(key.id, key.rate_per_s)  # refused requests count too
        if wait > 0:
            raise HTTPException(
                429,
                {"field": "authorization", "reason": "over this key's rate limit"},
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if not allows(key.role, needed):
            self._audit_failure(where, client, f"role {key.role} may not: needs {needed}", presented, key)
            raise HTTPException(403, {"field": "authorization", "reason": f"needs the {needed} role"})
        return key

    def audit_read(self, caller: ApiKey, what: str, ids: Sequence[str]) -> None:
        """Audit a read of interaction content (``data.read``), where ``privacy.audit_trail`` is on."""
        if self.cfg.privacy.audit_trail and ids:
            self.store.audit(caller.label, "data.read", what, {"interactions": len(ids), "ids": list(ids[:20])})

    def _audit_failure(
        self, where: str, client: str | None, reason: str, presented: str | None, key: ApiKey | None = None
    ) -> None:
        match = KEY_PATTERN.match(presented or "")
        details = {"reason": reason, "client": client, "key_id": key.id if key else (match.group(1) if match else None)}
        try:
            self.store.audit(key.label if key else "anonymous", "auth.failure", where, details)
        except Exception:  # the refusal stands whether or not the audit row could be written
            log.exception("auditing an authentication failure failed")

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


def allowed_methods(api: FastAPI, scope: Mapping[str, Any]) -> list[str]:
    """The methods the routes matching a request's path answer (a path may have one route per method)."""
    methods: set[str] = set()
    for route in api.router.routes:
        match, _ = route.matches({**scope, "type": "http"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


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
        if err["type"] == "json_invalid":
            return _error(400, "body", "not valid JSON")
        return _error(422, ".".join(loc) or None, err["msg"].removeprefix("Value error, "))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Kaizen's own refusals carry {field, reason}; the framework's (no route, wrong method, a
        # body it could not read) a phrase, answered in the same shape.
        if isinstance(exc.detail, dict):
            response = _error(exc.status_code, exc.detail.get("field"), exc.detail.get("reason", ""))
        else:
            response = _error(exc.status_code, None, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            response.headers["Allow"] = ", ".join(allowed_methods(api, request.scope))
        return response

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged here in full; the answer says nothing of the server's insides.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        if unavailable(exc):
            return _error(503, None, "a dependency of the server is unavailable; retry")
        return _error(500, None, "the server could not complete the request")

    @api.middleware("http")
    async def _bounded_body(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        declared = request.headers.get("content-length")
        limit = cfg.collection.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            return _error(413, "body", f"body of {declared} bytes exceeds {limit}")
        return await call_next(request)

    def require(role: Role) -> Any:
        async def check(request: Request) -> ApiKey:
            client = request.client.host if request.client else None
            where = f"{request.method} {request.url.path}"
            return await asyncio.to_thread(service.authorize, request.headers, role, where, client)

        return Depends(check)

    # Routes that act on who calls take the caller as a parameter (the others list the check).
    as_operator, as_admin = require("operator"), require("admin")

    async def read_json(request: Request) -> Any:
        # A declared length over the limit was refused by _bounded_body; this is a body sent
        # without one (chunked).
        limit = cfg.collection.max_body_bytes
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, {"field": "body", "reason": f"body of {len(body)} bytes exceeds {limit}"})
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPException(400, {"field": "body", "reason": json_problem(exc)}) from None

    @api.post(
        "/v1/events",
        summary="Record a batch of events",
        dependencies=[require("agent")],
        response_model=EventBatchResult,
        responses={
            207: {"model": EventBatchResult, "description": "Some events were rejected: their results say why."},
            **errors(*AUTH, *BODY, 503),
        },
        openapi_extra=json_body(contract.EventBatch),
    )
    async def post_events(request: Request) -> JSONResponse:
        """Body ``{"events": [{id, type, timestamp, body}, ...]}``. Answers per event: accepted,
        duplicate, excluded, sampled_out, or rejected with the field and the reason. 200 when no
        event was rejected, 207 otherwise; every accepted event is committed before the answer."""
        data = await read_json(request)
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise HTTPException(422, {"field": "events", "reason": "expected an object with an 'events' list"})
        unknown = sorted(set(data) - {"events"})
        if unknown:
            raise HTTPException(422, {"field": unknown[0], "reason": "unknown field"})
        events = data["events"]
        if len(events) > cfg.collection.max_events_per_batch:
            raise HTTPException(
                413,
                {"field": "events", "reason": f"{len(events)} events exceed {cfg.collection.max_events_per_batch}"},
            )
        try:
            results = await service.ingest(events)
        except Exception:  # the store failed: nothing was committed, the client retries
            log.exception("commit failed")
            raise HTTPException(503, {"field": None, "reason": "the store did not take the events; retry"}) from None
        status = 207 if any(r.status == "rejected" for r in results) else 200
        return JSONResponse(status_code=status, content=_summary(results))

    async def post_single(request: Request, event_type: str) -> JSONResponse:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise HTTPException(422, {"field": "body", "reason": "expected a JSON object"})
        body = dict(body)
        event_id, timestamp = body.pop("id", None), body.pop("timestamp", None)
        event = {
            "id": uuid.uuid4().hex if event_id is None else event_id,
            "type": event_type,
            "timestamp": datetime.now(UTC).isoformat() if timestamp is None else timestamp,
            "body": body,
        }
        try:
            (result,) = await service.ingest([event])
        except Exception:
            log.exception("commit failed")
            raise HTTPException(503, {"field": None, "reason": "the store did not take the event; retry"}) from None
        if result.status == "rejected":
            field = result.field or ""
            field = field[5:] if field.startswith("body.") else field
            return _error(422, field or None, result.reason or "rejected")
        status = 201 if result.status == "accepted" else 200
        return JSONResponse(status_code=status, content=result.model_dump(exclude_none=True))

    def single(path: str, summary: str, body: type[BaseModel]) -> Callable[[Any], Any]:
        return api.post(
            path,
            summary=summary,
            status_code=201,
            dependencies=[require("agent")],
            response_model=EventResult,
            response_model_exclude_none=True,
            responses={
                200: {"model": EventResult, "description": "Not stored anew: a duplicate, excluded or sampled out."},
                **errors(*AUTH, *BODY, 503),
            },
            openapi_extra=json_body(body),
        )

    @single("/v1/interactions", "Record one interaction", contract.InteractionSubmission)
    async def post_interaction(request: Request) -> JSONResponse:
        """The interaction body itself; optional ``id`` and ``timestamp`` at its top level."""
        return await post_single(request, "interaction")

    @single("/v1/feedback", "Record feedback on an interaction", contract.FeedbackSubmission)
    async def post_feedback(request: Request) -> JSONResponse:
        return await post_single(request, "feedback")

    @single("/v1/tool-usage", "Record one tool invocation", contract.ToolUsageSubmission)
    async def post_tool_usage(request: Request) -> JSONResponse:
        return await post_single(request, "tool_usage")

    @single("/v1/outcomes", "Record outcome metrics", contract.OutcomeSubmission)
    async def post_outcome(request: Request) -> JSONResponse:
        return await post_single(request, "outcome")

    @api.post(
        "/v1/quality/assess",
        summary="Score a prompt and response",
        dependencies=[require("agent")],
        response_model=QualityScore,
        responses=errors(*AUTH, *BODY, 503),
    )
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
        response_model=StreamWindows,
        responses=errors(*AUTH, *BODY),
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
            client = ws.client.host if ws.client else None
            await asyncio.to_thread(service.authorize, ws.headers, "agent", "WS /v1/quality/stream", client)
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

    @api.get("/v1/review", response_model=contract.ReviewQueue, responses=errors(*AUTH, 403, 422, 503))
    async def review_queue(
        caller: ApiKey = as_operator,
        limit: int = Query(50, ge=1, le=500),
        max_confidence: float | None = Query(None, gt=0, le=1, description="Default: quality.review_confidence_below."),
    ) -> dict[str, Any]:
        """Scored interactions whose confidence is low and that no person has rated, least
        confident first. Rate one with ``POST /v1/review/{id}``; ``kaizen calibrate`` uses the ratings."""
        bound = max_confidence if max_confidence is not None else cfg.quality.review_confidence_below
        rows = await asyncio.to_thread(service.store.review_queue, bound, limit)
        await asyncio.to_thread(service.audit_read, caller, "GET /v1/review", [r["id"] for r in rows])
        return {"interactions": rows, "count": len(rows), "max_confidence": bound}

    @api.post(
        "/v1/review/{interaction_id}",
        status_code=201,
        dependencies=[require("operator")],
        response_model=RatingCreated,
        responses=errors(*AUTH, 403, 404, *BODY, 503),
    )
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

    @api.get(
        "/v1/interactions/{interaction_id}",
        response_model=contract.InteractionDetail,
        responses=errors(*AUTH, 403, 404, 503),
    )
    async def get_interaction(interaction_id: str, caller: ApiKey = as_operator) -> dict[str, Any]:
        """The interaction with its context, tool usage, feedback and merged outcome."""
        record = await asyncio.to_thread(service.store.get_interaction, interaction_id)
        if record is None:
            raise HTTPException(404, {"field": "interaction_id", "reason": f"no interaction {interaction_id!r}"})
        await asyncio.to_thread(service.audit_read, caller, "GET /v1/interactions/{id}", [interaction_id])
        return record

    @api.get("/v1/interactions", response_model=contract.InteractionList, responses=errors(*AUTH, 403, 422, 503))
    async def list_interactions(
        caller: ApiKey = as_operator,
        session_id: str | None = Query(None, max_length=500, description="Raw session id (hashed here)."),
        since: IsoDatetime | None = Query(None, description="Inclusive lower time bound (ISO 8601)."),
        until: IsoDatetime | None = Query(None, description="Exclusive upper time bound (ISO 8601)."),
        min_quality: float | None = Query(None, ge=0, le=1),
        max_quality: float | None = Query(None, ge=0, le=1),
        quality_status: Literal["pending", "scored", "no_evidence"] | None = Query(None),
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
        await asyncio.to_thread(service.audit_read, caller, "GET /v1/interactions", [r["id"] for r in rows])
        return {"interactions": rows, "count": len(rows)}

    @api.delete(
        "/v1/sessions/{session_id}",
        summary="Erase a session's data (admin)",
        response_model=Erasure,
        responses=errors(*AUTH, 403, 422, 503),
    )
    async def erase_session(
        caller: ApiKey = as_admin,
        session_id: str = Path(min_length=1, max_length=500, description="The raw session id the agent sent."),
        reason: str = Query("erasure request", max_length=2000, description="Why (audited)."),
    ) -> dict[str, Any]:
        """Remove every interaction of the session, with its feedback, tool calls, outcomes and
        scores, from the store and its files; datasets built from them are marked stale. Audited
        under the session's hash. Erasing a session with nothing stored answers 0 interactions."""
        return await asyncio.to_thread(
            erase, cfg, service.store, session_id=session_id, actor=caller.label, reason=reason
        )

    @api.get(
        "/v1/audit",
        summary="The audit log (admin)",
        response_model=contract.AuditLog,
        responses=errors(*AUTH, 403, 422, 503),
    )
    async def audit_log(
        caller: ApiKey = as_admin,
        action: str | None = Query(
            None, max_length=200, description="An action (`key.create`), or a prefix ending in a dot (`deployment.`)."
        ),
        target: str | None = Query(None, max_length=500, description="What the entries are about."),
        since: IsoDatetime | None = Query(None, description="Entries from this time on (ISO 8601)."),
        before_id: int | None = Query(None, ge=1, le=2**63 - 1, description="Page back: entries older than this id."),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Who did what, newest first: key and alias changes, erasures, deployments, training
        decisions, authentication failures, reads of interaction content (``privacy.audit_trail``)."""
        rows = await asyncio.to_thread(
            service.store.audit_entries, action=action, target=target, since=since, before_id=before_id, limit=limit
        )
        await asyncio.to_thread(service.store.audit, caller.label, "audit.read", action, {"entries": len(rows)})
        return {"entries": rows, "count": len(rows)}

    @api.get(
        "/v1/stats",
        dependencies=[require("operator")],
        response_model=contract.Stats,
        responses=errors(*AUTH, 403, 503),
    )
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

    @api.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok", "uptime_s": round(time.time() - service.started, 1)}

    @api.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "The store does not answer."}},
    )
    async def readyz() -> JSONResponse:
        """Readiness: the store answers a query."""
        ok = await asyncio.to_thread(service.store.ping)
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ready" if ok else "store unavailable", "engine": service.store.engine},
        )

    contract.publish(api)
    return api
