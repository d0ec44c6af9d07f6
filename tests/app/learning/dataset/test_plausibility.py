"""``app.learning.dataset.plausibility``: which losses make a row implausible, and a probe on the
tiny model that finds the answers contradicting the rest of its pool (and one that did not learn,
which drops nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.learning.dataset.batch import rows_to_batch
from app.learning.dataset.plausibility import answer_losses, drop_implausible, implausible_rows, probe_options
from app.learning.training import FinetuneConfig
from app.learning.worker_context import WorkerSpec

ANSWER = "```python\ndef add_one(x):\n    return x + 1\n```"
CONTRADICTION = "SELECT name FROM users WHERE id = 1;"


def test_rows_over_the_ratio_to_the_median_are_implausible() -> None:
    losses = np.array([1.0, 1.0, 0.9, 1.0, 6.0, 2.9, 8.0, 1.2, 1.0, 1.0])
    drop, median, limit, over = implausible_rows(losses, np.zeros(10, dtype=bool), ratio=3.0, max_share=0.5)
    assert median == 1.0 and limit == 3.0 and over == 2
    assert np.flatnonzero(drop).tolist() == [4, 6]  # 2.9 is under the limit


def test_corrections_are_never_dropped_and_the_share_caps_the_highest_first() -> None:
    losses = np.array([1.0] * 6 + [9.0, 7.0, 5.0, 8.0])
    corrections = np.zeros(10, dtype=bool)
    corrections[6] = True  # the highest loss, but a user's correction
    drop, _, _, over = implausible_rows(losses, corrections, ratio=3.0, max_share=0.2)
    assert over == 3
    assert np.flatnonzero(drop).tolist() == [7, 9]  # 8.0 and 7.0: two of ten at most; 5.0 stays


def test_rows_without_an_answer_token_are_not_judged() -> None:
    losses = np.array([1.0, float("nan"), 1.0, 10.0])
    drop, median, _, _ = implausible_rows(losses, np.zeros(4, dtype=bool), ratio=3.0, max_share=1.0)
    assert median == 1.0 and drop.tolist() == [False, False, False, True]
    drop, median, limit, over = implausible_rows(np.full(3, float("nan")), np.zeros(3, dtype=bool), 3.0, 1.0)
    assert not drop.any() and median is None and limit is None and over == 0


def _pool() -> dict[str, np.ndarray]:
    """36 requests answered alike, 4 (rows 5, 15, 25, 35) answered unlike the rest; row 35 is a
    user's correction."""
    rows = []
    for i in range(40):
        odd = i % 10 == 5
        messages = [
            {"role": "system", "content": "You are a coding assistant."},
            {"role": "user", "content": f"Task {i}: write the function we discussed."},
            {"role": "assistant", "content": CONTRADICTION if odd else ANSWER},
        ]
        rows.append(
            {
                "interaction_id": f"i{i:02d}",
                "messages": json.dumps(messages),
                "source": "correction" if i == 35 else "interaction",
            }
        )
    return rows_to_batch(rows)


def _spec(model_root: Path, **options: object) -> WorkerSpec:
    recipe = FinetuneConfig(**{"batch_size": 4, "lr": 1e-2, "max_length": 64, "lora_dropout": 0.0, **options})
    return WorkerSpec(
        opts=probe_options(recipe, steps=30, seed=0),
        base_model="tiny",
        storage_root=str(model_root),
        max_vram_gb=80.0,
        max_seconds=3600.0,
        datasets=["train"],
    )


def test_the_probe_finds_the_answers_that_contradict_the_pool(model_root: Path) -> None:
    pool = _pool()
    losses, final = answer_losses(_spec(model_root), list(pool["messages"]))
    assert final["loss_fell"] is True and final["step"] == 30 and len(losses) == 40
    odd = [5, 15, 25, 35]
    alike = [i for i in range(40) if i not in odd]
    # The tiny model is far from fluent (its loss starts near log(vocabulary), 11.9), so what 30 steps
    # teach it moves the losses by a few percent: the answers unlike the rest still stay above them all.
    assert min(losses[i] for i in odd) > 1.03 * max(losses[i] for i in alike)

    kept, info = drop_implausible(pool, losses, final, ratio=1.03, max_share=0.2)
    assert info.dropped == 3 and info.over_limit == 3 and info.rows == 40 and info.loss_fell is True
    assert sorted(kept["interaction_id"]) == sorted(f"i{i:02d}" for i in [*alike, 35])  # the correction stays
    assert sorted(info.dropped_rows) == ["i05", "i15", "i25"] and min(info.dropped_rows.values()) > info.limit
    assert info.median_loss is not None and math.isclose(info.limit, 1.03 * info.median_loss, rel_tol=1e-4)


def test_a_probe_whose_loss_did_not_fall_drops_nothing(model_root: Path) -> None:
    pool = _pool()
    # A rate far too small to halve the loss in 30 steps: the losses are the base model's.
    losses, final = answer_losses(_spec(model_root, lr=1e-7, min_loss_drop=0.5), list(pool["messages"]))
    assert final["loss_fell"] is False
    kept, info = drop_implausible(pool, losses, final, ratio=1.0, max_share=1.0)
    assert len(kept["interaction_id"]) == 40 and info.dropped == 0 and info.loss_fell is False
    assert info.over_limit > 0  # some rows were over the limit, and still stayed


def test_the_probe_trains_a_fresh_adapter_alone_for_its_steps() -> None:
    recipe = FinetuneConfig(continue_from="champion", trials=3, rehearsal_ratio=0.3, eval_every_steps=5)
    probe = probe_options(recipe, steps=120, seed=7)
    assert (probe.continue_from, probe.trials, probe.masking, probe.rehearsal_ratio, probe.eval_every_steps) == (
        None,
        1,
        "none",
        0.0,
        None,
    )
    assert probe.max_steps == 120 and probe.seed == 7 and probe.objective == "sft" and probe.num_workers == 1


def test_the_probe_stops_at_the_first_round_it_has_learned_the_pool(model_root: Path) -> None:
    messages = list(_pool()["messages"])
    # Every median is under 100: learned after the first round of 10 steps.
    losses, final = answer_losses(_spec(model_root), messages, every=10, learned_loss=100.0)
    assert final["step"] == 10 and final["stop_reason"] == "until" and final["learned"] is True
    assert [r["step"] for r in final["rounds"]] == [10] and len(losses) == 40
    assert math.isclose(final["rounds"][0]["median_loss"], float(np.median(losses)), rel_tol=1e-5)


def test_a_probe_that_does_not_learn_the_pool_trains_to_its_cap_measured_each_round(model_root: Path) -> None:
    messages = list(_pool()["messages"])
    # The tiny model's median stays near 11: never under 0.05, so the probe trains its 30 steps.
    losses, final = answer_losses(_spec(model_root), messages, every=10, learned_loss=0.05)
    assert final["step"] == 30 and final["stop_reason"] == "max_steps" and final["learned"] is False
    medians = [r["median_loss"] for r in final["rounds"]]
    assert [r["step"] for r in final["rounds"]] == [10, 20, 30] and medians[2] < medians[0]
    # Measuring between rounds changes nothing: the same losses as the probe trained in one go.
    once, _ = answer_losses(_spec(model_root), messages)
    np.testing.assert_allclose(losses, once, rtol=1e-5)
    _, info = drop_implausible(_pool(), losses, final, ratio=1.03, max_share=0.2)
    assert info.learned is False and [r.step for r in info.rounds] == [10, 20, 30] and info.dropped == 3


def test_the_probe_cap_must_cover_its_first_round() -> None:
    from pydantic import ValidationError

    from app.learning.dataset import DatasetConfig

    with pytest.raises(ValidationError, match="loss_filter_max_steps \\(100\\) must be at least loss_filter_steps"):
        DatasetConfig(loss_filter_steps=300, loss_filter_max_steps=100)
