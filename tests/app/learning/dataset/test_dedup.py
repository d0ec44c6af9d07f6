"""Stage 4 (``app.learning.dataset.dedup``): fingerprints, exact and near duplicates."""

from __future__ import annotations

from app.learning.dataset.dedup import drop_exact_duplicates, drop_near_duplicates, fingerprint
from tests.app.learning.dataset.samples import read_rows

LONG = " ".join(f"word{i}" for i in range(200))


def test_exact_duplicates_compare_normalised_text_and_keep_the_best() -> None:
    batch = read_rows(
        3,
        input=["Sort a list", "  SORT   a list ", "Sort a dict"],
        output=["Use sorted().", "use SORTED().", "Use sorted()."],
        quality_score=[0.8, 0.9, 0.8],
    )
    kept, dropped = drop_exact_duplicates(fingerprint(batch, num_perm=64))
    assert dropped == 1
    assert sorted(kept["interaction_id"]) == ["id-01", "id-02"]  # the better of the pair


def test_near_duplicates_by_minhash_lsh() -> None:
    near = LONG.replace("word100", "changed")  # one word of 200: Jaccard of 5-shingles ~0.95
    other = " ".join(f"other{i}" for i in range(200))
    batch = read_rows(
        4, input=["q"] * 4, output=[LONG, near, other, LONG[: len(LONG) // 2]], quality_score=[0.8, 0.9, 0.7, 0.95]
    )
    batch = fingerprint(batch, num_perm=128, shingle_size=5, seed=3)
    kept, dropped = drop_near_duplicates(batch, threshold=0.8, num_perm=128, seed=3)
    # id-01 (better) keeps over id-00; half of the text (Jaccard ~0.5) and an unrelated one stay.
    assert dropped == 1
    assert sorted(kept["interaction_id"]) == ["id-01", "id-02", "id-03"]
    kept, dropped = drop_near_duplicates(batch, threshold=0.4, num_perm=128, seed=3)
    assert dropped == 2 and sorted(kept["interaction_id"]) == ["id-02", "id-03"]
