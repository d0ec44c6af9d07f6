"""The Ray Train side of a fine-tuning run: the ``TorchTrainer`` (:func:`build_trainer`), the
function each of its workers runs (:func:`train_loop`: a :class:`~app.learning.trainer.Trainer`
with the Ray context) and the checks that refuse, before any worker starts, what cannot run
(:func:`check_requirements`).

``jobs/finetune.py`` builds one trainer; ``jobs/sweep.py`` one per Ray Tune trial.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.config import KaizenConfig
from app.learning.lineage import resolve_parent_adapter
from app.learning.masking import fisher_source
from app.learning.trainer import Trainer
from app.learning.training import FinetuneConfig
from app.learning.training_data import DATASETS
from app.learning.worker_context import InjectedFault, RayTrainContext, WorkerSpec, deterministic_algorithms

if TYPE_CHECKING:
    import ray.data
    from ray.train.torch import TorchTrainer

__all__ = ["FAIL_AT_STEP_ENV", "FAIL_MARKER_ENV", "build_trainer", "check_requirements", "train_loop", "worker_spec"]

FAIL_AT_STEP_ENV = "KAIZEN_TEST_FAIL_AT_STEP"
"""Fault injection for tests: rank 0 raises once, right after reporting this optimizer step."""
FAIL_MARKER_ENV = "KAIZEN_TEST_FAIL_MARKER"
"""The file whose existence says the injected failure has happened (so it happens once)."""


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the trainer of :class:`~app.learning.trainer.WorkerSpec`
    ``config``, on this worker's Ray context, set up (or resumed) and run to the end."""
    spec = WorkerSpec.model_validate(config)
    trainer = Trainer(spec, RayTrainContext(cpus=spec.opts.cpus_per_worker))
    with deterministic_algorithms(spec.opts.deterministic):
        trainer.setup()
        trainer.fit()


def worker_spec(
    cfg: KaizenConfig,
    opts: FinetuneConfig,
    datasets: Sequence[str],
    parent_adapter_id: str | None = None,
    fault: InjectedFault | None = None,
) -> WorkerSpec:
    """What a trainer of ``opts`` on the sets ``datasets`` is told: only what it needs of ``cfg``
    (the rest of the config, store DSNs and keys, stays on the driver)."""
    return WorkerSpec(
        opts=opts,
        base_model=cfg.model.base_model,
        storage_root=cfg.model.storage_root,
        max_vram_gb=cfg.training.resource_limits.max_vram_gb,
        max_seconds=cfg.training.max_hours * 3600.0,
        parent_adapter_id=parent_adapter_id,
        datasets=sorted(datasets),
        fault=fault,
    )


def build_trainer(
    cfg: KaizenConfig,
    opts: FinetuneConfig,
    datasets: Mapping[str, ray.data.Dataset],
    run_name: str,
    storage_path: str | os.PathLike[str],
    callbacks: Sequence[Any] | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one run: :func:`train_loop` on ``opts.num_workers`` workers.

    Resolves ``opts.continue_from`` now (the champion at build time is the parent; it is in
    ``trainer.train_loop_config["parent_adapter_id"]``) and checks the options against the
    resource limits and what is installed (:func:`check_requirements`).

    Args:
        datasets: ``train`` and optionally ``validation``, ``rehearsal``, ``fisher``, ``heldout``
            (:func:`app.learning.training_data.read_datasets`); every worker takes an equal share
            of each.
        run_name: the run's folder under ``storage_path``; restarting a trainer with the same
            name and path resumes that run from its last checkpoint.
        callbacks: Ray Train ``UserCallback`` instances (e.g. Ray Tune's ``TuneReportCallback``).

    Raises:
        ValueError: a missing ``train`` set, or masking without the data its Fisher comes from.
    """
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    if "train" not in datasets:
        raise ValueError("datasets needs a 'train' set")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown datasets {unknown}: use {', '.join(DATASETS)}")
    if fisher_source(opts, datasets) is None and opts.masking != "none":
        raise ValueError(
            f"finetune.masking: {opts.masking} protects earlier tasks and needs their rows for the Fisher "
            "information: give rehearsal rows (--rehearsal) or --fisher-data"
            + (", or set finetune.mask_mode=most_important" if opts.masking == "fggm" else "")
        )
    check_requirements(cfg, opts)
    spec = worker_spec(cfg, opts, list(datasets), resolve_parent_adapter(cfg, opts), _fault_injection())
    resources = {"CPU": opts.cpus_per_worker, **({"GPU": 1} if opts.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=opts.num_workers, use_gpu=opts.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=os.fspath(storage_path),
            failure_config=FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=opts.checkpoints_to_keep),
            callbacks=list(callbacks or []),
        ),
        datasets=dict(datasets),
        # Each worker takes its share itself (Trainer.setup): no streaming split.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def check_requirements(cfg: KaizenConfig, opts: FinetuneConfig) -> None:
    """Refuse, before any worker starts, what cannot run: more CPUs than
    ``training.resource_limits.max_cpu_cores``, DeepSpeed or bitsandbytes that are not
    installed, GPUs that a local Ray does not have.

    Raises:
        ValueError: the CPU limit or the GPU count, naming the key.
        ImportError: a missing package, with the extra that installs it.
    """
    limit = cfg.training.resource_limits.max_cpu_cores
    cpus = opts.num_workers * opts.cpus_per_worker
    if cpus > limit:
        raise ValueError(
            f"finetune.num_workers: {opts.num_workers} workers x {opts.cpus_per_worker} CPUs = {cpus:g} "
            f"exceeds training.resource_limits.max_cpu_cores={limit}"
        )
    for wanted, package, key in (
        (opts.strategy == "deepspeed", "deepspeed", "finetune.strategy=deepspeed"),
        (opts.quantize_4bit, "bitsandbytes", "finetune.quantize_4bit"),
    ):
        if wanted and importlib.util.find_spec(package) is None:
            raise ImportError(f"{key} needs the {package} package, which is not installed: pip install 'kaizen[gpu]'")
    if opts.use_gpu:
        import ray

        # A cluster may add GPU nodes on demand (the autoscaler): only a local Ray is counted.
        joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        if ray.is_initialized() and not joined:
            gpus = ray.cluster_resources().get("GPU", 0)
        elif not ray.is_initialized():
            gpus = torch.cuda.device_count()
        else:
            return
        if gpus < opts.num_workers:
            raise ValueError(
                f"finetune.use_gpu: {opts.num_workers} workers need {opts.num_workers} GPUs and "
                f"{'this machine' if not ray.is_initialized() else 'the local Ray'} has {gpus:g}; "
                "set finetune.use_gpu=false to train on CPU"
            )


def _fault_injection() -> InjectedFault | None:
    step = os.environ.get(FAIL_AT_STEP_ENV)
    if not step:
        return None
    marker = os.environ.get(FAIL_MARKER_ENV) or str(Path(tempfile.gettempdir()) / f"kaizen-fail-{os.getpid()}")
    return InjectedFault(step=int(step), marker=marker)
