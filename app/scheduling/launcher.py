"""How the scheduler starts a learning cycle and learns how it ended: the :class:`CycleLauncher`
protocol (the scheduler actor's launcher submits ``python -m jobs.learn`` as a Ray job, or runs it as
a process; the tests pass a double), the command line of a cycle, and how its output is read back."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.scheduling.state import TrainingRun

__all__ = ["CycleLauncher", "CycleOutcome", "cycle_arguments", "outcome_from_log", "shell_command"]

_REASON_CHARS = 500


@dataclass(frozen=True)
class CycleOutcome:
    """How a cycle ended: ``succeeded`` or ``failed``, why in words, the adapter it registered and
    what it reported (``stages``: seconds per stage; ``record``: the cycle's own record)."""

    status: Literal["succeeded", "failed"]
    reason: str
    adapter_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class CycleLauncher(Protocol):
    """Starts the cycle of a claimed run and reports its end."""

    def launch(self, run: TrainingRun) -> Mapping[str, Any]:
        """Start ``python -m jobs.learn`` for the claimed ``run`` (its arguments:
        :func:`cycle_arguments`); return what identifies the cycle (kept on the run as
        ``config.launch``: a Ray job's id, or a process and its log). Raises when it cannot start
        (the run then fails with the message)."""
        ...

    def outcome(self, run: TrainingRun) -> CycleOutcome | None:
        """How ``run``'s cycle ended, from ``run.config['launch']``; None while it runs."""
        ...


def cycle_arguments(config_path: str, run: TrainingRun) -> list[str]:
    """The command-line arguments of ``python -m jobs.learn`` for ``run``: the config file, its data
    cut-off as the dataset's end (``dataset.until``: the cycle learns what came before it, and the
    next cycle's new data is what came after), the run's id (``learn.run_id``: the cycle keeps its
    stages in the run's row as it goes), and ``--json`` so that its record is read back."""
    args = ["--config", config_path, "--json", f"learn.run_id={run.id}"]
    if run.data_cutoff is not None:
        args.append(f"dataset.until={run.data_cutoff.isoformat()}")
    return args


def shell_command(python: str, arguments: Sequence[str]) -> str:
    """``python -m jobs.learn ARGS`` as one shell-quoted line (a Ray job's entrypoint)."""
    return " ".join(shlex.quote(a) for a in [python, "-m", "jobs.learn", *arguments])


def outcome_from_log(returncode: int, log: str) -> CycleOutcome:
    """A cycle's outcome from its exit status and its output (``--json``: the record is the last
    JSON object printed)."""
    record = _last_record(log)
    metrics: dict[str, Any] = {}
    adapter_id = None
    if record is not None:
        metrics["record"] = record
        metrics["stages"] = {name: {"seconds": s} for name, s in (record.get("stages") or {}).items()}
        adapter_id = (record.get("adapter") or {}).get("adapter_id")
    if returncode == 0:
        if adapter_id:
            return CycleOutcome("succeeded", f"adapter {adapter_id} registered", adapter_id, metrics)
        return CycleOutcome("succeeded", "the cycle exited 0 without printing its record", None, metrics)
    return CycleOutcome("failed", f"exit status {returncode}: {_last_words(log)}", adapter_id, metrics)


def _last_record(log: str) -> dict[str, Any] | None:
    """The last top-level JSON object in ``log`` that starts on a line of its own."""
    start = len(log)
    while True:
        start = log.rfind("{", 0, start)
        if start < 0:
            return None
        if start == 0 or log[start - 1] == "\n":
            try:
                value, _ = json.JSONDecoder().raw_decode(log, start)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict) and "cycle_id" in value:
                return value


def _last_words(log: str) -> str:
    """Why a cycle failed: its own ``kaizen learn: ...`` message when it printed one, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if not lines:
        return "no output"
    said = [line for line in lines if line.startswith("kaizen learn:")]
    text = said[-1] if said else lines[-1]
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
