from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.config import (
    ConfigError,
    KaizenConfig,
    apply_overrides,
    load_config,
    validate_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, KaizenConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must open with the command that uses it"


def test_defaults_are_the_embedded_default() -> None:
    cfg = load_config()
    assert cfg.store.engine == "sqlite" and cfg.store.sqlite_path == "data/kaizen.db"
    assert cfg.model.base_model == "tiny"
    assert cfg.quality.threshold == 0.70


@pytest.mark.parametrize(
    "override, key",
    [
        ("collection.capture_rate=1.5", "collection.capture_rate"),
        ("collection.capture_rate=-0.1", "collection.capture_rate"),
        ("collection.retention_days=0", "collection.retention_days"),
        ("quality.threshold=1.2", "quality.threshold"),
        ("model.base_model=''", "model.base_model"),
        ("model.checkpoint_dir=''", "model.checkpoint_dir"),
        ("model.deployment_strategy=yolo", "model.deployment_strategy"),
        ("store.engine=mysql", "store.engine"),
        ("collection.exclude_patterns=['(unclosed']", "collection.exclude_patterns.0"),
        ("serve.port=notaport", "serve.port"),
        ("training.window=25:00-06:00", "training.window"),
        ("training.window=10:00-10:00", "training.window"),
        ("training.quality_window=5", "training.quality_window"),
        ("training.backoff_minutes=0", "training.backoff_minutes"),
    ],
)
def test_seed_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert any(e.startswith(key + ":") for e in err.value.errors), err.value.errors


@pytest.mark.parametrize(
    "data, key",
    [
        ({"quality": {"assessment_timeout_ms": 50}}, "quality.assessment_timeout_ms"),
        ({"training": {"min_interactions": 5}}, "training.min_interactions"),
        ({"training": {"resource_limits": {"max_vram_gb": 4}}}, "training.resource_limits.max_vram_gb"),
    ],
)
def test_seed_warnings_do_not_invalidate(data: dict, key: str) -> None:
    report = validate_config(data)
    assert report.valid
    assert any(w.startswith(key + ":") for w in report.warnings)


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    report = validate_config({"collection": {"captur_rate": 0.5}, "bogus": 1})
    assert any(e.startswith("collection.captur_rate: unknown key") and "capture_rate" in e for e in report.errors), (
        report.errors
    )
    assert any(e.startswith("bogus: unknown key") for e in report.errors)


def test_dotted_overrides_parse_yaml_values() -> None:
    cfg = load_config(
        overrides=[
            "collection.capture_rate=0.25",
            "collection.exclude_patterns=['secret-project']",
            "serve.collector.autoscaling.max_replicas=4",
            "privacy.hmac_key=abc",
        ]
    )
    assert cfg.collection.capture_rate == 0.25
    assert cfg.collection.exclude_patterns == ["secret-project"]
    assert cfg.serve.collector.autoscaling.max_replicas == 4
    assert cfg.hmac_key() == b"abc"
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="collection.capture_rate: is not a section"):
        apply_overrides({"collection": {"capture_rate": 1}}, ["collection.capture_rate.x=1"])


def test_bad_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("collection: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_hmac_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_HMAC_KEY", "from-env")
    assert load_config().hmac_key() == b"from-env"
    assert not any("hmac_key" in w for w in validate_config({}).warnings)


def test_job_sections_are_validated_by_their_jobs_options() -> None:
    from app.config import job_options
    from app.learning.training import FinetuneConfig

    report = validate_config(
        {
            "finetune": {"lora_rnk": 4, "masking": "l2"},
            "sweep": {"search": {"bogus": [1]}},
            "learn": {"train_with": "magic"},
            "quality": {"nope": 1},
        }
    )
    text = "\n".join(report.errors)
    assert "finetune.lora_rnk: unknown key (allowed:" in text and "finetune.masking:" in text
    assert "sweep.search: bogus: not searchable" in text and "learn.train_with:" in text
    assert "quality.nope: unknown key" in text
    # A model validator's message that starts with a key is named under the section.
    report = validate_config({"finetune": {"strategy": "deepspeed"}})
    assert report.errors == [
        "finetune.strategy: deepspeed needs use_gpu=true (DeepSpeed ZeRO runs on GPUs); use ddp on CPU"
    ]
    cfg = load_config(None, ["finetune.lora_rank=4", "sweep.num_samples=2"])
    opts = job_options(cfg, "finetune")
    assert isinstance(opts, FinetuneConfig) and opts.lora_rank == 4 and job_options(cfg, "sweep").num_samples == 2


def test_every_key_is_listed_with_a_description() -> None:
    from app.config_keys import config_keys

    keys = config_keys(load_config(overrides=["finetune.lora_rank=4"]))
    names = [k.key for k in keys]
    assert len(names) == len(set(names)) and all(k.description for k in keys)
    assert {"collection.capture_rate", "serve.scorer.autoscaling.max_replicas", "finetune.lora_rank"} <= set(names)
    by_name = {k.key: k for k in keys}
    assert by_name["finetune.lora_rank"].value == 4 and by_name["finetune.lora_rank"].default != 4
    # A nested default comes from its parent: the scorer's autoscaling, not AutoscalingConfig's own.
    assert by_name["serve.scorer.autoscaling.target_ongoing_requests"].default == 8
    # Adapters go to model.storage_root; checkpoint_dir holds training runs, sweeps and cycle records.
    assert "Adapters are kept under storage_root, not here" in by_name["model.checkpoint_dir"].description
