"""Functional correctness: the seed's weighted formula over outcome metrics when the agent
reported them; otherwise what static checks of the response's code can tell.

Static evidence so far: Python blocks parsed and compiled (never run) and their imports resolved;
TypeScript and JavaScript blocks parsed with tree-sitter; truncated blocks. Sandboxed execution
of the examples and tests a prompt or response carries comes next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app.quality.base import DimensionScore, weighted
from app.quality.code import check_python, check_syntax, extract_code_blocks

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
    response: str, outcomes: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None = None
) -> DimensionScore | None:
    """Correctness from reported outcomes, else from the response's code; None with neither."""
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
    py_checks = [check_python(b.code) for b, _ in checked if b.language == "python"]
    resolvable = [c.imports_resolvable for c in py_checks if c.imports_resolvable is not None]
    result = weighted({
        "syntax": (0.6, syntax),
        "complete": (0.15, complete),
        "imports": (0.25, sum(resolvable) / len(resolvable) if resolvable else None),
    })
    assert result is not None
    score, subscores = result
    if syntax < 1.0:
        score = min(score, 0.3)  # code that does not even parse cannot be correct
    elif complete < 1.0:
        score = min(score, 0.5)  # the answer stops inside its code: at best half an answer
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
        },
    )
