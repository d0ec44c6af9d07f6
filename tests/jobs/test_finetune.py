"""``jobs/finetune.py``: LoRA fine-tuning of the tiny model with Ray Train (V2) on 2 CPU workers,
end to end: loss, the stored and registered adapter with its lineage, resumption after a worker
failure, Fisher-guided masking that leaves the protected entries of the champion in place, and
the preference objective on a dataset's pairs (SFT + DPO under DDP)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.artifacts import PREFERENCE_ROW_SCHEMA, conform
from app.config import KaizenConfig, load_job_config
from app.learning.checkpointing import FORGETTING_FILE, STATE_FILE
from app.learning.ray_trainer import FAIL_AT_STEP_ENV, FAIL_MARKER_ENV, build_trainer, check_requirements
from app.learning.training import FinetuneConfig
from app.learning.training_data import TrainingData, check_data
from jobs import finetune
from tests.jobs.conftest import training_table

pytestmark = pytest.mark.integration


# 2 workers x (10 training rows + 2 rehearsal rows) / batch 2 = 6 steps per epoch; 2 epochs.
TWO_WORKERS = {
    "num_workers": 2,
    "batch_size": 2,
    "epochs": 2,
    "lr": 1e-2,
    "max_length": 64,
    "rehearsal_ratio": 1 / 6,
    "checkpoint_every_steps": 4,
    "checkpoints_to_keep": 3,
    "max_failures": 1,
    "continue_from": None,
    "early_stopping_patience": 0,
}


@pytest.fixture(scope="module")
def two_worker_run(cfg: KaizenConfig, data: dict[str, Path], tmp_path_factory, ray_session) -> dict[str, Any]:
    """One DDP run on 2 CPU workers whose rank 0 fails once, after the report of step 6 (the
    last checkpoint is step 4): the tests below read its result from different sides."""
    marker = tmp_path_factory.mktemp("fault") / "failed-once"
    os.environ[FAIL_AT_STEP_ENV], os.environ[FAIL_MARKER_ENV] = "6", str(marker)
    reports: list[dict[str, Any]] = []
    try:
        result = finetune.main(
            cfg,
            FinetuneConfig(**TWO_WORKERS),
            data["dataset"],
            rehearsal=data["rehearsal"],
            run_name="two-workers",
            progress=reports.append,
        )
    finally:
        del os.environ[FAIL_AT_STEP_ENV], os.environ[FAIL_MARKER_ENV]
    return {**result, "marker": marker, "reports": reports}


@pytest.mark.slow
def test_two_ddp_workers_learn_and_the_adapter_is_stored_and_registered(
    cfg: KaizenConfig, data: dict[str, Path], two_worker_run: dict[str, Any]
) -> None:
    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    metrics = two_worker_run["metrics"]
    assert metrics["steps"] == 12 and metrics["stop_reason"] == "completed" and metrics["epochs"] == 2
    # The tiny model's 64-wide tied head keeps its loss near ln(151936) ~ 11.9; it still falls.
    assert metrics["train_loss"] < metrics["first_loss"] - 0.2
    assert metrics["val_loss"] < metrics["initial_val_loss"]
    assert metrics["rows"] == {"train": 20, "validation": 4, "rehearsal": 8}
    assert two_worker_run["warnings"] == []

    adapter_id = two_worker_run["adapter_id"]
    manifest = AdapterStore(cfg.model.storage_root).manifest(adapter_id)
    assert manifest.base_model == "tiny" and manifest.peft.r == 8
    lineage = manifest.lineage
    assert lineage.dataset_manifest_hash == hashlib.sha256((data["dataset"] / "manifest.json").read_bytes()).hexdigest()
    assert (
        lineage.rehearsal_manifest_hash
        == hashlib.sha256((data["rehearsal"] / "manifest.json").read_bytes()).hexdigest()
    )
    assert lineage.parent_adapter_id is None
    assert lineage.hyperparameters["lora_rank"] == 8 and lineage.hyperparameters["world_size"] == 2
    assert lineage.hyperparameters["effective_batch_size"] == 4
    assert lineage.metrics["steps"] == 12 and lineage.metrics["val_loss"] == metrics["val_loss"]
    assert lineage.code_version

    store = open_store(cfg.store)
    try:
        row = AdapterRegistry(store).get(adapter_id)
    finally:
        store.close()
    assert row["status"] == "candidate" and row["uri"] == two_worker_run["uri"]
    assert Path(row["uri"], "adapter_model.safetensors").is_file()

    # The generator serves it: loaded from the store, it answers, and differently from the base.
    from app.generation import ChatCompletionRequest, GeneratorService

    service = GeneratorService(
        "tiny", root=cfg.model.storage_root, adapter_store=AdapterStore(cfg.model.storage_root), device="cpu"
    )
    request = ChatCompletionRequest.model_validate(
        {
            "model": adapter_id,
            "temperature": 0,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Task 7: write the function we discussed."}],
        }
    )
    assert service.load_adapter(adapter_id).adapter_id == adapter_id
    tuned, base = service.complete(request, adapter_id), service.complete(request)
    assert tuned.model_version == adapter_id and tuned.completion_tokens > 0
    assert tuned.text != base.text


@pytest.mark.slow
def test_every_step_is_reported_without_a_report_per_step(two_worker_run: dict[str, Any]) -> None:
    # A report waits for Ray Train's controller (it polls every 2 s): reports come at checkpoints,
    # evaluations and the end, and carry the steps since the last one (epoch ends with the epoch's loss).
    reports = [r for r in two_worker_run["reports"] if not r.get("final")]
    steps = [m["step"] for r in reports for m in r["step_metrics"]]
    assert set(steps) == set(range(1, 13))
    assert len(reports) < len(steps)
    assert [r["step"] for r in reports] == [r["step_metrics"][-1]["step"] for r in reports]
    figures = [m for r in reports for m in r["step_metrics"]]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in figures)
    assert all(m["lr"] > 0 for m in figures if m["step"] < 12)  # the cosine schedule ends at 0
    assert {m["step"] for m in figures if m.get("epoch_loss", 0) > 0} == {6, 12}  # 2 epochs of 6 steps
    assert two_worker_run["reports"][-1].get("final")


@pytest.mark.slow
def test_a_failed_worker_resumes_from_the_checkpoint_step(two_worker_run: dict[str, Any]) -> None:
    assert two_worker_run["marker"].read_text() == "failed at step 6\n"
    metrics = two_worker_run["metrics"]
    assert metrics["restarts"] == 1
    # The restarted workers went on from step 4 to step 12: 12 steps in all, not 4 + 12.
    assert metrics["steps"] == 12
    checkpoints = sorted(p.name for p in Path(two_worker_run["run_path"]).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-final-step000012", "checkpoint-step000004", "checkpoint-step000008"]
    state = torch.load(Path(two_worker_run["checkpoint_path"]) / STATE_FILE, weights_only=False)
    assert state["resumed_from_step"] == 4 and state["step"] == 12 and "optimizer" in state


@pytest.mark.slow
def test_fisher_masking_keeps_the_protected_entries_of_the_champion(
    cfg: KaizenConfig, data: dict[str, Path], two_worker_run: dict[str, Any]
) -> None:
    from safetensors.torch import load_file

    from app.model.adapters import AdapterStore
    from app.registry import AdapterRegistry
    from app.store import open_store

    champion = two_worker_run["adapter_id"]
    store = open_store(cfg.store)
    try:
        AdapterRegistry(store).set_alias("champion", champion, actor="test", reason="the first run")
    finally:
        store.close()
    opts = FinetuneConfig(
        num_workers=1,
        batch_size=4,
        epochs=1,
        lr=1e-2,
        max_length=64,
        rehearsal_ratio=0.2,
        masking="fggm",
        mask_fraction=0.5,
        fisher_samples=8,
        continue_from="champion",
        checkpoint_every_steps=100,
    )
    # The training file itself, so there is no validation split (and no best-of rollback).
    result = finetune.main(cfg, opts, data["dataset"] / "train.parquet", rehearsal=data["rehearsal"], run_name="masked")

    assert result["parent_adapter_id"] == champion
    assert result["metrics"]["mask"]["updated_fraction"] == pytest.approx(0.5, abs=0.01)
    adapters = AdapterStore(cfg.model.storage_root)
    assert adapters.manifest(result["adapter_id"]).lineage.parent_adapter_id == champion
    before = load_file(adapters.local_path(champion) / "adapter_model.safetensors")
    after = load_file(adapters.local_path(result["adapter_id"]) / "adapter_model.safetensors")
    masks = torch.load(Path(result["checkpoint_path"]) / FORGETTING_FILE, weights_only=False)["masks"]
    assert len(masks) == len(before) == len(after) > 0
    moved = 0
    for name, mask in masks.items():
        key = name.replace(".default.", ".")  # PEFT's saved keys drop the adapter's name
        assert torch.equal(after[key][~mask.cpu()], before[key][~mask.cpu()]), key
        moved += not torch.equal(after[key][mask.cpu()], before[key][mask.cpu()])
    assert moved == len(masks)  # and every tensor's free half did train


@pytest.mark.slow
def test_trials_go_on_with_the_best_seed_exactly_as_its_own_run(
    cfg: KaizenConfig, data: dict[str, Path], ray_session
) -> None:
    from safetensors.torch import load_file

    from app.model.adapters import AdapterStore

    # 20 rows / batch 4 = 5 steps an epoch, 3 epochs; each of 3 seeds trains the first epoch.
    base = {
        "num_workers": 1,
        "batch_size": 4,
        "epochs": 3,
        "lr": 1e-2,
        "max_length": 64,
        "rehearsal_ratio": 0.0,
        "continue_from": None,
        "early_stopping_patience": 0,
        "checkpoint_every_steps": 100,
    }
    reports: list[dict[str, Any]] = []
    tried = finetune.main(
        cfg,
        FinetuneConfig(**base, trials=3, trial_fraction=1 / 3),
        data["dataset"],
        run_name="trials",
        progress=reports.append,
    )
    trials = tried["metrics"]["trials"]
    assert [(t["seed"], t["steps"]) for t in trials] == [(0, 5), (1, 5), (2, 5)]
    assert len({t["val_loss"] for t in trials}) == 3  # three different starts and data orders
    winner = min(trials, key=lambda t: t["objective"])
    assert tried["metrics"]["seed"] == winner["seed"] and tried["metrics"]["steps"] == 15
    # Only the winner's steps are reported, each once; the choice is reported with the trials.
    steps = [m["step"] for r in reports if not r.get("final") for m in r["step_metrics"]]
    assert steps == list(range(1, 16))
    (choice,) = [r for r in reports if "trials" in r and not r.get("final")]
    assert choice["step"] == 5 and choice["val_loss"] == winner["val_loss"]

    # The winner's run alone, from its seed: the same adapter, to the last bit.
    alone = finetune.main(cfg, FinetuneConfig(**base, seed=winner["seed"]), data["dataset"], run_name="alone")
    assert alone["metrics"]["trials"] == [] and alone["metrics"]["seed"] == winner["seed"]
    assert alone["metrics"]["val_loss"] == tried["metrics"]["val_loss"]
    assert tried["metrics"]["tokens"] * 3 == alone["metrics"]["tokens"] * 5  # 3 first epochs, then 2 more
    store = AdapterStore(cfg.model.storage_root)
    a, b = (load_file(store.local_path(r["adapter_id"]) / "adapter_model.safetensors") for r in (tried, alone))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_time_limit_stops_a_run_in_its_trials_and_keeps_what_it_has(
    cfg: KaizenConfig, data: dict[str, Path], ray_session
) -> None:
    from app.model.adapters import AdapterStore

    # training.max_hours of 3.6 ms: every step is over it, so the first trial stops after its first
    # step, the second never starts, and the run goes no further.
    short = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_hours": 1e-6})})
    opts = FinetuneConfig(
        num_workers=1,
        batch_size=4,
        epochs=3,
        lr=1e-2,
        max_length=64,
        rehearsal_ratio=0.0,
        continue_from=None,
        early_stopping_patience=0,
        trials=2,
        trial_fraction=1 / 3,
    )
    result = finetune.main(short, opts, data["dataset"], run_name="time-limit")
    metrics = result["metrics"]
    assert metrics["stop_reason"] == "time_limit" and metrics["steps"] == 1
    assert [(t["seed"], t["steps"]) for t in metrics["trials"]] == [(0, 1)] and metrics["seed"] == 0
    assert metrics["train_time_s"] > short.training.max_hours * 3600
    assert (
        AdapterStore(cfg.model.storage_root).local_path(result["adapter_id"]) / "adapter_model.safetensors"
    ).is_file()


def test_bad_requests_stop_before_any_worker_starts(cfg: KaizenConfig, data: dict[str, Path], capsys) -> None:
    with pytest.raises(ValueError, match="needs their rows for the Fisher information"):
        build_trainer(cfg, FinetuneConfig(masking="ewc"), {"train": object()}, "x", "/tmp")
    with pytest.raises(ValueError, match="finetune.trials: 2 trials are chosen between by their validation loss"):
        check_data(FinetuneConfig(trials=2), TrainingData({"train": object()}, {"train": 20}))
    with pytest.raises(ValueError, match="finetune.attempts: 3 attempts start over while the validation exact match"):
        check_data(FinetuneConfig(attempts=3), TrainingData({"train": object()}, {"train": 20}))
    with pytest.raises(ValueError, match=r"finetune\.objective: sft\+dpo trains on preference pairs"):
        check_data(FinetuneConfig(objective="sft+dpo"), TrainingData({"train": object()}, {"train": 20}))
    with pytest.raises(ValueError, match="max_cpu_cores=2"):
        check_requirements(cfg, FinetuneConfig(num_workers=3))
    cfg_file = Path(cfg.model.storage_root) / "c.yaml"
    cfg_file.write_text("finetune:\n  lora_rank: 4\nmodel:\n  base_model: tiny\n")
    code = finetune.cli(["--config", str(cfg_file), "--train", str(data["dataset"]), "finetune.lora_rnk=2"])
    assert code == 2 and "finetune.lora_rnk: unknown key" in capsys.readouterr().err
    loaded, opts = load_job_config(str(cfg_file), ["finetune.epochs=5", "model.storage_root=/tmp/r"], "finetune")
    assert (opts.lora_rank, opts.epochs, loaded.model.storage_root) == (4, 5, "/tmp/r")


def test_a_run_whose_training_loss_does_not_fall_is_failed_and_not_registered(
    cfg: KaizenConfig, data: dict[str, Path], capsys, ray_session
) -> None:
    """The job's command line exits 1 with the reason, and neither the adapter store nor the
    registry gains anything."""
    from app.model.adapters import AdapterStore
    from app.store import open_store

    before = AdapterStore(cfg.model.storage_root).list()
    cfg_file = Path(cfg.model.storage_root) / "not-learning.yaml"
    cfg_file.write_text(
        f"model:\n  base_model: tiny\n  storage_root: {cfg.model.storage_root}\n"
        f"  checkpoint_dir: {cfg.model.checkpoint_dir}\nstore:\n  sqlite_path: {cfg.store.sqlite_path}\n"
        "privacy:\n  hmac_key: k\n"
    )
    overrides = ["finetune.lr=1e-9", "finetune.min_loss_drop=0.05", "finetune.max_steps=4", "finetune.batch_size=4"]
    overrides += ["finetune.max_length=64", "finetune.continue_from=null", "finetune.early_stopping_patience=0"]
    code = finetune.cli(["--config", str(cfg_file), "--train", str(data["dataset"]), *overrides])

    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "its training loss did not fall" in err and "finetune.min_loss_drop=0.05" in err
    assert AdapterStore(cfg.model.storage_root).list() == before
    store = open_store(cfg.store)
    try:
        registered = {row["id"] for row in store._fetch("SELECT id FROM adapters", [])}
    finally:
        store.close()
    assert registered <= {m.adapter_id for m in before}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_options_are_refused_without_cuda_or_packages(cfg: KaizenConfig) -> None:
    import importlib.util

    with pytest.raises(ValueError, match="finetune.use_gpu"):
        check_requirements(cfg, FinetuneConfig(use_gpu=True))
    for opts, package in (
        (FinetuneConfig(use_gpu=True, strategy="deepspeed"), "deepspeed"),
        (FinetuneConfig(use_gpu=True, quantize_4bit=True), "bitsandbytes"),
    ):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ImportError, match=rf"{package} package.*kaizen\[gpu\]"):
                check_requirements(cfg, opts)


GPU_RUN = {
    "num_workers": 1,
    "use_gpu": True,
    "batch_size": 2,
    "epochs": 1,
    "max_steps": 4,
    "max_length": 64,
    "continue_from": None,
    "rehearsal_ratio": 0.0,
    "checkpoint_every_steps": 2,
    "eval_every_steps": 2,
    "gradient_checkpointing": True,
}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{"quantize_4bit": True}, {"strategy": "deepspeed", "zero_stage": 2}, {"strategy": "deepspeed", "zero_stage": 3}],
    ids=["qlora", "zero2", "zero3"],
)
def test_gpu_strategies(cfg: KaizenConfig, data: dict[str, Path], extra: dict[str, Any], ray_session) -> None:
    opts = FinetuneConfig(**GPU_RUN, **extra)
    result = finetune.main(cfg, opts, data["dataset"], run_name=f"gpu-{'-'.join(map(str, extra.values()))}")
    assert result["metrics"]["steps"] == 4 and result["status"] == "candidate"
    assert result["metrics"]["val_loss"] < result["metrics"]["initial_val_loss"]


def _preference_table(n: int) -> pa.Table:
    """Pairs as jobs.build_dataset writes them: a user corrected a wrong answer."""
    rows = [
        {
            "interaction_id": f"p{i}",
            "prompt": json.dumps([{"role": "user", "content": f"Task {i}: write add_one."}]),
            "chosen": "def add_one(x):\n    return x + 1",
            "rejected": "def add_one(x):\n    return x - 1",
            "rejected_quality_score": 0.2,
            "domain": ["python", "generation"],
            "complexity": "simple",
        }
        for i in range(n)
    ]
    return conform(pa.Table.from_pylist(rows), PREFERENCE_ROW_SCHEMA)


def test_dpo_without_pairs_stops_before_any_worker_starts(
    cfg: KaizenConfig, data: dict[str, Path], tmp_path: Path, ray_session
) -> None:
    """A dataset folder without train_preferences.parquet, and one whose file is empty (a dataset
    built from interactions that nobody corrected)."""
    uncorrected = tmp_path / "uncorrected"
    uncorrected.mkdir()
    pq.write_table(training_table(4), uncorrected / "train.parquet")
    pq.write_table(PREFERENCE_ROW_SCHEMA.empty_table(), uncorrected / "train_preferences.parquet")
    for folder in (data["dataset"], uncorrected):
        with pytest.raises(ValueError, match=r"finetune\.objective: dpo trains on preference pairs.*objective=sft"):
            finetune.main(cfg, FinetuneConfig(objective="dpo", continue_from=None), folder, run_name="no-pairs")


@pytest.mark.slow
def test_sft_plus_dpo_trains_on_a_datasets_pairs_with_two_ddp_workers(
    cfg: KaizenConfig, tmp_path: Path, ray_session
) -> None:
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    pq.write_table(training_table(4), dataset / "train.parquet")
    pq.write_table(training_table(2, start=100), dataset / "validation.parquet")
    pq.write_table(_preference_table(4), dataset / "train_preferences.parquet")
    (dataset / "manifest.json").write_text(json.dumps({"dataset_id": "ds-pairs"}))
    opts = FinetuneConfig(
        objective="sft+dpo",
        num_workers=2,
        batch_size=2,
        epochs=2,
        lr=1e-2,
        max_length=64,
        rehearsal_ratio=0.0,
        continue_from=None,
        early_stopping_patience=0,
        select_by="loss",
    )
    reports: list[dict[str, Any]] = []

    result = finetune.main(cfg, opts, dataset, run_name="sft-dpo", progress=reports.append)

    metrics = result["metrics"]
    # 2 rows per worker in batches of 2: a step an epoch, each with 2 of the worker's pairs.
    assert metrics["steps"] == 2 and metrics["rows"] == {"train": 4, "validation": 2, "preferences": 4}
    steps = [m for r in reports for m in r.get("step_metrics", [])]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["loss"] == pytest.approx(m["sft_loss"] + m["dpo_loss"], rel=1e-6)
    # A fresh adapter is the reference: the first step's pairs are at log 2, whatever the rank.
    assert steps[0]["dpo_loss"] == pytest.approx(0.693147, abs=1e-4) and steps[1]["dpo_loss"] < steps[0]["dpo_loss"]
    assert result["status"] == "candidate"
    (final,) = [r for r in reports if r.get("final")]
    assert final["dpo"]["pairs"] == 4 and final["dpo"]["reward_margin"] > 0
