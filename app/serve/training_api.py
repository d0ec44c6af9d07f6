"""The training routes: ``GET /v1/training`` (the scheduler's view: the current cycle, the triggers
and what holds a cycle back, the last decision with its reasons, the next check) and
``POST /v1/training/runs`` (an operator asks for a cycle). Both talk to the scheduler actor by name
(``kaizen-scheduler`` in ``ray.namespace``); without it, the view comes from the store alone and a
request is kept in the store for the scheduler's first check once it runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from app.config import KaizenConfig
from app.scheduling.scheduler import request_cycle
from app.scheduling.state import SCHEDULER_ACTOR, TrainingRunStore
from app.serve.contract import AUTH, BODY, errors
from app.serve.errors import public_reason, remote_cause
from app.store import InteractionStore

__all__ = ["TrainingRequest", "add_training_routes", "scheduler_or_none"]


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(min_length=1, max_length=2000, description="Why a cycle is wanted now (audited).")
    actor: str = Field("operator", min_length=1, max_length=200, description="Who asks (audited).")


def scheduler_or_none(namespace: str) -> Any | None:
    """The running scheduler actor's handle, or None (no Ray here, or no scheduler started)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(SCHEDULER_ACTOR, namespace=namespace)
    except ValueError:
        return None


def store_view(store: InteractionStore) -> dict[str, Any]:
    """What the store says of training without the scheduler: the cycles and the last decisions."""
    runs = TrainingRunStore(store)
    running = runs.running()
    return {
        "scheduler": {"running": False},
        "running": running.to_json() if running else None,
        "last_decision": runs.last_decision(),
        "decisions": runs.decisions(limit=10),
        "recent": [r.to_json() for r in runs.list(limit=10)],
    }


def add_training_routes(api: FastAPI, cfg: KaizenConfig, store: InteractionStore, operator: list[Any]) -> None:
    """Mount the routes; ``operator`` are the dependencies that require the operator role."""
    namespace = cfg.ray.namespace

    @api.get(
        "/v1/training",
        dependencies=operator,
        summary="The scheduler: current cycle, triggers, decisions",
        responses=errors(*AUTH, 403, 503),
    )
    async def training() -> dict[str, Any]:
        handle = await asyncio.to_thread(scheduler_or_none, namespace)
        if handle is None:
            return await asyncio.to_thread(store_view, store)
        return await handle.status.remote()

    @api.post(
        "/v1/training/runs",
        status_code=202,
        dependencies=operator,
        summary="Ask for a learning cycle",
        responses=errors(*AUTH, 403, 409, *BODY, 503),
    )
    async def request_run(body: TrainingRequest) -> dict[str, Any]:
        """The manual trigger: the cycle starts at the scheduler's next check unless one is running
        or resources are short (it waits); with no scheduler running the request waits in the
        store for its first check. Refused (409) while ``enabled`` is false."""
        handle = await asyncio.to_thread(scheduler_or_none, namespace)
        try:
            if handle is not None:
                return await handle.request.remote(body.actor, body.reason)
            now = datetime.now(UTC)
            run = await asyncio.to_thread(request_cycle, cfg, TrainingRunStore(store), body.actor, body.reason, now)
            return {**run.to_json(), "scheduler": {"running": False}}
        except Exception as exc:  # a refusal is a ValueError (the actor's, unwrapped)
            if isinstance(remote_cause(exc), ValueError):
                raise HTTPException(409, {"field": "training", "reason": public_reason(exc)}) from None
            raise
