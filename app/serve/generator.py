"""``GeneratorDeployment``: the base model with its LoRA adapters multiplexed, as a Serve deployment.

Thin on purpose: the model, the adapters and generation are :class:`app.generation.GeneratorService`.
Serve routes a request for an adapter to a replica that has it loaded (``@serve.multiplexed``,
least recently used evicted, memory freed through ``_LoadedAdapter.__del__``); whole-answer
requests are batched per adapter (``@serve.batch``); streams run one per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from app.config import KaizenConfig
from app.deployment.state import HEARTBEAT_S, DeploymentStore
from app.generation import GeneratorService
from app.model.adapters import AdapterStore
from app.serve.openai_api import _iterate_in_thread, generate_items
from app.store import open_store

__all__ = ["GeneratorDeployment"]

log = logging.getLogger("kaizen.generator")


class _LoadedAdapter:
    """What the multiplexed loader returns: Serve drops it on eviction, which detaches the adapter."""

    def __init__(self, service: GeneratorService, adapter_id: str):
        self.service, self.adapter_id = service, adapter_id

    def __del__(self) -> None:
        # Detaching waits for a generation in flight; never block the replica's event loop on it.
        threading.Thread(target=self.service.unload_adapter, args=(self.adapter_id,), daemon=True).start()


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """OpenAI-style completions from ``model.base_model`` and its adapters (see module docstring)."""

    def __init__(self, config: dict[str, Any]):
        cfg = KaizenConfig.model_validate(config)
        g = cfg.serve.generator
        self.service = GeneratorService(
            cfg.model.base_model,
            root=cfg.model.storage_root,
            adapter_store=AdapterStore(cfg.model.storage_root),
            max_adapters=g.max_adapters + 1,  # Serve evicts first; one spare while a detach completes
            default_max_tokens=g.default_max_tokens,
        )
        self._cap_adapters(g.max_adapters)
        self._complete_batch.set_max_batch_size(g.max_batch_size)
        self._complete_batch.set_batch_wait_timeout_s(g.batch_wait_timeout_s)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.deployments = DeploymentStore(open_store(cfg.store))
        # The constructor runs on the replica's event loop: the keeper shares it with the requests.
        self._keeper = asyncio.get_running_loop().create_task(self._keep_adapters())

    async def _keep_adapters(self) -> None:
        """Every :data:`HEARTBEAT_S`: load the adapters in use (the aliases', the active
        deployment's and the champion it replaced: :meth:`DeploymentStore.wanted_adapters`) through
        the multiplexed loader, so Serve routes their requests here and nothing waits for a load
        when traffic moves; then tell the store which adapters this replica has (the deployer
        moves traffic only once every replica lists the new one)."""
        while True:
            try:
                for adapter_id in await asyncio.to_thread(self.deployments.wanted_adapters):
                    try:
                        await self.get_adapter(adapter_id)
                    except Exception:  # not listed in the heartbeat: the deployer sees it missing
                        log.warning("preloading adapter %s failed", adapter_id, exc_info=True)
                loaded = self.service.loaded_adapters()
                await asyncio.to_thread(self.deployments.heartbeat, self.replica_id, loaded)
            except Exception:  # the store away for a moment: try again at the next beat
                log.warning("adapter heartbeat failed", exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    async def __del__(self) -> None:
        """Serve's graceful shutdown of this replica (scaled down, redeployed, deleted): stop the
        heartbeat and leave the store's list of replicas, so that the deployer does not wait for an
        adapter to load on a replica that is gone until its heartbeat ages out."""
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.cancel()
        if getattr(self, "deployments", None) is not None:
            try:
                await asyncio.to_thread(self.deployments.forget_replica, self.replica_id)
            except Exception:  # the store away: the heartbeat ages out instead
                log.warning("leaving the replica list failed", exc_info=True)

    def _cap_adapters(self, count: int) -> None:
        """``@serve.multiplexed`` takes its cap when the class is defined; the configured one is
        installed by creating the wrapper it would create lazily on the first call."""
        from ray.serve.multiplex import _ModelMultiplexWrapper

        wrapper = _ModelMultiplexWrapper(type(self).get_adapter.__wrapped__, self, count)
        setattr(self, "__serve_multiplex_wrapper", wrapper)

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_adapter(self, adapter_id: str) -> _LoadedAdapter:
        """Attach an adapter from the adapter store (between generations, never during one)."""
        await asyncio.to_thread(self.service.load_adapter, adapter_id)
        return _LoadedAdapter(self.service, adapter_id)

    async def _adapter(self) -> str | None:
        adapter_id = serve.get_multiplexed_model_id() or None
        if adapter_id is not None:
            await self.get_adapter(adapter_id)
        return adapter_id

    async def complete(self, payload: dict[str, Any], session: str) -> dict[str, Any]:
        """One whole answer (batched with concurrent requests for the same adapter)."""
        try:
            adapter_id = await self._adapter()
        except Exception as exc:  # an unknown or incompatible adapter: the request's fault
            return _load_error(exc)
        return await self._complete_batch(payload, adapter_id, session)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _complete_batch(
        self, payloads: list[dict[str, Any]], adapter_ids: list[str | None], sessions: list[str]
    ) -> list[dict[str, Any]]:
        # One generate call per adapter in the batch (Serve's multiplexing makes that usually one).
        def run() -> list[dict[str, Any]]:
            results: list[dict[str, Any]] = [{} for _ in payloads]
            by_adapter: dict[str | None, list[int]] = {}
            for i, adapter_id in enumerate(adapter_ids):
                by_adapter.setdefault(adapter_id, []).append(i)
            for adapter_id, indices in by_adapter.items():
                for i, merged in zip(
                    indices,
                    self._batch_items([payloads[i] for i in indices], adapter_id, [sessions[i] for i in indices]),
                ):
                    results[i] = merged
            return results

        return await asyncio.to_thread(run)

    def _batch_items(
        self, payloads: list[dict[str, Any]], adapter_id: str | None, sessions: list[str]
    ) -> list[dict[str, Any]]:
        from app.generation import GenerationRequestError, interaction_event, parse_request
        from app.serve.openai_api import _error_item

        out: list[dict[str, Any]] = [{} for _ in payloads]
        requests, positions = [], []
        for i, payload in enumerate(payloads):
            try:
                requests.append(parse_request(payload))
                positions.append(i)
            except GenerationRequestError as exc:
                out[i] = _error_item(exc)
        if requests:
            try:
                generations = self.service.complete_batch(requests, adapter_id)
            except GenerationRequestError:
                # One request that does not fit must not fail the others: answer them one by one.
                generations = []
                for i, request in zip(positions, requests):
                    try:
                        generations.append(self.service.complete(request, adapter_id))
                    except GenerationRequestError as exc:
                        out[i] = _error_item(exc)
                        generations.append(None)
            for i, request, generation in zip(positions, requests, generations):
                if generation is not None:
                    out[i] = {
                        "completion": generation.completion.model_dump(mode="json", exclude_none=True),
                        "event": interaction_event(request, generation, session_id=sessions[i]),
                    }
        return out

    async def stream(self, payload: dict[str, Any], session: str) -> AsyncIterator[dict[str, Any]]:
        """One answer as it is generated: ``{"chunk"}`` items, then ``{"event"}``."""
        try:
            adapter_id = await self._adapter()
        except Exception as exc:
            yield _load_error(exc)
            return
        async for item in _iterate_in_thread(lambda: generate_items(self.service, payload, adapter_id, session, True)):
            yield item

    async def loaded_adapters(self) -> list[str]:
        return self.service.loaded_adapters()


def _load_error(exc: Exception) -> dict[str, Any]:
    """A registered adapter that would not load is the server's failure (503, counted against its
    arm by the ingress), not the request's; the exception stays in the replica's log."""
    from app.generation import GenerationRequestError
    from app.serve.openai_api import _error_item

    if isinstance(exc, GenerationRequestError):
        return _error_item(exc)
    log.error("adapter load failed", exc_info=exc)
    return _error_item(
        GenerationRequestError("model", "the adapter could not be loaded on this server; retry", status_code=503)
    )
