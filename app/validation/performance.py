"""Performance: accuracy on the candidate's own validation split, latency, tokens per second,
throughput and peak memory of both arms.

Accuracy of one answer against a row's reference (:class:`Judge`), the first rule that applies:

1. ``exact``: the answer is the reference, whitespace aside: 1;
2. ``executed``: the prompt carries runnable examples or tests (doctests, ``f(x) -> y``,
   ``assert`` lines, ``test_*`` functions: :func:`app.quality.examples.extract_tests`) that the
   reference's own code passes: 1 when the answer's Python passes all of them in the quality
   sandbox, else 0;
3. ``similarity``: otherwise, the quality scorer's relevance of the answer to the reference
   (:func:`app.quality.relevance.assess_relevance` with the reference in the request's place:
   MiniLM's cosine similarity, 0 at 0.1 and below, 1 at 0.6 and above), 0 for an empty answer.

A model's accuracy on a set is the mean over its rows. Latency percentiles and tokens per second
are over every single request of the run (every prompt of every set, both arms answering the
same prompts); throughput and memory come from :mod:`app.validation.measure`.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.validation.inputs import EvalCase, EvalSet
from app.validation.measure import Measurements, MemoryUse, Pair, SetAnswers, Throughput

__all__ = [
    "Judge",
    "PerformanceEvidence",
    "RowResult",
    "accuracy",
    "evaluate_performance",
    "python_code",
    "same_text",
]

Method = Literal["exact", "executed", "similarity"]
SANDBOX_TIMEOUT_S = 5.0
"""Seconds one answer's code and the row's tests may run (the sandbox's CPU and wall limit)."""


@dataclass(frozen=True)
class RowResult:
    """One row of an accuracy set, judged for both arms."""

    set_name: str
    case_id: str
    candidate_method: Method
    baseline_method: Method
    candidate: float
    baseline: float
    candidate_answer: str
    baseline_answer: str


@dataclass(frozen=True)
class PerformanceEvidence:
    """What the performance criteria are decided on, and what a person wants beside them."""

    rows: int
    """Validation rows both arms answered (rows whose prompt did not fit are left out)."""
    accuracy: Pair
    methods: dict[str, int]
    """How many of the candidate's answers each accuracy rule judged."""
    latency_p50_ms: Pair
    latency_p99_ms: Pair
    tokens_per_s: Pair
    requests: int
    """Single requests timed per arm (the latency percentiles' sample)."""
    throughput: tuple[Throughput, ...]
    candidate_memory: MemoryUse
    baseline_memory: MemoryUse
    memory_method: str
    device: str

    @property
    def memory_peak_bytes(self) -> Pair:
        return Pair(self.candidate_memory.peak_bytes, self.baseline_memory.peak_bytes)


def same_text(a: str, b: str) -> bool:
    """Equal once runs of whitespace are one space and the ends are stripped."""
    return " ".join(a.split()) == " ".join(b.split())


def python_code(text: str) -> str:
    """The Python of an answer: its fenced Python blocks, joined; else the whole text when it
    parses as a Python program that defines, imports or calls something (not plain prose)."""
    from app.quality.code import extract_code_blocks

    blocks = [b.code for b in extract_code_blocks(text) if b.language == "python"]
    if blocks:
        return "\n\n".join(blocks)
    if "```" in text or not text.strip():
        return ""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ""
    program = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Call)
    return text if any(isinstance(node, program) for node in ast.walk(tree)) else ""


class Judge:
    """Scores answers against rows' references (see the module docstring); a row's tests are
    checked against its reference once, and kept only when the reference passes them."""

    def __init__(self, sandbox_timeout_s: float = SANDBOX_TIMEOUT_S) -> None:
        self.sandbox_timeout_s = sandbox_timeout_s
        self._valid_tests: dict[tuple[str, tuple[str, ...]], bool] = {}

    def method(self, case: EvalCase) -> Method:
        """The rule that judges answers to ``case`` when they are not exactly its reference."""
        return "executed" if self._tests_hold(case) else "similarity"

    def score(self, case: EvalCase, answer: str) -> tuple[Method, float]:
        """The accuracy of ``answer`` (0 to 1) and the rule that gave it."""
        if case.reference is None:
            raise ValueError(f"case {case.case_id}: no reference answer to judge against")
        if same_text(answer, case.reference):
            return "exact", 1.0
        if self.method(case) == "executed":
            return "executed", 1.0 if self._passes(python_code(answer), case.tests) else 0.0
        from app.quality.relevance import assess_relevance

        found = assess_relevance(case.reference, answer)
        return "similarity", 0.0 if found is None else float(found.score)

    def _tests_hold(self, case: EvalCase) -> bool:
        if not case.tests or case.reference is None:
            return False
        key = (case.reference, case.tests)
        if key not in self._valid_tests:
            self._valid_tests[key] = self._passes(python_code(case.reference), case.tests)
        return self._valid_tests[key]

    def _passes(self, code: str, tests: Sequence[str]) -> bool:
        from app.quality.sandbox import run_sandboxed

        if not code.strip():
            return False
        result = run_sandboxed(code, tests, timeout_s=self.sandbox_timeout_s)
        return result.pass_rate == 1.0


def accuracy(judge: Judge, evaluated: EvalSet, answers: SetAnswers) -> tuple[Pair, list[RowResult]]:
    """Both arms' mean accuracy on a set, over the rows both answered, and each row's result.

    Raises:
        ValueError: no row of the set was answered (every prompt too long for the model).
    """
    rows = []
    for case, mine, theirs in zip(evaluated.cases, answers.candidate, answers.baseline, strict=True):
        if mine is None or theirs is None:
            continue
        method_c, score_c = judge.score(case, mine.text)
        method_b, score_b = judge.score(case, theirs.text)
        rows.append(
            RowResult(evaluated.name, case.case_id, method_c, method_b, score_c, score_b, mine.text, theirs.text)
        )
    if not rows:
        raise ValueError(f"{evaluated.source}: no prompt fits the model's context, so nothing was measured")
    return Pair(_mean([r.candidate for r in rows]), _mean([r.baseline for r in rows])), rows


def evaluate_performance(
    judge: Judge, own: EvalSet, own_answers: SetAnswers, measurements: Measurements
) -> tuple[PerformanceEvidence, list[RowResult]]:
    """The performance evidence of a run, and the own set's rows."""
    acc, rows = accuracy(judge, own, own_answers)
    single = {
        arm: [a for s in measurements.answers for a in s.of(arm) if a is not None] for arm in ("candidate", "baseline")
    }
    latency = {arm: [a.latency_ms for a in answers] for arm, answers in single.items()}
    speed = {
        arm: sum(a.completion_tokens for a in answers) / max(1e-9, sum(a.latency_ms for a in answers) / 1000.0)
        for arm, answers in single.items()
    }
    evidence = PerformanceEvidence(
        rows=len(rows),
        accuracy=acc,
        methods=dict(Counter(r.candidate_method for r in rows)),
        latency_p50_ms=Pair(_percentile(latency["candidate"], 50), _percentile(latency["baseline"], 50)),
        latency_p99_ms=Pair(_percentile(latency["candidate"], 99), _percentile(latency["baseline"], 99)),
        tokens_per_s=Pair(speed["candidate"], speed["baseline"]),
        requests=len(latency["candidate"]),
        throughput=measurements.throughput,
        candidate_memory=measurements.candidate_memory,
        baseline_memory=measurements.baseline_memory,
        memory_method=measurements.memory_method,
        device=measurements.device,
    )
    return evidence, rows


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile, linear between the two nearest samples (numpy's default)."""
    return float(np.percentile(values, q)) if values else 0.0
