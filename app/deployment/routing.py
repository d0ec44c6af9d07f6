"""Which adapter answers a completion request, and as which arm of a deployment.

A request for ``champion`` (the name an agent uses for whatever serves production) goes to the
champion adapter, or to the base model while there is none, except while a canary runs: then the
sessions in the canary's share (:func:`~app.deployment.state.in_canary`, sticky per session) go to
the challenger. A request that names the base model, an adapter id or ``challenger`` is never
split. The route is read from the store at each request, so a move of an alias or of the canary's
share takes effect on the next request, and a request already started finishes where it began.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.deployment.state import DeploymentStore, in_canary
from app.registry import AdapterRegistry

__all__ = ["Route", "Router"]


@dataclass(frozen=True)
class Route:
    """Where one request goes: the adapter (None: the base model), and, for a request for
    ``champion``, the arm that answers and the deployment whose split chose it."""

    adapter_id: str | None
    serving_arm: str | None = None
    deployment_id: str | None = None


class Router:
    """Routes from the registry's aliases and the running canary (see the module docstring)."""

    def __init__(self, registry: AdapterRegistry, deployments: DeploymentStore, base_model: str) -> None:
        self.registry = registry
        self.deployments = deployments
        self.base_model = base_model

    def route(self, model: str, session: str) -> Route | None:
        """The route of a request for ``model`` in ``session``; None when ``model`` names nothing
        (not the base model, an alias or a registered adapter)."""
        if model == self.base_model:
            return Route(None)
        if model == "champion":
            canary = self.deployments.canary_route()
            if canary is not None and in_canary(session, canary.deployment_id, canary.share):
                return Route(canary.challenger, "challenger", canary.deployment_id)
            return Route(self.registry.champion(), "champion", canary.deployment_id if canary else None)
        adapter_id = self.registry.resolve(model)
        return Route(adapter_id) if adapter_id is not None else None
