"""Functional correctness: the seed's weighted formula over outcome metrics when the agent
reported them; otherwise what static checks of the response's code can tell.

Evidence from the response: Python blocks parsed and compiled and their imports resolved;
TypeScript and JavaScript blocks parsed with tree-sitter; truncated blocks; and the examples and
tests the prompt or the response carries, run against the Python in the sandbox.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from typing import Any

from app.quality.base import DimensionScore, weighted
from app.quality.code import check_python, check_syntax, extract_code_blocks
from app.quality.examples import extract_tests
from app.quality.sandbox import run_sandboxed

__all__ = ["OUTCOME_WEIGHTS", "assess_correctness"]

# The seed's weights.
OUTCOME_WEIGHTS = {
    "code_compiles": 0.25,
    "tests_pass": 0.25,
    "lint_passes": 0.15,
    "type_check_passes": 0.15,
    "deployment_success": 0.10,
    "no_runtime_errors": 0.10,
}


def merge_outcomes(outcomes: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None) -> dict[str, bool]:
    """Outcome reports merged field by field, later wins; unreported fields are absent."""
    if outcomes is None:
        return {}
    rows = [outcomes] if isinstance(outcomes, Mapping) else list(outcomes)
    merged: dict[str, bool] = {}
    for row in rows:
        for name in OUTCOME_WEIGHTS:
            if row.get(name) is not None:
                merged[name] = bool(row[name])
    return merged


def assess_correctness(
    response: str,
    outcomes: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    prompt: str = "",
    execute: bool = True,
    timeout_s: float = 2.0,
) -> DimensionScore | None:
    """Correctness from reported outcomes, else from the response's code; None with neither.

    With ``execute``, the examples and tests found in the prompt and the response (doctests,
    ``f(x) -> y``, ``assert`` lines, ``test_*`` functions) run against the response's Python in
    the sandbox, and their pass rate is the strongest evidence.
    """
    reported = merge_outcomes(outcomes)
    if reported:
        result = weighted({k: (w, float(reported[k]) if k in reported else None) for k, w in OUTCOME_WEIGHTS.items()})
        assert result is not None
        score, subscores = result
        return DimensionScore(
            "functional_correctness", score, subscores, {"source": "outcomes", "has_compilation_result": True}
        )

    blocks = extract_code_blocks(response)
    checked = [(b, c) for b in blocks if (c := check_syntax(b.language, b.code)) is not None]
    if not checked:
        return None
    syntax = sum(c.parses for _, c in checked) / len(checked)
    complete = sum(b.closed for b, _ in checked) / len(checked)
    py_blocks = [b for b, _ in checked if b.language == "python"]
    py_checks = [check_python(b.code) for b in py_blocks]
    resolvable = [c.imports_resolvable for c in py_checks if c.imports_resolvable is not None]
    run = None
    if execute and py_checks and all(c.parses and c.compiles for c in py_checks):
        defined = {
            n.name
            for c in py_checks
            if c.tree
            for n in c.tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }
        tests = extract_tests(prompt, response, defined)
        if tests:
            run = run_sandboxed("\n\n".join(b.code for b in py_blocks), tests, timeout_s=timeout_s)
    result = weighted(
        {
            "syntax": (0.6 if run is None else 0.25, syntax),
            "complete": (0.15 if run is None else 0.10, complete),
            "imports": (0.25 if run is None else 0.15, sum(resolvable) / len(resolvable) if resolvable else None),
            "tests": (0.5, None if run is None else run.pass_rate),
        }
    )
    assert result is not None
    score, subscores = result
    if syntax < 1.0:
        score = min(score, 0.3)  # code that does not even parse cannot be correct
    elif complete < 1.0:
        score = min(score, 0.5)  # the answer stops inside its code: at best half an answer
    if run is not None and (run.pass_rate or 0.0) < 1.0:
        score = min(score, 0.2 + 0.5 * (run.pass_rate or 0.0))  # failing its own examples is wrong
    return DimensionScore(
        "functional_correctness",
        score,
        subscores,
        {
            "source": "static",
            "has_compilation_result": True,
            "languages": sorted({b.language or "unknown" for b in blocks}),
            "errors": [f"{c.language}: {c.error}" for _, c in checked if c.error],
            "unresolved_imports": sorted({m for c in py_checks for m in c.unresolved}),
            "tests": None
            if run is None
            else {
                "passed": run.passed,
                "failed": run.failed,
                "timed_out": run.timed_out,
                "errors": run.errors[:5],
                "setup_error": run.setup_error,
            },
        },
    )
