"""``kaizen learn`` end to end on a small seeded store: a first cycle (no champion: no rehearsal),
then, with its adapter made champion, a second cycle that rehearses the champion's dataset with
SSR, measures forgetting on its validation split and continues the champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from app import cli
from app.model.adapters import AdapterStore
from app.quality.service import QualityService
from app.registry import AdapterRegistry
from app.store.sqlite import SQLiteStore
from jobs import learn
from tests.conftest import ingest_samples

pytestmark = pytest.mark.integration

# Small and quick: a tiny dataset, little generation, a few optimizer steps.
SECTIONS = {
    "dataset": {"min_examples": 8, "keep_fraction": 1.0, "validation_fraction": 0.25, "max_group_share": 1.0},
    "learn": {"min_train_rows": 8, "max_group_share": 1.0},
    "ssr": {
        "prompts_per_domain": 3,
        "samples_per_prompt": 2,
        "max_input_tokens": 24,
        "max_output_tokens": 24,
        "min_input_chars": 1,
        "check_code": False,
        "drop_truncated_outputs": False,
        "rehearsal_instances_per_domain": 3,
        "num_gpus": 0,
    },
    "finetune": {
        "batch_size": 4,
        "epochs": 1,
        "max_steps": 3,
        "max_length": 96,
        "eval_every_steps": 3,
        "checkpoint_every_steps": 100,
        "early_stopping_patience": 0,
    },
}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Path:
    root = tmp_path_factory.mktemp("learn")
    (root / "models").symlink_to(model_root / "models", target_is_directory=True)
    db = root / "kaizen.db"
    store = SQLiteStore(db)
    store.migrate()
    ingest_samples(store, 40)
    QualityService(store).score_pending()
    store.close()
    path = root / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": {"sqlite_path": str(db)},
                "privacy": {"hmac_key": "k"},
                "quality": {"threshold": 0.3},
                "model": {"base_model": "tiny", "storage_root": str(root), "checkpoint_dir": str(root / "checkpoints")},
                **SECTIONS,
            }
        )
    )
    return path


def _learn(config_file: Path, capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, dict, str]:
    code = cli.main(["learn", "--config", str(config_file), "--json", *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    text = out.out
    return code, json.loads(text[text.index("\n{") + 1 :]), text


def test_two_cycles_from_the_store_to_a_candidate(config_file: Path, capsys, ray_session) -> None:
    from app.config import load_config
    from app.store import open_store

    cfg = load_config(config_file)
    _, first, text = _learn(config_file, capsys, "validation.max_examples=4", "validation.max_new_tokens=8")
    assert "[1/6] dataset" in text and "[5/6] candidate" in text and "[6/6] validation" in text
    assert "[2/6] dataset checks" in text and "passed: " in text
    assert {c["name"] for c in first["checks"] if c["passed"]} == {"size", "duplicates", "balance", "redactions"}
    assert "nothing to rehearse: no champion adapter yet" in text
    assert "step 3 (epoch" in text  # the training's own progress, forwarded from Ray Train
    assert first["rehearsal"] is None and first["earlier"] is None
    adapter = first["adapter"]
    assert adapter["status"] == "candidate" and adapter["parent_adapter_id"] is None
    # The cycle ends with the validation job: a verdict against the base model, and the status follows it.
    verdict = first["validation"]
    assert verdict["verdict"] in ("production", "staging", "rejected") and verdict["baseline"] == "base:tiny"
    store = open_store(cfg.store)
    try:
        status = AdapterRegistry(store).get(adapter["adapter_id"])["status"]
    finally:
        store.close()
    assert status == ("rejected" if verdict["verdict"] == "rejected" else "validated")
    assert Path(first["record"]).is_file() and set(first["stages"]) == {
        "dataset",
        "dataset checks",
        "rehearsal",
        "training (finetune)",
        "candidate",
        "validation",
    }
    lineage = AdapterStore(cfg.model.storage_root).manifest(adapter["adapter_id"]).lineage
    assert lineage.dataset_uri == first["dataset"]["uri"]

    store = open_store(cfg.store)
    try:
        AdapterRegistry(store).set_alias("champion", adapter["adapter_id"], actor="test", reason="first cycle")
    finally:
        store.close()

    # The second cycle builds a new dataset; the champion's is the earlier domain.
    _, second, text = _learn(config_file, capsys, "finetune.continue_from=champion", "learn.validate_candidate=false")
    assert second["validation"] is None and "learn.validate_candidate is false" in text
    assert second["earlier"] == first["dataset"]["uri"]
    # SSR ran on the earlier dataset with the champion writing the outputs; whether the tiny
    # random model's answers survive the filters is up to it, and the cycle says which happened.
    ssr = json.loads((Path(second["ssr"]["uri"]) / "manifest.json").read_text())
    assert ssr["source"] == first["dataset"]["uri"] and ssr["refined_by"] == adapter["adapter_id"]
    assert ("synthetic rows" in text) == bool(second["rehearsal"]) != ("SSR kept no rows" in text)
    metrics = second["adapter"]["metrics"]
    assert metrics["heldout_loss"] is not None and metrics["forgetting"] is not None and metrics["rows"]["heldout"] >= 1
    assert second["adapter"]["parent_adapter_id"] == adapter["adapter_id"]

    # Real rehearsal: the champion's own training rows are mixed in.
    _, third, text = _learn(
        config_file, capsys, "learn.rehearsal=real", "finetune.continue_from=null", "learn.validate_candidate=false"
    )
    assert third["rehearsal"] == str(Path(first["dataset"]["uri"]) / "train.parquet")
    assert (
        third["adapter"]["metrics"]["rows"]["rehearsal"]
        == first["dataset"]["rows"] - third["adapter"]["metrics"]["rows"]["heldout"]
    )
    lineage = AdapterStore(cfg.model.storage_root).manifest(third["adapter"]["adapter_id"]).lineage
    assert lineage.rehearsal_uri == third["rehearsal"] and lineage.rehearsal_manifest_hash

    # What a later SSR cycle carries over (learn.carry_rehearsal): the champion's own SSR set,
    # never a real-rehearsal file.
    for champion, expected in ((third, None), (second, second["rehearsal"])):
        store = open_store(cfg.store)
        try:
            AdapterRegistry(store).set_alias(
                "champion", champion["adapter"]["adapter_id"], actor="test", reason="carry"
            )
        finally:
            store.close()
        assert learn.champion_rehearsal_set(cfg) == expected


def test_bad_options_and_an_empty_store_are_named(config_file: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["learn", "--config", str(config_file), "learn.train_with=magic", "ssr.bogus=1"])
    err = capsys.readouterr().err
    assert code == 2 and "learn.train_with:" in err and "ssr.bogus: unknown key" in err

    data = yaml.safe_load(config_file.read_text())
    data["store"]["sqlite_path"] = str(tmp_path / "empty.db")
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump(data))
    code = cli.main(["learn", "--config", str(empty)])
    err = capsys.readouterr().err
    assert code == 1 and "not enough data for a cycle" in err


def test_a_scheduled_cycle_keeps_its_stages_and_stops_on_a_failed_dataset_check(
    config_file: Path, capsys, ray_session
) -> None:
    from datetime import UTC, datetime

    from app.config import load_config
    from app.scheduling.state import TrainingRunStore
    from app.store import open_store

    cfg = load_config(config_file)
    store = open_store(cfg.store)
    try:
        runs = TrainingRunStore(store)
        now = datetime.now(UTC)
        run = runs.claim(runs.schedule(now, triggers={"manual": "test"}), now, data_cutoff=now, needs={})
    finally:
        store.close()
    code = cli.main(["learn", "--config", str(config_file), f"learn.run_id={run.id}", "learn.min_train_rows=100000"])
    err = capsys.readouterr().err
    assert code == 1 and "failed its checks: size: " in err and "learn.min_train_rows: at least 100000" in err
    store = open_store(cfg.store)
    try:
        stages = TrainingRunStore(store).get(run.id).metrics["stages"]
        TrainingRunStore(store).finish(TrainingRunStore(store).get(run.id), "failed", datetime.now(UTC), reason="test")
    finally:
        store.close()
    assert stages["dataset"]["status"] == "done" and "rows" in stages["dataset"]["summary"]
    checks = stages["dataset checks"]
    assert checks["status"] == "failed" and {c["name"]: c["passed"] for c in checks["checks"]}["size"] is False
    assert "rehearsal" not in stages  # nothing after the failed check ran
