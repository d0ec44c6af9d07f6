"""A cycle's command line, and its outcome read back from its exit status and output."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from app.scheduling.launcher import cycle_arguments, outcome_from_log, shell_command
from app.scheduling.state import TrainingRun


def _run(cutoff: datetime | None) -> TrainingRun:
    config = {"data_cutoff": cutoff.isoformat()} if cutoff else {}
    return TrainingRun("run-1", "running", datetime.now(UTC), None, config, {}, None)


def test_the_cycle_learns_what_came_before_its_cutoff() -> None:
    cutoff = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
    args = cycle_arguments("/data/checkpoints/cycles/run-1.yaml", _run(cutoff))
    assert args == [
        "--config",
        "/data/checkpoints/cycles/run-1.yaml",
        "--json",
        "learn.run_id=run-1",
        "dataset.until=2025-06-01T12:30:00+00:00",
    ]
    assert (
        shell_command("/venv/bin/python", ["--config", "/a b.yaml"])
        == "/venv/bin/python -m jobs.learn --config '/a b.yaml'"
    )
    # the override is what the dataset job reads: an aware time
    from app.config import job_options, load_config

    cfg = load_config(None, args[-2:])
    assert job_options(cfg, "dataset").until == cutoff and job_options(cfg, "learn").run_id == "run-1"


def test_outcome_from_the_record_or_the_last_words() -> None:
    record = {
        "cycle_id": "cycle-1",
        "stages": {"dataset": 2.5, "rehearsal": 1.0, "training (finetune)": 30.0, "candidate": 0.1},
        "adapter": {"adapter_id": "adp-9", "status": "candidate"},
    }
    log = (
        '[1/4] dataset\n      ds-1: 40 rows\n{\n  "not": "the record"\n}\ncycle done\n'
        + json.dumps(record, indent=2)
        + "\n"
    )
    ok = outcome_from_log(0, log)
    assert (ok.status, ok.adapter_id, ok.reason) == ("succeeded", "adp-9", "adapter adp-9 registered")
    assert ok.metrics["stages"]["training (finetune)"] == {"seconds": 30.0} and ok.metrics["record"] == record

    failed = outcome_from_log(
        1, "[1/4] dataset\nkaizen learn: not enough data for a cycle: 3 scored interactions\nTraceback...\n"
    )
    assert failed.status == "failed" and failed.adapter_id is None
    assert failed.reason == "exit status 1: kaizen learn: not enough data for a cycle: 3 scored interactions"
    assert outcome_from_log(137, "").reason == "exit status 137: no output"
    assert outcome_from_log(1, "x" * 2000).reason.endswith("...")
    assert outcome_from_log(0, "done\n").reason == "the cycle exited 0 without printing its record"
