"""The deployer actor: :class:`app.deployment.deployer.Deployer` on a timer, as a named Ray actor.

``kaizen up`` starts it detached (:func:`start_deployer`), so it outlives the command that started
it, as ``kaizen-deployer`` in the configured namespace (``ray.namespace``); the CLI and the HTTP
API reach it by that name (:func:`deployer_handle`). It restarts by itself when it dies
(``max_restarts=-1``): everything it knows is in the store, so a restarted deployer goes on from
the deployment's state as the store has it. It needs no CPU of its own (``num_cpus=0``): it reads
the store every ``deploy.check_interval_s`` and sends one small request per smoke test.

The logic is all in the plain class; this module only builds it from the config, runs its
``tick`` in a thread, and forwards the operators' calls.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from actors.named import find_actor, start_actor, stop_actor
from app.config import KaizenConfig
from app.deployment.deployer import Deployer
from app.deployment.probe import HttpProbe
from app.store import open_store

__all__ = [
    "ACTOR_NAME",
    "DeployerActor",
    "deployer_handle",
    "start_deployer",
    "stop_deployer",
]

ACTOR_NAME = "kaizen-deployer"

log = logging.getLogger("kaizen.deployer")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DeployerActor:
    """Ticks a :class:`Deployer` every ``deploy.check_interval_s`` and forwards operators' calls
    to it (its methods hold one lock, so a call and a tick never interleave)."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = KaizenConfig.model_validate(config)
        self.store = open_store(cfg.store)
        probe = HttpProbe.for_config(cfg, self.store)
        self.deployer = Deployer(cfg, self.store, probe)
        self.interval_s = cfg.deploy.check_interval_s
        self.ticks = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deployer-tick", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deployer.tick()
                self.last_error = None
            except Exception as exc:  # the store away for a moment, a bug: said in status, tried again
                log.exception("deployer tick failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
            self.ticks += 1
            self._stop.wait(self.interval_s)

    def status(self) -> dict[str, Any]:
        """:meth:`Deployer.status` with the actor's own health."""
        out = self.deployer.status()
        out["deployer"] = {
            "ticks": self.ticks,
            "check_interval_s": self.interval_s,
            "last_error": self.last_error,
            "running": self._thread.is_alive(),
            "pid": os.getpid(),
        }
        return out

    def tick(self) -> dict[str, Any] | None:
        """One tick now (besides the timer's); the deployment after it."""
        d = self.deployer.tick()
        return d.to_json() if d else None

    def promote(self, adapter_id: str, actor: str, reason: str) -> dict[str, Any]:
        return self.deployer.promote(adapter_id, actor, reason).to_json()

    def rollback(self, deployment_id: str | None, actor: str, reason: str) -> dict[str, Any]:
        return self.deployer.rollback(deployment_id, actor, reason).to_json()

    def pause(self, deployment_id: str | None, actor: str, reason: str) -> dict[str, Any]:
        return self.deployer.pause(deployment_id, actor, reason).to_json()

    def resume(self, deployment_id: str | None, actor: str, reason: str) -> dict[str, Any]:
        return self.deployer.resume(deployment_id, actor, reason).to_json()

    def stop(self) -> None:
        """Stop the timer and close the store (before the actor is killed for good)."""
        self._stop.set()
        self._thread.join(timeout=max(30.0, 2 * self.interval_s))
        self.store.close()


def start_deployer(cfg: KaizenConfig, *, detached: bool = True) -> Any:
    """The deployer actor of ``cfg.ray.namespace``, started if it is not running (Ray must be up:
    :func:`app.ray_setup.start_ray`). ``detached``: it outlives the driver that started it (what
    ``kaizen up`` wants); stop it with :func:`stop_deployer`. Returns its handle."""
    return start_actor(DeployerActor, ACTOR_NAME, cfg, detached=detached)


def deployer_handle(namespace: str) -> Any | None:
    """The running deployer actor of ``namespace``, or None."""
    return find_actor(ACTOR_NAME, namespace)


def stop_deployer(namespace: str, timeout_s: float = 60.0) -> bool:
    """Stop and remove the deployer actor of ``namespace`` (no restart); False if none was running."""
    return stop_actor(ACTOR_NAME, namespace, timeout_s)
