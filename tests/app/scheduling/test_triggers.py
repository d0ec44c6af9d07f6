"""The triggers' evidence as the store gives it (sample traffic through the real ingestion pipeline,
scored as the scorer stores scores), and each trigger's rule on measured samples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from app.deployment.stats import Sample
from app.registry import AdapterRegistry
from app.scheduling.triggers import (
    DataEvidence,
    check_quality,
    check_time,
    check_triggers,
    check_volume,
    inclusion_threshold,
    measure,
    training_set_quality,
)
from app.schemas import QualityScore
from app.store import InteractionStore
from tests.app.scheduling.helpers import BASE_MODEL, make_cfg, make_trained_champion, serve
from tests.conftest import ingest_samples


def _scores(store: InteractionStore, ids: list[str], quality: float) -> None:
    store.save_scores(
        [(i, QualityScore(overall=quality, components={}, confidence=0.8, assessor_version="test")) for i in ids]
    )


def test_new_data_is_scored_above_the_threshold_with_an_answer_after_the_cutoff(store: InteractionStore) -> None:
    ids = ingest_samples(store, 12)  # 12 sample interactions and one with an empty answer
    cfg = make_cfg()
    now = datetime.now(UTC)
    assert measure(store, cfg, now, cutoff=None, last_cycle_at=None).new.n == 0  # none scored yet
    _scores(store, ids[:8], 0.9)
    _scores(store, ids[8:10], 0.5)  # below quality.threshold
    _scores(store, ["empty"], 0.95)  # no answer: not training data whatever its score
    e = measure(store, cfg, now, cutoff=None, last_cycle_at=None)
    assert (e.new.n, round(e.new.mean, 6), e.threshold) == (8, 0.9, 0.7)
    times = sorted(store.get_interaction(i)["timestamp"] for i in ids[:8])
    assert e.oldest_new_at == datetime.fromisoformat(times[0])
    assert measure(store, cfg, now, cutoff=datetime.fromisoformat(times[4]), last_cycle_at=None).new.n == 4
    # dataset.threshold overrides quality.threshold, as it does for the dataset job
    lower = cfg.model_copy(update={"dataset": {"threshold": 0.4}})
    assert inclusion_threshold(lower) == 0.4 and measure(store, lower, now, cutoff=None, last_cycle_at=None).new.n == 10
    # A corrected answer is new data of quality 1.0 whatever it scored (its correction is the target),
    # unless dataset.corrections is off; thumbs down alone adds nothing.
    _feedback(store, ids[8], {"explicit": {"correction": "print('right')", "thumbs": "down"}})
    _feedback(store, ids[9], {"explicit": {"thumbs": "down"}})
    e = measure(store, cfg, now, cutoff=None, last_cycle_at=None)
    assert (e.new.n, round(e.new.mean, 6)) == (9, round((8 * 0.9 + 1.0) / 9, 6))
    ignored = cfg.model_copy(update={"dataset": {"corrections": False}})
    assert measure(store, ignored, now, cutoff=None, last_cycle_at=None).new.n == 8


def _feedback(store: InteractionStore, interaction_id: str, body: dict) -> None:
    from app.config import KaizenConfig
    from app.ingest import IngestPipeline

    pipeline = IngestPipeline(KaizenConfig.model_validate({"privacy": {"hmac_key": "k"}}))
    event = {
        "id": f"fb-{interaction_id}",
        "type": "feedback",
        "timestamp": datetime.now(UTC).isoformat(),
        "body": {"interaction_id": interaction_id, **body},
    }
    prepared = pipeline.prepare([event])
    assert all(r.status == "accepted" for r in prepared.finish(store.write(prepared.to_commit)))


def test_live_halves_are_the_served_models_last_answers(store: InteractionStore) -> None:
    cfg = make_cfg(quality_window=10)
    start = datetime.now(UTC) - timedelta(hours=3)
    for k, quality in enumerate((0.2, 0.6, 0.9)):  # three batches of 6, an hour apart
        serve(store, 6, model=BASE_MODEL, quality=quality, sd=0.0, at=start + timedelta(hours=k), seed=k)
    serve(store, 6, model="other-model", quality=0.1, sd=0.0, at=start + timedelta(hours=2.5), seed=9)
    e = measure(store, cfg, datetime.now(UTC), cutoff=None, last_cycle_at=None)
    # the last 10 of BASE_MODEL: 4 at 0.6 then 6 at 0.9; the older half 4 x 0.6 + 1 x 0.9
    assert (e.live_older.n, e.live_newer.n) == (5, 5)
    assert round(e.live_older.mean, 6) == round((4 * 0.6 + 0.9) / 5, 6) and round(e.live_newer.mean, 6) == 0.9
    after = measure(store, cfg, datetime.now(UTC), cutoff=start + timedelta(hours=2), last_cycle_at=None)
    assert after.live_older.n + after.live_newer.n == 6


def test_training_set_quality_from_the_champions_dataset_manifest(store: InteractionStore, tmp_path: Path) -> None:
    registry = AdapterRegistry(store)
    assert training_set_quality(registry, None) == (
        None,
        "no champion adapter yet: the base model learned from no interactions",
    )
    at = datetime.now(UTC) - timedelta(days=1)
    ids = make_trained_champion(store, tmp_path / "ds-1", "adp-1", quality=0.8, at=at)
    scores = [store.get_interaction(i)["quality_score"] for i in ids]
    sample, note = training_set_quality(registry, "adp-1")
    assert sample.n == len(ids) and abs(sample.mean - sum(scores) / len(scores)) < 1e-6
    exact = Sample.of(scores)
    assert abs(sample.sd - exact.sd) < 0.02  # the spread from the histogram's bins
    assert note == f"the champion adp-1's training set {tmp_path / 'ds-1'}"
    (tmp_path / "ds-1" / "manifest.json").unlink()
    gone, why = training_set_quality(registry, "adp-1")
    assert gone is None and "cannot be read" in why


def _evidence(**changes) -> DataEvidence:
    now = datetime(2025, 6, 1, 12, tzinfo=UTC)
    base = {
        "now": now,
        "threshold": 0.7,
        "cutoff": now - timedelta(hours=30),
        "new": Sample.of([0.8] * 10),
        "oldest_new_at": now - timedelta(hours=29),
        "last_cycle_at": now - timedelta(hours=30),
        "champion": "adp-1",
        "served_model": "adp-1",
        "training_set": Sample.of([0.8, 0.82, 0.78] * 30),
        "training_set_note": "the champion adp-1's training set /data/datasets/ds-1",
        "live_older": Sample(),
        "live_newer": Sample(),
    }
    base.update(changes)
    return DataEvidence(**base)


def test_each_rule_on_samples() -> None:
    training = make_cfg(min_interactions=10, interval_hours=24, quality_margin=0.05, quality_window=40).training
    assert check_volume(_evidence(), training).fired
    assert not check_volume(_evidence(new=Sample.of([0.8] * 9)), training).fired
    zero = make_cfg(min_interactions=0).training  # 0 still needs one new interaction
    assert not check_volume(_evidence(new=Sample()), zero).fired and check_volume(_evidence(), zero).fired

    assert check_time(_evidence(), training).fired
    assert not check_time(_evidence(last_cycle_at=_evidence().now - timedelta(hours=23)), training).fired
    assert not check_time(_evidence(new=Sample()), training).fired
    first = check_time(_evidence(last_cycle_at=None, oldest_new_at=None, new=Sample()), training)
    assert not first.fired and first.reason == "no cycle yet and no interaction above the threshold"

    assert not check_quality(_evidence(), training).fired
    better = check_quality(_evidence(new=Sample.of([0.9, 0.92, 0.88] * 20)), training)
    assert better.fired and "better by at least 0.05" in better.reason
    # a large difference on five interactions is not evidence yet
    assert not check_quality(_evidence(new=Sample.of([0.95] * 3)), training).fired
    falling = check_quality(
        _evidence(live_older=Sample.of([0.8, 0.75, 0.85] * 7), live_newer=Sample.of([0.6, 0.55, 0.65] * 7)), training
    )
    assert falling.fired and "falling by at least 0.05" in falling.reason
    small = check_quality(
        _evidence(live_older=Sample.of([0.8, 0.75, 0.85] * 7), live_newer=Sample.of([0.78, 0.73, 0.83] * 7)), training
    )
    assert not small.fired  # significant perhaps, but less than the margin
    assert [c.name for c in check_triggers(_evidence(), training)] == ["volume", "quality", "time"]
