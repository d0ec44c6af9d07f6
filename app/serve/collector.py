"""``CollectorDeployment``: the collector as a Ray Serve deployment behind its FastAPI ingress.

Thin on purpose: the logic is :class:`app.serve.api.CollectorService`. Resources and autoscaling
come from ``serve.collector`` in the config (see ``app/serve/build.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from app.config import KaizenConfig
from app.serve.api import CollectorService, create_api
from app.store import StoredEvent

__all__ = ["CollectorDeployment"]

# The ASGI builder below runs on the replica right after __init__ and takes no arguments, so
# __init__ leaves the replica's service here for it. One replica per process: no sharing.
_replica_service: CollectorService | None = None


def _build_asgi() -> FastAPI:
    assert _replica_service is not None, "CollectorDeployment.__init__ must run first"
    return create_api(_replica_service)


@serve.deployment(name="Collector")
@serve.ingress(_build_asgi)
class CollectorDeployment:
    """Receives agent events over HTTP, filters them and group-commits them to the store."""

    def __init__(self, config: dict[str, Any]):
        global _replica_service
        cfg = KaizenConfig.model_validate(config)
        self.commit.set_max_batch_size(cfg.serve.collector.max_batch_size)
        self.commit.set_batch_wait_timeout_s(cfg.serve.collector.batch_wait_timeout_s)
        self.service = CollectorService(cfg, commit=self.commit)
        _replica_service = self.service

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def commit(self, batches: list[list[StoredEvent]]) -> list[list[bool]]:
        """Group commit: the events of concurrent requests in one transaction."""
        return await self.service.commit_group(batches)

    def check_health(self) -> None:
        """Serve's health probe: an unreachable store takes the replica out of rotation."""
        if not self.service.store.ping():
            raise RuntimeError(f"{self.service.store.engine} store does not answer")
