"""Forgetting: both arms' accuracy on every earlier domain of the champion's lineage (the
validation splits of the datasets it and the adapters before it were trained on, and their
rehearsal sets; :func:`app.validation.inputs.earlier_sets`), judged as the candidate's own split is
(:class:`app.validation.performance.Judge`).

A domain's forgetting rate is ``max(0, (before - after) / before)``: the share of the baseline's
accuracy there (before) that the candidate (after) lost; 0 where the baseline had none to lose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.validation.inputs import EvalSet
from app.validation.measure import SetAnswers
from app.validation.performance import Judge, RowResult, accuracy

__all__ = ["DomainForgetting", "ForgettingEvidence", "evaluate_forgetting", "forgetting_rate"]


def forgetting_rate(before: float, after: float) -> float:
    """``max(0, (before - after) / before)``, 0 when ``before`` is 0."""
    if before <= 0:
        return 0.0
    return max(0.0, (before - after) / before)


@dataclass(frozen=True)
class DomainForgetting:
    """One earlier domain: the baseline's accuracy there (before) and the candidate's (after)."""

    name: str
    source: str
    rows: int
    before: float
    after: float

    @property
    def rate(self) -> float:
        return forgetting_rate(self.before, self.after)


@dataclass(frozen=True)
class ForgettingEvidence:
    domains: tuple[DomainForgetting, ...]
    notes: tuple[str, ...] = ()
    """Why the lineage has no more domains than these (no champion, a dataset without a
    validation split...)."""

    @property
    def max_rate(self) -> float:
        return max((d.rate for d in self.domains), default=0.0)


def evaluate_forgetting(
    judge: Judge, earlier: Sequence[tuple[EvalSet, SetAnswers]], notes: Sequence[str] = ()
) -> tuple[ForgettingEvidence, list[RowResult]]:
    """Each earlier domain's accuracies, and the rows they came from."""
    domains, rows = [], []
    for evaluated, answers in earlier:
        acc, results = accuracy(judge, evaluated, answers)
        domains.append(DomainForgetting(evaluated.name, evaluated.source, len(results), acc.baseline, acc.candidate))
        rows.extend(results)
    return ForgettingEvidence(tuple(domains), tuple(notes)), rows
