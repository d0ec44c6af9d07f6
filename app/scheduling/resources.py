"""What a learning cycle needs from the Ray cluster, what the cluster has free, and the off-peak
window.

The cluster is behind :class:`ClusterResources` (``ray.available_resources()`` in the scheduler
actor; a table in the tests): what it reports free is what Serve's replicas and running tasks have
not reserved, so a cycle started on it does not take the CPUs of the collector or the generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Protocol

from app.config import KaizenConfig, job_options

__all__ = [
    "GIB",
    "ClusterResources",
    "CycleNeeds",
    "OffPeakWindow",
    "ResourceCheck",
    "check_resources",
]

GIB = 1024**3


class ClusterResources(Protocol):
    """The Ray cluster's free resources: ``{"CPU": 3.0, "GPU": 1.0, "memory": bytes, ...}`` as
    ``ray.available_resources()`` reports them (a resource nobody has free is absent)."""

    def available(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class CycleNeeds:
    """What one learning cycle reserves at its largest stage: CPUs and GPUs (training's
    ``finetune.num_workers`` x ``finetune.cpus_per_worker``, one GPU per worker with
    ``finetune.use_gpu``, times ``sweep.max_concurrent_trials`` for a sweep; or the rehearsal's
    generation actors, ``ssr.actors`` x ``ssr.num_cpus``/``ssr.num_gpus``), and the host memory of
    ``training.resource_limits.max_system_memory_gb``."""

    cpus: float
    gpus: float
    memory_gb: float
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: KaizenConfig) -> CycleNeeds:
        """The needs of a cycle run with ``cfg``.

        Raises:
            ConfigError: a bad option in the finetune, ssr, sweep or learn section.
        """
        learn = job_options(cfg, "learn")
        ft = job_options(cfg, "finetune")
        trials = job_options(cfg, "sweep").max_concurrent_trials if learn.train_with == "sweep" else 1
        stages = {
            "training": {
                "CPU": ft.num_workers * ft.cpus_per_worker * trials,
                "GPU": float(ft.num_workers * trials) if ft.use_gpu else 0.0,
            }
        }
        if learn.rehearsal == "ssr":
            ssr = job_options(cfg, "ssr")
            stages["rehearsal"] = {"CPU": ssr.actors * ssr.num_cpus, "GPU": ssr.actors * (ssr.num_gpus or 0.0)}
        return cls(
            cpus=max(s["CPU"] for s in stages.values()),
            gpus=max(s["GPU"] for s in stages.values()),
            memory_gb=cfg.training.resource_limits.max_system_memory_gb,
            stages=stages,
        )

    def to_json(self) -> dict[str, Any]:
        return {"CPU": self.cpus, "GPU": self.gpus, "memory_gb": self.memory_gb, "stages": self.stages}


@dataclass(frozen=True)
class ResourceCheck:
    """The needs against what the cluster has free; ``short`` names each shortfall in words."""

    needs: CycleNeeds
    free: dict[str, float]
    short: list[str]

    @property
    def ok(self) -> bool:
        return not self.short

    @property
    def reason(self) -> str:
        if self.ok:
            return (
                f"the cluster has {_describe(self.free)} free; a cycle needs {self.needs.cpus:g} CPU, "
                f"{self.needs.gpus:g} GPU and {self.needs.memory_gb:g} GB of memory"
            )
        return "not enough free in the Ray cluster beside Serve: " + "; ".join(self.short)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "needs": self.needs.to_json(), "free": self.free, "short": self.short}


def check_resources(needs: CycleNeeds, available: Mapping[str, float]) -> ResourceCheck:
    """Whether the cluster's free resources (``ray.available_resources()``'s shape) hold the needs."""
    free = {
        "CPU": round(float(available.get("CPU", 0.0)), 3),
        "GPU": round(float(available.get("GPU", 0.0)), 3),
        "memory_gb": round(float(available.get("memory", 0.0)) / GIB, 3),
    }
    short = []
    if free["CPU"] + 1e-9 < needs.cpus:
        short.append(f"{needs.cpus:g} CPU needed, {free['CPU']:g} free (finetune/ssr workers x CPUs each)")
    if free["GPU"] + 1e-9 < needs.gpus:
        short.append(f"{needs.gpus:g} GPU needed, {free['GPU']:g} free (finetune.use_gpu: one per worker)")
    if free["memory_gb"] + 1e-9 < needs.memory_gb:
        short.append(
            f"{needs.memory_gb:g} GB of memory needed, {free['memory_gb']:g} GB free "
            "(training.resource_limits.max_system_memory_gb)"
        )
    return ResourceCheck(needs, free, short)


def _describe(free: Mapping[str, float]) -> str:
    return f"{free['CPU']:g} CPU, {free['GPU']:g} GPU and {free['memory_gb']:g} GB of memory"


@dataclass(frozen=True)
class OffPeakWindow:
    """Hours of the day (UTC) in which the scheduler may start a cycle by itself; ``22:00-06:00``
    spans midnight. Its start is in it, its end is not."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> OffPeakWindow:
        """A window from ``training.window``'s validated form ``HH:MM-HH:MM``.

        Raises:
            ValueError: not that form.
        """
        try:
            first, second = text.split("-")
            start, end = time.fromisoformat(first.strip()), time.fromisoformat(second.strip())
        except ValueError:
            raise ValueError(f"training.window: {text!r} is not 'HH:MM-HH:MM'") from None
        if start == end:
            raise ValueError(f"training.window: {text!r} is empty (start and end are the same time)")
        return cls(start, end)

    def contains(self, now: datetime) -> bool:
        t = _utc_time(now)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_start(self, now: datetime) -> datetime:
        """When the window next opens at or after ``now`` (``now`` itself when it is open)."""
        if self.contains(now):
            return now
        utc = now.astimezone(UTC)
        opening = utc.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return opening if opening > utc else opening + timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} UTC"


def _utc_time(now: datetime) -> time:
    return now.astimezone(UTC).time().replace(tzinfo=None)
