"""Stage 3 of ``jobs/build_dataset.py``: only the rows at or above
:class:`~app.quality.thresholds.ThresholdManager`'s inclusion threshold for their domain (the
language) and complexity go on, and every row whose answer is a user's correction
(:mod:`app.learning.dataset.preferences`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from app.learning.dataset.batch import Batch, as_text, num_rows, take
from app.learning.dataset.preferences import SOURCE_CORRECTION
from app.quality.thresholds import ThresholdManager

__all__ = ["filter_quality"]


def filter_quality(batch: Mapping[str, np.ndarray], thresholds: ThresholdManager) -> Batch:
    """Stage 3: the rows whose score is at or above the inclusion threshold for their domain
    (the language) and complexity, with that threshold in a ``threshold`` column; a correction
    (``source`` ``correction``) passes whatever the threshold, being the user's own statement of
    the right answer."""
    limits = np.asarray(
        [
            round(thresholds.threshold(as_text(d), as_text(c)), 6)
            for d, c in zip(batch["language"], batch["complexity"])
        ],
        dtype=np.float64,
    )
    out = dict(batch)
    out["threshold"] = limits
    corrected = np.asarray([as_text(s) == SOURCE_CORRECTION for s in batch.get("source", [""] * num_rows(batch))])
    keep = (np.asarray(batch["quality_score"], dtype=np.float64) >= limits) | corrected.astype(bool)
    return take(out, keep)
