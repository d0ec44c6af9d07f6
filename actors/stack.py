"""The whole of Kaizen on a Ray cluster, started and stopped as one: the Serve app (collector,
scorer, generator), the deployer and the scheduler. ``kaizen up`` runs it until Ctrl-C; the
closed-loop benchmark and its test run it for as long as they drive traffic through it.

Ray must be up (:func:`app.ray_setup.start_ray`); the actors are detached, so :func:`stop_kaizen`
removes them before Serve goes.
"""

from __future__ import annotations

from app.config import KaizenConfig

__all__ = ["KaizenNotReady", "start_kaizen", "stop_kaizen"]


class KaizenNotReady(RuntimeError):
    """The Serve app did not answer ``/readyz`` in time (everything started was stopped again)."""


def start_kaizen(cfg: KaizenConfig, *, ready_timeout_s: float = 120.0) -> str:
    """Start the Serve app with ``cfg``, wait until it is ready, then start the deployer and the
    scheduler actors; returns the API's URL.

    Raises:
        KaizenNotReady: the app did not become ready within ``ready_timeout_s``.
    """
    from ray import serve

    from actors.deployer import start_deployer
    from actors.scheduler import start_scheduler
    from app.client import wait_until_ready
    from app.serve.build import build_app

    logging_config = {"log_level": cfg.serve.log_level, "enable_access_log": cfg.serve.access_log}
    serve.start(http_options=cfg.http_options(), logging_config=logging_config)
    serve.run(
        build_app(cfg),
        name=cfg.serve.app_name,
        route_prefix=cfg.serve.route_prefix,
        blocking=False,
        logging_config=logging_config,
    )
    url = cfg.api_url()
    if not wait_until_ready(url, timeout_s=ready_timeout_s, verify=cfg.tls_verify()):
        serve.shutdown()
        raise KaizenNotReady(f"Kaizen did not become ready at {url}/readyz within {ready_timeout_s:g} s")
    _audit_start(cfg, url)
    start_deployer(cfg, detached=True)
    start_scheduler(cfg, detached=True)
    return url


def _audit_start(cfg: KaizenConfig, url: str) -> None:
    """Audit the config Kaizen starts with (``config.apply``): the keys off their defaults,
    secrets masked, and a hash of the whole tree."""
    import hashlib
    import json
    import os

    from app.config_keys import changed_keys
    from app.store import open_store

    whole = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    store = open_store(cfg.store)
    try:
        details = {"url": url, "sha256": hashlib.sha256(whole).hexdigest(), "changed": changed_keys(cfg)}
        store.audit(os.environ.get("USER") or "kaizen up", "config.apply", cfg.serve.app_name, details)
    finally:
        store.close()


def stop_kaizen(cfg: KaizenConfig, *, end_cycles: bool = False) -> None:
    """Remove the scheduler and the deployer, then Serve. A cycle already started goes on unless
    ``end_cycles``: then the cycles started here as processes (not Ray jobs) are ended too, so that
    their training workers free the cluster (what a test or a benchmark that ends wants)."""
    from ray import serve

    from actors.deployer import stop_deployer
    from actors.scheduler import stop_scheduler

    stop_scheduler(cfg.ray.namespace)
    stop_deployer(cfg.ray.namespace)
    if end_cycles:
        _end_cycles(cfg)
    serve.shutdown()


def _end_cycles(cfg: KaizenConfig) -> None:
    """End the running cycles launched on this host as processes (each in a session of its own)."""
    import os
    import signal
    import socket

    from app.scheduling.state import TrainingRunStore
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        running = TrainingRunStore(store).running()
    finally:
        store.close()
    launch = dict((running.config or {}).get("launch") or {}) if running is not None else {}
    if launch.get("via") == "process" and launch.get("host") == socket.gethostname():
        try:
            os.killpg(int(launch["pid"]), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
