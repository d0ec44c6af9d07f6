"""One validation's measuring half, as it runs in its Ray task: answer every set with both arms
(:func:`app.validation.measure.measure`) and turn the answers into the evidence of each suite.

:class:`ValidationPlan` is everything the task needs, read and checked on the driver;
:func:`collect_evidence` is plain Python (the tests call it without Ray).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.validation.forgetting import evaluate_forgetting
from app.validation.inputs import EvalSet, Subjects
from app.validation.measure import Measurements, MeasureOptions, measure
from app.validation.performance import Judge, RowResult, evaluate_performance
from app.validation.quality import compare_quality
from app.validation.safety import evaluate_safety
from app.validation.verdict import Evidence

__all__ = ["Collected", "ValidationPlan", "collect_evidence"]


@dataclass(frozen=True)
class ValidationPlan:
    """What to measure: the two models, the sets (the own split first), how to generate."""

    subjects: Subjects
    sets: tuple[EvalSet, ...]
    options: MeasureOptions
    confidence: float
    notes: tuple[str, ...] = ()
    """What the search for earlier domains found missing (reported with the forgetting evidence)."""


@dataclass(frozen=True)
class Collected:
    """The evidence, the rows it was computed from, and what the run was measured on."""

    evidence: Evidence
    rows: tuple[RowResult, ...]
    measurements: Measurements


def collect_evidence(plan: ValidationPlan) -> Collected:
    """Measure both arms on every set of ``plan`` and evaluate each suite."""
    measured = measure(plan.subjects, plan.sets, plan.options)
    paired = list(zip(plan.sets, measured.answers, strict=True))
    judge = Judge()
    own, own_answers = next((s, a) for s, a in paired if s.role == "own")
    performance, own_rows = evaluate_performance(judge, own, own_answers, measured)
    forgetting, earlier_rows = evaluate_forgetting(
        judge, [(s, a) for s, a in paired if s.role == "earlier"], plan.notes
    )
    evidence = Evidence(
        performance=performance,
        quality=compare_quality(own, own_answers, plan.confidence),
        safety=evaluate_safety(plan.sets, measured.answers),
        forgetting=forgetting,
    )
    return Collected(evidence, tuple(own_rows + earlier_rows), measured)
