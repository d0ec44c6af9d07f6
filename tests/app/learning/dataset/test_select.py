"""Stage 8 (``app.learning.dataset.select``): the diverse, quality-weighted selection and the split."""

from __future__ import annotations

import numpy as np
import pytest

import app.learning.dataset.select as select_module
from app.learning.dataset.batch import take
from app.learning.dataset.select import (
    assign_split,
    diverse_indices,
    relative_quality,
    select_diverse,
    selection_size,
    split_fraction,
)
from tests.app.learning.dataset.samples import read_rows


def _clusters(sizes: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.eye(8)[: len(sizes)]
    points = np.concatenate([c + 0.01 * rng.standard_normal((n, 8)) for c, n in zip(centers, sizes)])
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["k_center", "k_means"])
def test_selection_covers_every_cluster_with_its_best_row(method: str) -> None:
    x = _clusters([10, 5, 5])
    quality = np.full(20, 0.75)
    best = [3, 12, 17]  # the best row of each cluster
    quality[best] = 0.95
    picked = diverse_indices(x, quality, 3, method=method, seed=0)
    assert sorted(picked.tolist()) == best


@pytest.mark.parametrize("method", ["k_center", "k_means"])
def test_selection_prefers_scores_backed_by_evidence(method: str) -> None:
    x = _clusters([10, 5, 5])
    quality = np.full(20, 0.9)
    quality[[0, 10, 15]] = 0.95  # the best guesses, inferred without evidence
    confidence = np.full(20, 0.45)
    sure = [4, 12, 18]  # rated by their users: a little lower, but known
    confidence[sure] = 0.62
    confidence[1] = np.nan  # unknown: counts as 1 only when weighed
    assert sorted(diverse_indices(x, quality, 3, method=method, seed=0).tolist()) == [0, 10, 15]
    picked = diverse_indices(x, quality, 3, method=method, seed=0, confidence=confidence, confidence_weight=4)
    assert sorted(picked.tolist()) == [1, 12, 18]


def _two_kinds(
    clusters: int = 8, per_kind: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Requests of two kinds in each of ``clusters`` topics, each kind a little apart from the
    other; half of each kind's answers good. The scorer is stingier with kind B: its good answers
    score below kind A's poor ones."""
    rng = np.random.default_rng(seed)
    dim = clusters + 2
    points, kind_b, good = [], [], []
    for c in range(clusters):
        for b in (False, True):
            offset = np.eye(dim)[clusters + int(b)] * 0.15
            for i in range(per_kind):
                points.append(np.eye(dim)[c] + offset + 0.01 * rng.standard_normal(dim))
                kind_b.append(b)
                good.append(i % 2 == 0)
    kind_b, good = np.array(kind_b), np.array(good)
    quality = np.where(kind_b, np.where(good, 0.80, 0.67), np.where(good, 0.95, 0.82))
    x = np.array(points)
    return x / np.linalg.norm(x, axis=1, keepdims=True), quality, kind_b, good


def test_relative_quality_compares_a_row_with_the_requests_most_like_it(monkeypatch: pytest.MonkeyPatch) -> None:
    x, quality, kind_b, good = _two_kinds()
    assert quality[kind_b & good].max() < quality[~kind_b & ~good].min()  # raw: kind beats answer
    relative = relative_quality(x, quality, 5)
    assert relative[good].min() > relative[~good].max()  # against its neighbours, the answer counts
    # A row is not its own neighbour: identical requests, each against the other two.
    same = np.ones((3, 4)) / 2.0
    assert np.allclose(relative_quality(same, np.array([0.6, 0.5, 0.4]), 2), [0.65, 0.5, 0.35])
    assert np.array_equal(relative_quality(same, np.array([0.6, 0.5, 0.4]), 0), [0.6, 0.5, 0.4])
    # A large pool looks for neighbours in a seeded sample of it.
    monkeypatch.setattr(select_module, "NEIGHBOUR_REFERENCE_ROWS", 40)
    sampled = relative_quality(x, quality, 3, seed=1)
    assert np.array_equal(sampled, relative_quality(x, quality, 3, seed=1))
    assert sampled[good].mean() - sampled[~good].mean() > 0.1
    assert sampled[kind_b & good].mean() > sampled[~kind_b & ~good].mean()


@pytest.mark.parametrize("method", ["k_center", "k_means"])
def test_selection_takes_the_best_answers_of_every_kind(method: str) -> None:
    x, quality, kind_b, good = _two_kinds()
    raw = diverse_indices(x, quality, 8, method=method, quality_weight=4, seed=0)
    assert not kind_b[raw].any()  # raw scores: kind A only, its poor answers included
    picked = diverse_indices(x, quality, 8, method=method, quality_weight=4, seed=0, quality_neighbours=5)
    assert good[picked].all() and 0 < kind_b[picked].sum() < 8


def test_selection_keeps_the_fraction_and_weighs_quality() -> None:
    x = _clusters([10, 5, 5])
    batch = read_rows(20, quality_score=list(np.linspace(0.7, 0.9, 20)))
    batch["embedding"] = x.astype(np.float32)
    assert selection_size(20, 0.5) == 10 and selection_size(21, 0.5) == 11 and selection_size(3, 0.01) == 1
    chosen = select_diverse(batch, keep_fraction=0.5)
    assert len(chosen["interaction_id"]) == 10 and len(set(chosen["interaction_id"])) == 10
    # max_rows caps what the fraction gives, never raises it.
    assert selection_size(20, 0.5, max_rows=4) == 4 and selection_size(20, 0.1, max_rows=4) == 2
    capped = select_diverse(batch, keep_fraction=1.0, max_rows=6)
    assert set(capped["interaction_id"]) < set(select_diverse(batch, keep_fraction=1.0)["interaction_id"])
    assert len(capped["interaction_id"]) == 6
    # Equidistant candidates: the better one wins; with quality_weight 0 the first (lowest index).
    y = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert diverse_indices(y, np.array([0.9, 0.6, 0.8]), 2).tolist() == [0, 2]
    assert diverse_indices(y, np.array([0.9, 0.6, 0.8]), 2, quality_weight=0.0).tolist() == [0, 1]
    # The result does not depend on the order the rows came in.
    order = np.random.default_rng(1).permutation(20)
    again = select_diverse(take(batch, order), keep_fraction=0.5)
    assert sorted(again["interaction_id"]) == sorted(chosen["interaction_id"])


def test_split_is_a_deterministic_hash_of_the_id() -> None:
    batch = read_rows(400)
    split = assign_split(batch, 0.25)["split"]
    share = float(np.mean(split == "validation"))
    assert 0.18 < share < 0.32
    shuffled = take(batch, np.random.default_rng(0).permutation(400))
    again = dict(zip(shuffled["interaction_id"], assign_split(shuffled, 0.25)["split"]))
    assert all(again[i] == s for i, s in zip(batch["interaction_id"], split))
    assert all((s == "validation") == (split_fraction(i) < 0.25) for i, s in zip(batch["interaction_id"], split))
    # A small set still gets one validation row; a fraction of 0 gets none.
    tiny = assign_split(read_rows(3), 0.01)["split"]
    assert list(tiny).count("validation") == 1
    assert "validation" not in set(assign_split(read_rows(3), 0.0)["split"])
