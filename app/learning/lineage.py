"""Where a fine-tuned adapter comes from and where it goes: the parent it continues
(:func:`resolve_parent_adapter`), and the run's final adapter published to the adapter store with
its lineage and registered as a ``candidate`` (:func:`publish_adapter`)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import KaizenConfig
from app.learning.checkpointing import ADAPTER_DIR
from app.learning.training import FinetuneConfig
from app.learning.training_data import TrainingData

if TYPE_CHECKING:
    from ray.train import Result

__all__ = ["ACTOR", "TrainingDidNotLearn", "code_version", "publish_adapter", "resolve_parent_adapter"]

ACTOR = "jobs.finetune"
"""Who registers the adapters, in the registry's history."""


class TrainingDidNotLearn(RuntimeError):
    """A run finished but its training loss did not fall: a failed run, whose adapter is not
    published. ``metrics`` are its final report's."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


def resolve_parent_adapter(cfg: KaizenConfig, opts: FinetuneConfig) -> str | None:
    """The adapter to continue from: the registry's champion (None when unset), an adapter id,
    or None for a fresh adapter.

    Raises:
        ValueError: the adapter is not in the registry or the store, was trained on another base
            model, or has another LoRA shape than the options ask for.
    """
    if opts.continue_from is None:
        return None
    from app.model.adapters import AdapterStore
    from app.registry import champion_adapter, registered_adapter

    if opts.continue_from == "champion":
        adapter_id = champion_adapter(cfg)
        if adapter_id is None:
            return None
    elif registered_adapter(cfg, opts.continue_from) is None:
        raise ValueError(f"finetune.continue_from: adapter {opts.continue_from!r} is not registered")
    else:
        adapter_id = opts.continue_from
    manifest = AdapterStore(cfg.model.storage_root).manifest(adapter_id)
    where = f"finetune.continue_from ({opts.continue_from} = {adapter_id})"
    if manifest.base_model != cfg.model.base_model:
        raise ValueError(
            f"{where}: trained on base model {manifest.base_model!r}, not model.base_model={cfg.model.base_model!r}"
        )
    targets = manifest.peft.target_modules
    shape = {
        "lora_rank": (manifest.peft.r, opts.lora_rank),
        "lora_alpha": (float(manifest.peft.lora_alpha), opts.lora_alpha),
        "target_modules": (sorted(targets) if isinstance(targets, list) else targets, sorted(opts.target_modules)),
    }
    for key, (theirs, ours) in shape.items():
        if theirs != ours:
            raise ValueError(
                f"finetune.{key}: {ours} differs from the adapter's {theirs} ({where}); continuing needs the "
                "same LoRA shape: match it, or set finetune.continue_from=null for a fresh adapter"
            )
    return adapter_id


def publish_adapter(
    cfg: KaizenConfig,
    opts: FinetuneConfig,
    result: Result,
    *,
    data: TrainingData,
    parent_adapter_id: str | None,
    started: float | None = None,
) -> dict[str, Any]:
    """Save a run's final adapter in the adapter store with its lineage and register it as a
    ``candidate``; returns ``adapter_id``, ``uri``, ``status``, ``parent_adapter_id``,
    ``metrics``, ``run_path`` and ``checkpoint_path``.

    Raises:
        ValueError: the run left no final checkpoint.
        TrainingDidNotLearn: its training loss did not fall (``finetune.min_loss_drop``); nothing is
            stored or registered.
    """
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    checkpoint, final = result.checkpoint, dict(result.metrics or {})
    if checkpoint is None or not final.get("final"):
        raise ValueError(f"the run at {result.path} has no final checkpoint to publish")
    if final.get("loss_fell") is False:
        raise TrainingDidNotLearn(
            f"the run at {result.path} failed: its training loss did not fall "
            f"(mean of its first steps {final['loss_start']:.4f}, of its last {final['loss_end']:.4f}; "
            f"finetune.min_loss_drop={opts.min_loss_drop}), so its adapter is not registered",
            metrics=final,
        )
    metrics = {
        k: final.get(k)
        for k in (
            "first_loss",
            "loss_start",
            "loss_end",
            "loss_fell",
            "train_loss",
            "val_loss",
            "val_exact_match",
            "heldout_exact_match",
            "kept_step",
            "last_val_loss",
            "initial_val_loss",
            "heldout_loss",
            "initial_heldout_loss",
            "forgetting",
            "objective",
            "step",
            "epochs",
            "tokens",
            "train_time_s",
            "stop_reason",
            "seed",
            "trials",
            "attempt",
            "attempts",
            "restarts",
            "mask",
            "peak_rss_mb",
            "peak_vram_gb",
            "dpo",
        )
    }
    metrics["steps"] = metrics.pop("step")
    if started is not None:
        metrics["wall_time_s"] = round(time.time() - started, 3)
    metrics["rows"] = dict(data.rows)
    hyperparameters = {
        **opts.model_dump(mode="json"),
        "world_size": final.get("world_size", opts.num_workers),
        "effective_batch_size": opts.batch_size * opts.grad_accumulation * final.get("world_size", opts.num_workers),
    }
    lineage = {
        "dataset_manifest_hash": data.hashes.get("train"),
        "rehearsal_manifest_hash": data.hashes.get("rehearsal"),
        "dataset_uri": data.paths.get("train"),
        "rehearsal_uri": data.paths.get("rehearsal"),
        "parent_adapter_id": parent_adapter_id,
        "hyperparameters": hyperparameters,
        "metrics": metrics,
        "code_version": code_version(),
    }
    store = AdapterStore(cfg.model.storage_root)
    with checkpoint.as_directory() as directory:
        manifest = store.save(Path(directory) / ADAPTER_DIR, base_model=cfg.model.base_model, lineage=lineage)
    db = open_store(cfg.store)
    try:
        row = AdapterRegistry(db).register(manifest, store.uri(manifest.adapter_id), status="candidate", actor=ACTOR)
    finally:
        db.close()
    return {
        "adapter_id": manifest.adapter_id,
        "uri": row["uri"],
        "status": row["status"],
        "parent_adapter_id": parent_adapter_id,
        "metrics": metrics,
        "run_path": result.path,
        "checkpoint_path": checkpoint.path,
    }


def code_version() -> str | None:
    """``git rev-parse HEAD`` of this checkout (``+dirty`` with uncommitted changes), else the
    installed package's version, else None."""
    root = Path(__file__).resolve().parents[2]  # the checkout: app/learning/lineage.py
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                check=False,
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kaizen {version('kaizen')}"
    except PackageNotFoundError:
        return None
