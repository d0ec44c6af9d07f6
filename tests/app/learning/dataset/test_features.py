"""Stage 7 (``app.learning.dataset.features``): the ``features`` column and its reader."""

from __future__ import annotations

import numpy as np

from app.learning.dataset.features import decode_features
from tests.app.learning.dataset.samples import prepared_rows


def test_features_round_trip() -> None:
    batch = prepared_rows(2)
    features = decode_features(batch["features"][0])
    assert features["language"] == "python" and features["frameworks"] == ["click"]
    assert features["code_lines"] == 2 and features["quality_confidence"] == 0.9
    assert np.allclose(features["embedding"], batch["embedding"][0])
