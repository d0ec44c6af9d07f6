"""Quality: the five-dimension scorer (:func:`app.quality.assess_text`) on both arms' answers to
the candidate's own validation prompts, compared pair by pair.

Each answer is scored as a live interaction would be: the request, the answer and its generation
time (the efficiency dimension reads it); the examples and tests the request carries run in the
sandbox. An empty answer, or one with nothing to assess, scores 0. Since both arms answer the same prompts, the
comparison is paired: the mean of the per-prompt differences, with a Student t confidence
interval at ``validation.confidence`` (the differences' own spread, n - 1 degrees of freedom), and
the win rate: the share of prompts where the candidate scores higher, ties counting half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from app.validation.inputs import EvalSet
from app.validation.measure import Answer, Pair, SetAnswers

__all__ = ["QualityEvidence", "compare_quality", "paired_interval", "score_answer"]

TIE = 1e-9
"""Differences smaller than this are ties."""


@dataclass(frozen=True)
class QualityEvidence:
    """The paired comparison of the two arms' quality scores (0-1, the scorer's overall)."""

    pairs: int
    mean: Pair
    mean_difference: float
    """Candidate less baseline, averaged over the prompts."""
    interval: tuple[float, float] | None
    """The mean difference's confidence interval; None with fewer than two pairs."""
    confidence: float
    wins: int
    ties: int
    losses: int
    dimensions: dict[str, Pair]
    """Each dimension's mean over the answers it could assess, for each arm (NaN where none)."""

    @property
    def win_rate(self) -> float:
        """Wins plus half the ties, over the pairs."""
        return (self.wins + 0.5 * self.ties) / self.pairs if self.pairs else 0.0


def score_answer(prompt: str, answer: Answer) -> tuple[float, dict[str, float]]:
    """The overall quality score of one answer and its dimensions' scores: 0 and none for an
    empty answer (the scorer would rate its generation time alone) or one with nothing to assess."""
    from app.quality import assess_text

    if not answer.text.strip():
        return 0.0, {}
    try:
        score = assess_text(prompt, answer.text, generation_time_ms=answer.latency_ms)
    except ValueError:
        return 0.0, {}
    return float(score.overall), dict(score.components)


def paired_interval(differences: Sequence[float], confidence: float) -> tuple[float, float] | None:
    """The Student t interval of the mean of paired differences; None for fewer than two."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return None
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def compare_quality(evaluated: EvalSet, answers: SetAnswers, confidence: float) -> QualityEvidence:
    """Score both arms' answers to ``evaluated`` and compare them pair by pair (prompts that did
    not fit the model are left out)."""
    scores: dict[str, list[float]] = {"candidate": [], "baseline": []}
    dims: dict[str, dict[str, list[float]]] = {"candidate": {}, "baseline": {}}
    for case, mine, theirs in zip(evaluated.cases, answers.candidate, answers.baseline, strict=True):
        if mine is None or theirs is None:
            continue
        for arm, answer in (("candidate", mine), ("baseline", theirs)):
            overall, components = score_answer(case.request_text, answer)
            scores[arm].append(overall)
            for name, value in components.items():
                dims[arm].setdefault(name, []).append(float(value))
    differences = [c - b for c, b in zip(scores["candidate"], scores["baseline"])]
    n = len(differences)
    names = sorted(set(dims["candidate"]) | set(dims["baseline"]))
    return QualityEvidence(
        pairs=n,
        mean=Pair(_mean(scores["candidate"]), _mean(scores["baseline"])),
        mean_difference=_mean(differences),
        interval=paired_interval(differences, confidence),
        confidence=confidence,
        wins=sum(d > TIE for d in differences),
        ties=sum(abs(d) <= TIE for d in differences),
        losses=sum(d < -TIE for d in differences),
        dimensions={
            name: Pair(
                _mean(dims["candidate"].get(name, []), math.nan), _mean(dims["baseline"].get(name, []), math.nan)
            )
            for name in names
        },
    )


def _mean(values: Sequence[float], empty: float = 0.0) -> float:
    return sum(values) / len(values) if values else empty
