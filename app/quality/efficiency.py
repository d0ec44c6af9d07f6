"""Efficiency: the seed's 0.4 generation time (2 s target), 0.3 elegance (1 - solution
complexity), 0.3 productivity (here: how directly the response answers, by its length)."""

from __future__ import annotations

from radon.complexity import cc_visit

from app.quality.base import DimensionScore, clamp, weighted
from app.quality.code import extract_code_blocks

__all__ = ["assess_efficiency"]


def _complexity(python_code: list[str]) -> float | None:
    """Mean cyclomatic complexity (radon) of the functions, mapped to [0, 1]: 1 is trivial
    (score 0), 11 or more is as complex as it gets (score 1)."""
    values = []
    for code in python_code:
        try:
            values.extend(block.complexity for block in cc_visit(code))
        except (SyntaxError, ValueError):
            continue
    if not values:
        return None
    return clamp((sum(values) / len(values) - 1.0) / 10.0)


def assess_efficiency(response: str, generation_time_ms: float | None = None) -> DimensionScore | None:
    """The seed's efficiency formula over what is known; None when nothing is."""
    time_score = None
    if generation_time_ms is not None:
        time_score = clamp(1.0 - (generation_time_ms / 1000.0 - 2.0) / 10.0)
    blocks = extract_code_blocks(response)
    complexity = _complexity([b.code for b in blocks if b.language == "python"])
    elegance = None if complexity is None else 1.0 - complexity
    # Conciseness: full marks up to ~600 words, then it decays (walls of text cost the reader).
    words = len(response.split())
    conciseness = None if not words else 1.0 if words <= 600 else clamp(600.0 / words)
    result = weighted({"time": (0.4, time_score), "elegance": (0.3, elegance), "conciseness": (0.3, conciseness)})
    if result is None:
        return None
    score, subscores = result
    return DimensionScore(
        "efficiency",
        score,
        subscores,
        {"generation_time_ms": generation_time_ms, "words": words, "complexity": complexity},
    )
