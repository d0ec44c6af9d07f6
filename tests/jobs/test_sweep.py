"""``jobs/sweep.py``: a Ray Tune sweep of two trials, each its own Ray Train run (the driver-function
pattern), ranked by validation loss plus forgetting on held-out rows of an earlier domain; the
best trial's adapter is registered as a candidate and the results table saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import ConfigError, KaizenConfig
from app.learning.sweep import SearchRange, SweepConfig, check_search, relevant_search
from app.learning.training import FinetuneConfig
from jobs import sweep

pytestmark = pytest.mark.integration

TRIAL = {
    "num_workers": 1,
    "batch_size": 4,
    "epochs": 1,
    "max_steps": 4,
    "max_length": 64,
    "eval_every_steps": 2,
    "continue_from": None,
    "early_stopping_patience": 0,
    "checkpoint_every_steps": 100,
}


def test_search_options_are_checked_and_irrelevant_ones_left_out() -> None:
    with pytest.raises(ValueError, match="bogus: not searchable"):
        SweepConfig(search={"bogus": [1]})
    with pytest.raises(ValueError, match="lora_rank: takes whole numbers"):
        SweepConfig(search={"lora_rank": [4, 4.5]})
    with pytest.raises(ValueError, match="method: grid takes lists of values; lr is a range"):
        SweepConfig(method="grid", search={"lr": {"min": 1e-4, "max": 1e-3}})
    with pytest.raises(ValueError, match="log-uniform range needs min > 0"):
        SweepConfig(search={"lr": {"min": 0, "max": 1e-3, "log": True}})
    search = SweepConfig().search
    kept, notes = relevant_search(search, FinetuneConfig().model_dump(), has_rehearsal=False)
    assert set(kept) == {"lr", "lora_rank", "lora_alpha"}
    assert any("mask_fraction left out: finetune.masking is none" in n for n in notes)
    assert any("rehearsal_ratio left out: there are no rehearsal rows" in n for n in notes)
    kept, _ = relevant_search(search, FinetuneConfig(masking="fggm").model_dump(), has_rehearsal=True)
    assert set(kept) == set(search)
    errors = check_search(
        {"lr": SearchRange(min=1e-4, max=1e-3), "rehearsal_ratio": [0.5, 1.0]}, FinetuneConfig().model_dump()
    )
    assert errors == [errors[0]] and errors[0].startswith("sweep.search.rehearsal_ratio: 1.0 is refused by finetune")


def test_two_trials_rank_by_the_objective_and_the_best_is_registered(
    cfg: KaizenConfig, data: dict[str, Path], ray_session
) -> None:
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    options = SweepConfig(
        sweep_id="sweep-test",
        method="grid",
        num_samples=1,
        grace_period_steps=2,
        search={"lr": [1e-4, 3e-2], "rehearsal_ratio": [0.2], "mask_fraction": [0.5]},
    )
    lines: list[str] = []
    result = sweep.main(
        cfg,
        options,
        FinetuneConfig(**TRIAL),
        data["dataset"],
        rehearsal=data["rehearsal"],
        heldout=data["earlier"],
        progress=lines.append,
    )

    assert result["notes"] == ["sweep.search.mask_fraction left out: finetune.masking is none, not fggm"]
    trials = result["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"completed", "stopped"}
    completed = [t for t in trials if t["status"] == "completed"]
    assert sorted(t["params"]["lr"] for t in trials) == [1e-4, 3e-2]
    assert completed and all(t["params"]["rehearsal_ratio"] == 0.2 for t in trials)
    for t in completed:
        # The objective is the validation loss plus the rise of the earlier domain's loss.
        assert t["heldout_loss"] is not None and t["objective"] == pytest.approx(
            t["val_loss"] + max(0.0, t["forgetting"])
        )
    best = result["best"]
    assert best["objective"] == min(t["objective"] for t in completed)
    assert any("started: lr=" in line for line in lines) and any("objective" in line for line in lines)

    adapter = result["adapter"]
    manifest = AdapterStore(cfg.model.storage_root).manifest(adapter["adapter_id"])
    assert manifest.lineage.hyperparameters["lr"] == best["params"]["lr"]
    assert manifest.lineage.metrics["objective"] == pytest.approx(best["objective"])
    assert manifest.lineage.dataset_uri == str(data["dataset"])
    store = open_store(cfg.store)
    try:
        assert AdapterRegistry(store).get(adapter["adapter_id"])["status"] == "candidate"
    finally:
        store.close()

    saved = json.loads((Path(result["path"]) / "results.json").read_text())
    assert [t["trial"] for t in saved["trials"]] == [t["trial"] for t in trials]
    assert saved["adapter"]["adapter_id"] == adapter["adapter_id"]
    table = (Path(result["path"]) / "results.md").read_text()
    assert table.startswith("| trial | lr | rehearsal_ratio | status |") and "(best)" in table

    with pytest.raises(ValueError, match="sweep-test exists"):
        sweep.main(cfg, options, FinetuneConfig(**TRIAL), data["dataset"], rehearsal=data["rehearsal"])


def test_the_command_line_names_bad_options(cfg: KaizenConfig, data: dict[str, Path], capsys) -> None:
    code = sweep.cli(["--train", str(data["dataset"]), "sweep.num_samples=0", "finetune.lora_rnk=2"])
    err = capsys.readouterr().err
    assert code == 2 and "sweep.num_samples:" in err and "finetune.lora_rnk: unknown key" in err
    with pytest.raises(ValueError, match="give --validation rows"):
        sweep.main(cfg, SweepConfig(), FinetuneConfig(**TRIAL), data["rehearsal"])
    with pytest.raises(ConfigError, match=r"sweep\.search\.lora_alpha: 0\.0 is refused by finetune"):
        sweep.main(cfg, SweepConfig(search={"lora_alpha": [16, 0]}), FinetuneConfig(**TRIAL), data["dataset"])
