"""The quality scorer deployment's class without Serve (its methods are plain): what the config's
quality.real_time, quality.assessment_timeout_ms, quality.fallback_on_timeout and
performance.async_processing make it do. Through real Serve: test_collector_serve.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.config import KaizenConfig
from app.quality import ASSESSOR_VERSION
from app.serve.api import CollectorService
from app.serve.scorer import QualityScorerDeployment
from tests.conftest import ingest_samples

Scorer = QualityScorerDeployment.func_or_class


@pytest.fixture
def make_scorer(tmp_path) -> Iterator[Callable[..., Any]]:
    made = []

    def make(**sections: dict[str, Any]) -> Any:
        cfg = KaizenConfig.model_validate(
            {
                "store": {"sqlite_path": str(tmp_path / "k.db")},
                "privacy": {"hmac_key": "k"},
                "serve": {"scorer": {"sweep_interval_s": 0.2, "nice": 0}},
                **sections,
            }
        )
        scorer = Scorer(cfg.model_dump(mode="json"))
        made.append(scorer)
        return scorer

    yield make
    for scorer in made:
        scorer._stop.set()
        scorer._executor.shutdown(wait=True, cancel_futures=True)
        for thread in scorer._threads:
            thread.join(timeout=30)
        scorer.service.store.close()


def statuses(scorer: Any, ids: list[str]) -> list[str]:
    return [scorer.service.store.get_interaction(i)["quality_status"] for i in ids]


def fully_scored(scorer: Any, interaction_id: str) -> bool:
    rows = scorer.service.store.quality_scores(interaction_id)  # newest first
    return bool(rows) and rows[0]["assessor_version"] == ASSESSOR_VERSION


def wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_without_real_time_nothing_is_scored_on_commit(make_scorer) -> None:
    scorer = make_scorer(quality={"real_time": False})
    ids = ingest_samples(scorer.service.store, 2)[:2]
    assert asyncio.run(scorer.score_ids(ids)) == 0 and asyncio.run(scorer.score_now(ids)) == {}
    time.sleep(1.0)  # five sweeps
    assert statuses(scorer, ids) == ["pending", "pending"]  # left for python -m jobs.score
    # Ad-hoc assessments still answer.
    assessed = asyncio.run(scorer.assess({"prompt": "add", "response": "```python\ndef add(a, b): return a + b\n```"}))
    assert 0 <= assessed["overall"] <= 1


def test_with_real_time_the_sweep_scores_what_is_pending(make_scorer) -> None:
    scorer = make_scorer(quality={"real_time": True})
    ids = ingest_samples(scorer.service.store, 2)[:2]  # committed behind the scorer's back
    assert wait_until(lambda: statuses(scorer, ids) == ["scored", "scored"])


@pytest.mark.parametrize(
    "timeout_ms, fallback, want",
    [(60_000, True, "scored"), (0.001, True, "fallback"), (0.001, False, "pending")],
)
def test_the_real_time_budget_and_its_fallback(make_scorer, timeout_ms: float, fallback: bool, want: str) -> None:
    scorer = make_scorer(quality={"assessment_timeout_ms": timeout_ms, "fallback_on_timeout": fallback})
    ids = ingest_samples(scorer.service.store, 2)[:2]
    assert asyncio.run(scorer.score_now(ids)) == {want: 2}
    versions = [[r["assessor_version"] for r in scorer.service.store.quality_scores(i)] for i in ids]
    if want == "fallback":
        assert all(v and v[0].endswith("-fallback") for v in versions)
    # Past the budget the full assessment still comes: the running one, then the rest from the queue.
    assert wait_until(lambda: all(fully_scored(scorer, i) for i in ids))


@pytest.mark.parametrize("async_processing", [True, False])
def test_the_collector_answers_after_or_before_scoring(make_scorer, tmp_path, async_processing: bool) -> None:
    scorer = make_scorer(quality={"assessment_timeout_ms": 60_000})
    cfg = KaizenConfig.model_validate(
        {
            "store": {"sqlite_path": str(tmp_path / "k.db")},
            "privacy": {"hmac_key": "k"},
            "performance": {"async_processing": async_processing},
        }
    )
    handed: list[list[str]] = []
    collector = CollectorService(cfg, on_committed=handed.append, score_now=scorer.score_now)
    body = {
        "session_id": "s",
        "input": {"raw": "Write add. add(1, 2) -> 3"},
        "output": {"content": "```python\ndef add(a, b):\n    return a + b\n```", "generation_time_ms": 400},
    }
    event = {"id": "inline-1", "type": "interaction", "timestamp": "2026-11-01T10:00:00Z", "body": body}
    (result,) = asyncio.run(collector.ingest([event]))
    assert result.status == "accepted"
    status = collector.store.get_interaction("inline-1")["quality_status"]
    if async_processing:  # answered at once; the hand-off scores it later
        assert status == "pending" and handed == [["inline-1"]]
    else:  # the answer came after the score
        assert status == "scored" and handed == []
    collector.store.close()
