"""One learning cycle: from the interactions in the store to a candidate adapter in the registry.

    python -m jobs.learn --config configs/default.yaml [section.key=value ...]
    kaizen learn [--config FILE] [--address http://HEAD:8265] [section.key=value ...]
    kaizen learn --now [--reason TEXT]     (the running scheduler starts one: POST /v1/training/runs)

The stages, each the job of the same name with its config section:

1. ``jobs/build_dataset.py`` (``dataset``): the best recent interactions as a training set;
2. the dataset checks (:mod:`app.learning.dataset.checks`): too few training rows, too many repeated
   requests, one group crowding out the rest or too many redaction placeholders stop the cycle,
   with every failed check named (``learn.min_train_rows``, ``max_duplicate_share``,
   ``max_group_share``, ``max_redacted_share``);
3. the earlier domains, those of the champion adapter's own training set (from its lineage):
   ``jobs/synthesize.py`` (``ssr``) writes Self-Synthesized Rehearsal rows from a small sample of
   them (``learn.rehearsal=ssr``) and keeps the champion's own SSR rows of the domains before
   those (``learn.carry_rehearsal``), or their real rows are rehearsed (``real``), or nothing
   (``none``); the first cycle, without a champion, has no earlier domains;
4. ``jobs/finetune.py`` (``finetune``), or ``jobs/sweep.py`` (``sweep``, ``learn.train_with=sweep``),
   continuing the champion, with forgetting measured on the earlier set's validation split;
5. the new adapter is registered as a ``candidate``;
6. ``jobs/validate.py`` (``validation``, ``learn.validate_candidate``): the candidate against the champion
   (or the base model), the verdict recorded and the registry status following it; the deployer
   takes up a production verdict by itself.

Each stage prints a line as it starts and ends, training prints its steps, and the cycle's
record (stages, paths, timings, the adapter) is written to
``<model.checkpoint_dir>/cycles/<cycle id>.json``. A cycle the scheduler started
(``learn.run_id``) also keeps each stage in its ``training_runs`` row as it starts and ends, so
``GET /v1/training`` and ``kaizen training status`` show where it is.

With ``--address`` the cycle is submitted to a Ray cluster as a Ray job (``ray job submit``):
this folder is its working directory, the config file must lie inside it, and the job's output
is followed until it ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.artifacts import artifact_uri
from app.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    KaizenConfig,
    job_options,
    load_config,
    resolve_paths,
)
from app.job_cli import job_parser
from app.learning.dataset.checks import DatasetRejected
from app.learning.lineage import TrainingDidNotLearn
from app.ray_setup import start_ray

__all__ = ["cli", "earlier_dataset", "main", "submit"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = 6
# What a submitted job does not need: the local environment, data and history.
SUBMIT_EXCLUDES = [".venv/", "data/", ".git/", "**/__pycache__/", ".pytest_cache/", "benchmarks/results/"]


class NotEnoughData(RuntimeError):
    """The store has too few good interactions for a dataset (the dataset job's message)."""


def main(cfg: KaizenConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one cycle; Ray is started here unless it runs.

    Returns:
        The cycle's record: ``cycle_id``, ``dataset``, ``earlier``, ``rehearsal``, ``training``
        (the finetune or sweep result), ``adapter`` (id, uri, status, metrics), ``validation``
        (verdict, reason, baseline, report; None with ``learn.validate_candidate`` false), ``stages``
        (seconds each), ``record`` (where the record was written).

    Raises:
        NotEnoughData: too few interactions for a dataset.
        DatasetRejected: the dataset failed its checks (the message names each failed check).
        ConfigError: a bad option in one of the stages' sections.
        ValueError: a stage refused its input (the message names it).
    """
    from app.learning.dataset import InsufficientDataError
    from app.learning.dataset.checks import check_dataset, failed_checks
    from app.learning.training import format_metric
    from jobs import build_dataset, finetune, synthesize
    from jobs import sweep as sweep_job
    from jobs import validate as validate_job

    started = time.time()
    cfg = resolve_paths(cfg.model_copy(deep=True))
    learn = job_options(cfg, "learn")
    dataset_opts, ssr_opts = job_options(cfg, "dataset"), job_options(cfg, "ssr")
    ft_opts = job_options(cfg, "finetune")
    sweep_opts = job_options(cfg, "sweep") if learn.train_with == "sweep" else None
    cycle_id = f"cycle-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    record: dict[str, Any] = {
        "cycle_id": cycle_id,
        "started_at": datetime.now(UTC).isoformat(),
        "options": learn.model_dump(mode="json"),
        "stages": {},
    }
    start_ray(cfg)
    _quiet_ray_data()
    keep_stage = _stage_keeper(cfg, learn.run_id)
    current: dict[str, str | None] = {"name": None}

    def stage(number: int, name: str) -> Callable[..., None]:
        progress(f"[{number}/{STAGES}] {name}")
        current["name"] = name
        keep_stage(name, {"status": "running", "started_at": datetime.now(UTC).isoformat()})
        t0 = time.perf_counter()

        def done(summary: str, status: str = "done", **info: Any) -> None:
            seconds = time.perf_counter() - t0
            record["stages"][name] = round(seconds, 2)
            keep_stage(name, {"status": status, "seconds": round(seconds, 2), "summary": summary, **info})
            current["name"] = None
            progress(f"      {summary} ({seconds:.1f} s)")

        return done

    try:
        done = stage(1, "dataset")
        try:
            manifest = build_dataset.main(cfg, dataset_opts)
        except InsufficientDataError as exc:
            raise NotEnoughData(str(exc)) from exc
        dataset = Path(manifest.uri)
        record["dataset"] = {"dataset_id": manifest.dataset_id, "uri": manifest.uri, "rows": manifest.rows}
        done(
            f"{manifest.dataset_id}: {manifest.rows} rows (train {manifest.funnel.train}) of {manifest.funnel.scored}"
            f" scored interactions -> {dataset}"
        )

        done = stage(2, "dataset checks")
        checks = check_dataset(
            dataset,
            min_train_rows=learn.min_train_rows,
            max_duplicate_share=learn.max_duplicate_share,
            max_group_share=learn.max_group_share,
            max_redacted_share=learn.max_redacted_share,
            group_by=tuple(dataset_opts.balance_by),
        )
        record["checks"] = [c.to_json() for c in checks]
        failed = failed_checks(checks)
        if failed:
            done(f"failed: {'; '.join(c.detail for c in failed)}", "failed", checks=record["checks"])
            raise DatasetRejected(manifest.dataset_id, checks)
        done("passed: " + "; ".join(c.detail for c in checks), checks=record["checks"])

        done = stage(3, "rehearsal")
        earlier, why = earlier_dataset(cfg)
        record["earlier"] = str(earlier) if earlier else None
        rehearsal: Path | None = None
        if earlier is None:
            done(f"nothing to rehearse: {why}")
        elif learn.rehearsal == "none":
            done(f"learn.rehearsal is none: the earlier domains ({earlier}) are not rehearsed")
        elif learn.rehearsal == "real":
            rehearsal = earlier / "train.parquet"
            done(f"the earlier dataset's own training rows: {rehearsal}")
        else:
            carried = champion_rehearsal_set(cfg) if learn.carry_rehearsal and ssr_opts.carry_over is None else None
            if carried is not None:
                ssr_opts = ssr_opts.model_copy(update={"carry_over": carried})
            made = synthesize.main(cfg, ssr_opts, earlier)
            uri = artifact_uri(cfg.model.storage_root, "rehearsal", made.rehearsal_id)
            record["ssr"] = {
                "rehearsal_id": made.rehearsal_id,
                "uri": uri,
                "rows": made.rows,
                "refined_by": made.refined_by,
                "carried_from": made.carried_from,
                "carried": made.carried,
            }
            if made.rows:
                rehearsal = Path(uri)
                counts = ", ".join(f"{d}: {n}" for d, n in made.counts.items())
                done(f"{made.rehearsal_id}: {made.rows} synthetic rows ({counts}) from {earlier}")
            else:
                dropped = {d: r.outputs_dropped or r.inputs_dropped for d, r in made.domains.items()}
                done(f"{made.rehearsal_id}: SSR kept no rows (dropped: {dropped}); training without rehearsal")
        record["rehearsal"] = str(rehearsal) if rehearsal else None
        heldout = earlier if earlier is not None and learn.measure_forgetting and _has_validation(earlier) else None
        if rehearsal is None:
            ft_opts = ft_opts.model_copy(update={"rehearsal_ratio": 0.0})  # nothing to mix in, and no warning about it

        done = stage(4, f"training ({learn.train_with})")
        if sweep_opts is not None:
            result = sweep_job.main(
                cfg,
                sweep_opts,
                ft_opts,
                dataset,
                rehearsal=rehearsal,
                heldout=heldout,
                progress=lambda line: progress(f"      {line}"),
            )
            adapter = result["adapter"]
            record["training"] = {
                "sweep_id": result["sweep_id"],
                "path": result["path"],
                "best": result["best"]["trial"],
                "trials": [{k: t.get(k) for k in ("trial", "params", "status", "objective")} for t in result["trials"]],
            }
            done(
                f"{len(result['trials'])} trials, best {result['best']['trial']} (objective "
                f"{result['best']['objective']:.4f}); results in {result['path']}"
            )
        else:
            adapter = finetune.main(
                cfg, ft_opts, dataset, rehearsal=rehearsal, heldout=heldout, progress=_Throttled(progress)
            )
            record["training"] = {"run_path": adapter["run_path"], "warnings": adapter.get("warnings", [])}
            m, fmt = adapter["metrics"], format_metric
            done(
                f"{m['steps']} steps: loss {fmt(m.get('first_loss'))} -> {fmt(m.get('train_loss'))}, "
                f"validation {fmt(m.get('initial_val_loss'))} -> {fmt(m.get('val_loss'))}, "
                f"forgetting {fmt(m.get('forgetting'))}"
            )

        done = stage(5, "candidate")
        record["adapter"] = {k: adapter.get(k) for k in ("adapter_id", "uri", "status", "parent_adapter_id", "metrics")}
        done(
            f"adapter {adapter['adapter_id']} registered as {adapter['status']}"
            f"{' (from ' + adapter['parent_adapter_id'] + ')' if adapter.get('parent_adapter_id') else ''}"
        )

        done = stage(6, "validation")
        if learn.validate_candidate:
            outcome = validate_job.main(cfg, adapter["adapter_id"], progress=lambda line: progress(f"      {line}"))
            record["validation"] = {
                "validation_id": outcome.validation_id,
                "verdict": outcome.verdict,
                "reason": outcome.reason,
                "baseline": outcome.baseline,
                "report_uri": outcome.report_uri,
            }
            done(f"{outcome.verdict} against {outcome.baseline} ({outcome.reason}); report {outcome.report_uri}")
        else:
            record["validation"] = None
            done("learn.validate_candidate is false: the candidate waits for kaizen validate")

        record["seconds"] = round(time.time() - started, 2)
        record["record"] = _write_record(cfg, cycle_id, record)
        progress(f"cycle {cycle_id} done in {record['seconds']:.0f} s; record: {record['record']}")
        return record
    except BaseException as exc:
        # The stage that was running when the cycle stopped says so in the run's row.
        if current["name"] is not None:
            keep_stage(current["name"], {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise


def _champion_lineage(cfg: KaizenConfig) -> tuple[str | None, Any]:
    """The champion adapter's id and lineage (None, None without a champion)."""
    from app.model.adapters import AdapterStore
    from app.registry import champion_adapter

    champion = champion_adapter(cfg)
    if champion is None:
        return None, None
    return champion, AdapterStore(cfg.model.storage_root).manifest(champion).lineage


def champion_rehearsal_set(cfg: KaizenConfig) -> str | None:
    """The SSR rehearsal set the champion adapter was trained with (its lineage's
    ``rehearsal_uri``, when that is a folder holding an SSR set), else None."""
    from app.learning.ssr import is_rehearsal_set

    _, lineage = _champion_lineage(cfg)
    uri = lineage.rehearsal_uri if lineage is not None else None
    return uri if uri and is_rehearsal_set(uri) else None


def earlier_dataset(cfg: KaizenConfig) -> tuple[Path | None, str]:
    """The champion adapter's training dataset folder (its lineage's ``dataset_uri``), or None
    and why there is none."""
    champion, lineage = _champion_lineage(cfg)
    if champion is None:
        return None, "no champion adapter yet (the first cycle)"
    uri = lineage.dataset_uri
    if not uri:
        return None, f"the champion {champion} has no dataset in its lineage"
    path = Path(uri)
    if path.is_file():  # trained from a Parquet file: its folder is the dataset
        path = path.parent
    if not path.exists():
        return None, f"the champion {champion}'s dataset {uri} is gone"
    return path, ""


def submit(
    address: str,
    config: str | None,
    overrides: Sequence[str],
    *,
    wait: bool = True,
    output: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> tuple[str, str]:
    """Submit a cycle to a Ray cluster as a Ray job (``ray job submit``) and, with ``wait``,
    follow its output until it ends; returns the job id and its final status.

    Raises:
        ConfigError: the config file is not inside the project folder (the job's working directory),
            or it names relative paths, which would point into that temporary folder on the cluster.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    path = Path(config or DEFAULT_CONFIG_PATH).resolve()
    try:
        relative = path.relative_to(PROJECT_ROOT)
    except ValueError:
        raise ConfigError([f"--config: {path} must lie inside {PROJECT_ROOT}, the job's working directory"]) from None
    cfg = load_config(path, list(overrides))
    paths = {"model.storage_root": cfg.model.storage_root, "model.checkpoint_dir": cfg.model.checkpoint_dir}
    if cfg.store.engine == "sqlite":
        paths["store.sqlite_path"] = cfg.store.sqlite_path
    relative_paths = [
        f"{key}: {value!r} is relative; on the cluster it would name a folder inside the job's "
        "temporary working directory: give an absolute or shared path (or a URI)"
        for key, value in paths.items()
        if "://" not in value and not Path(value).is_absolute()
    ]
    if relative_paths:
        raise ConfigError(relative_paths)
    entrypoint = " ".join(["python", "-m", "jobs.learn", "--config", str(relative), *map(shlex.quote, overrides)])
    client = JobSubmissionClient(address)
    submission_id = f"kaizen-learn-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    deadline = time.monotonic() + 60
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint,
                runtime_env={
                    "working_dir": str(PROJECT_ROOT),
                    "excludes": SUBMIT_EXCLUDES,
                    "env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                },
                submission_id=submission_id,
                metadata={"kaizen": "learn"},
            )
            break
        except RuntimeError as exc:
            # A head that has just started answers "No available agent ... try again later".
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    output(f"submitted {job_id} to {address}: {entrypoint}\n")
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    shown = 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            output(logs[shown:])
            shown = len(logs)
        if status in terminal:
            return job_id, str(status.value if hasattr(status, "value") else status)
        time.sleep(1.0)


class _Throttled:
    """Training reports as lines: every evaluation and the end, other steps at most every few seconds."""

    def __init__(self, emit: Callable[[str], None], every_s: float = 5.0) -> None:
        self.emit, self.every_s, self.last = emit, every_s, -math.inf

    def __call__(self, metrics: dict[str, Any]) -> None:
        from app.learning.training import describe_report

        now = time.monotonic()
        if "val_loss" in metrics or metrics.get("final") or now - self.last >= self.every_s:
            self.last = now
            self.emit(f"      {describe_report(metrics)}")


def _quiet_ray_data() -> None:
    """The cycle prints its own progress: no Ray Data progress bars or plan logs between its lines."""
    import logging

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _stage_keeper(cfg: KaizenConfig, run_id: str | None) -> Callable[[str, dict[str, Any]], None]:
    """What keeps a stage in the scheduler's ``training_runs`` row ``run_id`` (nothing without one).
    The store is opened for each write: a cycle runs for minutes to hours between them."""
    if run_id is None:
        return lambda name, info: None
    from app.scheduling.state import TrainingRunStore
    from app.store import open_store

    def keep(name: str, info: dict[str, Any]) -> None:
        store = open_store(cfg.store)
        try:
            TrainingRunStore(store).record_stage(run_id, name, info)
        finally:
            store.close()

    return keep


def _has_validation(path: Path) -> bool:
    return (path / "validation.parquet").exists() or (path / "validation").is_dir()


def _write_record(cfg: KaizenConfig, cycle_id: str, record: dict[str, Any]) -> str:
    directory = Path(cfg.model.checkpoint_dir) / "cycles"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{cycle_id}.json"
    tmp = directory / f".{cycle_id}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, target)
    return str(target)


OVERRIDES_HELP = "learn.key=value, dataset.*, ssr.*, finetune.*, sweep.* and section.key=value"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``kaizen learn``: the jobs' ``--config`` and overrides, and the cycle's flags."""
    parser.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    add_cycle_arguments(parser)


def add_cycle_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags a cycle adds to the jobs' shared command line (:func:`app.job_cli.job_parser`)."""
    parser.add_argument(
        "--address",
        default=None,
        help="submit to this Ray cluster's job server (http://HEAD:8265) instead of running here",
    )
    parser.add_argument("--no-wait", action="store_true", help="with --address: return once the job is submitted")
    parser.add_argument(
        "--now",
        action="store_true",
        help="ask the running scheduler (kaizen up) for a cycle through the API (POST /v1/training/runs) "
        "instead of running one here; it starts at the scheduler's next check",
    )
    parser.add_argument("--reason", default="asked for with kaizen learn --now", help="with --now: why (audited)")
    parser.add_argument("--url", default=None, help="with --now: the Kaizen API (default: the config's serve address)")
    parser.add_argument(
        "--api-key", default=None, help="with --now: an operator's key (default: the KAIZEN_API_KEY variable)"
    )
    parser.add_argument("--json", action="store_true", help="print the cycle's record as JSON at the end")


def run(args: argparse.Namespace) -> int:
    """Run or submit a cycle from parsed arguments; returns the exit status (1: not enough data
    or a failed job, 2: a bad option or input)."""
    import logging

    try:
        cfg = load_config(args.config, list(args.overrides))  # validates every section
    except ConfigError as exc:
        print(f"kaizen learn: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "now", False):
        return _ask_scheduler(cfg, args)
    if args.address:
        try:
            job_id, status = submit(args.address, args.config, args.overrides, wait=not args.no_wait)
        except ConfigError as exc:
            print(f"kaizen learn: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"kaizen learn: cannot submit to {args.address}: {type(exc).__name__}: {first}", file=sys.stderr)
            return 2
        print(f"\njob {job_id}: {status}")
        return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        record = main(cfg)
    except NotEnoughData as exc:
        print(f"kaizen learn: not enough data for a cycle: {exc}", file=sys.stderr)
        return 1
    except DatasetRejected as exc:
        print(f"kaizen learn: {exc}", file=sys.stderr)
        return 1
    except TrainingDidNotLearn as exc:
        print(f"kaizen learn: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as exc:
        print(f"kaizen learn: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    return 0


def request_cycle(url: str, reason: str, api_key: str | None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Ask the scheduler behind the Kaizen API at ``url`` for a cycle (``POST /v1/training/runs``);
    returns its answer: the training run as it is after the scheduler's check (``running`` when it
    started at once, else ``scheduled``).

    Raises:
        RuntimeError: the API is unreachable or refused (the message says why, in its words).
    """
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    target = f"{url.rstrip('/')}/v1/training/runs"
    try:
        response = httpx.post(
            target, json={"reason": reason, "actor": "kaizen learn --now"}, headers=headers, timeout=timeout_s
        )
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {target} ({type(exc).__name__}): is kaizen up running?") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, dict):
            detail = detail.get("reason") or detail
        raise RuntimeError(f"{target} answered {response.status_code}: {detail}")
    return response.json()


def _ask_scheduler(cfg: KaizenConfig, args: argparse.Namespace) -> int:
    url = args.url or cfg.api_url()
    try:
        answer = request_cycle(url, args.reason, args.api_key or os.environ.get("KAIZEN_API_KEY"))
    except RuntimeError as exc:
        print(f"kaizen learn --now: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    started = answer.get("status") == "running"
    print(
        f"requested a cycle: training run {answer.get('id')} is {answer.get('status')}"
        + ("" if started else " (it starts once no cycle runs and the resources are free)")
    )
    print("follow it with: kaizen training status")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.learn``: the jobs' shared command line (app/job_cli) with the cycle's flags;
    the exit status as :func:`run` gives it (the same codes as every job's)."""
    parser = job_parser("jobs.learn", __doc__, overrides_help=OVERRIDES_HELP)
    add_cycle_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
