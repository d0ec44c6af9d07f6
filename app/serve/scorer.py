"""``QualityScorerDeployment``: scores interactions after the collector commits them.

The collector hands it the ids of committed interactions without waiting (``score_ids``); a
background sweep re-queues whatever is still pending (hand-offs dropped while the scorer was
saturated, down or being replaced), so nothing goes unscored and ingestion never waits for scoring. The logic is
:class:`app.quality.service.QualityService`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from typing import Any

from ray import serve

from app.config import KaizenConfig
from app.quality import assess_text
from app.quality.service import QualityService
from app.store import open_store

__all__ = ["QualityScorerDeployment"]

log = logging.getLogger("kaizen.scorer")


@serve.deployment(name="QualityScorer")
class QualityScorerDeployment:
    """Scores interactions by id, scores ad-hoc prompt/response pairs, sweeps pending ones.

    One worker thread per replica does the scoring, from a bounded queue, a batch (one
    transaction) at a time: a replica never uses more than its share of the CPU, so scoring
    cannot starve ingestion. A hand-off that finds the queue full is dropped; the interaction stays
    pending and the sweep enqueues it again when there is room.
    """

    def __init__(self, config: dict[str, Any]):
        cfg = KaizenConfig.model_validate(config)
        self.service = QualityService(open_store(cfg.store), cache_size=cfg.performance.cache_size)
        self._nice = cfg.serve.scorer.nice
        # Load MiniLM and warm the analysers now: the first interactions must not wait for them.
        assess_text("Write a function that adds two numbers.", "```python\ndef add(a, b):\n    return a + b\n```")
        self._queue: queue.Queue[str] = queue.Queue(maxsize=cfg.serve.scorer.queue_size)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name="kaizen-score", daemon=True),
            threading.Thread(
                target=self._sweep, args=(cfg.serve.scorer.sweep_interval_s,), name="kaizen-score-sweep", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    def _enqueue(self, interaction_ids: list[str]) -> int:
        taken = 0
        for interaction_id in interaction_ids:
            try:
                self._queue.put_nowait(interaction_id)
            except queue.Full:
                break  # left pending; the sweep brings it back
            taken += 1
        return taken

    def _work(self) -> None:
        if self._nice and hasattr(os, "setpriority"):
            # Linux niceness is per thread, and the analysers' subprocesses inherit it: scoring
            # takes the CPU that ingestion leaves, never the other way round.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.service.score_ids(list(dict.fromkeys(batch)))
            except Exception:  # the store may be briefly unavailable: they stay pending for the sweep
                log.exception("scoring %d interactions failed", len(batch))

    def _sweep(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.service.refresh_calibration()
                room = self._queue.maxsize - self._queue.qsize()
                if self._queue.qsize() == 0 and room > 0:  # only when caught up: no double work
                    pending = self.service.store.interaction_ids(quality_status="pending", limit=room)
                    self._enqueue(pending)
            except Exception:  # the store may be briefly unavailable; the next sweep retries
                log.exception("sweeping pending interactions failed")

    async def score_ids(self, interaction_ids: list[str]) -> int:
        """Queue these interactions for scoring (the collector's hand-off); how many were taken."""
        return self._enqueue(interaction_ids)

    async def assess(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Score a prompt and response (``POST /v1/quality/assess``)."""
        score = await asyncio.to_thread(assess_text, **payload, calibration=self.service.calibration)
        return score.model_dump(mode="json")

    def check_health(self) -> None:
        if not self.service.store.ping():
            raise RuntimeError("store does not answer")

    def __del__(self) -> None:
        self._stop.set()


_BATCH = 32  # interactions scored, then stored in one transaction
