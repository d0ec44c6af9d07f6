"""What every long-lived Kaizen actor shares: started once per namespace under its name (detached
for ``kaizen up``), found by name, and stopped cleanly (its own ``stop``, then removed for good)."""

from __future__ import annotations

import logging
from typing import Any

import ray

from app.config import KaizenConfig

__all__ = ["find_actor", "start_actor", "stop_actor"]

log = logging.getLogger("kaizen.actors")


def start_actor(actor_class: Any, name: str, cfg: KaizenConfig, *, detached: bool = True) -> Any:
    """The ``name`` actor of ``cfg.ray.namespace``, started from ``actor_class`` (a ``ray.remote``
    class taking the config as a dict) if it is not running; Ray must be up. ``detached``: it
    outlives the driver that started it. Returns its handle."""
    options: dict[str, Any] = {"name": name, "namespace": cfg.ray.namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return actor_class.options(**options).remote(cfg.model_dump(mode="json"))


def find_actor(name: str, namespace: str) -> Any | None:
    """The running ``name`` actor of ``namespace``, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def stop_actor(name: str, namespace: str, timeout_s: float = 60.0) -> bool:
    """Call the actor's ``stop`` and remove it (no restart); False if none was running."""
    handle = find_actor(name, namespace)
    if handle is None:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=timeout_s)
    except Exception:  # already dying, or stuck: removed below all the same
        log.warning("%s did not stop cleanly; removing it", name, exc_info=True)
    ray.kill(handle, no_restart=True)
    return True
