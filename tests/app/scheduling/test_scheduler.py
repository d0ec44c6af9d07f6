"""The scheduler on a real store of either engine, driven by interactions written through the real
ingestion path and scored as the scorer stores scores, a clock the tests move, the cluster's free
resources as a table, and the launcher's test double: each trigger firing and not firing, the
resource check, the off-peak window, one cycle at a time, back-off after failures, the switches,
manual requests, and a scheduler restarted in the middle of a cycle."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.scheduling.scheduler import DECISION_REPEAT_S, Scheduler
from app.scheduling.state import DECISION_ACTION, StaleRunError, TrainingRunStore
from app.store import InteractionStore
from tests.app.scheduling.helpers import (
    BASE_MODEL,
    Clock,
    Free,
    Launcher,
    make_cfg,
    make_trained_champion,
    past_cycle,
    serve,
)

CHAMPION = "adp-champion"


class World:
    """A store, a scheduler on a moving clock, its launcher double and the cluster's free resources;
    the test writes traffic and moves the clock."""

    def __init__(self, store: InteractionStore, **training: Any) -> None:
        self.store = store
        self.clock = Clock()
        self.launcher = Launcher()
        self.free = Free()
        self.runs = TrainingRunStore(store)
        self.seed = 0
        self.make(**training)

    def make(self, enabled: bool = True, **training: Any) -> Scheduler:
        """A (new) scheduler on the same store, clock, launcher and cluster."""
        self.cfg = make_cfg(enabled=enabled, **training)
        self.scheduler = Scheduler(self.cfg, self.store, self.launcher, resources=self.free, clock=self.clock)
        return self.scheduler

    def data(self, n: int, quality: float = 0.85, model: str = BASE_MODEL, sd: float = 0.03) -> list[str]:
        """``n`` interactions answered now (on the scheduler's clock), scored around ``quality``;
        the clock moves on by a second (the next check comes after them)."""
        self.seed += 1
        ids = serve(self.store, n, model=model, quality=quality, sd=sd, at=self.clock(), seed=self.seed)
        self.clock.advance(1 / 60)
        return ids

    def tick(self):
        return self.scheduler.tick()

    def decisions(self) -> list[dict[str, Any]]:
        return self.runs.decisions(limit=1000)

    def codes(self) -> list[str]:
        return [d["code"] for d in self.decisions()]

    def trigger(self, name: str) -> dict[str, Any]:
        (check,) = [c for c in self.scheduler.status()["triggers"] if c["name"] == name]
        return check


@pytest.fixture
def world(store: InteractionStore) -> Iterator[World]:
    yield World(store)


# --- the triggers, from measured data --------------------------------------------------------------


def test_volume_trigger_counts_new_data_above_the_threshold(world: World) -> None:
    world.data(30, quality=0.4)  # below quality.threshold 0.70: not training data
    world.data(19)
    assert world.tick() is None and world.launcher.launched == []
    volume = world.trigger("volume")
    assert not volume["fired"] and volume["evidence"]["new"] == 19
    assert "19 new interactions at or above quality 0.7" in volume["reason"]
    assert world.codes() == ["no_trigger"]

    world.data(1)
    run = world.tick()
    assert run.status == "running" and run.trigger == "volume" and world.launcher.launched[0].id == run.id
    assert run.data_cutoff == world.clock()
    assert "20 new interactions" in run.triggers["volume"]["reason"]
    started = world.decisions()[-1]
    assert started["code"] == "started" and started["target"] == run.id and "volume" in started["reason"]

    # What the cycle learns (before its cut-off) is not new for the next one.
    world.clock.advance(1)
    world.launcher.end(run, "succeeded", adapter_id="adp-1")
    world.data(5)
    assert world.tick() is None
    finished = world.runs.get(run.id)
    assert finished.status == "succeeded" and finished.adapter_id == "adp-1"
    assert finished.metrics["stages"]["training (finetune)"] == {"seconds": 40.0}
    assert world.trigger("volume")["evidence"]["new"] == 5
    assert world.codes()[-2:] == ["succeeded", "no_trigger"]


def test_time_trigger_fires_after_the_interval_with_new_data(store: InteractionStore) -> None:
    world = World(store, min_interactions=1000, interval_hours=24)
    world.data(3)
    assert world.tick() is None
    assert "0.0 h since the oldest unlearned interaction" in world.trigger("time")["reason"]
    world.clock.advance(23 * 60)
    assert world.tick() is None
    world.clock.advance(61)
    run = world.tick()
    assert run.trigger == "time" and "with 3 new interactions" in run.triggers["time"]["reason"]
    world.launcher.end(run, adapter_id="adp-1")
    world.clock.advance(25 * 60)
    assert world.tick() is None  # a day later, but nothing new to learn
    time = world.trigger("time")
    assert not time["fired"] and "since the last cycle started" in time["reason"] and "no new" in time["reason"]
    world.data(1)
    assert world.tick().trigger == "time"


def test_quality_trigger_new_data_better_than_the_champions_training_set(world: World, tmp_path: Path) -> None:
    world.make(min_interactions=1000)
    make_trained_champion(
        world.store, tmp_path / "ds-champion", CHAMPION, quality=0.76, at=world.clock() - timedelta(days=1)
    )
    past_cycle(world.store, world.clock(), adapter_id=CHAMPION)
    world.clock.advance(1)
    world.data(30, quality=0.78)  # no better than what the champion learned from
    assert world.tick() is None
    quality = world.trigger("quality")
    assert not quality["fired"] and "not significantly better" in quality["reason"]
    assert quality["evidence"]["new_minus_training_set"]["n_a"] == 60

    world.data(60, quality=0.93)
    run = world.tick()
    assert run is not None and run.trigger == "quality"
    assert "better by at least 0.05" in run.triggers["quality"]["reason"]


def test_quality_trigger_champions_live_quality_falling(world: World, tmp_path: Path) -> None:
    world.make(min_interactions=1000, quality_window=40)
    make_trained_champion(
        world.store, tmp_path / "ds-champion", CHAMPION, quality=0.8, at=world.clock() - timedelta(days=1)
    )
    past_cycle(world.store, world.clock(), adapter_id=CHAMPION)
    world.clock.advance(1)
    world.data(20, quality=0.8, model=CHAMPION)
    world.clock.advance(1)
    world.data(20, quality=0.79, model=CHAMPION)  # flat
    world.clock.advance(1)
    world.data(40, quality=0.5, model=BASE_MODEL)  # the base model's answers are not the champion's
    assert world.tick() is None
    quality = world.trigger("quality")
    assert not quality["fired"] and f"live quality of {CHAMPION} over its last 40" in quality["reason"]

    world.clock.advance(1)
    world.data(20, quality=0.55, model=CHAMPION)
    run = world.tick()
    assert run is not None and run.trigger == "quality"
    assert "falling by at least 0.05" in run.triggers["quality"]["reason"]
    trend = world.decisions()[-1]["triggers"][1]["evidence"]["live_newer_minus_older"]
    assert trend["estimate"] < -0.2 and trend["high"] < 0


def test_live_trend_of_the_base_model_while_there_is_no_champion(world: World) -> None:
    world.make(min_interactions=1000, quality_window=40)
    world.data(20, quality=0.8)
    world.clock.advance(1)
    world.data(20, quality=0.45)
    run = world.tick()
    assert run is not None and run.trigger == "quality"
    assert f"live quality of {BASE_MODEL}" in run.triggers["quality"]["reason"]
    assert "not compared (no champion adapter yet" in world.trigger("quality")["reason"]


# --- what holds a cycle back ------------------------------------------------------------------------


def test_resource_shortage_defers_until_the_cluster_has_room(world: World) -> None:
    world.free.cpu = 0.5  # Serve's replicas hold the rest
    world.data(25)
    run = world.tick()
    assert run.status == "scheduled" and world.launcher.launched == []
    waiting = world.decisions()[-1]
    assert waiting["code"] == "waiting" and [b["code"] for b in waiting["blockers"]] == ["resources"]
    assert "1 CPU needed, 0.5 free" in waiting["reason"]
    world.free.memory_gb = 8
    world.clock.advance(1)
    world.tick()
    (blocker,) = world.scheduler.status()["blockers"]
    assert "16 GB of memory needed, 8 GB free" in blocker["reason"] and "1 CPU needed" in blocker["reason"]

    world.free.cpu, world.free.memory_gb = 2.0, 20.0
    world.clock.advance(1)
    started = world.tick()
    assert started.id == run.id and started.status == "running" and len(world.launcher.launched) == 1
    assert started.config["needs"]["CPU"] == 1.0


def test_gpu_training_waits_for_a_free_gpu(store: InteractionStore) -> None:
    world = World(store)
    world.cfg = world.cfg.model_copy(update={"finetune": {"use_gpu": True, "num_workers": 2}})
    world.scheduler = Scheduler(world.cfg, store, world.launcher, resources=world.free, clock=world.clock)
    world.data(25)
    assert world.tick().status == "scheduled"
    assert "2 GPU needed, 0 free" in world.decisions()[-1]["reason"]
    world.free.gpu = 2
    assert world.tick().status == "running"


def test_off_peak_window_defers_automatic_cycles(world: World) -> None:
    now = world.clock()
    opens, closes = now + timedelta(hours=2), now + timedelta(hours=4)
    world.make(window=f"{opens:%H:%M}-{closes:%H:%M}")
    world.data(25)
    run = world.tick()
    assert run.status == "scheduled" and world.launcher.launched == []
    waiting = world.decisions()[-1]
    assert [b["code"] for b in waiting["blockers"]] == ["window"]
    assert f"outside the off-peak window {opens:%H:%M}-{closes:%H:%M} UTC (training.window)" in waiting["reason"]
    assert world.scheduler.status()["window"]["open"] is False

    world.clock.advance(119)
    assert world.tick().status == "scheduled"
    world.clock.advance(2)
    assert world.tick().status == "running"


def test_one_cycle_at_a_time_and_triggers_merge_into_the_next(world: World) -> None:
    world.data(25)
    first = world.tick()
    assert first.status == "running"
    world.clock.advance(5)
    world.data(10)  # new since the running cycle's cut-off, not enough on its own
    assert world.tick().id == first.id
    world.scheduler.request("bob", "a new task family appeared")
    world.clock.advance(5)
    world.data(15)  # now 25 after the cut-off: the volume trigger fires again
    nxt = world.tick()
    assert nxt.status == "scheduled" and nxt.manual and set(nxt.triggers) == {"volume"}
    assert [r["actor"] for r in nxt.requests] == ["bob"] and len(world.launcher.launched) == 1
    assert (
        world.decisions()[-1]["code"] == "waiting" and "is running (one at a time)" in world.decisions()[-1]["reason"]
    )
    with pytest.raises(StaleRunError, match="another cycle is running"):
        world.runs.claim(nxt, world.clock(), data_cutoff=world.clock(), needs={})
    world.scheduler.request("carol", "me too")  # merged into the same scheduled cycle
    assert world.runs.scheduled().id == nxt.id and len(world.runs.scheduled().requests) == 2

    world.launcher.end(first, adapter_id="adp-1")
    world.clock.advance(1)
    second = world.tick()
    assert second.id == nxt.id and second.status == "running" and second.trigger == "manual"
    assert [r.id for r in world.launcher.launched] == [first.id, second.id]
    assert world.runs.get(first.id).status == "succeeded"
    assert second.data_cutoff > first.data_cutoff
    assert len(world.runs.list(status="running")) == 1


def test_failed_cycles_back_off_exponentially_up_to_the_interval(store: InteractionStore) -> None:
    world = World(store, backoff_minutes=10, interval_hours=1)
    world.data(25)
    waits = []
    for attempt in range(5):
        run = world.tick()
        assert run.status == "running", (attempt, world.decisions()[-1]["reason"])
        world.launcher.end(run, "failed")
        waiting = world.tick()  # records the failure; the data is still unlearned: scheduled again
        assert world.runs.get(run.id).status == "failed" and waiting.status == "scheduled"
        backoff = world.scheduler.status()["backoff"]
        waits.append(backoff["minutes"])
        assert backoff["failures"] == attempt + 1
        world.clock.advance(backoff["minutes"] - 1)
        assert world.tick().status == "scheduled"
        assert "backing off after" in world.decisions()[-1]["reason"]
        world.clock.advance(1.5)
    assert waits == [10, 20, 40, 60, 60]  # doubled, at most training.interval_hours
    assert world.tick().status == "running"

    # A manual request is not held by the back-off; a success ends it.
    run = world.runs.running()
    world.launcher.end(run, "failed")
    world.tick()
    world.scheduler.request("alice", "the fix is deployed")
    manual = world.tick()
    assert manual.status == "running" and manual.manual
    world.launcher.end(manual, adapter_id="adp-1")
    world.tick()
    assert world.scheduler.status()["backoff"] is None


def test_a_cycle_that_cannot_be_started_fails_and_backs_off(world: World) -> None:
    world.launcher.refuse = "job server at http://head:8265 refused the connection"
    world.data(25)
    run = world.tick()
    assert run.status == "failed" and "ConnectionError: job server at http://head:8265" in run.metrics["reason"]
    assert world.decisions()[-1]["code"] == "failed"
    world.launcher.refuse = None
    assert world.tick().status == "scheduled"
    assert [b["code"] for b in world.decisions()[-1]["blockers"]] == ["backoff"]


def test_auto_training_false_reports_what_it_would_do_without_starting(store: InteractionStore) -> None:
    world = World(store, auto_training=False)
    world.data(25)
    assert world.tick() is None and world.launcher.launched == [] and world.runs.list() == []
    would = world.decisions()[-1]
    assert would["code"] == "would_start" and would["target"] == "scheduler"
    assert "would start a learning cycle (volume: 25 new interactions" in would["reason"]
    assert "would start it now" in would["reason"] and "training.auto_training is false" in would["reason"]
    world.clock.advance(1)
    world.tick()
    assert world.codes() == ["would_start"]  # the same decision is not written at every check
    world.clock.advance(DECISION_REPEAT_S / 60 + 1)
    world.tick()
    assert world.codes() == ["would_start", "would_start"]
    world.free.cpu = 0
    world.tick()
    assert "would wait: not enough free in the Ray cluster" in world.decisions()[-1]["reason"]

    world.free.cpu = 4
    world.scheduler.request("alice", "train now")  # an operator's request still runs
    run = world.tick()
    assert run.status == "running" and run.trigger == "manual"


def test_enabled_false_starts_nothing_not_even_on_request(store: InteractionStore) -> None:
    world = World(store, enabled=False)
    world.data(25)
    assert world.tick() is None and world.launcher.launched == []
    assert "not started: enabled is false" in world.decisions()[-1]["reason"]
    with pytest.raises(ValueError, match="enabled is false"):
        world.scheduler.request("alice", "train now")
    status = world.scheduler.status()
    assert status["enabled"] is False and status["triggers"][0]["fired"] is True


def test_a_scheduled_cycle_whose_triggers_stop_firing_is_cancelled(world: World, tmp_path: Path) -> None:
    now = world.clock()
    world.make(
        min_interactions=1000,
        quality_window=40,
        window=f"{now + timedelta(hours=1):%H:%M}-{now + timedelta(hours=2):%H:%M}",
    )
    world.data(20, quality=0.8)
    world.clock.advance(1)
    world.data(20, quality=0.45)
    run = world.tick()
    assert run.status == "scheduled" and run.trigger == "quality"
    world.clock.advance(1)
    world.data(40, quality=0.8)  # the live quality is back
    assert world.tick() is None
    cancelled = world.runs.get(run.id)
    assert cancelled.status == "cancelled" and "its triggers no longer fire" in cancelled.metrics["reason"]
    assert world.decisions()[-1]["code"] == "cancelled"


def test_manual_request_is_not_held_by_the_window(world: World) -> None:
    now = world.clock()
    world.make(window=f"{now + timedelta(hours=3):%H:%M}-{now + timedelta(hours=4):%H:%M}")
    with pytest.raises(ValueError, match="actor must be a non-empty string"):
        world.scheduler.request(" ", "why")
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        world.scheduler.request("alice", "")
    run = world.scheduler.request("alice", "before the demo")
    assert run.status == "scheduled" and world.decisions()[-1]["code"] == "requested"
    started = world.tick()
    assert started.status == "running" and started.trigger == "manual"
    assert started.reasons() == ["manual: alice: before the demo"]


# --- durability, status and the audit trail --------------------------------------------------------


def test_a_restarted_scheduler_reads_the_running_cycles_end(world: World) -> None:
    world.data(25)
    run = world.tick()
    world.make()  # the actor restarted: a new scheduler on the same store
    assert world.tick().id == run.id
    world.launcher.end(run, adapter_id="adp-1")
    world.clock.advance(30)
    world.make()
    assert world.tick() is None
    ended = world.runs.get(run.id)
    assert ended.status == "succeeded" and ended.adapter_id == "adp-1"
    assert "after 30.0 min" in world.decisions()[-2]["reason"]


def test_a_cycle_claimed_but_never_launched_fails(world: World) -> None:
    runs = world.runs
    scheduled = runs.schedule(world.clock(), request={"actor": "alice", "reason": "now"})
    runs.claim(scheduled, world.clock(), data_cutoff=world.clock(), needs={})  # then the scheduler died
    world.tick()
    ended = runs.get(scheduled.id)
    assert ended.status == "failed" and "stopped before the cycle started" in ended.metrics["reason"]
    assert world.launcher.asked == []


def test_status_shows_the_cycle_the_decision_and_the_next_check(world: World) -> None:
    status = world.scheduler.status()
    assert status["last_check"] is None and status["next_check"] is None and status["running"] is None
    assert [t["name"] for t in status["triggers"]] == ["volume", "quality", "time"]
    world.data(25)
    run = world.tick()
    status = world.scheduler.status()
    assert status["running"]["id"] == run.id and status["running"]["trigger"] == "volume"
    assert status["running"]["data_cutoff"] == run.data_cutoff.isoformat()
    assert status["last_decision"]["code"] == "started" and status["last_decision"]["target"] == run.id
    assert status["last_check"] == world.clock().isoformat()
    assert status["next_check"] == (world.clock() + timedelta(seconds=60)).isoformat()
    assert status["resources"]["ok"] and status["resources"]["needs"]["CPU"] == 1.0
    assert status["evidence"]["data_cutoff"] == run.data_cutoff.isoformat()
    assert status["recent"][0]["id"] == run.id and status["scheduled"] is None
    audit = world.store._fetch("SELECT actor, action FROM audit_log WHERE target = ?", [run.id])
    assert {"actor": "scheduler", "action": DECISION_ACTION} in audit


def test_repeated_decisions_are_recorded_when_they_change(world: World) -> None:
    world.tick()
    world.clock.advance(1)
    world.tick()
    assert world.codes() == ["no_trigger"]
    world.data(25)
    world.free.cpu = 0
    world.tick()
    world.clock.advance(1)
    world.tick()
    assert world.codes() == ["no_trigger", "waiting"]
    world.free.memory_gb = 1  # still waiting for resources: the same decision
    world.tick()
    assert world.codes() == ["no_trigger", "waiting"]
