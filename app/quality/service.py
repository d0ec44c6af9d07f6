"""``QualityService``: scores stored interactions and writes the scores back; a plain class that
the scorer deployment and ``jobs/score.py`` wrap. Requests for the same content are answered from
an LRU cache keyed by a hash of everything the score depends on."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from app.quality import assess_record
from app.schemas import QualityScore
from app.store import InteractionStore

__all__ = ["QualityService"]


def _content_key(record: Mapping[str, Any]) -> str:
    fields = ("input_raw", "output_content", "generation_time_ms", "feedback", "outcome", "context", "timestamp")
    payload = json.dumps({f: record.get(f) for f in fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class QualityService:
    """Score interactions by id, or every pending one, and store the results."""

    def __init__(self, store: InteractionStore, cache_size: int = 10_000):
        self.store = store
        self.cache_size = cache_size
        self._cache: OrderedDict[str, QualityScore] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def assess(self, record: Mapping[str, Any]) -> QualityScore:
        """Score one interaction record (as the store returns it), through the cache."""
        key = _content_key(record)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        score = assess_record(record)
        with self._lock:
            self.misses += 1
            self._cache[key] = score
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return score

    def score_ids(self, interaction_ids: Sequence[str]) -> dict[str, QualityScore]:
        """Score and store the given interactions; unknown ids are skipped."""
        scored: dict[str, QualityScore] = {}
        for interaction_id in interaction_ids:
            record = self.store.get_interaction(interaction_id)
            if record is None:
                continue
            try:
                scored[interaction_id] = self.assess(record)
            except ValueError:  # an empty response: nothing to assess, ever
                self.store.set_quality(interaction_id, None, None, status="no_evidence")
                continue
        if scored:
            self.store.save_scores(list(scored.items()))
        return scored

    def score_pending(self, limit: int = 500) -> int:
        """Score interactions still marked pending (committed while the scorer was slow or down)."""
        pending = self.store.query_interactions(quality_status="pending", limit=limit)
        return len(self.score_ids([r["id"] for r in pending]))
