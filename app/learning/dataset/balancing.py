"""Stage 5 of ``jobs/build_dataset.py``, on the driver over the whole pool: no group of rows
alike in domain, task and complexity keeps more than a share of the rows (:func:`balance`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, best_first, num_rows, take

__all__ = ["balance"]


def _group_keys(batch: Mapping[str, np.ndarray], by: Sequence[str]) -> list[str]:
    return ["/".join(as_text(batch[name][i]) for name in by) or "all" for i in range(num_rows(batch))]


def balance(
    batch: Mapping[str, np.ndarray], max_share: float = 0.4, by: Sequence[str] = ("language", "task", "complexity")
) -> tuple[Batch, int, dict[str, Any]]:
    """Cap every group (rows alike in ``by``) at ``max_share`` of the rows kept, keeping each
    capped group's best rows by quality.

    The cap is the largest ``c`` with ``c <= max_share * sum(min(size, c))`` over the groups. With
    ``k`` groups no share can be below ``1 / k``: a smaller ``max_share`` acts as ``1 / k`` (every
    group cut to the smallest's size), and a single group is left whole.

    Returns:
        The kept rows (best first), how many were dropped, and ``{groups, cap, effective_share}``
        (rows per group before the cap).
    """
    n = num_rows(batch)
    keys = _group_keys(batch, by)
    sizes = Counter(keys)
    info: dict[str, Any] = {"groups": dict(sorted(sizes.items())), "cap": None, "effective_share": None}
    if n == 0 or not by or max_share >= 1.0 or len(sizes) < 2:
        return take(batch, best_first(batch)) if n else dict(batch), 0, info
    share = max(max_share, 1.0 / len(sizes))
    counts = sorted(sizes.values())
    cap = counts[0]
    for c in range(counts[-1], counts[0] - 1, -1):
        if c <= share * sum(min(size, c) for size in counts) + 1e-9:
            cap = c
            break
    kept_per_group: Counter[str] = Counter()
    keep = []
    for i in best_first(batch):
        if kept_per_group[keys[i]] < cap:
            kept_per_group[keys[i]] += 1
            keep.append(i)
    info.update(cap=cap, effective_share=round(share, 6))
    return take(batch, keep), n - len(keep), info
