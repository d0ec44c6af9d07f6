"""What a trainer is told (:class:`WorkerSpec`) and where it runs: the thin seam between
:class:`app.learning.trainer.Trainer` and Ray Train.

The trainer asks its context for its rank and device, its sets' rows, the checkpoint to resume
from, the collectives that keep the ranks in step, and to report. Two contexts:

* :class:`RayTrainContext`: on a Ray Train worker (``ray.train.report``, ``get_checkpoint``,
  ``get_dataset_shard``, ``prepare_model``, torch.distributed's collectives over the worker group);
* :class:`LocalContext`: one process without Ray (rank 0 of 1): the rows are given, reports are
  collected in a list and checkpoints copied into a folder, from which a later trainer resumes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from app.learning.training import FinetuneConfig

__all__ = [
    "CheckpointSource",
    "InjectedFault",
    "LocalCheckpoint",
    "LocalContext",
    "RayTrainContext",
    "TrainContext",
    "WorkerSpec",
    "deterministic_algorithms",
]

ReduceOp = Literal["sum", "max"]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """torch's deterministic algorithms within the block (``enabled``), the caller's setting after
    it. Where torch has no deterministic kernel for an op it warns rather than fails; on CUDA,
    cuBLAS gets the fixed workspace its deterministic mode needs."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


class InjectedFault(BaseModel):
    """Fault injection for tests: rank 0 raises once, right after reporting optimizer step ``step``;
    the file ``marker`` says the failure has happened (so it happens once)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(description="The optimizer step after whose report rank 0 fails.")
    marker: str = Field(description="Written when the failure happens; while it exists, none happens.")


class WorkerSpec(BaseModel):
    """What every worker of a run is told: the options and the little of the Kaizen config the
    workers need (the rest, store DSNs and keys, stays on the driver)."""

    model_config = ConfigDict(extra="forbid")

    opts: FinetuneConfig = Field(description="The fine-tuning options.")
    base_model: str = Field(description="model.base_model: a profile name or a checkpoint directory.")
    storage_root: str = Field(description="model.storage_root: where models and adapters are.")
    max_vram_gb: float = Field(description="training.resource_limits.max_vram_gb, per GPU.")
    max_seconds: float = Field(description="training.max_hours in seconds: the run stops after this much training.")
    parent_adapter_id: str | None = Field(None, description="The adapter to continue; None: a fresh adapter.")
    datasets: list[str] = Field(description="The sets the run has (train, validation, rehearsal, fisher, heldout).")
    fault: InjectedFault | None = Field(None, description="Fault injection for tests.")


class CheckpointSource(Protocol):
    """A checkpoint to resume from (``ray.train.Checkpoint`` or :class:`LocalCheckpoint`)."""

    def as_directory(self) -> contextlib.AbstractContextManager[str | os.PathLike[str]]:
        """The checkpoint as a local folder, for the time of the ``with`` block."""
        ...


class TrainContext(Protocol):
    """What a trainer needs of the place it runs."""

    rank: int
    world_size: int
    device: torch.device

    def dataset_rows(self, name: str) -> list[dict[str, Any]]:
        """Every row of the set ``name`` (the trainer takes its rank's share)."""
        ...

    def latest_checkpoint(self) -> CheckpointSource | None:
        """The checkpoint a restarted run goes on from; None for a fresh run."""
        ...

    def report(self, metrics: dict[str, Any], *, checkpoint: Path | None = None, name: str | None = None) -> None:
        """Hand over a report, with a checkpoint folder called ``name`` (a barrier on every rank)."""
        ...

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """The module the training steps run: wrapped for data parallelism where there are ranks."""
        ...

    def all_reduce(self, values: list[float], op: ReduceOp = "sum") -> list[float]:
        """``values`` summed (or their maximum) over the ranks; the values themselves with one rank."""
        ...

    def average(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Average ``tensors`` over the ranks in place."""
        ...


@dataclass
class LocalCheckpoint:
    """A checkpoint folder on this machine."""

    path: Path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[Path]:
        yield self.path


@dataclass
class LocalContext:
    """One process without Ray: rank 0 of a world of 1.

    Args:
        datasets: each set's rows (``{"messages": ...}`` dicts), as a run's ``--train`` etc.
        checkpoint_root: where checkpoints are copied (``<root>/<name>``); None: they are dropped.
        resume_from: a checkpoint folder to go on from.
        device: where the model trains.
    """

    datasets: Mapping[str, list[dict[str, Any]]]
    checkpoint_root: Path | None = None
    resume_from: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[dict[str, Any]] = field(default_factory=list)
    """Every report's metrics, in order."""
    checkpoints: dict[str, Path] = field(default_factory=dict)
    """The checkpoints kept, by name."""
    rank: int = 0
    world_size: int = 1

    def dataset_rows(self, name: str) -> list[dict[str, Any]]:
        return list(self.datasets[name])

    def latest_checkpoint(self) -> LocalCheckpoint | None:
        return LocalCheckpoint(Path(self.resume_from)) if self.resume_from is not None else None

    def report(self, metrics: dict[str, Any], *, checkpoint: Path | None = None, name: str | None = None) -> None:
        self.reports.append(copy.deepcopy(metrics))
        if checkpoint is not None and name is not None and self.checkpoint_root is not None:
            target = Path(self.checkpoint_root) / name
            shutil.copytree(checkpoint, target, dirs_exist_ok=True)
            self.checkpoints[name] = target

    def prepare_model(self, module: nn.Module) -> nn.Module:
        return module

    def all_reduce(self, values: list[float], op: ReduceOp = "sum") -> list[float]:
        return values

    def average(self, tensors: Mapping[str, torch.Tensor]) -> None:
        return None


class RayTrainContext:
    """A Ray Train worker: its rank in the worker group, its device, its sets (Ray Datasets
    handed to the ``TorchTrainer``), ``ray.train.report`` and the worker group's process group.

    Torch's threads follow the worker's CPU reservation (``cpus``), not whatever the
    environment says.
    """

    def __init__(self, cpus: float) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank: int = context.get_world_rank()
        self.world_size: int = context.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cpus)))

    def dataset_rows(self, name: str) -> list[dict[str, Any]]:
        import ray.train

        return list(ray.train.get_dataset_shard(name).iter_rows())

    def latest_checkpoint(self) -> CheckpointSource | None:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], *, checkpoint: Path | None = None, name: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        if name is None:
            ray.train.report(metrics)
            return
        saved = Checkpoint.from_directory(checkpoint) if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=name)

    def prepare_model(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        # The model is already on its device (a 4-bit one cannot be moved); DDP only with world > 1.
        return ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy="ddp")

    def all_reduce(self, values: list[float], op: ReduceOp = "sum") -> list[float]:
        if _process_group_size() == 1:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

    def average(self, tensors: Mapping[str, torch.Tensor]) -> None:
        world = _process_group_size()
        if world > 1:
            import torch.distributed as dist

            for value in tensors.values():
                dist.all_reduce(value)
                value.div_(world)


def _process_group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
