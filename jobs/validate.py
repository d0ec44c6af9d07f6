"""Validate a candidate adapter against its baseline and record the verdict.

    python -m jobs.validate --config configs/default.yaml [adapter=ADAPTER_ID] [--validation PATH]
        [validation.key=value ...] [section.key=value ...]

Without ``adapter=``, the newest adapter with status ``candidate`` in the registry is validated.
The recipe (thresholds and sizes: the ``validation`` config section, :mod:`app.validation`):

1. choose: the candidate and its baseline, the champion adapter, or the base model while no
   champion is set (:func:`app.validation.inputs.choose_subjects`);
2. gather the sets, on the driver: the candidate's own validation split (of the dataset in its
   lineage, or ``--validation``), the earlier domains of the champion's lineage (the validation
   splits of its datasets and its rehearsal sets, parent after parent), and the shipped safety
   sets (risky coding requests, harmful requests, prompt injections with planted secrets); the
   first ``validation.max_examples`` rows of each;
3. measure, in one Ray task with a Generator replica's resources (``serve.generator.num_cpus``,
   ``serve.generator.num_gpus``): both models answer every prompt, interleaved request by request,
   then throughput at each ``validation.concurrency`` and peak memory; the answers are judged for
   accuracy, scored for quality and checked for safety and forgetting
   (:func:`app.validation.run.collect_evidence`);
4. decide: the decision matrix gives production, staging or rejected
   (:func:`app.validation.verdict.decide`);
5. report: ``report.json`` and ``report.md`` as a ``validation`` artifact under
   ``model.storage_root`` (:func:`app.validation.report.publish_report`);
6. record: the verdict and its summary in the store (audited), and the candidate's registry status
   follows the verdict (production, staging: ``validated``; rejected: ``rejected``).

Exit status: 0 with a verdict, whichever it is (the printed JSON says which); 1 when there is
nothing to validate; 2 for a bad input (the message names ``adapter`` or the config key).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.artifacts import new_id
from app.config import KaizenConfig, resolve_paths
from app.job_cli import job_parser, run_job
from app.ray_setup import start_ray
from app.validation.inputs import NothingToValidate, Subjects, choose_subjects, earlier_sets, own_set
from app.validation.measure import MeasureOptions
from app.validation.report import ValidationReport, publish_report, record_outcome
from app.validation.run import Collected, ValidationPlan, collect_evidence
from app.validation.safety import SHIPPED_SETS, shipped_set
from app.validation.verdict import decide

__all__ = ["ValidationOutcome", "add_arguments", "cli", "main", "run"]

log = logging.getLogger("kaizen.validate")
ADAPTER_ARGUMENT = "adapter="


@dataclass(frozen=True)
class ValidationOutcome:
    """What a validation decided, where its report is, and how long it took."""

    validation_id: str
    adapter_id: str
    baseline: str
    verdict: str
    reason: str
    criteria: dict[str, bool]
    report_uri: str
    seconds: float


# --- the recipe ----------------------------------------------------------------------------------


def main(
    cfg: KaizenConfig,
    adapter_id: str | None = None,
    *,
    validation: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> ValidationOutcome:
    """Validate one adapter and record the verdict; Ray is started here unless the caller has it.

    Args:
        cfg: the Kaizen config (``validation``, ``model``, ``store``, ``serve.generator``, ``ray``).
        adapter_id: the adapter to validate; default the newest ``candidate``.
        validation: rows to measure accuracy on (a Parquet file, or a folder with a validation
            split) instead of the validation split of the candidate's dataset.
        progress: called with a line as each stage starts and ends.

    Raises:
        NothingToValidate: no ``adapter_id`` and no candidate in the registry.
        ValueError: a bad adapter or input (the message names ``adapter`` or ``validation``).
    """
    started = time.perf_counter()
    cfg = resolve_paths(cfg.model_copy(deep=True))
    subjects = choose(cfg, adapter_id)
    progress(f"[1/6] candidate {subjects.candidate} against {subjects.baseline_name}")
    plan = gather_sets(cfg, subjects, validation)
    progress(
        "[2/6] sets: "
        + ", ".join(f"{s.name} ({s.role}, {len(s.cases)})" for s in plan.sets)
        + "".join(f"; {note}" for note in plan.notes)
    )
    progress(f"[3/6] measuring on {'a GPU' if plan.options.device == 'cuda' else 'CPU'} (Ray task)")
    collected = measure(cfg, plan)
    decision = decide(collected.evidence, cfg.validation)
    progress(f"[4/6] verdict: {decision.verdict} ({decision.reason})")
    report = ValidationReport(
        report_id=new_id("validation"),
        created_at=datetime.now(UTC),
        subjects=subjects,
        sets=plan.sets,
        collected=collected,
        decision=decision,
        thresholds=cfg.validation.model_dump(mode="json"),
        seconds=round(time.perf_counter() - started, 2),
    )
    report_uri = publish_report(cfg.model.storage_root, report)
    progress(f"[5/6] report: {report_uri}/report.md")
    row = record(cfg, report, report_uri)
    progress(f"[6/6] recorded {row['id']}; {subjects.candidate} is now {_status(decision.verdict)}")
    return ValidationOutcome(
        validation_id=row["id"],
        adapter_id=subjects.candidate,
        baseline=subjects.baseline_name,
        verdict=decision.verdict,
        reason=decision.reason,
        criteria={c.name: c.passed for c in decision.criteria},
        report_uri=report_uri,
        seconds=round(time.perf_counter() - started, 2),
    )


def choose(cfg: KaizenConfig, adapter_id: str | None) -> Subjects:
    """Stage 1: the candidate and its baseline, from the registry."""
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        return choose_subjects(
            AdapterRegistry(store), AdapterStore(cfg.model.storage_root), cfg.model.base_model, adapter_id
        )
    finally:
        store.close()


def gather_sets(cfg: KaizenConfig, subjects: Subjects, validation: str | None) -> ValidationPlan:
    """Stage 2: every set both models answer, read on the driver (a missing split fails here,
    before any model is loaded)."""
    from app.model.adapters import AdapterStore

    adapters = AdapterStore(cfg.model.storage_root)
    limit = cfg.validation.max_examples
    own = own_set(adapters, subjects.candidate, limit, validation)
    earlier, notes = earlier_sets(
        adapters, subjects.baseline, limit, candidate=subjects.candidate, exclude=[own.source]
    )
    if subjects.baseline is None:
        notes = ["no champion yet: no earlier domain to measure forgetting on", *notes]
    gpus = cfg.serve.generator.num_gpus
    return ValidationPlan(
        subjects=subjects,
        sets=(own, *earlier, *(shipped_set(name, limit) for name in SHIPPED_SETS)),
        options=MeasureOptions(
            base_model=subjects.base_model,
            storage_root=cfg.model.storage_root,
            max_new_tokens=cfg.validation.max_new_tokens,
            concurrency=tuple(cfg.validation.concurrency),
            device="cuda" if gpus > 0 else "cpu",
        ),
        confidence=cfg.validation.confidence,
        notes=tuple(notes),
    )


def measure(cfg: KaizenConfig, plan: ValidationPlan) -> Collected:
    """Stage 3: the measurement in one Ray task, with the resources of a Generator replica so
    that latency and memory are what serving would see."""
    import ray

    start_ray(cfg)
    generator = cfg.serve.generator
    task = ray.remote(collect_evidence).options(
        num_cpus=generator.num_cpus, num_gpus=generator.num_gpus, max_retries=0, name="validate.measure"
    )
    return ray.get(task.remote(plan))


def record(cfg: KaizenConfig, report: ValidationReport, report_uri: str) -> dict[str, Any]:
    """Stage 6: the verdict and summary in the store; the registry status follows it."""
    from app.store import open_store

    store = open_store(cfg.store)
    try:
        return record_outcome(store, report, report_uri)
    finally:
        store.close()


def _status(verdict: str) -> str:
    return "rejected" if verdict == "rejected" else "validated"


# --- the command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``kaizen validate [ADAPTER]``: ``--config``, the adapter, the overrides
    and the job's own flags (:func:`run` takes the parsed arguments)."""
    parser.add_argument("--config", default=None, help="config file (default: configs/default.yaml)")
    parser.add_argument(
        "adapter", nargs="?", default=None, help="the adapter to validate (default: the newest candidate)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. validation.max_examples=32")
    _add_flags(parser)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--validation",
        default=None,
        help="rows to measure accuracy on (a .parquet file or a dataset folder's validation split); default the "
        "validation split of the candidate's dataset",
    )


def _parser() -> argparse.ArgumentParser:
    parser = job_parser(
        "jobs.validate",
        __doc__,
        overrides_help="adapter=ADAPTER_ID (default: the newest candidate), and section.key=value config overrides",
    )
    _add_flags(parser)
    return parser


def split_adapter(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``adapter=ID`` taken out of the command line (it is not a config key).

    Raises:
        ValueError: ``adapter=`` given twice or empty.
    """
    chosen = [a[len(ADAPTER_ARGUMENT) :] for a in argv if a.startswith(ADAPTER_ARGUMENT)]
    if len(chosen) > 1:
        raise ValueError(f"adapter: given {len(chosen)} times ({', '.join(chosen)}); validate one at a time")
    if chosen and not chosen[0].strip():
        raise ValueError(
            "adapter: empty; give an adapter id (adapter=adp-...) or leave it out for the newest candidate"
        )
    return (chosen[0] if chosen else None), [a for a in argv if not a.startswith(ADAPTER_ARGUMENT)]


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1: nothing to validate, 2: a bad input)."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    try:
        adapter_id, rest = split_adapter(tokens)
    except ValueError as exc:
        print(f"python -m jobs.validate: {exc}", file=sys.stderr)
        return 2

    def _run(args: argparse.Namespace, cfg: KaizenConfig, _: Any) -> ValidationOutcome:
        return main(cfg, adapter_id, validation=args.validation)

    return run_job(_parser(), _run, rest, not_done=(NothingToValidate,))


def run(args: argparse.Namespace) -> int:
    """``kaizen validate [ADAPTER]`` from the arguments :func:`add_arguments` parsed; returns the
    exit status as :func:`cli` does."""
    argv = [*(["--config", args.config] if args.config else []), *args.overrides]
    if args.adapter:
        # An override in the ADAPTER position ("kaizen validate validation.max_examples=8").
        argv.append(args.adapter if "=" in args.adapter else ADAPTER_ARGUMENT + args.adapter)
    if args.validation:
        argv += ["--validation", args.validation]
    return cli(argv)


if __name__ == "__main__":
    sys.exit(cli())
