"""Fine-tune a LoRA adapter with Ray Train and register it as a candidate.

    python -m jobs.finetune --config configs/default.yaml --train <dataset dir or parquet>
        [--validation <dir or parquet>] [--rehearsal <dir or parquet>] [--fisher-data <dir or parquet>]
        [--heldout <dir or parquet>]
        [--name RUN] [finetune.key=value ...] [section.key=value ...]

The recipe (options: :class:`app.learning.training.FinetuneConfig`, ``finetune.<key>=<value>``
on the command line or a ``finetune:`` section in the config file):

1. read the rows on the driver (:func:`app.learning.training_data.read_datasets`: a Parquet file,
   or a folder: its ``train.parquet`` or ``train/`` when present, else every Parquet file under
   it; a dataset folder's ``validation.parquet`` or ``validation/`` is the validation split
   unless ``--validation`` says otherwise, and with ``finetune.objective`` dpo or sft+dpo its
   ``train_preferences.parquet`` holds the preference pairs), hash each set's ``manifest.json``
   for the lineage and check the rows against the options;
2. build a ``TorchTrainer`` (Ray Train V2, :func:`app.learning.ray_trainer.build_trainer`) whose
   ``finetune.num_workers`` workers each run a :class:`app.learning.trainer.Trainer`: it loads
   ``model.base_model`` from its checkpoint directory, puts a fresh LoRA adapter on it or
   continues the registry's champion (``finetune.continue_from``), tokenizes its shard of the
   rows (labels on the assistant turns only) and trains with DDP (gloo on CPU, NCCL on GPU) or
   DeepSpeed ZeRO-2/3, optionally on 4-bit weights (QLoRA), with gradient checkpointing and bf16
   autocast on GPU;
3. fit: the objective (``finetune.objective``) is the answers' cross-entropy (sft), direct
   preference optimisation on the pairs, each user's correction made more likely than the answer
   it replaced relative to the base model (dpo, ``finetune.dpo_beta``; the reference is the same
   model with the adapter disabled), or their sum (sft+dpo); each epoch mixes rehearsal rows of
   earlier domains into the training rows (``finetune.rehearsal_ratio``); Fisher-guided gradient
   masking or EWC, with the Fisher information estimated on the rehearsal rows (or
   ``--fisher-data``), keeps the adapter entries that matter to earlier domains in place. The
   learning rate warms up (``finetune.warmup_fraction``) and decays; validation exact match
   (``finetune.select_by``; the loss objective breaks ties) drives early stopping and picks the
   adapter kept; with held-out rows of earlier domains, once the validation match reaches
   ``finetune.learned_exact_match`` the held-out rows' exact match (forgetting) counts first.
   With ``finetune.trials`` > 1 the run first trains that many seeds for
   ``finetune.trial_fraction`` of its steps each and goes on with the best by validation; with
   ``finetune.attempts`` > 1 a run that ends with its validation exact match below
   ``finetune.learned_exact_match`` starts over from the next seed, and the best attempt is kept.
   Every step's loss, learning rate and tokens/s reach Ray Train in the ``step_metrics`` of the
   next report (an epoch's last step with the epoch's loss), sent at evaluations, checkpoints,
   the end and at most every ``finetune.report_every_s`` in between (a report waits until the
   controller has collected the one before, and it polls every 2 s: a report per step, or per
   epoch of a small set, would cap a fast run at one per poll); every
   ``finetune.checkpoint_every_steps`` steps the adapter, optimizer and position are
   checkpointed to ``<model.checkpoint_dir>/runs/<run>``, from which a failed worker group is
   restarted (``finetune.max_failures``) and goes on from the checkpoint's step;
4. publish the final adapter to the adapter store with its lineage (base model, dataset and
   rehearsal manifest hashes, hyper-parameters, metrics, code version) and into the registry as
   a ``candidate`` (:func:`app.learning.lineage.publish_adapter`); a run whose training loss did
   not fall (``finetune.min_loss_drop``) is failed instead: exit status 1, nothing stored or
   registered.

A Ray Tune sweep (``jobs/sweep.py``) gives each trial its own ``TorchTrainer`` from the same pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.config import KaizenConfig, resolve_paths
from app.job_cli import job_parser, run_job
from app.learning.lineage import TrainingDidNotLearn, publish_adapter
from app.learning.ray_trainer import build_trainer
from app.learning.training import OBJECTIVES_WITH_PAIRS, FinetuneConfig, describe_report
from app.learning.training_data import add_data_arguments, check_data, read_datasets
from app.ray_setup import start_ray

__all__ = ["cli", "main"]

log = logging.getLogger("kaizen.finetune")


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
        train: training rows (a Parquet file or a dataset folder; with ``finetune.objective`` dpo or
            sft+dpo, a dataset folder whose ``train_preferences.parquet`` has pairs).
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
        ValueError: options that do not fit the data or the resource limits (naming the key), e.g.
            ``finetune.objective`` dpo without preference pairs.
        ImportError: DeepSpeed or bitsandbytes asked for and not installed.
        ray.train.TrainingFailedError: the workers failed more than ``finetune.max_failures`` times.
    """
    started = time.time()
    cfg = resolve_paths(cfg.model_copy(deep=True))
    start_ray(cfg)
    data = read_datasets(
        train, validation, rehearsal, fisher_data, heldout, preferences=opts.objective in OBJECTIVES_WITH_PAIRS
    )
    warnings = check_data(opts, data)
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


# --- helpers -------------------------------------------------------------------------------------


def _new_run_name(now: datetime | None = None) -> str:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"finetune-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _default_storage_path(cfg: KaizenConfig) -> str:
    return f"{cfg.model.checkpoint_dir.rstrip('/')}/runs"


# --- the command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = job_parser(
        "jobs.finetune", __doc__, overrides_help="finetune.key=value (options) and section.key=value (config)"
    )
    add_data_arguments(parser)
    parser.add_argument("--name", help="the run's name (default finetune-<time>-<hex>)")
    return parser


def _run(args: argparse.Namespace, cfg: KaizenConfig, opts: FinetuneConfig) -> dict[str, Any]:
    return main(
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


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: a bad option or input)."""
    return run_job(_parser(), _run, argv, section="finetune", not_done=(TrainingDidNotLearn,))


if __name__ == "__main__":
    sys.exit(cli())
