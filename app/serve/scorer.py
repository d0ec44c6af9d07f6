"""``QualityScorerDeployment``: scores interactions after the collector commits them.

The collector hands it the ids of committed interactions without waiting (``score_ids``), or, with
``performance.async_processing=false``, waits for their scores before it acknowledges them
(``score_now``, at most ``quality.assessment_timeout_ms``). A background sweep re-queues whatever
is still pending (hand-offs dropped while the scorer was saturated, down or being replaced), so
nothing goes unscored. With ``quality.real_time=false`` it scores nothing on commit and does not
sweep: interactions stay pending for ``python -m jobs.score``; ad-hoc assessments still answer.
The logic is :class:`app.quality.service.QualityService`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from ray import serve

from app.config import KaizenConfig
from app.quality import assess_text
from app.quality.service import QualityService
from app.quality.streaming import CircuitBreaker
from app.store import open_store

__all__ = ["QualityScorerDeployment"]

log = logging.getLogger("kaizen.scorer")


@serve.deployment(name="QualityScorer")
class QualityScorerDeployment:
    """Scores interactions by id, scores ad-hoc prompt/response pairs, sweeps pending ones.

    One scoring thread per replica runs every full assessment (hand-offs from a bounded queue, one
    interaction at a time, and the collector's ``score_now`` requests): a replica never uses more
    than its share of the CPU, so scoring cannot starve ingestion. A hand-off that finds the queue
    full is dropped; the interaction stays pending and the sweep enqueues it again when there is
    room. Each assessment has the real-time budget: past it, the cheap fallback score is stored
    (``quality.fallback_on_timeout``) until the full one replaces it.
    """

    def __init__(self, config: dict[str, Any]):
        cfg = KaizenConfig.model_validate(config)
        self.service = QualityService(open_store(cfg.store), cache_size=cfg.performance.cache_size)
        self._nice = cfg.serve.scorer.nice
        self._real_time = cfg.quality.real_time
        self._budget = {
            "timeout_s": cfg.quality.assessment_timeout_ms / 1000.0,
            "fallback": cfg.quality.fallback_on_timeout,
        }
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kaizen-score", initializer=self._lower_priority)
        # The collector's waiting requests stop waiting while the scoring thread cannot keep up.
        self._breaker = CircuitBreaker()
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

    def _lower_priority(self) -> None:
        if self._nice and hasattr(os, "setpriority"):
            # Linux niceness is per thread, and the analysers' subprocesses inherit it: scoring
            # takes the CPU that ingestion leaves, never the other way round.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)

    def _work(self) -> None:
        self._lower_priority()  # the fallback scores are computed on this thread
        while not self._stop.is_set():
            try:
                interaction_id = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                result = self.service.score_within([interaction_id], executor=self._executor, **self._budget)
                # One full assessment at a time: past the budget the fallback is stored, and the
                # full score follows before the next hand-off is taken.
                wait(result.running)
                self._enqueue(result.not_started)  # behind a score_now request: try again later
            except Exception:  # the store may be briefly unavailable: it stays pending for the sweep
                log.exception("scoring %s failed", interaction_id)

    def _sweep(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.service.refresh_calibration()
                if not self._real_time:
                    continue  # pending interactions wait for python -m jobs.score
                room = self._queue.maxsize - self._queue.qsize()
                if self._queue.qsize() == 0 and room > 0:  # only when caught up: no double work
                    pending = self.service.store.interaction_ids(quality_status="pending", limit=room)
                    self._enqueue(pending)
            except Exception:  # the store may be briefly unavailable; the next sweep retries
                log.exception("sweeping pending interactions failed")

    async def score_ids(self, interaction_ids: list[str]) -> int:
        """Queue these interactions for scoring (the collector's hand-off); how many were taken."""
        return self._enqueue(interaction_ids) if self._real_time else 0

    async def score_now(self, interaction_ids: list[str]) -> dict[str, int]:
        """Score these interactions within the real-time budget (the collector waits for it with
        ``performance.async_processing=false``); how many ended scored, fallback, pending..."""
        if not self._real_time:
            return {}
        result = await asyncio.to_thread(
            self.service.score_within, interaction_ids, executor=self._executor, breaker=self._breaker, **self._budget
        )
        if self._enqueue(result.not_started) < len(result.not_started):
            log.warning("the scoring queue is full: some interactions wait, pending or with a fallback score")
        return dict(Counter(result.status.values()))

    async def assess(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Score a prompt and response (``POST /v1/quality/assess``)."""
        score = await asyncio.to_thread(assess_text, **payload, calibration=self.service.calibration)
        return score.model_dump(mode="json")

    def check_health(self) -> None:
        if not self.service.store.ping():
            raise RuntimeError("store does not answer")

    def __del__(self) -> None:
        self._stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
