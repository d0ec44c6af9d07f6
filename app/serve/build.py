"""Typed Serve application builder: ``serve run app.serve.build:build_app config=configs/default.yaml``.

``kaizen up`` calls :func:`build_app` with a loaded config; ``serve run`` passes string args.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from app.config import KaizenConfig, load_config
from app.serve.collector import CollectorDeployment
from app.serve.generator import GeneratorDeployment
from app.serve.scorer import QualityScorerDeployment

__all__ = ["BuildArgs", "build_app", "collector_options", "generator_options", "scorer_options"]


class BuildArgs(BaseModel):
    """Arguments of ``serve run app.serve.build:build_app``."""

    model_config = ConfigDict(extra="forbid")
    config: str = Field("configs/default.yaml", description="Config file.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, key=value.")


def _options(num_cpus: float, max_ongoing: int, autoscaling: Any, health_check_period_s: float) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": num_cpus},
        "max_ongoing_requests": max_ongoing,
        "autoscaling_config": {
            "min_replicas": autoscaling.min_replicas,
            "initial_replicas": max(1, autoscaling.min_replicas),
            "max_replicas": autoscaling.max_replicas,
            "target_ongoing_requests": autoscaling.target_ongoing_requests,
        },
        "health_check_period_s": health_check_period_s,
    }


def collector_options(cfg: KaizenConfig) -> dict[str, Any]:
    """Deployment options of the collector from ``serve.collector``."""
    c = cfg.serve.collector
    return _options(c.num_cpus, c.max_ongoing_requests, c.autoscaling, health_check_period_s=5)


def scorer_options(cfg: KaizenConfig) -> dict[str, Any]:
    """Deployment options of the quality scorer from ``serve.scorer``."""
    c = cfg.serve.scorer
    return _options(c.num_cpus, c.max_ongoing_requests, c.autoscaling, health_check_period_s=10)


def generator_options(cfg: KaizenConfig) -> dict[str, Any]:
    """Deployment options of the generator from ``serve.generator``."""
    c = cfg.serve.generator
    options = _options(c.num_cpus, c.max_ongoing_requests, c.autoscaling, health_check_period_s=10)
    options["ray_actor_options"]["num_gpus"] = c.num_gpus
    return options


def build_app(args: dict[str, Any] | KaizenConfig | None = None) -> Application:
    """The Kaizen Serve application from a config (or ``serve run`` args)."""
    if isinstance(args, KaizenConfig):
        cfg = args
    else:
        parsed = BuildArgs.model_validate(args or {})
        cfg = load_config(parsed.config, parsed.overrides)
    config = cfg.model_dump(mode="json")
    scorer = None
    if cfg.serve.scorer.enabled:
        scorer = QualityScorerDeployment.options(**scorer_options(cfg)).bind(config)
    generator = None
    if cfg.serve.generator.enabled:
        generator = GeneratorDeployment.options(**generator_options(cfg)).bind(config)
    return CollectorDeployment.options(**collector_options(cfg)).bind(config, scorer, generator)
