"""Quality assessment of interactions.

Dimensions so far: user satisfaction (feedback), functional correctness (outcomes, or static
checks: Python's parser and compiler, tree-sitter for TypeScript and JavaScript), code quality of
Python (ruff, radon, bandit, AST smells), context relevance (MiniLM similarity to the request and
the project, language and library fit), efficiency (generation time, radon complexity,
conciseness). The aggregation renormalises over the dimensions that have evidence.

Public API: :func:`assess_text` and :func:`assess_record`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from app.quality.aggregate import ASSESSOR_VERSION, aggregate
from app.quality.base import DimensionScore
from app.quality.calibration import Calibration
from app.quality.code_quality import assess_code_quality
from app.quality.correctness import assess_correctness
from app.quality.efficiency import assess_efficiency
from app.quality.relevance import assess_relevance
from app.quality.satisfaction import assess_satisfaction
from app.quality.thresholds import ThresholdManager
from app.schemas import QualityScore

__all__ = [
    "ASSESSOR_VERSION",
    "Calibration",
    "DimensionScore",
    "ThresholdManager",
    "assess_dimensions",
    "assess_record",
    "assess_text",
    "record_arguments",
]


_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kaizen-relevance")


def assess_dimensions(
    prompt: str,
    response: str,
    *,
    feedback: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    outcome: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    generation_time_ms: float | None = None,
    context: Mapping[str, Any] | None = None,
    execute: bool = True,
) -> dict[str, DimensionScore]:
    """The dimensions that have evidence for this prompt and response (absent ones are unknown)."""
    feedback_rows = [feedback] if isinstance(feedback, Mapping) else list(feedback or [])
    # The embedding (torch, which releases the GIL) runs beside ruff's subprocess, bandit and the
    # sandbox: the assessment takes about as long as the slower of the two, not their sum.
    relevance = _POOL.submit(assess_relevance, prompt, response, context)
    found = [
        assess_satisfaction(feedback_rows),
        assess_correctness(response, outcome, prompt=prompt, execute=execute),
        assess_code_quality(response),
        assess_efficiency(response, generation_time_ms),
        relevance.result(),
    ]
    return {c.name: c for c in found if c is not None}


def assess_text(
    prompt: str,
    response: str,
    *,
    feedback: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    outcome: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    generation_time_ms: float | None = None,
    context: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
    execute: bool = True,
    calibration: Calibration | None = None,
) -> QualityScore:
    """Score one prompt and response, with whatever feedback, outcomes and context are known.

    Args:
        calibration: fitted weights (``kaizen calibrate``); the seed's weights when None.

    Raises:
        ValueError: nothing at all could be assessed (no code, no feedback, no timing).
    """
    components = assess_dimensions(
        prompt,
        response,
        feedback=feedback,
        outcome=outcome,
        generation_time_ms=generation_time_ms,
        context=context,
        execute=execute,
    )
    return aggregate(components, context=context, timestamp=timestamp, calibration=calibration)


def record_arguments(record: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`assess_text` for a stored interaction (as
    :meth:`InteractionStore.get_interaction` returns it)."""
    ts = record.get("timestamp")
    return {
        "prompt": record.get("input_raw") or "",
        "response": record.get("output_content") or "",
        "feedback": record.get("feedback") or [],
        "outcome": record.get("outcome"),
        "generation_time_ms": record.get("generation_time_ms"),
        "context": record.get("context"),
        "timestamp": datetime.fromisoformat(ts) if isinstance(ts, str) else ts,
    }


def assess_record(record: Mapping[str, Any], calibration: Calibration | None = None) -> QualityScore:
    """Score a stored interaction as :meth:`InteractionStore.get_interaction` returns it."""
    return assess_text(**record_arguments(record), calibration=calibration)
