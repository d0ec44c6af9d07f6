"""Batches (``app.learning.dataset.batch``): rows to a batch and back."""

from __future__ import annotations

import numpy as np

from app.learning.dataset.batch import rows_to_batch
from app.learning.dataset.dedup import fingerprint
from tests.app.learning.dataset.samples import read_rows


def test_rows_round_trip_through_batches() -> None:
    batch = fingerprint(read_rows(3), num_perm=16)
    rows = [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(3)]
    again = rows_to_batch(rows)
    assert again["minhash"].shape == (3, 16) and again["minhash"].dtype == np.uint64
    assert again["quality_score"].dtype == np.float64 and list(again["interaction_id"]) == list(batch["interaction_id"])
