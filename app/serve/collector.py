"""``CollectorDeployment``: the collector as a Ray Serve deployment behind its FastAPI ingress.

Thin on purpose: the logic is :class:`app.serve.api.CollectorService`. Resources and autoscaling
come from ``serve.collector`` in the config (see ``app/serve/build.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import KaizenConfig
from app.serve.api import CollectorService, create_api
from app.serve.openai_api import HandleBackend
from app.store import StoredEvent

__all__ = ["CollectorDeployment"]


@serve.deployment(name="Collector")
@serve.ingress()
class CollectorDeployment:
    """Receives agent events over HTTP, filters them and group-commits them to the store."""

    def __init__(
        self, config: dict[str, Any], scorer: DeploymentHandle | None = None, generator: DeploymentHandle | None = None
    ):
        cfg = KaizenConfig.model_validate(config)
        self.commit.set_max_batch_size(cfg.serve.collector.max_batch_size)
        self.commit.set_batch_wait_timeout_s(cfg.serve.collector.batch_wait_timeout_s)
        self.scorer = scorer
        self.service = CollectorService(
            cfg,
            commit=self.commit,
            # Fire and forget: the reply to the agent does not wait for scoring...
            on_committed=(lambda ids: scorer.score_ids.remote(ids)) if scorer is not None else None,
            assess=self._assess if scorer is not None else None,
            generator=HandleBackend(generator) if generator is not None else None,
            # ... unless performance.async_processing=false: then it waits for the scores.
            score_now=self._score_now if scorer is not None else None,
        )

    async def _score_now(self, interaction_ids: list[str]) -> dict[str, int]:
        assert self.scorer is not None
        return await self.scorer.score_now.remote(interaction_ids)

    async def _assess(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self.scorer is not None
        return await self.scorer.assess.remote(payload)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's late-bound ingress: the app is built after __init__, around this replica's service."""
        return create_api(self.service)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def commit(self, batches: list[list[StoredEvent]]) -> list[list[bool]]:
        """Group commit: the events of concurrent requests in one transaction."""
        return await self.service.commit_group(batches)

    def check_health(self) -> None:
        """Serve's health probe: an unreachable store takes the replica out of rotation."""
        if not self.service.store.ping():
            raise RuntimeError(f"{self.service.store.engine} store does not answer")
