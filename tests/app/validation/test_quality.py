"""The paired quality comparison: its interval, and the scorer on answers of different worth."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from app.validation.inputs import EvalSet, cases_from_table
from app.validation.measure import Answer, SetAnswers
from app.validation.quality import compare_quality, paired_interval


def test_the_interval_is_students_on_the_differences() -> None:
    differences = [0.1, 0.3, -0.05, 0.2, 0.15]
    low, high = paired_interval(differences, 0.9)
    expected = stats.t.interval(0.9, len(differences) - 1, loc=stats.tmean(differences), scale=stats.sem(differences))
    assert (low, high) == pytest.approx(expected)
    assert paired_interval([0.2, 0.2, 0.2], 0.95) == pytest.approx((0.2, 0.2))
    assert paired_interval([0.4], 0.95) is None


def test_better_answers_win() -> None:
    prompts = [
        "Write a Python function is_even(n) that returns True for even numbers. is_even(4) -> True",
        "Write a Python function square(x) returning x squared. square(3) -> 9",
        "Write a Python function first(items) that returns the first item of a list. first([7, 8]) -> 7",
    ]
    good = [
        "```python\ndef is_even(n):\n    return n % 2 == 0\n```",
        "```python\ndef square(x):\n    return x * x\n```",
        "```python\ndef first(items):\n    return items[0]\n```",
    ]
    rows = [
        {"messages": json.dumps([{"role": "user", "content": p}, {"role": "assistant", "content": g}])}
        for p, g in zip(prompts, good, strict=True)
    ]
    cases, _ = cases_from_table(rows, 10, prefix="q")
    evaluated = EvalSet("own", "own", "/own", tuple(cases))
    candidate = tuple(Answer(g, 50.0, 20, "stop") for g in good)
    baseline = (
        Answer("```python\ndef is_even(n):\n    return n % 2 == 1\n```", 50.0, 20, "stop"),  # fails its example
        Answer("", 50.0, 0, "stop"),  # empty: 0, whatever its speed
        candidate[2],  # the same answer: a tie
    )
    result = compare_quality(evaluated, SetAnswers("own", candidate, baseline), 0.95)
    assert result.pairs == 3 and (result.wins, result.ties, result.losses) == (2, 1, 0)
    assert result.win_rate == pytest.approx(2.5 / 3)
    assert result.mean.candidate > result.mean.baseline and result.mean_difference > 0
    low, high = result.interval
    assert low <= result.mean_difference <= high
    assert {"functional_correctness", "code_quality", "efficiency"} <= set(result.dimensions)
    assert result.dimensions["functional_correctness"].candidate > result.dimensions["functional_correctness"].baseline
