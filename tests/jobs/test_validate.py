"""``jobs/validate.py`` end to end on the tiny model, Ray on 2 CPUs and SQLite: a first candidate
against the base model goes to production; made champion, it is the baseline of a second
candidate that forgot its domain and answers harmful requests, which is rejected. Bad inputs exit
with 1 or 2 and a message naming what is wrong."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from app.config import load_config
from app.deployment.state import DeploymentStore
from app.model.adapters import AdapterStore
from app.registry import AdapterRegistry
from app.store import open_store
from jobs import validate
from tests.conftest import train_answer_adapter

REFUSAL = "Sorry, I can't help with that."
OTHER = "It returns None."
# Small and quick: two rows of each set, short answers, two concurrencies.
VALIDATION = {"max_examples": 2, "max_new_tokens": 12, "concurrency": [1, 2]}


def _table(prompts: list[str], answer: str) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "interaction_id": f"{answer[:4]}-{i}",
                "messages": json.dumps([{"role": "user", "content": p}, {"role": "assistant", "content": answer}]),
            }
            for i, p in enumerate(prompts)
        ]
    )


def _dataset(root: Path, name: str, prompts: list[str], answer: str) -> Path:
    folder = root / "datasets" / name
    folder.mkdir(parents=True)
    pq.write_table(_table(prompts[:2], answer), folder / "train.parquet")
    pq.write_table(_table(prompts[2:], answer), folder / "validation.parquet")
    (folder / "manifest.json").write_text(json.dumps({"dataset_id": name}))
    return folder


def _config(root: Path, db: Path) -> Path:
    path = root / f"{db.stem}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": {"sqlite_path": str(db)},
                "privacy": {"hmac_key": "k"},
                "model": {"base_model": "tiny", "storage_root": str(root), "checkpoint_dir": str(root / "checkpoints")},
                "serve": {"generator": {"num_cpus": 1}},
                "validation": VALIDATION,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> dict[str, Any]:
    """A storage root sharing the session's tiny model, two datasets, and two registered
    candidates: ``adp-a`` answers REFUSAL to anything (trained on ds-a), ``adp-b`` OTHER (ds-b)."""
    root = tmp_path_factory.mktemp("validate")
    (root / "models").symlink_to(model_root / "models", target_is_directory=True)
    prompts_a = [f"Task {i}: write the helper we discussed." for i in range(4)]
    prompts_b = [f"Question {i}: what does this function return?" for i in range(4)]
    ds_a, ds_b = _dataset(root, "ds-a", prompts_a, REFUSAL), _dataset(root, "ds-b", prompts_b, OTHER)
    scratch, adapters = AdapterStore(root / "scratch"), AdapterStore(root)
    db = open_store(load_config(_config(root, root / "kaizen.db")).store)
    try:
        for adapter_id, answer, dataset, prompts in (
            ("adp-a", REFUSAL, ds_a, prompts_a),
            ("adp-b", OTHER, ds_b, prompts_b),
        ):
            train_answer_adapter(model_root, scratch, adapter_id, answer, prompts)
            manifest = adapters.save(
                scratch.local_path(adapter_id),
                base_model="tiny",
                adapter_id=adapter_id,
                lineage={"dataset_uri": str(dataset)},
            )
            AdapterRegistry(db).register(manifest, adapters.uri(adapter_id), actor="test")
    finally:
        db.close()
    return {"root": root, "config": root / "kaizen.yaml", "ds_a": ds_a}


def _validate(capsys: pytest.CaptureFixture, *argv: str) -> dict[str, Any]:
    code = validate.cli(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return json.loads(out.out[out.out.index("{") :])


@pytest.mark.integration
@pytest.mark.slow
def test_a_good_candidate_goes_to_production_and_a_forgetful_one_is_rejected(
    world: dict[str, Any], capsys: pytest.CaptureFixture, ray_session: None
) -> None:
    config = str(world["config"])
    cfg = load_config(config)

    # 1. adp-a against the base model, which writes blank lines: more accurate, as safe. The tiny
    # model's timings are noise at this size, so latency and memory get room to spare.
    first = _validate(
        capsys,
        "--config",
        config,
        "adapter=adp-a",
        "validation.max_latency_increase=10",
        "validation.max_memory_increase=10",
    )
    assert first["adapter_id"] == "adp-a" and first["baseline"] == "base:tiny"
    assert first["verdict"] == "production", first
    assert first["criteria"] == dict.fromkeys(
        ["accuracy", "latency", "memory", "planted_secrets", "privacy_leaks", "insecure_code", "harmful_requests"], True
    )
    report = json.loads((Path(first["report_uri"]) / "report.json").read_text())
    assert report["performance"]["accuracy"] == {"candidate": 1.0, "baseline": 0.0}
    assert report["performance"]["methods"] == {"exact": 2}
    assert [t["concurrency"] for t in report["performance"]["throughput"]] == [1, 2]
    assert report["performance"]["candidate_memory"]["adapter_bytes"] > 0
    assert report["performance"]["baseline_memory"]["adapter_bytes"] == 0
    assert report["safety"]["harmful"]["answered"] == {"candidate": 0.0, "baseline": 0.0}
    assert [s["role"] for s in report["sets"]] == ["own", "risky", "harmful", "injection"]
    assert report["forgetting"]["domains"] == []
    page = (Path(first["report_uri"]) / "report.md").read_text()
    assert page.startswith(f"# Validation {Path(first['report_uri']).name}: production")

    db = open_store(cfg.store)
    try:
        deployments, registry = DeploymentStore(db), AdapterRegistry(db)
        row = deployments.latest_validation("adp-a")
        assert row["id"] == first["validation_id"] and row["verdict"] == "production"
        assert row["baseline"] == "base:tiny" and row["report_uri"] == first["report_uri"]
        assert row["summary"]["criteria"]["accuracy"] == {"passed": True, "measured": 1.0, "threshold": -0.02}
        (audit,) = deployments.audit("adp-a")
        assert audit["action"] == "validation.verdict" and audit["details"]["verdict"] == "production"
        assert registry.get("adp-a")["status"] == "validated"
        # What the deployer would do with a production verdict.
        registry.set_alias("champion", "adp-a", actor="test", reason="promoted")
        registry.set_status("adp-a", "champion", actor="test", reason="promoted")
    finally:
        db.close()

    # 2. The newest candidate, adp-b, against the champion: it answers its own questions, but on
    # the champion's domain it forgot everything, and it answers harmful requests.
    second = _validate(capsys, "--config", config)
    assert second["adapter_id"] == "adp-b" and second["baseline"] == "adp-a"
    assert second["verdict"] == "rejected"
    assert second["criteria"]["forgetting:ds-a"] is False and second["criteria"]["harmful_requests"] is False
    assert second["criteria"]["accuracy"] is True
    report = json.loads((Path(second["report_uri"]) / "report.json").read_text())
    (domain,) = report["forgetting"]["domains"]
    assert domain["name"] == "ds-a" and domain["source"] == str(world["ds_a"] / "validation.parquet")
    assert domain["before"] == 1.0 and domain["rate"] > 0.3
    assert report["safety"]["harmful"]["answered"] == {"candidate": 2.0, "baseline": 0.0}
    assert "| forgetting:ds-a |" in (Path(second["report_uri"]) / "report.md").read_text()

    db = open_store(cfg.store)
    try:
        assert AdapterRegistry(db).get("adp-b")["status"] == "rejected"
        assert DeploymentStore(db).latest_validation("adp-b")["verdict"] == "rejected"
    finally:
        db.close()


def test_bad_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(_config(tmp_path, tmp_path / "kaizen.db"))
    assert validate.cli(["--config", config]) == 1
    assert "nothing to validate: no adapter in the registry has status 'candidate'" in capsys.readouterr().err
    assert validate.cli(["--config", config, "adapter=adp-nope"]) == 2
    assert "adapter: 'adp-nope' is not registered" in capsys.readouterr().err
    assert validate.cli(["--config", config, "adapter=adp-a", "adapter=adp-b"]) == 2
    assert "adapter: given 2 times" in capsys.readouterr().err
    assert validate.cli(["--config", config, "validation.concurrency=[]"]) == 2
    assert "validation.concurrency" in capsys.readouterr().err

    # kaizen validate [ADAPTER] [overrides]: the same job behind the operators' command line.
    parser = argparse.ArgumentParser(prog="kaizen validate")
    validate.add_arguments(parser)
    assert validate.run(parser.parse_args(["adp-nope", "--config", config])) == 2
    assert "adapter: 'adp-nope' is not registered" in capsys.readouterr().err
    assert validate.run(parser.parse_args(["validation.max_examples=0", "--config", config])) == 2
    assert "validation.max_examples" in capsys.readouterr().err
    assert validate.run(parser.parse_args(["--config", config, "--validation", str(tmp_path)])) == 1
