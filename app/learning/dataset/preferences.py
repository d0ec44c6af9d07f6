"""Users' verdicts on answers, and corrections as training targets (a stage of
``jobs/build_dataset.py`` between reading and classification, and a step on the driver).

A user who writes the answer they wanted (``feedback.correction``) has said two things: what the
model should have written, and that what it wrote was not it. So a corrected interaction becomes

* a training row whose answer is the correction (``learning_type`` ``correction``), and
* a preference pair ``(prompt, chosen = correction, rejected = the model's answer)``, which
  direct preference optimisation trains on (``finetune.objective``; the pairs are written by
  :func:`app.learning.dataset.write.to_preference_table`).

The model's answer is kept only as the rejected side of the pair: it is never a target. Neither is
any other answer the user turned down without correcting it (:func:`feedback_verdict`): those
rows are removed on the driver (:func:`drop_rejected`) and counted in the manifest's funnel.

A correction's quality, for the inclusion threshold and the selection, is
:data:`CORRECTION_QUALITY` with full confidence: it is the user's explicit statement of the right
answer, while the stored score measured the answer the user rejected (that score stays with the
pair, as ``rejected_quality_score``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, num_rows, object_array, take
from app.learning.dataset.dedup import normalize_text
from app.quality.satisfaction import merge_feedback

__all__ = [
    "CORRECTION_QUALITY",
    "REJECTING_RATING",
    "SOURCE_CORRECTION",
    "SOURCE_INTERACTION",
    "Verdict",
    "apply_corrections",
    "drop_rejected",
    "feedback_verdict",
]

SOURCE_INTERACTION = "interaction"
"""``learning_type`` of a row whose target is the answer the model gave."""
SOURCE_CORRECTION = "correction"
"""``learning_type`` of a row whose target is a user's correction."""
CORRECTION_QUALITY = 1.0
"""The quality score (and confidence) of a correction as a target."""
REJECTING_RATING = 2
"""A rating of this many stars (of 5) or fewer turns the answer down."""


@dataclass(frozen=True)
class Verdict:
    """What a user's feedback says of one answer."""

    correction: str
    """The answer the user wrote instead (the latest one), "" without one."""
    rejected: bool
    """The user turned the answer down: a correction, thumbs down, not accepted, abandoned, or a
    rating of :data:`REJECTING_RATING` stars or fewer (the latest value of each signal counts)."""


def feedback_verdict(feedback: Iterable[Mapping[str, Any]], answer: str = "") -> Verdict:
    """The verdict of an interaction's feedback rows (store rows, oldest first, or nested
    ``explicit``/``implicit`` bodies). A correction identical to the answer (after normalising
    case and whitespace) is no correction: it confirms the answer."""
    rows = list(feedback)
    correction = ""
    for row in rows:
        text = as_text(row.get("correction") or (row.get("explicit") or {}).get("correction"))
        if text.strip():
            correction = text
    if correction and normalize_text(correction) == normalize_text(answer):
        correction = ""
    merged = merge_feedback(rows)
    rating = merged.get("rating")
    rejected = (
        bool(correction)
        or merged.get("thumbs") == "down"
        or merged.get("accepted") is False
        or bool(merged.get("abandoned"))
        or (rating is not None and int(rating) <= REJECTING_RATING)
    )
    return Verdict(correction=correction, rejected=rejected)


def apply_corrections(batch: Mapping[str, np.ndarray], use_corrections: bool = True) -> Batch:
    """Stage 1b: where a row has a ``correction``, the correction becomes its answer (``output``),
    the model's answer moves to ``rejected_output``, and its ``quality_score`` and
    ``quality_confidence`` become :data:`CORRECTION_QUALITY` (the stored score moves to
    ``answer_quality``); ``source`` says which rows these are. ``rejected`` stays true for the rows
    the user turned down without a correction, which :func:`drop_rejected` removes.

    With ``use_corrections`` false (``dataset.corrections``) nothing is swapped: a corrected
    answer is a rejected one like any other, and is removed."""
    n = num_rows(batch)
    corrections = [as_text(c) for c in batch["correction"]]
    corrected = np.asarray([use_corrections and bool(c.strip()) for c in corrections], dtype=bool)
    outputs = [as_text(o) for o in batch["output"]]
    quality = np.asarray(batch["quality_score"], dtype=np.float64)
    confidence = np.asarray(batch["quality_confidence"], dtype=np.float64)
    out = {name: col for name, col in batch.items() if name != "correction"}
    out["output"] = object_array(c if k else o for c, o, k in zip(corrections, outputs, corrected))
    out["rejected_output"] = object_array(o if k else "" for o, k in zip(outputs, corrected))
    out["source"] = object_array(SOURCE_CORRECTION if k else SOURCE_INTERACTION for k in corrected)
    out["answer_quality"] = quality.copy()
    out["quality_score"] = np.where(corrected, CORRECTION_QUALITY, quality)
    out["quality_confidence"] = np.where(corrected, CORRECTION_QUALITY, confidence)
    out["rejected"] = np.asarray(batch["rejected"], dtype=bool).reshape(n) & ~corrected
    return out


def drop_rejected(batch: Mapping[str, np.ndarray]) -> tuple[Batch, int]:
    """On the driver: the rows whose answer the user did not turn down (corrected rows included,
    their answer now the correction), without the ``rejected`` column; and how many were removed."""
    if not num_rows(batch):
        return {name: col for name, col in batch.items() if name != "rejected"}, 0
    rejected = np.asarray(batch["rejected"], dtype=bool)
    kept = take({name: col for name, col in batch.items() if name != "rejected"}, ~rejected)
    return kept, int(rejected.sum())
