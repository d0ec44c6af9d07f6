"""Stage 5 (``app.learning.dataset.balancing``): the cap on each group's share."""

from __future__ import annotations

import pytest

from app.learning.dataset.balancing import balance
from tests.app.learning.dataset.samples import read_rows


def test_balance_caps_each_groups_share_keeping_its_best_rows() -> None:
    languages = ["python"] * 8 + ["typescript"] * 2 + ["go"] * 2
    scores = [0.70 + 0.01 * i for i in range(8)] + [0.8] * 4
    batch = read_rows(12, language=languages, quality_score=scores)
    kept, dropped, info = balance(batch, max_share=0.5, by=["language"])
    assert (dropped, info["cap"]) == (4, 4)
    python = [i for i, lang in zip(kept["interaction_id"], kept["language"]) if lang == "python"]
    assert sorted(python) == ["id-04", "id-05", "id-06", "id-07"]  # the four best
    assert info["groups"] == {"go": 2, "python": 8, "typescript": 2}

    # A share below 1/k acts as 1/k; one group, or a share of 1, is left alone.
    kept, dropped, info = balance(batch, max_share=0.1, by=["language"])
    assert dropped == 6 and info["effective_share"] == pytest.approx(1 / 3, abs=1e-5)
    assert balance(read_rows(5, language=["python"] * 5), max_share=0.2, by=["language"])[1] == 0
    assert balance(batch, max_share=1.0, by=["language"])[1] == 0
