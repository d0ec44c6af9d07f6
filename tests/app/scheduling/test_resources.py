"""What a cycle needs from its config, against what the cluster has free; the off-peak window."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.config import ConfigError
from app.scheduling.resources import GIB, CycleNeeds, OffPeakWindow, check_resources
from tests.app.scheduling.helpers import make_cfg


def test_needs_follow_the_training_and_rehearsal_stages() -> None:
    cfg = make_cfg()
    needs = CycleNeeds.of(cfg)
    assert (needs.cpus, needs.gpus, needs.memory_gb) == (1.0, 0.0, 16.0)
    assert set(needs.stages) == {"training", "rehearsal"}

    cfg = make_cfg(resource_limits={"max_system_memory_gb": 6})
    cfg = cfg.model_copy(
        update={
            "finetune": {"num_workers": 2, "cpus_per_worker": 1.5, "use_gpu": True},
            "learn": {"train_with": "sweep"},
            "sweep": {"max_concurrent_trials": 2},
        }
    )
    needs = CycleNeeds.of(cfg)
    assert (needs.cpus, needs.gpus, needs.memory_gb) == (6.0, 4.0, 6.0)

    no_rehearsal = make_cfg().model_copy(update={"learn": {"rehearsal": "none"}, "ssr": {"actors": 8}})
    assert set(CycleNeeds.of(no_rehearsal).stages) == {"training"}
    rehearsal = make_cfg().model_copy(update={"ssr": {"actors": 3, "num_cpus": 1, "num_gpus": 0.5}})
    assert (CycleNeeds.of(rehearsal).cpus, CycleNeeds.of(rehearsal).gpus) == (3.0, 1.5)
    with pytest.raises(ConfigError, match="finetune.num_workers"):
        CycleNeeds.of(make_cfg().model_copy(update={"finetune": {"num_workers": 0}}))


def test_check_names_each_shortfall() -> None:
    needs = CycleNeeds(cpus=2.0, gpus=1.0, memory_gb=16.0)
    ok = check_resources(needs, {"CPU": 2.0, "GPU": 1.0, "memory": 20 * GIB})
    assert ok.ok and ok.free == {"CPU": 2.0, "GPU": 1.0, "memory_gb": 20.0}
    assert ok.reason.startswith("the cluster has 2 CPU, 1 GPU and 20 GB of memory free")
    short = check_resources(needs, {"CPU": 1.25, "memory": 8 * GIB})  # no GPU in the cluster: absent
    assert not short.ok and len(short.short) == 3
    assert "2 CPU needed, 1.25 free" in short.reason and "1 GPU needed, 0 free" in short.reason
    assert "16 GB of memory needed, 8 GB free (training.resource_limits.max_system_memory_gb)" in short.reason


def test_window_spans_midnight_and_says_when_it_opens() -> None:
    night = OffPeakWindow.parse("22:00-06:00")
    at = lambda h, m=0: datetime(2025, 6, 1, h, m, tzinfo=UTC)  # noqa: E731
    assert [night.contains(at(h)) for h in (21, 22, 23, 0, 5, 6, 12)] == [False, True, True, True, True, False, False]
    assert night.next_start(at(12)) == at(22) and night.next_start(at(23)) == at(23)
    day = OffPeakWindow.parse("09:30-17:00")
    assert (
        day.contains(at(9, 30))
        and not day.contains(at(17))
        and day.next_start(at(18)) == datetime(2025, 6, 2, 9, 30, tzinfo=UTC)
    )
    assert str(day) == "09:30-17:00 UTC"
    # another zone's clock is read in UTC
    from zoneinfo import ZoneInfo

    assert night.contains(datetime(2025, 6, 2, 0, 30, tzinfo=ZoneInfo("Europe/Berlin")))  # 22:30 UTC
    with pytest.raises(ValueError, match="training.window"):
        OffPeakWindow.parse("late")
