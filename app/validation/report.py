"""The validation report: published as a ``validation`` artifact under ``model.storage_root``
(``validations/val-…/``: ``report.json``, everything measured; ``report.md``, the page a person
reads; ``manifest.json``), and its summary recorded in the store with the verdict
(:meth:`app.deployment.state.DeploymentStore.record_validation`, audited), the candidate's registry
status following the verdict (production and staging: ``validated``; rejected: ``rejected``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.artifacts import MANIFEST_FILE, artifact_location, publish
from app.validation.inputs import EvalSet, Subjects
from app.validation.measure import SetAnswers
from app.validation.run import Collected
from app.validation.verdict import Criterion, Decision

if TYPE_CHECKING:
    from app.store.base import InteractionStore

__all__ = ["ACTOR", "ValidationReport", "publish_report", "record_outcome", "render_markdown"]

ACTOR = "jobs.validate"
"""Who records validations and moves the candidate's status, in the audit log."""
REPORT_JSON, REPORT_MD = "report.json", "report.md"
ANSWER_CHARS = 2000
"""Answers are kept in ``report.json`` up to this many characters each."""
MARKDOWN_ROWS = 20


@dataclass(frozen=True)
class ValidationReport:
    """One validation: what was compared, on what, what was measured, and the decision."""

    report_id: str
    created_at: datetime
    subjects: Subjects
    sets: tuple[EvalSet, ...]
    collected: Collected
    decision: Decision
    thresholds: Mapping[str, Any]
    """The ``validation`` config section the decision used."""
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The verdict, each criterion's result and the key numbers (what the store keeps)."""
        e = self.collected.evidence
        perf, quality = e.performance, e.quality
        return _clean(
            {
                "report_id": self.report_id,
                "verdict": self.decision.verdict,
                "reason": self.decision.reason,
                "candidate": self.subjects.candidate,
                "baseline": self.subjects.baseline_name,
                "criteria": {
                    c.name: {"passed": c.passed, "measured": c.measured, "threshold": c.threshold}
                    for c in self.decision.criteria
                },
                "accuracy": {"candidate": perf.accuracy.candidate, "baseline": perf.accuracy.baseline},
                "latency_p50_ms": {
                    "candidate": perf.latency_p50_ms.candidate,
                    "baseline": perf.latency_p50_ms.baseline,
                },
                "peak_memory_bytes": {
                    "candidate": perf.memory_peak_bytes.candidate,
                    "baseline": perf.memory_peak_bytes.baseline,
                },
                "quality": {
                    "mean_difference": quality.mean_difference,
                    "interval": list(quality.interval) if quality.interval else None,
                    "win_rate": quality.win_rate,
                },
                "forgetting_max_rate": e.forgetting.max_rate,
                "device": perf.device,
            }
        )

    def to_json(self) -> dict[str, Any]:
        """Everything, for ``report.json``."""
        e = self.collected.evidence
        perf = e.performance
        rows = [
            {
                **dataclasses.asdict(r),
                "candidate_answer": r.candidate_answer[:ANSWER_CHARS],
                "baseline_answer": r.baseline_answer[:ANSWER_CHARS],
            }
            for r in self.collected.rows
        ]
        return _clean(
            {
                "report_id": self.report_id,
                "created_at": self.created_at.isoformat(),
                "seconds": self.seconds,
                "candidate": self.subjects.candidate,
                "baseline": self.subjects.baseline_name,
                "base_model": self.subjects.base_model,
                "verdict": self.decision.verdict,
                "reason": self.decision.reason,
                "criteria": [dataclasses.asdict(c) for c in self.decision.criteria],
                "thresholds": dict(self.thresholds),
                "performance": {
                    **dataclasses.asdict(perf),
                    "accuracy_change": perf.accuracy.change,
                    "latency_p50_change": perf.latency_p50_ms.relative_change,
                    "memory_peak_bytes": dataclasses.asdict(perf.memory_peak_bytes),
                    "memory_change": perf.memory_peak_bytes.relative_change,
                },
                "quality": {**dataclasses.asdict(e.quality), "win_rate": e.quality.win_rate},
                "safety": dataclasses.asdict(e.safety),
                "forgetting": {
                    "domains": [{**dataclasses.asdict(d), "rate": d.rate} for d in e.forgetting.domains],
                    "max_rate": e.forgetting.max_rate,
                    "notes": list(e.forgetting.notes),
                },
                "measured_on": {
                    "device": self.collected.measurements.device,
                    "torch_threads": self.collected.measurements.torch_threads,
                    "seconds": self.collected.measurements.seconds,
                },
                "sets": [_set_summary(s, a) for s, a in zip(self.sets, self.collected.measurements.answers)],
                "rows": rows,
            }
        )


def publish_report(storage_root: str, report: ValidationReport) -> str:
    """Write ``report.json``, ``report.md`` and the manifest as the ``validation`` artifact
    ``report.report_id``; returns its URI.

    Raises:
        FileExistsError: an artifact with this id is already stored.
    """
    target = artifact_location(storage_root, "validation", report.report_id)

    def write(staging: Path) -> None:
        (staging / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        (staging / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
        manifest = {
            "validation_report_id": report.report_id,
            "kind": "validation",
            "adapter_id": report.subjects.candidate,
            "baseline": report.subjects.baseline_name,
            "verdict": report.decision.verdict,
            "created_at": report.created_at.isoformat(),
            "files": [REPORT_JSON, REPORT_MD],
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    publish(target, write)
    return target.uri


def record_outcome(
    store: InteractionStore, report: ValidationReport, report_uri: str | None, *, actor: str = ACTOR
) -> dict[str, Any]:
    """Record the verdict with its summary (audited as ``validation.verdict``) and move the
    candidate's registry status: ``validated`` for production and staging, ``rejected`` otherwise.

    Returns:
        The ``validations`` row.
    """
    from app.deployment.state import DeploymentStore
    from app.registry import AdapterRegistry

    decision = report.decision
    row = DeploymentStore(store).record_validation(
        report.subjects.candidate,
        report.subjects.baseline_name,
        decision.verdict,
        report.summary(),
        report_uri,
        actor=actor,
        validation_id=report.report_id,
    )
    status = "rejected" if decision.verdict == "rejected" else "validated"
    AdapterRegistry(store).set_status(
        report.subjects.candidate,
        status,
        actor,
        f"validation {row['id']} against {report.subjects.baseline_name}: {decision.verdict} ({decision.reason})",
    )
    return row


# --- the page ----------------------------------------------------------------------------------------


def render_markdown(report: ValidationReport) -> str:
    """The report as a page a person reads: the verdict and why, then each suite."""
    e = report.collected.evidence
    perf, quality, safety, forgetting = e.performance, e.quality, e.safety, e.forgetting
    m = report.collected.measurements
    baseline = (
        f"the champion `{report.subjects.baseline}`"
        if report.subjects.baseline
        else f"the base model `{report.subjects.base_model}` (no champion yet)"
    )
    out = [
        f"# Validation {report.report_id}: {report.decision.verdict}",
        "",
        f"Candidate `{report.subjects.candidate}` against {baseline}, measured together on {m.device} "
        f"(torch threads: {m.torch_threads}), {report.created_at:%Y-%m-%d %H:%M} UTC, in {report.seconds:.0f} s.",
        "",
        f"**Verdict: {report.decision.verdict}**: {report.decision.reason}. "
        + {
            "production": "The deployer may put it in front of users (model.deployment_strategy).",
            "staging": "Kept as validated; an operator decides whether to deploy it.",
            "rejected": "Not deployed.",
        }[report.decision.verdict],
        "",
        "## Decision matrix",
        "",
        "| criterion | measured | rule | result | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in report.decision.criteria:
        out.append(
            f"| {c.name} | {_value(c)} | {c.comparison} {_threshold(c)} | {'pass' if c.passed else '**FAIL**'} "
            f"| {c.detail} |"
        )
    if not forgetting.domains:
        out.append("| forgetting | (no earlier domain) | | pass | " + ("; ".join(forgetting.notes) or "-") + " |")
    out += [
        "",
        "## Performance",
        "",
        "| | candidate | baseline | change |",
        "| --- | --- | --- | --- |",
        f"| accuracy ({perf.rows} rows) | {perf.accuracy.candidate:.3f} | {perf.accuracy.baseline:.3f} "
        f"| {perf.accuracy.change:+.3f} |",
        _pair_row("latency p50 (ms)", perf.latency_p50_ms),
        _pair_row("latency p99 (ms)", perf.latency_p99_ms),
        _pair_row("tokens/s (one request at a time)", perf.tokens_per_s),
    ]
    for t in perf.throughput:
        out.append(
            f"| throughput at concurrency {t.concurrency} (requests/s; tokens/s) | {t.candidate_requests_per_s:.2f}; "
            f"{t.candidate_tokens_per_s:.1f} | {t.baseline_requests_per_s:.2f}; {t.baseline_tokens_per_s:.1f} "
            f"| {_percent(t.candidate_requests_per_s / t.baseline_requests_per_s - 1)} |"
        )
    mem_c, mem_b = perf.candidate_memory, perf.baseline_memory
    out += [
        f"| peak memory (MiB) | {_mib(mem_c.peak_bytes)} | {_mib(mem_b.peak_bytes)} "
        f"| {_percent(perf.memory_peak_bytes.relative_change)} |",
        f"| of which adapter (MiB) | {_mib(mem_c.adapter_bytes)} | {_mib(mem_b.adapter_bytes)} | |",
        f"| of which working memory (MiB) | {_mib(mem_c.working_bytes)} | {_mib(mem_b.working_bytes)} | |",
        "",
        f"Latency over {perf.requests} requests per model, one at a time, the two models alternating. "
        f"Peak memory: the base model's parameters ({_mib(mem_c.weights_bytes)} MiB), the model's own adapter, "
        f"and the working memory of its largest batch ({m.memory_method}).",
        "",
        "Accuracy judged by: "
        + ", ".join(f"{n} {k}" for k, n in sorted(perf.methods.items()))
        + " (exact: the reference itself; executed: the prompt's own tests pass in the sandbox; similarity: "
        "the quality scorer's relevance of the answer to the reference).",
        "",
        "## Quality",
        "",
        f"The five-dimension scorer on both models' answers to the {quality.pairs} validation prompts: "
        f"candidate {quality.mean.candidate:.3f}, baseline {quality.mean.baseline:.3f}, difference "
        f"{quality.mean_difference:+.3f}"
        + (
            f" ({quality.confidence:.0%} interval {quality.interval[0]:+.3f} to {quality.interval[1]:+.3f})"
            if quality.interval
            else ""
        )
        + f"; the candidate is better on {quality.wins}, equal on {quality.ties}, worse on {quality.losses} "
        f"(win rate {quality.win_rate:.2f}). Reported, not part of the verdict.",
        "",
    ]
    if quality.dimensions:
        out += ["| dimension | candidate | baseline |", "| --- | --- | --- |"]
        out += [f"| {name} | {_num(p.candidate)} | {_num(p.baseline)} |" for name, p in quality.dimensions.items()]
        out.append("")
    leak, insecure, harmful = safety.leakage, safety.insecure_code, safety.harmful
    out += [
        "## Safety",
        "",
        "| check | candidate | baseline | out of |",
        "| --- | --- | --- | --- |",
        f"| planted secrets reproduced | {leak.planted.candidate:g} | {leak.planted.baseline:g} "
        f"| {leak.planted_cases} prompts |",
        f"| answers with what the privacy filter redacts | {leak.sensitive.candidate:g} "
        f"| {leak.sensitive.baseline:g} | {leak.answers} answers |",
        f"| insecure-code findings | {insecure.findings.candidate:g} | {insecure.findings.baseline:g} "
        f"| {insecure.cases} risky requests |",
        f"| harmful requests answered | {harmful.answered.candidate:g} | {harmful.answered.baseline:g} "
        f"| {harmful.cases} requests |",
        "",
    ]
    if leak.candidate_leaks:
        out += [f"Planted secrets the candidate reproduced: {', '.join(leak.candidate_leaks)}.", ""]
    if leak.candidate_kinds or leak.baseline_kinds:
        out += [f"Privacy-filter kinds: candidate {leak.candidate_kinds}, baseline {leak.baseline_kinds}.", ""]
    if insecure.candidate_kinds or insecure.baseline_kinds:
        out += [
            f"Insecure-code findings: candidate {insecure.candidate_kinds}, baseline {insecure.baseline_kinds}.",
            "",
        ]
    if harmful.candidate_answered:
        out += [f"Harmful requests the candidate answered: {', '.join(harmful.candidate_answered)}.", ""]
    if harmful.lost_refusals:
        out += [f"Refused by the baseline, answered by the candidate: {', '.join(harmful.lost_refusals)}.", ""]
    out += ["## Forgetting", ""]
    if forgetting.domains:
        out += [
            "| earlier domain | rows | before (baseline) | after (candidate) | rate |",
            "| --- | --- | --- | --- | --- |",
        ]
        out += [f"| {d.name} | {d.rows} | {d.before:.3f} | {d.after:.3f} | {d.rate:.3f} |" for d in forgetting.domains]
    else:
        out.append("No earlier domain to measure.")
    out += [f"- {note}" for note in forgetting.notes]
    out += [
        "",
        "## Sets",
        "",
        "| set | role | rows used | rows left out | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s, answers in zip(report.sets, m.answers):
        info = _set_summary(s, answers)
        out.append(f"| {s.name} | {s.role} | {info['answered']} | {info['left_out']} | {s.source} |")
    rows = [r for r in report.collected.rows if r.set_name == report.sets[0].name][:MARKDOWN_ROWS]
    out += [
        "",
        f"## The first {len(rows)} validation rows",
        "",
        "| row | candidate | baseline | candidate's answer |",
        "| --- | --- | --- | --- |",
    ]
    out += [
        f"| {r.case_id} | {r.candidate:.2f} ({r.candidate_method}) | {r.baseline:.2f} ({r.baseline_method}) "
        f"| {_cell(r.candidate_answer)} |"
        for r in rows
    ]
    out += ["", f"Thresholds: {json.dumps(_clean(dict(report.thresholds)))}", ""]
    return "\n".join(out)


def _set_summary(s: EvalSet, answers: SetAnswers) -> dict[str, Any]:
    unanswered = answers.unanswered
    return {
        "name": s.name,
        "role": s.role,
        "source": s.source,
        "rows_read": s.rows_read,
        "answered": len(s.cases) - unanswered,
        "left_out": s.rows_skipped + unanswered,
    }


def _pair_row(label: str, pair: Any) -> str:
    return f"| {label} | {pair.candidate:.1f} | {pair.baseline:.1f} | {_percent(pair.relative_change)} |"


def _value(c: Criterion) -> str:
    if c.name in ("latency", "memory"):
        return _percent(c.measured)
    if c.group == "safety":
        return f"{c.measured:g}"
    return f"{c.measured:+.3f}" if c.name == "accuracy" else f"{c.measured:.3f}"


def _threshold(c: Criterion) -> str:
    if c.name in ("latency", "memory"):
        return _percent(c.threshold)
    if c.group == "safety":
        return f"{c.threshold:g}" + ("" if c.name in ("planted_secrets", "harmful_requests") else " (baseline)")
    return f"{c.threshold:+.3f}" if c.name == "accuracy" else f"{c.threshold:.3f}"


def _percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.1%}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _num(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _cell(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("|", "\\|") or "(empty)"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
