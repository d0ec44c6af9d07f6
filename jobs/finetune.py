"""Fine-tune a LoRA adapter with Ray Train and register it as a candidate.

    python -m jobs.finetune --config configs/default.yaml --train <dataset dir or parquet>
        [--validation <dir or parquet>] [--rehearsal <dir or parquet>] [--fisher-data <dir or parquet>]
        [--heldout <dir or parquet>]
        [--name RUN] [finetune.key=value ...] [section.key=value ...]

The recipe (options: :class:`app.learning.training.FinetuneConfig`, ``finetune.<key>=<value>``
on the command line or a ``finetune:`` section in the config file):

1. read the rows on the driver (a Parquet file, or a folder: its ``train.parquet`` or ``train/``
   when present, else every Parquet file under it; a dataset folder's ``validation.parquet`` or
   ``validation/`` is the validation split unless ``--validation`` says otherwise) and hash each
   set's ``manifest.json`` for the lineage;
2. a ``TorchTrainer`` (Ray Train V2) runs :func:`train_loop` on ``finetune.num_workers`` workers:
   each loads ``model.base_model`` from its checkpoint directory, puts a fresh LoRA adapter on it
   or continues the registry's champion (``finetune.continue_from``), tokenizes its shard of the
   rows (labels on the assistant turns only) and trains with DDP (gloo on CPU, NCCL on GPU) or
   DeepSpeed ZeRO-2/3, optionally on 4-bit weights (QLoRA), with gradient checkpointing and bf16
   autocast on GPU. Each epoch mixes rehearsal rows of earlier domains into the training rows
   (``finetune.rehearsal_ratio``); Fisher-guided gradient masking or EWC, with the Fisher
   information estimated on the rehearsal rows (or ``--fisher-data``), keeps the adapter entries
   that matter to earlier domains in place. Validation loss drives early stopping and the best
   adapter is the one kept. With ``finetune.trials`` > 1 the run first trains that many seeds
   for ``finetune.trial_fraction`` of its steps each and goes on with the best by validation.
   Every step's loss, learning rate and tokens/s reach Ray Train in
   the ``step_metrics`` of the next report (an epoch's last step with the epoch's loss), sent at
   evaluations, checkpoints, the end and at most every ``finetune.report_every_s`` in between (a
   report waits until the controller has collected the one before, and it polls every 2 s: a
   report per step, or per epoch of a small set, would cap a fast run at one per poll); every
   ``finetune.checkpoint_every_steps`` steps the adapter, optimizer and position are
   checkpointed to ``<model.checkpoint_dir>/runs/<run>``, from which a failed worker group is
   restarted (``finetune.max_failures``) and goes on from the checkpoint's step;
3. the final adapter goes to the adapter store with its lineage (base model, dataset and
   rehearsal manifest hashes, hyper-parameters, metrics, code version) and into the registry as
   a ``candidate``.

For a Ray Tune sweep, :func:`read_datasets` and :func:`build_trainer` give each trial its own
``TorchTrainer`` (the driver-function pattern) and :func:`publish_adapter` registers a winner.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from app.config import KaizenConfig, resolve_paths
from app.learning.masking import (
    apply_masks,
    estimate_fisher,
    ewc_penalty,
    fisher_masks,
    mask_summary,
    register_mask_hooks,
    snapshot_parameters,
    trainable_parameters,
)
from app.learning.training import (
    IGNORE_INDEX,
    EarlyStopping,
    FinetuneConfig,
    collate,
    lr_factor,
    mix_rehearsal,
    steps_per_epoch,
    tokenize_messages,
)
from app.model.storage import file_sha256
from app.ray_setup import start_ray

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    from ray.train import Result
    from ray.train.torch import TorchTrainer

__all__ = [
    "FAIL_AT_STEP_ENV",
    "FAIL_MARKER_ENV",
    "CausalLMLoss",
    "TrainingData",
    "add_data_arguments",
    "build_trainer",
    "check_requirements",
    "code_version",
    "data_hash",
    "describe_report",
    "format_metric",
    "main",
    "publish_adapter",
    "read_datasets",
    "read_rows",
    "resolve_parent_adapter",
    "train_loop",
]

log = logging.getLogger("kaizen.finetune")

FAIL_AT_STEP_ENV = "KAIZEN_TEST_FAIL_AT_STEP"
"""Fault injection for tests: rank 0 raises once, right after reporting this optimizer step."""
FAIL_MARKER_ENV = "KAIZEN_TEST_FAIL_MARKER"
"""The file whose existence says the injected failure has happened (so it happens once)."""

MANIFEST_FILE = "manifest.json"
ADAPTER_DIR = "adapter"
STATE_FILE = "train_state.pt"
FORGETTING_FILE = "forgetting.pt"
DEEPSPEED_DIR = "deepspeed"
DATASETS = ("train", "validation", "rehearsal", "fisher", "heldout")
"""The sets a run takes: rows to train on, to validate on, of earlier domains to mix in, to
estimate the Fisher information on, and of earlier domains to measure forgetting on."""
ACTOR = "jobs.finetune"


# --- the recipe --------------------------------------------------------------------------------


def main(
    cfg: KaizenConfig,
    opts: FinetuneConfig,
    train: Path,
    validation: Path | None = None,
    rehearsal: Path | None = None,
    *,
    fisher_data: Path | None = None,
    heldout: Path | None = None,
    run_name: str | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune, store and register one adapter; Ray is started here unless the caller has it.

    Args:
        cfg: the Kaizen config (``model.base_model``, ``model.storage_root``,
            ``model.checkpoint_dir``, ``store``, ``training.resource_limits``, ``ray``).
        opts: the fine-tuning options.
        train: training rows (a Parquet file or a dataset folder).
        validation: validation rows; default the dataset folder's validation split, if any.
        rehearsal: rehearsal rows of earlier domains (SSR's output).
        fisher_data: rows of earlier tasks to estimate the Fisher information on, instead of
            the rehearsal rows.
        heldout: rows of earlier domains, never trained on, whose loss measures forgetting
            (``forgetting`` and ``objective`` in the metrics; see ``finetune.forgetting_weight``).
        run_name: the Ray Train run's name (default ``finetune-<time>-<hex>``).
        storage_path: where runs and checkpoints go (default ``<model.checkpoint_dir>/runs``).
        progress: called on this process with each report's metrics (rank 0's) while it trains.

    Returns:
        ``adapter_id``, ``uri``, ``status``, ``parent_adapter_id``, ``metrics`` (final train and
        validation loss, steps, time, ...), ``run_path``, ``checkpoint_path`` and ``warnings``.

    Raises:
        ValueError: options that do not fit the data or the resource limits (naming the key).
        ImportError: DeepSpeed or bitsandbytes asked for and not installed.
        ray.train.TrainingFailedError: the workers failed more than ``finetune.max_failures`` times.
    """
    started = time.time()
    cfg = resolve_paths(cfg.model_copy(deep=True))
    start_ray(cfg)
    data = read_datasets(train, validation, rehearsal, fisher_data, heldout)
    warnings = _check_data(opts, data)
    for warning in warnings:
        log.warning(warning)

    with _forwarded_reports(progress) as callbacks:
        trainer = build_trainer(
            cfg,
            opts,
            data.datasets,
            run_name or _new_run_name(),
            storage_path or _default_storage_path(cfg),
            callbacks=callbacks,
        )
        parent = trainer.train_loop_config["parent_adapter_id"]
        log.info(
            "training %s adapter on %s rows (%s)",
            f"from {parent}" if parent else "a fresh",
            data.rows["train"],
            ", ".join(f"{k}: {v}" for k, v in data.rows.items()),
        )
        result = trainer.fit()

    published = publish_adapter(cfg, opts, result, data=data, parent_adapter_id=parent, started=started)
    return {**published, "warnings": warnings}


@contextlib.contextmanager
def _forwarded_reports(progress: Callable[[dict[str, Any]], None] | None) -> Iterator[list[Any]]:
    """Ray Train callbacks that bring every report's metrics back to ``progress`` on this process.

    Train's callbacks run in its controller actor, whose output does not reach this process: the
    callback puts the metrics on a Ray queue and a thread here hands them to ``progress``.
    """
    if progress is None:
        yield []
        return
    import threading

    from ray.train import UserCallback
    from ray.util.queue import Empty, Queue

    queue: Queue = Queue(actor_options={"num_cpus": 0})

    class Forward(UserCallback):
        def __init__(self, queue: Queue) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.queue.put(dict(metrics[0]))

    stop = threading.Event()

    def drain() -> None:
        while True:
            try:
                progress(queue.get(timeout=0.5))
            except Empty:
                if stop.is_set():
                    return
            except Exception:  # a display error must not stop training
                log.exception("progress display failed")

    thread = threading.Thread(target=drain, name="finetune-progress", daemon=True)
    thread.start()
    try:
        yield [Forward(queue)]
    finally:
        stop.set()
        thread.join(timeout=10)
        queue.shutdown()


# --- data ----------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The rows of a run as Ray Datasets, with what the lineage needs to know of them."""

    datasets: dict[str, ray.data.Dataset]
    """``train`` and, when given, ``validation``, ``rehearsal`` and ``fisher``."""
    rows: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each set's ``manifest.json`` (of its Parquet files when it has none)."""
    paths: dict[str, str] = field(default_factory=dict)


def _parquet_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
    )


def data_hash(files: Sequence[Path], manifest: Path | None) -> str:
    """SHA-256 of a data set's ``manifest.json``, or where it has none, of its files' names and
    SHA-256s (so the same files give the same hash wherever they lie)."""
    if manifest is not None and manifest.is_file():
        return file_sha256(manifest)
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def read_rows(path: Path, split: str | None = None) -> tuple[pa.Table, str]:
    """The ``messages`` column of a Parquet file or folder, and the set's hash (:func:`data_hash`).

    A folder is read as its ``<split>.parquet`` or ``<split>/`` when ``split`` is given and
    present, else every Parquet file under it (hidden and ``_`` names skipped); its
    ``manifest.json`` (for a file, the one beside it) is the set's manifest.

    Raises:
        FileNotFoundError: no Parquet file there.
        ValueError: no ``messages`` column, or rows without messages.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file():
        files, manifest = [path], path.parent / MANIFEST_FILE
    elif path.is_dir():
        manifest = path / MANIFEST_FILE
        root = path
        if split is not None:
            root = next((p for p in (path / f"{split}.parquet", path / split) if p.exists()), path)
        files = [root] if root.is_file() else _parquet_files(root)
        if root == path and split == "train":
            # A dataset folder without a train split: its other splits are still not training rows.
            files = [
                f for f in files if f.relative_to(path).parts[0].removesuffix(".parquet") not in ("validation", "test")
            ]
    else:
        files, manifest = [], path / MANIFEST_FILE
    if not files:
        raise FileNotFoundError(f"no Parquet rows at {path} (a .parquet file or a folder holding them)")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        if "messages" not in names:
            raise ValueError(f"{f}: no 'messages' column (it has: {', '.join(names)})")
        tables.append(pq.read_table(f, columns=["messages"]))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    nulls = table.column("messages").null_count
    if nulls:
        raise ValueError(f"{path}: {nulls} of {table.num_rows} rows have no messages")
    return table, data_hash(files, manifest)


def read_datasets(
    train: Path,
    validation: Path | None = None,
    rehearsal: Path | None = None,
    fisher_data: Path | None = None,
    heldout: Path | None = None,
) -> TrainingData:
    """Read the run's rows on the driver into Ray Datasets (``ray.data.from_items``: blocks
    built here, so no read or metadata task competes with the training workers for CPUs; the
    sets of a LoRA run are small). See :func:`read_rows`.

    Without ``validation``, a training folder's ``validation.parquet`` or ``validation/`` is used.
    ``heldout`` holds rows of earlier domains that are never trained on (a dataset folder: its
    validation split): the rise of their loss is the run's measure of forgetting.
    """
    import ray.data

    data = TrainingData(datasets={})
    train = Path(train)
    found = None
    if validation is None and train.is_dir():
        found = validation = next((p for p in (train / "validation.parquet", train / "validation") if p.exists()), None)
    sources = {
        "train": (train, "train"),
        "validation": (validation, "validation"),
        "rehearsal": (rehearsal, "rehearsal"),
        "fisher": (fisher_data, None),
        "heldout": (heldout, "validation"),
    }
    for name, (path, split) in sources.items():
        if path is None:
            continue
        table, digest = read_rows(Path(path), split)
        if path is found and table.num_rows == 0:
            log.warning("%s is empty: training without validation", path)
            continue
        data.datasets[name] = ray.data.from_items(table.to_pylist())
        data.rows[name] = table.num_rows
        data.hashes[name] = digest
        data.paths[name] = str(path)
    return data


def _check_data(opts: FinetuneConfig, data: TrainingData) -> list[str]:
    """Errors for data that cannot be trained on as configured; warnings for what is odd."""
    for name, rows in data.rows.items():
        if rows < opts.num_workers:
            raise ValueError(
                f"finetune.num_workers: {opts.num_workers} workers need at least as many {name} rows "
                f"(each gets an equal shard), got {rows}"
            )
    if opts.trials > 1 and "validation" not in data.datasets:
        raise ValueError(
            f"finetune.trials: {opts.trials} trials are chosen between by their validation loss; give validation "
            "rows (--validation, or a dataset folder with a validation split) or set trials=1"
        )
    warnings = []
    if opts.rehearsal_ratio > 0 and "rehearsal" not in data.datasets:
        warnings.append(
            f"finetune.rehearsal_ratio is {opts.rehearsal_ratio} but no rehearsal rows were given: "
            "the epochs hold the training rows alone"
        )
    if "validation" not in data.datasets and opts.early_stopping_patience > 0:
        warnings.append("no validation rows: no early stopping, and the last adapter is kept")
    return warnings


# --- the trainer ---------------------------------------------------------------------------------


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
            (:func:`read_datasets`); every worker takes an equal share of each.
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
    if _fisher_source(opts, datasets) is None and opts.masking != "none":
        raise ValueError(
            f"finetune.masking: {opts.masking} protects earlier tasks and needs their rows for the Fisher "
            "information: give rehearsal rows (--rehearsal) or --fisher-data"
            + (", or set finetune.mask_mode=most_important" if opts.masking == "fggm" else "")
        )
    check_requirements(cfg, opts)
    parent = resolve_parent_adapter(cfg, opts)
    loop_config = {
        "opts": opts.model_dump(mode="json"),
        # Only what the workers need: the rest of the config (store DSNs, keys) stays here.
        "base_model": cfg.model.base_model,
        "storage_root": cfg.model.storage_root,
        "max_vram_gb": cfg.training.resource_limits.max_vram_gb,
        "max_seconds": cfg.training.max_hours * 3600.0,
        "parent_adapter_id": parent,
        "datasets": sorted(datasets),
        "fault": _fault_injection(),
    }
    resources = {"CPU": opts.cpus_per_worker, **({"GPU": 1} if opts.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
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
        # Each worker takes its share itself (_setup_data): no streaming split.
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
    from app.registry import AdapterRegistry
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        registry = AdapterRegistry(store)
        if opts.continue_from == "champion":
            adapter_id = registry.resolve("champion")
            if adapter_id is None:
                return None
        elif registry.get(opts.continue_from) is None:
            raise ValueError(f"finetune.continue_from: adapter {opts.continue_from!r} is not registered")
        else:
            adapter_id = opts.continue_from
    finally:
        store.close()
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


def _fisher_source(opts: FinetuneConfig, datasets: Mapping[str, Any]) -> str | None:
    """Which rows the Fisher information comes from: old tasks to protect them (``--fisher-data``,
    else the rehearsal rows), the new task's own rows for FGGM's ``most_important`` rule."""
    if "fisher" in datasets:
        return "fisher"
    if opts.masking == "fggm" and opts.mask_mode == "most_important":
        return "train"
    return "rehearsal" if "rehearsal" in datasets else None


def _fault_injection() -> dict[str, Any] | None:
    step = os.environ.get(FAIL_AT_STEP_ENV)
    if not step:
        return None
    marker = os.environ.get(FAIL_MARKER_ENV) or str(Path(tempfile.gettempdir()) / f"kaizen-fail-{os.getpid()}")
    return {"step": int(step), "marker": marker}


# --- the loop, on every worker -----------------------------------------------------------------


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM to return the summed token cross-entropy on the labelled
    positions and their count, computing the vocabulary head only at those positions: with
    Qwen's 152k-row head that is most of a step's cost, and prompts are most of the tokens.
    DDP and DeepSpeed wrap this module, so its forward is the one they synchronise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()


@dataclass
class _State:
    """Where a run is, as checkpointed: the next window to train is ``window`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0
    epoch_loss: float = 0.0
    epoch_label_tokens: int = 0
    first_loss: float | None = None
    initial_val_loss: float | None = None
    last_val_loss: float | None = None
    initial_heldout_loss: float | None = None
    last_heldout_loss: float | None = None
    early_stopping: dict[str, Any] = field(default_factory=lambda: {"best": None, "bad_evals": 0})
    best_params: dict[str, torch.Tensor] | None = None
    best_figures: dict[str, float] = field(default_factory=dict)
    """The evaluation figures of ``best_params``: val_loss, heldout_loss, forgetting, objective."""
    restarts: int = 0
    resumed_from_step: int | None = None
    seed: int = 0
    """The seed of the data order, and of the LoRA initialisation of a fresh adapter (see ``finetune.trials``)."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """With ``finetune.trials`` > 1: each seed's steps and evaluation at the choice."""


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: setup, resume, the epochs, the final report."""
    import ray.train
    import ray.train.torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    opts = FinetuneConfig.model_validate(config["opts"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    _setup_device(opts, device, config["max_vram_gb"])
    if device.type == "cpu":
        # Torch's threads follow the worker's CPU reservation, not whatever the environment says.
        torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    torch.manual_seed(opts.seed)  # the same LoRA initialisation on every rank

    peft_model, tokenizer = _setup_model(config, opts, device)
    loss_module = CausalLMLoss(peft_model)
    data = _setup_data(config["datasets"], tokenizer, opts, rank, world)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = _autocast(opts, device)

    state, forgetting, saved = _State(seed=opts.seed), None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, forgetting, saved = _load_checkpoint(checkpoint, peft_model)
        if "seed" not in saved:  # a checkpoint from before finetune.trials
            state.seed = opts.seed
    if forgetting is None and opts.masking != "none":
        forgetting = _setup_forgetting(
            opts, peft_model, loss_module, data[_fisher_source(opts, data)], pad_id, device, autocast
        )
    if opts.masking == "fggm" and opts.strategy == "deepspeed":
        register_mask_hooks(peft_model, forgetting["masks"])

    model, optimizer, scheduler, engine = _setup_optimizer(opts, peft_model, loss_module, data)
    if saved is not None:
        _restore_optimizer(saved, checkpoint, optimizer, scheduler, engine)

    stopper = EarlyStopping(opts.early_stopping_patience, opts.early_stopping_min_delta)
    stopper.load_state_dict(state.early_stopping)
    validation, heldout = data.get("validation"), data.get("heldout")

    def evaluate() -> dict[str, float]:
        """Validation (and held-out) losses; the objective that early stopping follows."""
        state.last_val_loss = _evaluate(loss_module, validation, opts, pad_id, device, autocast)
        result = {"val_loss": state.last_val_loss}
        if heldout is not None:
            state.last_heldout_loss = _evaluate(loss_module, heldout, opts, pad_id, device, autocast)
            if state.initial_heldout_loss is None:
                state.initial_heldout_loss = state.last_heldout_loss
            result["heldout_loss"] = state.last_heldout_loss
            result["forgetting"] = state.last_heldout_loss - state.initial_heldout_loss
        result["objective"] = objective(state.last_val_loss, result.get("forgetting"), opts.forgetting_weight)
        if stopper.update(result["objective"]):
            state.best_params, state.best_figures = _trainable_state(peft_model, opts), dict(result)
        state.early_stopping = stopper.state_dict()
        return result

    if validation is not None and checkpoint is None:
        # The starting point is a candidate too: an adapter that only gets worse is not kept.
        state.initial_val_loss = evaluate()["val_loss"]

    spe = steps_per_epoch(len(_epoch_rows(data, opts, 0, state.seed)), opts.batch_size, opts.grad_accumulation)
    total = min(opts.epochs * spe, opts.max_steps or math.inf)
    resumed_at = time.perf_counter() - state.elapsed_s
    step_metrics: list[dict[str, float]] = []  # the steps since the last report
    last_report = time.perf_counter()

    def train_until(limit: float, trial: bool = False) -> str:
        """Train from ``state``'s position to step ``limit`` (or an earlier stop); the stop reason.
        A ``trial`` neither evaluates, reports nor checkpoints: its steps travel in the next report."""
        nonlocal last_report
        stop_reason = "completed"
        # Nothing left (a checkpoint of the last step): straight to the final report.
        done = state.step >= limit
        while not done and state.epoch < opts.epochs:
            epoch = state.epoch
            rows = _epoch_rows(data, opts, epoch, state.seed)
            micro = [rows[i : i + opts.batch_size] for i in range(0, len(rows), opts.batch_size)]
            windows = [micro[i : i + opts.grad_accumulation] for i in range(0, len(micro), opts.grad_accumulation)]
            for w in range(state.window, len(windows)):
                t0 = time.perf_counter()
                loss_sum, labels, tokens = _train_window(
                    opts,
                    model,
                    peft_model,
                    optimizer,
                    scheduler,
                    engine,
                    windows[w],
                    forgetting,
                    pad_id,
                    device,
                    autocast,
                )
                state.step += 1
                end_of_epoch = w == len(windows) - 1
                state.epoch, state.window = (epoch + 1, 0) if end_of_epoch else (epoch, w + 1)
                state.elapsed_s = time.perf_counter() - resumed_at
                over_time = state.elapsed_s > config["max_seconds"]
                report_due = not trial and time.perf_counter() - last_report >= opts.report_every_s
                # Summed over the ranks, so that every rank takes the same decisions (a report is a barrier).
                loss_sum, labels, tokens, over_time, report_due = _all_reduce(
                    [loss_sum, labels, tokens, float(over_time), float(report_due)], device
                )
                state.tokens += int(tokens)
                state.epoch_loss += loss_sum
                state.epoch_label_tokens += int(labels)
                step_metrics.append(
                    {
                        "step": state.step,
                        "loss": loss_sum / max(labels, 1.0),
                        "lr": _current_lr(optimizer, engine),
                        "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
                    }
                )
                metrics: dict[str, Any] = {
                    **step_metrics[-1],
                    "epoch": epoch + (w + 1) / len(windows),
                    "tokens": state.tokens,
                    "elapsed_s": state.elapsed_s,
                }
                if state.first_loss is None:
                    state.first_loss = metrics["loss"]
                if end_of_epoch:
                    metrics["epoch_loss"] = step_metrics[-1]["epoch_loss"] = state.epoch_loss / max(
                        state.epoch_label_tokens, 1
                    )
                due = opts.eval_every_steps is not None and state.step % opts.eval_every_steps == 0
                if not trial and validation is not None and (due or (opts.eval_every_steps is None and end_of_epoch)):
                    metrics.update(evaluate(), best_objective=stopper.best)
                    if stopper.should_stop:
                        stop_reason = "early_stopping"
                if end_of_epoch and state.epoch < opts.epochs:
                    state.epoch_loss, state.epoch_label_tokens = 0.0, 0
                if state.step >= total and stop_reason == "completed" and state.step < opts.epochs * spe:
                    stop_reason = "max_steps"
                if over_time and stop_reason == "completed":
                    stop_reason = "time_limit"
                done = stop_reason != "completed" or state.step >= limit
                save = not trial and state.step % opts.checkpoint_every_steps == 0 and not done
                if not trial and (save or done or report_due or "val_loss" in metrics):
                    metrics["step_metrics"] = step_metrics.copy()
                    _report(
                        metrics,
                        state,
                        opts,
                        peft_model,
                        engine,
                        forgetting,
                        optimizer,
                        scheduler,
                        rank,
                        name=f"checkpoint-step{state.step:06d}" if save else None,
                    )
                    step_metrics.clear()
                    last_report = time.perf_counter()
                _maybe_fail(config.get("fault"), state.step, rank)
                if done:
                    break
        return stop_reason

    stop_reason = "completed"
    if opts.trials > 1 and checkpoint is None:
        # Restarts from other seeds: each trains the first trial_fraction of the steps from the same
        # starting point, and the one with the lowest validation objective goes on as if alone.
        start = (
            copy.deepcopy(state),
            _trainable_state(peft_model, opts),
            copy.deepcopy(optimizer.state_dict()),
            scheduler.state_dict(),
        )
        limit = max(1, round(opts.trial_fraction * total))
        trials, best, spent_tokens = [], None, 0
        for i in range(opts.trials):
            state = copy.deepcopy(start[0])
            state.seed = opts.seed + i
            if i > 0:
                if config["parent_adapter_id"] is None:  # a fresh adapter: this seed's initialisation
                    _init_lora(peft_model, state.seed)
                else:  # the parent's weights
                    _load_trainable_state(peft_model, start[1])
                optimizer.load_state_dict(copy.deepcopy(start[2]))
                scheduler.load_state_dict(start[3])
                if opts.masking != "none":  # the Fisher information of this seed's starting adapter
                    forgetting = _setup_forgetting(
                        opts, peft_model, loss_module, data[_fisher_source(opts, data)], pad_id, device, autocast
                    )
            stopper.load_state_dict(state.early_stopping)
            stop_reason = train_until(limit, trial=True)
            figures = evaluate()
            trials.append({"seed": state.seed, "steps": state.step, **figures})
            spent_tokens += state.tokens
            if best is None or figures["objective"] < best[0]["objective"]:
                best = (
                    figures,
                    state,
                    _trainable_state(peft_model, opts),
                    copy.deepcopy(optimizer.state_dict()),
                    scheduler.state_dict(),
                    forgetting,
                    step_metrics.copy(),
                    _rng_state(device),
                )
            step_metrics.clear()
            if stop_reason != "completed":  # out of time: the trials so far decide
                break
        figures, state, params, optimizer_state, scheduler_state, forgetting, step_metrics, rng = best
        _set_rng_state(device, rng)  # its dropout goes on as in a run of its own
        _load_trainable_state(peft_model, params)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        stopper.load_state_dict(state.early_stopping)
        # Tokens and time: every trial's, as they were spent.
        state.tokens, state.trials, state.elapsed_s = spent_tokens, trials, time.perf_counter() - resumed_at
        log.info(
            "trials: seed %d goes on (objectives %s)",
            state.seed,
            ", ".join(f"{t['seed']}: {t['objective']:.4f}" for t in trials),
        )
        if stop_reason == "completed":  # the winner's steps, its evaluation and the trials
            _report(
                {
                    **step_metrics[-1],
                    "epoch": state.step / spe,
                    "tokens": state.tokens,
                    "elapsed_s": state.elapsed_s,
                    **figures,
                    "best_objective": stopper.best,
                    "seed": state.seed,
                    "trials": trials,
                    "step_metrics": step_metrics,
                },
                state,
                opts,
                peft_model,
                engine,
                forgetting,
                optimizer,
                scheduler,
                rank,
                name=None,
            )
            step_metrics, last_report = [], time.perf_counter()
    if stop_reason == "completed":
        stop_reason = train_until(total)

    if state.best_params is not None:
        with _full_parameters(opts, peft_model, modify=True):
            _load_trainable_state(peft_model, state.best_params)  # the best validation loss wins
    final = {
        "step": state.step,
        "epochs": state.step / spe,
        "first_loss": state.first_loss,
        "train_loss": state.epoch_loss / state.epoch_label_tokens if state.epoch_label_tokens else None,
        "last_val_loss": state.last_val_loss,
        "initial_val_loss": state.initial_val_loss,
        "initial_heldout_loss": state.initial_heldout_loss,
        **_kept(state, opts),
        "tokens": state.tokens,
        "train_time_s": state.elapsed_s,
        "stop_reason": stop_reason,
        "seed": state.seed,
        "trials": state.trials,
        "restarts": state.restarts,
        "resumed_from_step": state.resumed_from_step,
        "world_size": world,
        **_peak_memory(device),
        "final": True,
        **({"mask": mask_summary(forgetting["masks"])} if forgetting and "masks" in forgetting else {}),
    }
    _report(
        final,
        state,
        opts,
        peft_model,
        engine,
        forgetting,
        optimizer,
        scheduler,
        rank,
        name=f"checkpoint-final-step{state.step:06d}",
    )


def objective(val_loss: float, forgetting: float | None, weight: float) -> float:
    """What a run minimises and a sweep ranks by: the validation loss plus ``weight`` times the
    rise of the held-out earlier domains' loss (a fall is no credit: 0)."""
    return val_loss + weight * max(0.0, forgetting or 0.0)


def _kept(state: _State, opts: FinetuneConfig) -> dict[str, Any]:
    """The kept adapter's figures: the best objective's (else the last evaluation's)."""
    if state.best_params is None:
        forgetting = None if state.last_heldout_loss is None else state.last_heldout_loss - state.initial_heldout_loss
        kept = {"val_loss": state.last_val_loss, "heldout_loss": state.last_heldout_loss, "forgetting": forgetting}
        if state.last_val_loss is not None:
            kept["objective"] = objective(state.last_val_loss, forgetting, opts.forgetting_weight)
        return kept
    return {"heldout_loss": None, "forgetting": None, **state.best_figures}


def _setup_device(opts: FinetuneConfig, device: torch.device, max_vram_gb: float) -> None:
    if opts.use_gpu and device.type != "cuda":
        raise RuntimeError(f"finetune.use_gpu is true but the worker's device is {device}: no CUDA here")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        # training.resource_limits.max_vram_gb, enforced by torch's caching allocator.
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_vram_gb * 2**30 / total), device)


def _setup_model(config: Mapping[str, Any], opts: FinetuneConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """The base model from its checkpoint directory, with a fresh LoRA adapter or the parent's."""
    from peft import LoraConfig, get_peft_model

    from app.model import load_model

    if opts.quantize_4bit:
        _require("bitsandbytes", "finetune.quantize_4bit")
    dtype = torch.bfloat16 if opts.precision == "bf16" and device.type == "cuda" else torch.float32
    model, tokenizer = load_model(
        config["base_model"], root=config["storage_root"], device=device, dtype=dtype, quantize_4bit=opts.quantize_4bit
    )
    model.config.use_cache = False  # no KV cache in training (and none with checkpointing)
    checkpointing = {"use_reentrant": False}  # works with DDP and frozen inputs
    if opts.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=opts.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    parent = config["parent_adapter_id"]
    if parent is not None:
        from app.model.adapters import AdapterStore

        peft_model = AdapterStore(config["storage_root"]).attach(model, parent, is_trainable=True)
    else:
        lora = LoraConfig(
            r=opts.lora_rank,
            lora_alpha=opts.lora_alpha,
            lora_dropout=opts.lora_dropout,
            target_modules=list(opts.target_modules),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        _init_lora(peft_model, opts.seed)
    peft_model.train()
    return peft_model, tokenizer


def _setup_data(
    names: Sequence[str], tokenizer: Any, opts: FinetuneConfig, rank: int, world: int
) -> dict[str, list[dict[str, Any]]]:
    """This worker's share of each set, tokenized.

    Every worker reads each (small) set whole and keeps every ``world``-th row from its rank on,
    cut to the same count on every rank: the epochs mix rehearsal rows in per rank, and equal
    shares give every rank the same number of steps, which DDP's collectives need. Reading
    in-process also spares the split coordinator actors a streaming split would start.
    """
    import ray.train

    data = {}
    for name in names:
        rows = list(ray.train.get_dataset_shard(name).iter_rows())
        share = len(rows) // world
        tokenized = []
        for i in range(rank, share * world, world):
            try:
                tokenized.append(tokenize_messages(tokenizer, rows[i]["messages"], opts.max_length))
            except ValueError as exc:
                raise ValueError(f"{name} row {i}: {exc}") from exc
        data[name] = tokenized
    return data


def _epoch_rows(
    data: Mapping[str, list[dict[str, Any]]], opts: FinetuneConfig, epoch: int, seed: int
) -> list[dict[str, Any]]:
    return mix_rehearsal(data["train"], data.get("rehearsal", []), opts.rehearsal_ratio, seed=seed, epoch=epoch)


@torch.no_grad()
def _init_lora(peft_model: nn.Module, seed: int) -> None:
    """A fresh adapter's initialisation drawn from ``seed`` alone (LoRA's A random, B zero), so that
    a run's seed decides it whatever else used the random generator before (the same on every rank)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast(opts: FinetuneConfig, device: torch.device) -> Any:
    enabled = opts.precision == "bf16"
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _setup_forgetting(
    opts: FinetuneConfig,
    peft_model: nn.Module,
    loss_module: CausalLMLoss,
    rows: list[dict[str, Any]],
    pad_id: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, Any]:
    """The Fisher information on ``rows`` (one row per backward pass), averaged over the ranks so
    that every rank masks the same entries; the masks (fggm) or the anchor (ewc)."""

    def loss_fn(_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast():
            loss_sum, count = loss_module(**batch)
        return loss_sum / count.clamp(min=1)

    batches = (_to(collate([r], pad_id), device) for r in rows)
    fisher = estimate_fisher(peft_model, batches, loss_fn, max_batches=opts.fisher_samples)
    world = _world_size()
    if world > 1:
        import torch.distributed as dist

        for value in fisher.values():
            dist.all_reduce(value)
            value.div_(world)
    forgetting: dict[str, Any] = {"fisher": fisher, "samples": min(len(rows), opts.fisher_samples)}
    if opts.masking == "fggm":
        forgetting["masks"] = fisher_masks(
            fisher, opts.mask_fraction, opts.mask_mode, granularity=opts.mask_granularity
        )
    forgetting["anchor"] = snapshot_parameters(peft_model)
    return forgetting


def _setup_optimizer(
    opts: FinetuneConfig, peft_model: nn.Module, loss_module: CausalLMLoss, data: Mapping[str, Any]
) -> tuple[nn.Module, torch.optim.Optimizer, Any, Any]:
    """DDP (``ray.train.torch.prepare_model``) with AdamW, or a DeepSpeed engine."""
    import ray.train.torch

    spe = steps_per_epoch(len(_epoch_rows(data, opts, 0, opts.seed)), opts.batch_size, opts.grad_accumulation)
    total = min(opts.epochs * spe, opts.max_steps or math.inf)
    trainable = list(trainable_parameters(peft_model).values())
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)

    def schedule(step: int) -> float:
        return lr_factor(step, total_steps=int(total), warmup_steps=opts.warmup_steps, schedule=opts.lr_schedule)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if opts.strategy == "deepspeed":
        deepspeed = _require("deepspeed", "finetune.strategy=deepspeed")
        ds_config = {
            "train_micro_batch_size_per_gpu": opts.batch_size,
            "gradient_accumulation_steps": opts.grad_accumulation,
            "gradient_clipping": opts.max_grad_norm or 0.0,
            "zero_optimization": {
                "stage": opts.zero_stage,
                "overlap_comm": True,
                "contiguous_gradients": True,
                **({"stage3_gather_16bit_weights_on_model_save": True} if opts.zero_stage == 3 else {}),
            },
            "bf16": {"enabled": opts.precision == "bf16"},
            "steps_per_print": 2**31 - 1,
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=loss_module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        return engine, optimizer, scheduler, engine
    # The model is already on its device (a 4-bit one cannot be moved); DDP only with world > 1.
    model = ray.train.torch.prepare_model(loss_module, move_to_device=False, parallel_strategy="ddp")
    return model, optimizer, scheduler, None


def _train_window(
    opts: FinetuneConfig,
    model: nn.Module,
    peft_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    engine: Any,
    window: list[list[dict[str, Any]]],
    forgetting: dict[str, Any] | None,
    pad_id: int,
    device: torch.device,
    autocast: Any,
) -> tuple[float, float, float]:
    """One optimizer step over ``window``'s micro-batches; this rank's summed loss, label
    tokens and input tokens. The loss is normalised by the window's label tokens, so a step is
    a token-weighted mean however the rows fall into micro-batches."""
    from torch.nn.parallel import DistributedDataParallel

    label_tokens = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for batch in window for r in batch)
    loss_total, input_tokens = 0.0, 0
    for j, rows in enumerate(window):
        batch = _to(collate(rows, pad_id), device)
        last = j == len(window) - 1
        no_sync = not last and isinstance(model, DistributedDataParallel)
        if engine is not None:
            engine.set_gradient_accumulation_boundary(last)
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast():
                loss_sum, _ = model(**batch)
            loss = loss_sum / max(label_tokens, 1)
            if last and forgetting is not None and opts.masking == "ewc":
                loss = loss + ewc_penalty(peft_model, forgetting["fisher"], forgetting["anchor"], opts.ewc_lambda)
            if engine is not None:
                engine.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
        loss_total += float(loss_sum.detach())
        input_tokens += int(batch["attention_mask"].sum())
    if engine is not None:
        engine.step()  # clips, steps the optimizer and the schedule at the boundary
        return loss_total, label_tokens, input_tokens
    if forgetting is not None and "masks" in forgetting:
        apply_masks(peft_model, forgetting["masks"])  # after DDP's all-reduce, before clipping
    if opts.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], opts.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, label_tokens, input_tokens


@torch.no_grad()
def _evaluate(
    loss_module: CausalLMLoss,
    rows: list[dict[str, Any]],
    opts: FinetuneConfig,
    pad_id: int,
    device: torch.device,
    autocast: Any,
) -> float:
    """Token-weighted validation loss over every rank's shard. Runs the unwrapped module: DDP's
    forward would broadcast buffers, a collective that nothing here needs."""
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), opts.batch_size):
        with autocast():
            loss_sum, n = loss_module(**_to(collate(rows[i : i + opts.batch_size], pad_id), device))
        total += float(loss_sum)
        count += int(n)
    loss_module.train(was_training)
    total, count = _all_reduce([total, float(count)], device)
    return total / count if count else float("nan")


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The largest peak over the ranks: resident memory of the worker process (MB) and, on a
    GPU, memory allocated by torch (GB)."""
    import resource

    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]  # KB on Linux
    if device.type == "cuda":
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
    if _world_size() > 1:
        import torch.distributed as dist

        tensor = torch.tensor(peaks, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        peaks = tensor.tolist()
    return {"peak_rss_mb": round(peaks[0], 1), **({"peak_vram_gb": round(peaks[1], 3)} if len(peaks) > 1 else {})}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums over the ranks (gloo on CPU, NCCL on GPU); the values themselves with one rank."""
    if _world_size() == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _current_lr(optimizer: torch.optim.Optimizer, engine: Any) -> float:
    return float((engine.optimizer if engine is not None else optimizer).param_groups[0]["lr"])


def _full_parameters(opts: FinetuneConfig, peft_model: nn.Module, *, modify: bool = False) -> Any:
    """Where ZeRO-3 partitions the adapter, a context (entered by every rank) in which its
    parameters are whole; with ``modify``, rank 0's changes are kept. Elsewhere a no-op."""
    if opts.strategy != "deepspeed" or opts.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = list(trainable_parameters(peft_model).values())
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def _trainable_state(peft_model: nn.Module, opts: FinetuneConfig | None) -> dict[str, torch.Tensor]:
    """CPU copies of the adapter's weights (gathered first under ZeRO-3 when ``opts`` is given)."""
    with _full_parameters(opts, peft_model) if opts is not None else contextlib.nullcontext():
        return {name: p.detach().to("cpu", copy=True) for name, p in trainable_parameters(peft_model).items()}


@torch.no_grad()
def _load_trainable_state(peft_model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = trainable_parameters(peft_model)
    missing = sorted(set(params) - set(state))
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} adapter parameters, e.g. {missing[0]!r}")
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))


def _report(
    metrics: dict[str, Any],
    state: _State,
    opts: FinetuneConfig,
    peft_model: nn.Module,
    engine: Any,
    forgetting: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    *,
    name: str | None,
) -> None:
    """``ray.train.report`` on every rank (it is a barrier); with ``name``, a checkpoint: rank 0
    writes the adapter (PEFT files), the position and the optimizer, and with DeepSpeed every
    rank adds its partition of the optimizer state (Ray merges the ranks' folders)."""
    import ray.train
    from ray.train import Checkpoint

    if name is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="kaizen-ckpt-") as tmp:
        directory = Path(tmp)
        with _full_parameters(opts, peft_model):
            params = _trainable_state(peft_model, None)
            if rank == 0:
                peft_model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
        if rank == 0:
            train_state = {**state.__dict__, "params": params}
            if engine is None:
                train_state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
            torch.save(train_state, directory / STATE_FILE)
            if forgetting is not None:
                torch.save({k: v for k, v in forgetting.items()}, directory / FORGETTING_FILE)
        if engine is not None:
            engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)
        keep = rank == 0 or engine is not None
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if keep else None, checkpoint_dir_name=name)


def _load_checkpoint(checkpoint: Any, peft_model: nn.Module) -> tuple[_State, dict[str, Any] | None, dict[str, Any]]:
    """The position, the Fisher masks or anchor and the adapter weights of a checkpoint; the
    adapter is loaded into ``peft_model`` here, the optimizer later (it does not exist yet)."""
    with checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
        path = Path(directory) / FORGETTING_FILE
        forgetting = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    _load_trainable_state(peft_model, saved["params"])
    fields = {k: v for k, v in saved.items() if k in _State.__dataclass_fields__}
    state = _State(**fields)
    state.restarts += 1
    state.resumed_from_step = state.step
    if forgetting is not None:
        device = next(iter(trainable_parameters(peft_model).values())).device
        forgetting = {
            k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v) for k, v in forgetting.items()
        }
    log.info("resuming at step %d (epoch %d, window %d)", state.step, state.epoch, state.window)
    return state, forgetting, saved


def _restore_optimizer(saved: Mapping[str, Any], checkpoint: Any, optimizer: Any, scheduler: Any, engine: Any) -> None:
    if engine is None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        return
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag="state", load_module_strict=False)


def _maybe_fail(fault: Mapping[str, Any] | None, step: int, rank: int) -> None:
    """Test hook (:data:`FAIL_AT_STEP_ENV`): rank 0 fails once at the given step."""
    if not fault or rank != 0 or step != fault["step"]:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"failed at step {step}\n")
    raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")


def _require(package: str, key: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{key} needs the {package} package: pip install 'kaizen[gpu]'") from exc


# --- the adapter -------------------------------------------------------------------------------


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
    """
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    checkpoint, final = result.checkpoint, dict(result.metrics or {})
    if checkpoint is None or not final.get("final"):
        raise ValueError(f"the run at {result.path} has no final checkpoint to publish")
    metrics = {
        k: final.get(k)
        for k in (
            "first_loss",
            "train_loss",
            "val_loss",
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
            "restarts",
            "mask",
            "peak_rss_mb",
            "peak_vram_gb",
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


def describe_report(metrics: Mapping[str, Any]) -> str:
    """One line for a training report: step, loss, validation figures, speed."""
    if metrics.get("final"):
        return (
            f"done: {metrics.get('step')} steps, val_loss {format_metric(metrics.get('val_loss'))}, "
            f"forgetting {format_metric(metrics.get('forgetting'))}, {metrics.get('stop_reason')}"
        )
    line = (
        f"step {metrics.get('step')} (epoch {metrics.get('epoch', 0):.2f}): loss {format_metric(metrics.get('loss'))}"
    )
    for key in ("val_loss", "forgetting", "objective"):
        if metrics.get(key) is not None:
            line += f", {key} {format_metric(metrics[key])}"
    line += f", {metrics.get('tokens_per_s', 0):,.0f} tokens/s"
    if metrics.get("trials"):
        tried = ", ".join(f"{t['seed']}: {format_metric(t.get('objective'))}" for t in metrics["trials"])
        line += f"; seed {metrics.get('seed')} goes on (objectives {tried})"
    return line


def format_metric(value: Any) -> str:
    """A loss-like figure with four decimals, or '-' when there is none."""
    return "-" if value is None else f"{value:.4f}"


def code_version() -> str | None:
    """``git rev-parse HEAD`` of this checkout (``+dirty`` with uncommitted changes), else the
    installed package's version, else None."""
    root = Path(__file__).resolve().parents[1]
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


# --- helpers -------------------------------------------------------------------------------------


def _new_run_name(now: datetime | None = None) -> str:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"finetune-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _default_storage_path(cfg: KaizenConfig) -> str:
    return f"{cfg.model.checkpoint_dir.rstrip('/')}/runs"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and the sets a run reads (shared with ``jobs.sweep``)."""
    parser.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
    parser.add_argument("--train", required=True, type=Path, help="training rows: a dataset folder or a .parquet file")
    parser.add_argument("--validation", type=Path, help="validation rows (default: the dataset's validation split)")
    parser.add_argument("--rehearsal", type=Path, help="rehearsal rows of earlier domains (SSR output)")
    parser.add_argument(
        "--fisher-data", type=Path, help="earlier-task rows for the Fisher information (default: rehearsal)"
    )
    parser.add_argument("--heldout", type=Path, help="held-out rows of earlier domains: their loss measures forgetting")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--name", help="the run's name (default finetune-<time>-<hex>)")
    parser.add_argument("overrides", nargs="*", help="finetune.key=value (options) and section.key=value (config)")
    return parser.parse_args(argv)


def _cli(argv: Sequence[str] | None = None) -> int:
    from app.config import ConfigError, load_job_config

    args = _parse(argv)
    try:
        cfg, opts = load_job_config(args.config, args.overrides, "finetune")
    except ConfigError as exc:
        print(f"python -m jobs.finetune: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = main(
            cfg,
            opts,
            args.train,
            args.validation,
            args.rehearsal,
            fisher_data=args.fisher_data,
            heldout=args.heldout,
            run_name=args.name,
            progress=lambda m: print(describe_report(m)),
        )
    except (ValueError, ImportError, FileNotFoundError) as exc:
        print(f"python -m jobs.finetune: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
