"""The deployment routes: ``GET /v1/deployments`` (what serves, the active deployment with its
latest decisions and live evidence, the recent ones), ``GET /v1/deployments/{id}`` (one, with
every decision) and ``POST /v1/deployments/{id}/rollback`` (an operator ends it; the champion it
replaced serves again). Both read and decide through :class:`app.deployment.deployer.Deployer` on
the store, as the deployer actor does; the store refuses a decision made on a stale read (409)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from app.config import KaizenConfig
from app.deployment.deployer import Deployer
from app.deployment.probe import HttpProbe
from app.deployment.state import DeploymentNotFoundError, StaleDeploymentError
from app.serve.contract import AUTH, BODY, errors
from app.store import InteractionStore

__all__ = ["RollbackRequest", "add_deployment_routes"]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(min_length=1, max_length=2000, description="Why (kept with the decision and audited).")
    actor: str = Field("operator", min_length=1, max_length=200, description="Who decides (audited).")


def add_deployment_routes(api: FastAPI, cfg: KaizenConfig, store: InteractionStore, operator: list[Any]) -> None:
    """Mount the routes; ``operator`` are the dependencies that require the operator role."""
    deployer = Deployer(cfg, store, HttpProbe.for_config(cfg, store), actor="api")

    @api.get(
        "/v1/deployments",
        dependencies=operator,
        summary="What serves, and the deployments",
        responses=errors(*AUTH, 403, 503),
    )
    async def deployments() -> dict[str, Any]:
        """The strategy and aliases, the active deployment with its latest decisions and live
        evidence (the rule's current answer), adapters waiting for a deployment, recent deployments."""
        return await asyncio.to_thread(deployer.status)

    @api.get(
        "/v1/deployments/{deployment_id}",
        dependencies=operator,
        summary="One deployment and its decisions",
        responses=errors(*AUTH, 403, 404, 422, 503),
    )
    async def deployment(deployment_id: str = Path(max_length=100)) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            d = deployer.deployments.get(deployment_id)
            return {**d.to_json(), "decisions": deployer.deployments.decisions(d.id)}

        try:
            return await asyncio.to_thread(read)
        except DeploymentNotFoundError:
            raise HTTPException(404, {"field": "deployment_id", "reason": f"no deployment {deployment_id!r}"}) from None

    @api.post(
        "/v1/deployments/{deployment_id}/rollback",
        dependencies=operator,
        summary="Roll a deployment back (operator)",
        responses=errors(*AUTH, 403, 404, 409, *BODY, 503),
    )
    async def rollback(body: RollbackRequest, deployment_id: str = Path(max_length=100)) -> dict[str, Any]:
        """End the deployment: the adapter stops serving (status ``rejected`` with the reason) and
        the champion it replaced serves again."""
        try:
            d = await asyncio.to_thread(deployer.rollback, deployment_id, body.actor, body.reason)
        except DeploymentNotFoundError:
            raise HTTPException(404, {"field": "deployment_id", "reason": f"no deployment {deployment_id!r}"}) from None
        except StaleDeploymentError:
            raise HTTPException(
                409, {"field": "deployment_id", "reason": "the deployment changed meanwhile; read it again and retry"}
            ) from None
        except ValueError as exc:
            raise HTTPException(409, {"field": "deployment_id", "reason": str(exc)}) from None
        return {**d.to_json(), "decisions": deployer.deployments.decisions(d.id)}
