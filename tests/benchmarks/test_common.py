import json
from pathlib import Path

import pytest

from benchmarks.common import finished_seeds, machine


def _partial(path: Path, runs: list[dict], complete: bool = False, benchmark: str = "forgetting") -> Path:
    path.write_text(json.dumps({"benchmark": benchmark, "complete": complete, "runs": runs}))
    return path


def test_a_stopped_run_keeps_the_seeds_it_finished_with_the_same_settings(tmp_path: Path) -> None:
    settings = {"seed": 1, "lr": 0.001, "methods": ("naive", "ssr")}
    runs = [{"seed": s, "settings": {**settings, "seed": s, "methods": ["naive", "ssr"]}} for s in (1, 2)]
    output = _partial(tmp_path / "r.json", runs)
    assert finished_seeds(output, "forgetting", "runs", [1, 2, 3], settings) == runs
    assert [r["seed"] for r in finished_seeds(output, "forgetting", "runs", [2, 3], settings)] == [2]
    # Nothing to keep: no file, or a complete one (a new run starts over).
    assert finished_seeds(tmp_path / "none.json", "forgetting", "runs", [1], settings) == []
    assert finished_seeds(_partial(tmp_path / "c.json", runs, complete=True), "forgetting", "runs", [1], settings) == []


def test_resuming_with_other_settings_or_another_benchmarks_file_is_refused(tmp_path: Path) -> None:
    output = _partial(tmp_path / "r.json", [{"seed": 1, "settings": {"seed": 1, "lr": 0.001}}])
    with pytest.raises(ValueError, match=r"seed 1 ran with lr=0.001, this run has 0.0005"):
        finished_seeds(output, "forgetting", "runs", [1, 2], {"seed": 1, "lr": 0.0005})
    with pytest.raises(ValueError, match="holds 'forgetting' results, not 'data_selection'"):
        finished_seeds(output, "data_selection", "seeds", [1], {"lr": 0.001})
    # Runs without their own settings are compared with the file's options.
    tmp_path.joinpath("d.json").write_text(
        json.dumps(
            {
                "benchmark": "data_selection",
                "complete": False,
                "options": {"seed": 0, "lr": 1e-3},
                "seeds": [{"seed": 0}],
            }
        )
    )
    with pytest.raises(ValueError, match="lr=0.001"):
        finished_seeds(tmp_path / "d.json", "data_selection", "seeds", [0], {"seed": 0, "lr": 5e-4})
    assert finished_seeds(tmp_path / "d.json", "data_selection", "seeds", [0], {"seed": 0, "lr": 1e-3}) == [{"seed": 0}]


def test_the_curve_keeps_the_winning_trials_validations_and_then_the_runs() -> None:
    from benchmarks.common import curve_summary, keep_evaluations

    curve: list[dict] = []
    keep = keep_evaluations(curve)
    trial = [
        {"step": 25, "train_loss": 2.0, "val_loss": 1.5, "val_exact_match": 0.2},
        {"step": 50, "train_loss": 1.0, "val_loss": 0.9, "val_exact_match": 0.6},
    ]
    # The choice carries the winner's last validation as its own figures: kept once, from the trial.
    keep({"step": 50, "val_loss": 0.9, "val_exact_match": 0.6, "trials": [{}, {}], "trial_evaluations": trial})
    keep({"step": 60, "loss": 0.7, "step_metrics": [{"loss": 0.6}, {"loss": 0.8}]})  # a progress report
    keep({"step": 75, "val_loss": 0.5, "val_exact_match": 0.8, "step_metrics": [{"loss": 0.5}, {"loss": 0.3}]})
    keep({"step": 75, "val_loss": 0.9, "val_exact_match": 0.6, "final": True})
    assert [(p["step"], p["train_loss"], p["val_exact_match"]) for p in curve] == [
        (25, 2.0, 0.2),
        (50, 1.0, 0.6),
        (75, 0.4, 0.8),
    ]
    line = curve_summary("kaizen", {"curve": curve, "kept_step": 50, "val_exact_match": 0.6, "own_score": 0.9})
    assert "3 evaluations to step 75" in line and "kept step 50" in line and "test 0.90" in line
    assert "attempts" not in line

    # Another attempt (finetune.attempts) starts its steps again: each point says whose it is.
    keep({"step": 25, "val_loss": 0.7, "val_exact_match": 0.9, "attempt": 1, "step_metrics": [{"loss": 0.2}]})
    assert curve[-1]["attempt"] == 1 and "attempt" not in curve[0]
    attempts = [{"seed": 3, "val_exact_match": 0.6}, {"seed": 4, "val_exact_match": 0.9}]
    line = curve_summary("kaizen", {"curve": curve, "kept_step": 25, "attempts": attempts, "kept_attempt": 1})
    assert "2 attempts (seeds 3: val exact 0.60, 4: val exact 0.90), attempt 2's; kept step 25" in line


def test_a_run_records_the_machine_that_computed_it() -> None:
    import torch

    m = machine()
    assert m["cpu"] and m["cores"] >= 1 and m["torch"] == torch.__version__
    assert m["torch_threads"] == torch.get_num_threads()
    json.dumps(m)  # it goes into the results file
