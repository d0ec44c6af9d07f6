"""Stage 8 of ``jobs/build_dataset.py``, on the driver: :func:`select_diverse` (k-center greedy or
k-means over the embeddings, weighted by quality measured against similar requests,
:func:`relative_quality`) and :func:`assign_split` (train or validation by a hash of the id)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from app.learning.dataset.batch import Batch, as_text, num_rows, take

__all__ = [
    "NEIGHBOUR_REFERENCE_ROWS",
    "assign_split",
    "diverse_indices",
    "relative_quality",
    "select_diverse",
    "selection_size",
    "split_fraction",
]


def selection_size(n: int, keep_fraction: float, max_rows: int | None = None) -> int:
    """How many of ``n`` rows a selection keeps: the fraction, rounded up, at least one of a
    non-empty pool, at most ``max_rows``."""
    size = 0 if n == 0 else min(n, max(1, math.ceil(n * keep_fraction - 1e-9)))
    return size if max_rows is None else min(size, max_rows)


NEIGHBOUR_REFERENCE_ROWS = 8192
""":func:`relative_quality` looks for a row's neighbours among at most this many rows (a seeded
sample of a larger pool), so its cost grows linearly with the pool."""


def relative_quality(
    unit: np.ndarray, quality: np.ndarray, neighbours: int, seed: int = 0, chunk: int = 1024
) -> np.ndarray:
    """Each row's quality measured against the requests most like it: its score minus the mean
    score of its ``neighbours`` nearest rows by cosine similarity (itself left out), plus the
    pool's mean, clipped to [0, 1].

    The scorers are not equally generous to every kind of request (a one-word answer is less
    "relevant" to its question than a long one is), so raw scores would make a selection prefer
    kinds over answers. Against its neighbours, a good answer to a kind of request that scores
    low still stands out, and a poor one to a kind that scores high does not. ``unit`` holds
    unit-length embeddings; pools over :data:`NEIGHBOUR_REFERENCE_ROWS` rows look for neighbours
    in a seeded sample of that many."""
    q = np.asarray(quality, dtype=np.float64)
    n = len(q)
    k = min(neighbours, n - 1)
    if k <= 0:
        return q.copy()
    reference = np.arange(n)
    if n > NEIGHBOUR_REFERENCE_ROWS:
        reference = np.sort(np.random.default_rng(seed).choice(n, NEIGHBOUR_REFERENCE_ROWS, replace=False))
    ref_unit, ref_q = unit[reference], q[reference]
    local = np.empty(n)
    for start in range(0, n, chunk):
        sim = unit[start : start + chunk] @ ref_unit.T
        rows = np.arange(start, min(start + chunk, n))
        # A row is not its own neighbour (when it is in the reference sample).
        own = np.searchsorted(reference, rows)
        is_own = (own < len(reference)) & (reference[np.minimum(own, len(reference) - 1)] == rows)
        sim[np.flatnonzero(is_own), own[is_own]] = -np.inf
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        local[start : start + chunk] = ref_q[nearest].mean(axis=1)
    return np.clip(q - local + q.mean(), 0.0, 1.0)


def diverse_indices(
    embeddings: np.ndarray,
    quality: np.ndarray,
    k: int,
    method: Literal["k_center", "k_means"] = "k_center",
    quality_weight: float = 1.0,
    seed: int = 0,
    confidence: np.ndarray | None = None,
    confidence_weight: float = 0.0,
    quality_neighbours: int = 0,
) -> np.ndarray:
    """``k`` row indices that cover the embedding space, weighted towards quality.

    A row's weight is ``quality ** quality_weight * confidence ** confidence_weight`` (a missing
    or NaN confidence counts as 1), the quality taken against its ``quality_neighbours`` nearest
    rows when that is not 0 (:func:`relative_quality`). ``k_center``: farthest-first greedy; it
    starts from the heaviest row and then takes the row whose cosine distance to the nearest
    chosen one, times its weight, is largest. ``k_means``: k clusters; from each, the row with
    the largest weight times its cosine similarity to the centroid (an empty cluster's place goes
    to the heaviest row left). Ties go to the lower index. Returns the indices in the order chosen.
    """
    n = len(embeddings)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    quality = np.asarray(quality, dtype=np.float64)
    if quality_neighbours:
        quality = relative_quality(x, quality, quality_neighbours, seed)
    weight = np.clip(quality, 1e-6, None) ** quality_weight
    if confidence is not None and confidence_weight:
        sure = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=1.0)
        weight = weight * np.clip(sure, 1e-6, None) ** confidence_weight
    chosen: list[int] = []
    if method == "k_center":
        first = int(np.argmax(weight))
        chosen.append(first)
        nearest = np.clip(1.0 - x @ x[first], 0.0, 2.0)
        taken = np.zeros(n, dtype=bool)
        taken[first] = True
        for _ in range(k - 1):
            priority = np.where(taken, -1.0, nearest * weight)
            i = int(np.argmax(priority))
            chosen.append(i)
            taken[i] = True
            nearest = np.minimum(nearest, np.clip(1.0 - x @ x[i], 0.0, 2.0))
        return np.asarray(chosen, dtype=np.int64)

    import warnings

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    model = (MiniBatchKMeans if n > 10_000 else KMeans)(n_clusters=k, random_state=seed, n_init=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates make fewer distinct points than k
        labels = model.fit_predict(x)
    centers = model.cluster_centers_
    centroids = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    taken = np.zeros(n, dtype=bool)
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        if members.size:
            best = members[int(np.argmax(weight[members] * (x[members] @ centroids[cluster])))]
            chosen.append(int(best))
            taken[best] = True
    for i in np.argsort(-weight, kind="stable"):
        if len(chosen) >= k:
            break
        if not taken[i]:
            chosen.append(int(i))
            taken[i] = True
    return np.asarray(chosen, dtype=np.int64)


def select_diverse(
    batch: Mapping[str, np.ndarray],
    keep_fraction: float = 0.5,
    method: Literal["k_center", "k_means"] = "k_center",
    quality_weight: float = 1.0,
    seed: int = 0,
    max_rows: int | None = None,
    confidence_weight: float = 0.0,
    quality_neighbours: int = 0,
) -> Batch:
    """Stage 8: the :func:`selection_size` rows :func:`diverse_indices` picks, by ``embedding``,
    ``quality_score`` (against its ``quality_neighbours`` nearest rows when not 0) and
    ``quality_confidence`` (when the batch has it). Rows are first put in id order, so the result
    does not depend on the order they arrived in."""
    n = num_rows(batch)
    if n == 0:
        return dict(batch)
    order = np.asarray(sorted(range(n), key=lambda i: as_text(batch["interaction_id"][i])), dtype=np.int64)
    batch = take(batch, order)
    picked = diverse_indices(
        np.asarray(batch["embedding"]),
        np.asarray(batch["quality_score"]),
        selection_size(n, keep_fraction, max_rows),
        method,
        quality_weight,
        seed,
        batch.get("quality_confidence"),
        confidence_weight,
        quality_neighbours,
    )
    return take(batch, picked)


def split_fraction(interaction_id: str) -> float:
    """Where an id falls in [0, 1): the first 8 bytes of its SHA-256. The same interaction lands
    in the same split of every dataset, so no later dataset validates on what an earlier one trained on."""
    return int.from_bytes(hashlib.sha256(interaction_id.encode()).digest()[:8], "big") / 2.0**64


def assign_split(batch: Mapping[str, np.ndarray], validation_fraction: float = 0.1) -> Batch:
    """Stage 8b: ``split`` is ``validation`` where :func:`split_fraction` of the id is below the
    fraction, else ``train``. When that leaves validation empty (a small set) and there are at
    least two rows, the row with the lowest hash goes to validation, so one exists."""
    ids = [as_text(i) for i in batch["interaction_id"]]
    where = np.asarray([split_fraction(i) for i in ids], dtype=np.float64)
    split = np.where(where < validation_fraction, "validation", "train").astype(object)
    if validation_fraction > 0 and len(ids) >= 2 and not (split == "validation").any():
        split[int(np.argmin(where))] = "validation"
    out = dict(batch)
    out["split"] = split
    return out
