"""``QualityScorerDeployment``: scores interactions after the collector commits them.

The collector hands it the ids of committed interactions without waiting (``score_ids``); a
background sweep scores whatever is still pending (hand-offs lost while the scorer was slow, down
or being replaced), so nothing goes unscored and ingestion never waits for scoring. The logic is
:class:`app.quality.service.QualityService`.
"""

from __future__ import annotations

import asyncio
import logging
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
    """Scores interactions by id, scores ad-hoc prompt/response pairs, sweeps pending ones."""

    def __init__(self, config: dict[str, Any]):
        cfg = KaizenConfig.model_validate(config)
        self.service = QualityService(open_store(cfg.store), cache_size=cfg.performance.cache_size)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep, args=(cfg.serve.scorer.sweep_interval_s,), name="kaizen-score-sweep", daemon=True
        )
        self._sweeper.start()

    def _sweep(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.service.score_pending()
            except Exception:  # the store may be briefly unavailable; the next sweep retries
                log.exception("sweeping pending interactions failed")

    async def score_ids(self, interaction_ids: list[str]) -> int:
        """Score and store these interactions; how many were scored."""
        return len(await asyncio.to_thread(self.service.score_ids, interaction_ids))

    async def assess(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Score a prompt and response (``POST /v1/quality/assess``)."""
        score = await asyncio.to_thread(assess_text, **payload, calibration=self.service.calibration)
        return score.model_dump(mode="json")

    def check_health(self) -> None:
        if not self.service.store.ping():
            raise RuntimeError("store does not answer")

    def __del__(self) -> None:
        self._stop.set()
