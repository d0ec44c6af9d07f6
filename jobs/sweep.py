"""Sweep fine-tuning hyper-parameters with Ray Tune and register the best adapter as a candidate.

    python -m jobs.sweep --config configs/default.yaml --train <dataset dir or parquet>
        [--validation <dir>] [--rehearsal <dir>] [--heldout <dir>] [--fisher-data <dir>]
        [sweep.key=value ...] [finetune.key=value ...] [section.key=value ...]

Ray Tune's driver-function pattern (Ray Train V2): each trial is a small function that builds its
own ``TorchTrainer`` with :func:`app.learning.ray_trainer.build_trainer`, the trial's options on top of the
``finetune`` section, and Ray Train's ``TuneReportCallback`` forwards every report of the trial's
rank 0 to Tune. ASHA compares the trials at rungs of ``sweep.grace_period_steps`` x
``sweep.reduction_factor``^k optimizer steps and stops the ones whose objective trails.

The objective is the validation loss plus ``finetune.forgetting_weight`` times the rise of the
loss on held-out rows of earlier domains (``--heldout``, rows that no trial trains on); without
held-out rows it is the validation loss. Every trial starts from the same parent adapter (the
champion when the sweep starts, with ``finetune.continue_from=champion``). The trial with the
lowest final objective has its adapter stored and registered as a ``candidate``; the results
table is printed and saved as ``results.json`` and ``results.md`` in
``<model.checkpoint_dir>/sweeps/<sweep id>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from app.config import ConfigError, KaizenConfig, job_options, resolve_paths
from app.job_cli import job_parser, run_job
from app.learning.lineage import TrainingDidNotLearn, publish_adapter, resolve_parent_adapter
from app.learning.ray_trainer import build_trainer
from app.learning.sweep import (
    SweepConfig,
    check_search,
    new_sweep_id,
    relevant_search,
    tune_space,
)
from app.learning.training import OBJECTIVES_WITH_PAIRS, FinetuneConfig, rehearsal_count, steps_per_epoch
from app.learning.training_data import add_data_arguments, check_data, read_datasets
from app.ray_setup import start_ray

__all__ = ["cli", "main", "results_table", "run_trial"]

log = logging.getLogger("kaizen.sweep")

METRIC = "objective"
TRIAL_CPUS = 0.01
RESULTS_JSON = "results.json"
RESULTS_TABLE = "results.md"
_PARAM_FORMAT = {
    "lr": "{:.2e}",
    "lora_alpha": "{:g}",
    "rehearsal_ratio": "{:.2f}",
    "mask_fraction": "{:.2f}",
    "lora_dropout": "{:.2f}",
    "ewc_lambda": "{:g}",
    "weight_decay": "{:g}",
}


def main(
    cfg: KaizenConfig,
    sweep: SweepConfig,
    opts: FinetuneConfig,
    train: Path,
    validation: Path | None = None,
    rehearsal: Path | None = None,
    *,
    heldout: Path | None = None,
    fisher_data: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the sweep, publish the best trial's adapter; Ray is started here unless it runs.

    Args:
        progress: called with a line at each trial's start, evaluation and end.

    Returns:
        ``sweep_id``, ``path``, ``trials`` (one row per trial: its parameters, status, steps,
        losses, forgetting, objective), ``best`` (the trial), ``adapter`` (what
        :func:`app.learning.lineage.publish_adapter` returned), ``notes`` and ``warnings``.

    Raises:
        ValueError: no validation rows, search values finetune refuses, or no trial finished.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    started = time.time()
    cfg = resolve_paths(cfg.model_copy(deep=True))
    start_ray(cfg)
    data = read_datasets(
        train, validation, rehearsal, fisher_data, heldout, preferences=opts.objective in OBJECTIVES_WITH_PAIRS
    )
    if "validation" not in data.datasets:
        raise ValueError(
            "a sweep ranks trials by validation loss: give --validation rows (or a dataset folder with them)"
        )
    warnings = check_data(opts, data)
    search, notes = relevant_search(sweep.search, opts.model_dump(), has_rehearsal="rehearsal" in data.datasets)
    if not search:
        raise ValueError("sweep.search: nothing left to search (" + "; ".join(notes) + ")")
    errors = check_search(search, opts.model_dump())
    if errors:
        raise ConfigError(errors)
    # Every trial starts from the same adapter: the champion now, not whichever is champion later.
    parent = resolve_parent_adapter(cfg, opts)
    base = opts.model_copy(update={"continue_from": parent})
    for line in [*notes, *warnings]:
        log.warning(line)

    sweep_id = sweep.sweep_id or new_sweep_id()
    root = f"{cfg.model.checkpoint_dir.rstrip('/')}/sweeps"
    path = Path(root) / sweep_id
    if path.exists():
        raise ValueError(f"sweep.sweep_id: {sweep_id} exists at {path}; choose another or leave it unset")
    total = _total_steps(base, data.rows)
    scheduler = (
        # max_t past the last step: ASHA stops a trial that reaches max_t, before its final report.
        ASHAScheduler(
            time_attr="step",
            max_t=max(total, sweep.grace_period_steps) + 1,
            grace_period=sweep.grace_period_steps,
            reduction_factor=sweep.reduction_factor,
        )
        if sweep.scheduler == "asha"
        else FIFOScheduler()
    )
    trainable = tune.with_parameters(
        run_trial,
        cfg=cfg.model_dump(mode="json"),
        base=base.model_dump(mode="json"),
        datasets=data.datasets,
        runs=str(path / "runs"),
    )
    reporter = _progress_callback(progress or (lambda line: None), list(search))
    tuner = tune.Tuner(
        # The trial function only waits on its trainer, whose workers hold the CPUs (Tune refuses
        # a trial of no resources at all).
        tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        param_space=tune_space(search, grid=sweep.method == "grid"),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials),
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=root,
            callbacks=[reporter],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        ),
    )
    grid = tuner.fit()
    rows = _trial_rows(grid, list(search))
    finished = [r for r in rows if r["status"] == "completed" and math.isfinite(r.get(METRIC) or math.nan)]
    _save(path, rows, search, sweep, base, None)
    if not finished:
        raise ValueError(
            f"no trial of sweep {sweep_id} finished (see {path}): "
            + "; ".join(f"{r['trial']}: {r['status']}{' ' + r['error'] if r.get('error') else ''}" for r in rows)
        )
    best = min(finished, key=lambda r: r[METRIC])
    best_opts = base.model_copy(update=best["params"])
    result = ray.train.Result(
        metrics=best["final"],
        checkpoint=ray.train.Checkpoint(best["checkpoint_path"]),
        error=None,
        path=best["run_path"],
    )
    adapter = publish_adapter(cfg, best_opts, result, data=data, parent_adapter_id=parent, started=started)
    for row in rows:
        row["best"] = row is best
    _save(path, rows, search, sweep, base, adapter)
    return {
        "sweep_id": sweep_id,
        "path": str(path),
        "trials": rows,
        "best": best,
        "adapter": adapter,
        "notes": notes,
        "warnings": warnings,
    }


def run_trial(
    config: dict[str, Any], *, cfg: dict[str, Any], base: dict[str, Any], datasets: Mapping[str, Any], runs: str
) -> None:
    """One trial (in its Tune actor): a ``TorchTrainer`` with the trial's options, whose reports
    reach Tune through ``TuneReportCallback``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationsToTune(TuneReportCallback):
        """Forwards the reports that carry the objective (evaluations and the final one): Tune
        wants its metric in every result, and the steps between evaluations have none."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if METRIC in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    opts = FinetuneConfig.model_validate({**base, **config})
    trial = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        KaizenConfig.model_validate(cfg), opts, datasets, f"trial-{trial}", runs, callbacks=[EvaluationsToTune()]
    )
    trainer.fit()


def results_table(rows: Sequence[Mapping[str, Any]], params: Sequence[str]) -> str:
    """The trials as a Markdown table, best objective first."""
    header = ["trial", *params, "status", "steps", "val_loss", "forgetting", METRIC]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: (r.get(METRIC) is None, r.get(METRIC) or 0.0)):
        cells = [row["trial"] + (" (best)" if row.get("best") else "")]
        cells += [_PARAM_FORMAT.get(p, "{}").format(row["params"].get(p)) for p in params]
        cells += [row["status"], str(row.get("steps") or 0)]
        cells += ["-" if row.get(k) is None else f"{row[k]:.4f}" for k in ("val_loss", "forgetting", METRIC)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- helpers -------------------------------------------------------------------------------------


def _progress_callback(emit: Callable[[str], None], params: list[str]) -> Any:
    """A Tune callback that reports each trial's start, evaluations and end through ``emit``."""
    from ray.tune import Callback

    class Progress(Callback):
        """Prints a line when a trial starts, evaluates and ends."""

        def __init__(self, emit: Callable[[str], None], params: list[str]) -> None:
            self.emit, self.params = emit, params

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            values = ", ".join(f"{p}={_PARAM_FORMAT.get(p, '{}').format(trial.config.get(p))}" for p in self.params)
            self.emit(f"trial {trial.trial_id} started: {values}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if METRIC in result and not result.get("final"):
                extra = f", forgetting {result['forgetting']:.4f}" if result.get("forgetting") is not None else ""
                self.emit(
                    f"trial {trial.trial_id} step {result.get('step')}: val_loss {result['val_loss']:.4f}"
                    f"{extra}, objective {result[METRIC]:.4f}"
                )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            how = "finished" if last.get("final") else f"stopped by the scheduler at step {last.get('step')}"
            self.emit(f"trial {trial.trial_id} {how}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.emit(f"trial {trial.trial_id} failed")

    return Progress(emit, params)


def _total_steps(opts: FinetuneConfig, rows: Mapping[str, int]) -> int:
    if opts.objective == "dpo":  # an epoch is a pass over the pairs
        mixed = rows.get("preferences", 0) // opts.num_workers
    else:  # sft+dpo draws a micro-batch of pairs per micro-batch of rows
        per_worker = rows["train"] // opts.num_workers
        mixed = per_worker + (rehearsal_count(per_worker, opts.rehearsal_ratio) if "rehearsal" in rows else 0)
    total = opts.epochs * steps_per_epoch(mixed, opts.batch_size, opts.grad_accumulation)
    return min(total, opts.max_steps or total)


def _trial_rows(grid: Any, params: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = {p: (result.config or {}).get(p) for p in params}
        trial = metrics.get("trial_id") or Path(result.path).name
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        else:
            status = "stopped"
        rows.append(
            {
                "trial": trial,
                "params": config,
                "status": status,
                "error": None if result.error is None else str(result.error).splitlines()[0][:300],
                "steps": metrics.get("step"),
                "val_loss": metrics.get("val_loss"),
                "heldout_loss": metrics.get("heldout_loss"),
                "forgetting": metrics.get("forgetting"),
                METRIC: metrics.get(METRIC),
                "train_time_s": metrics.get("train_time_s") or metrics.get("elapsed_s"),
                "checkpoint_path": metrics.get("checkpoint_path"),
                "run_path": str(Path(metrics["checkpoint_path"]).parent) if metrics.get("checkpoint_path") else None,
                "final": {k: v for k, v in metrics.items() if k != "config"} if status == "completed" else None,
            }
        )
    return rows


def _save(
    path: Path,
    rows: list[dict[str, Any]],
    search: Mapping[str, Any],
    sweep: SweepConfig,
    base: FinetuneConfig,
    adapter: Mapping[str, Any] | None,
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    document = {
        "sweep": sweep.model_dump(mode="json"),
        "search": {k: (v if isinstance(v, list) else v.model_dump()) for k, v in search.items()},
        "finetune": base.model_dump(mode="json"),
        "trials": [{k: v for k, v in r.items() if k != "final"} for r in rows],
        "adapter": dict(adapter) if adapter else None,
    }
    tmp = path / f".{RESULTS_JSON}.tmp"
    tmp.write_text(json.dumps(document, indent=2, default=str))
    os.replace(tmp, path / RESULTS_JSON)
    (path / RESULTS_TABLE).write_text(results_table(rows, list(search)) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = job_parser(
        "jobs.sweep", __doc__, overrides_help="sweep.key=value, finetune.key=value and section.key=value"
    )
    add_data_arguments(parser)
    return parser


def _run(args: argparse.Namespace, cfg: KaizenConfig, sweep: SweepConfig) -> str:
    """The sweep of the command line; its results table and the winner, to print."""
    result = main(
        cfg,
        sweep,
        job_options(cfg, "finetune"),
        args.train,
        args.validation,
        args.rehearsal,
        heldout=args.heldout,
        fisher_data=args.fisher_data,
        progress=print,
    )
    return (
        results_table(result["trials"], list(result["best"]["params"]))
        + f"\n\nbest trial {result['best']['trial']}: adapter {result['adapter']['adapter_id']} registered as "
        f"{result['adapter']['status']}; results in {result['path']}"
    )


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: a bad option or input)."""
    return run_job(_parser(), _run, argv, section="sweep", not_done=(TrainingDidNotLearn,))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
