"""What the scheduling tests share: a config with small thresholds, the launcher's test double (the
seam to the Ray job server, which these tests do not start), the cluster's free resources as a
table, and a champion adapter whose lineage names a training set."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.config import KaizenConfig
from app.learning.dataset.write import quality_histogram
from app.model.adapters import AdapterManifest
from app.registry import AdapterRegistry
from app.scheduling.launcher import CycleOutcome
from app.scheduling.resources import GIB
from app.scheduling.state import TrainingRun
from app.store import InteractionStore
from tests.app.deployment.helpers import BASE_MODEL, serve

__all__ = ["BASE_MODEL", "Clock", "Free", "Launcher", "make_cfg", "make_trained_champion", "past_cycle", "serve"]


def make_cfg(*, enabled: bool = True, **training: Any) -> KaizenConfig:
    """A config whose triggers fire on small samples (20 interactions; a 40-answer trend window)."""
    settings: dict[str, Any] = {"min_interactions": 20, "interval_hours": 24, "quality_window": 40}
    settings.update(training)
    return KaizenConfig.model_validate(
        {
            "enabled": enabled,
            "privacy": {"hmac_key": "k"},
            "model": {"base_model": BASE_MODEL},
            "training": settings,
        }
    )


class Clock:
    """The scheduler's clock: it stands still until the test moves it. It starts ten days ago on a
    whole minute, so that interactions stamped with it, even after the test moved it by days, are
    not in the future (where ingestion refuses them)."""

    def __init__(self) -> None:
        self.now = (datetime.now(UTC) - timedelta(days=10)).replace(second=0, microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += timedelta(minutes=minutes)


class Launcher:
    """The cycle launcher's test double: records each launch and reports the end the test sets
    (``end``); ``refuse`` makes the next launch raise, as an unreachable job server would."""

    def __init__(self) -> None:
        self.launched: list[TrainingRun] = []
        self.outcomes: dict[str, CycleOutcome] = {}
        self.asked: list[str] = []
        self.refuse: str | None = None

    def launch(self, run: TrainingRun) -> Mapping[str, Any]:
        if self.refuse:
            raise ConnectionError(self.refuse)
        self.launched.append(run)
        return {"via": "test", "job_id": f"job-{len(self.launched)}"}

    def outcome(self, run: TrainingRun) -> CycleOutcome | None:
        self.asked.append(run.id)
        return self.outcomes.get(run.id)

    def end(self, run: TrainingRun, status: str = "succeeded", adapter_id: str | None = None) -> None:
        reason = f"adapter {adapter_id} registered" if status == "succeeded" else "kaizen learn: training diverged"
        metrics = {"stages": {"dataset": {"seconds": 3.0}, "training (finetune)": {"seconds": 40.0}}}
        self.outcomes[run.id] = CycleOutcome(status, reason, adapter_id, metrics)  # type: ignore[arg-type]


class Free:
    """The Ray cluster's free resources, in ``ray.available_resources()``'s shape."""

    def __init__(self, cpu: float = 4.0, gpu: float = 0.0, memory_gb: float = 32.0) -> None:
        self.cpu, self.gpu, self.memory_gb = cpu, gpu, memory_gb

    def available(self) -> Mapping[str, float]:
        out = {"CPU": self.cpu, "memory": self.memory_gb * GIB, "object_store_memory": 2.0 * GIB}
        if self.gpu:
            out["GPU"] = self.gpu
        return out


def make_trained_champion(
    store: InteractionStore, folder: Path, adapter_id: str, quality: float, *, at: datetime, n: int = 60
) -> list[str]:
    """A champion adapter trained on ``n`` interactions scored around ``quality``: they are ingested
    and scored, the dataset folder's ``manifest.json`` carries the histogram of their stored scores
    (what the scheduler reads of a dataset: ``quality_histogram``, as jobs/build_dataset.py writes
    it), and the adapter's lineage names the folder."""
    ids = serve(store, n, model=BASE_MODEL, quality=quality, sd=0.04, seed=99, at=at)
    scores = [store.get_interaction(i)["quality_score"] for i in ids]
    folder.mkdir(parents=True, exist_ok=True)
    histogram = quality_histogram(scores)
    (folder / "manifest.json").write_text(
        json.dumps({"dataset_id": folder.name, "rows": len(scores), "quality_histogram": histogram.model_dump()})
    )
    manifest = AdapterManifest(
        adapter_id=adapter_id,
        base_model=BASE_MODEL,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
        files={"adapter_config.json": "0" * 64, "adapter_model.safetensors": "1" * 64},
        lineage={"dataset_uri": str(folder)},
    )
    registry = AdapterRegistry(store)
    registry.register(manifest, f"/adapters/{adapter_id}", actor="learn-job")
    registry.set_alias("champion", adapter_id, "test", "the champion before the test")
    return ids


def past_cycle(store: InteractionStore, at: datetime, adapter_id: str | None = None) -> TrainingRun:
    """A cycle that ran and succeeded before the test, with its data cut-off at ``at``."""
    from app.scheduling.state import TrainingRunStore

    runs = TrainingRunStore(store)
    run = runs.schedule(at, request={"actor": "alice", "reason": "the first cycle"})
    run = runs.claim(run, at, data_cutoff=at, needs={})
    runs.set_launch(run.id, {"via": "test"})
    return runs.finish(run, "succeeded", at, reason="adapter registered", adapter_id=adapter_id)
