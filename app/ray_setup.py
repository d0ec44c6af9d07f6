"""Starting or joining Ray, the same way for every job and command."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import KaizenConfig

__all__ = ["ray_address", "start_ray"]


def ray_address(cfg: KaizenConfig, address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``ray.address``, else ``$RAY_ADDRESS`` (set by
    ``ray job submit``); None means a local Ray of this process's own."""
    return address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def start_ray(
    cfg: KaizenConfig, *, address: str | None = None, logging_level: str = "ERROR", log_to_driver: bool = False
) -> None:
    """Join the configured cluster, or start a local Ray with ``ray.num_cpus`` CPUs; nothing when
    this process has Ray already.

    A local Ray is started with ``address="local"``: a bare ``ray.init()`` would attach to
    whatever cluster ``ray start`` last left on this machine (``/tmp/ray/ray_current_cluster``),
    even a stopped one.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    joining = ray_address(cfg, address)
    ray.init(
        address=joining or "local",
        num_cpus=None if joining else cfg.ray.num_cpus,
        namespace=cfg.ray.namespace,
        include_dashboard=False,
        logging_level=logging_level,
        log_to_driver=log_to_driver,
    )
