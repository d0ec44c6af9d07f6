"""``jobs/build_dataset.py`` end to end on real stores: sample interactions scored by the quality
service, the Ray Data chain, and the files it writes (schema, manifest counts, JSONL), on SQLite
through the command line and on PostgreSQL through ``main``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.config import ConfigError, KaizenConfig, load_job_config
from app.learning.dataset import (
    COMPLEXITIES,
    DATASET_SCHEMA,
    TASKS,
    DatasetConfig,
    DatasetManifest,
    InsufficientDataError,
    content_hash,
    decode_features,
    split_fraction,
)
from app.quality.service import QualityService
from app.store.postgres import PostgresStore
from app.store.sqlite import SQLiteStore
from jobs.build_dataset import cli, main
from tests.conftest import ingest_samples

SAMPLES = 60
OPTIONS = ["dataset.min_examples=8", "dataset.keep_fraction=0.8", "dataset.validation_fraction=0.2"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[float, float]]]:
    """A SQLite store with the sample interactions, scored; and the scores by id."""
    db = tmp_path_factory.mktemp("build-dataset") / "k.db"
    store = SQLiteStore(db)
    store.migrate()
    ingest_samples(store, SAMPLES)
    QualityService(store).score_pending()
    rows = store.query_interactions(quality_status="scored", limit=1000)
    store.close()
    return db, {r["id"]: (r["quality_score"], r["quality_confidence"]) for r in rows}


def _config_file(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"store:\n  sqlite_path: {db}\nmodel:\n  storage_root: {tmp_path / 'root'}\nprivacy:\n  hmac_key: k\n"
    )
    return path


@pytest.fixture(scope="module")
def sqlite_build(scored, tmp_path_factory: pytest.TempPathFactory, ray_session) -> DatasetManifest:
    """The dataset built from the SQLite store through the command line."""
    db, _ = scored
    cfg_file = _config_file(tmp_path_factory.mktemp("sqlite-build"), db)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(["--config", str(cfg_file), "--json", "dataset.dataset_id=ds-sqlite", *OPTIONS])
    assert code == 0, err.getvalue()[-2000:]
    text = out.getvalue()
    return DatasetManifest.model_validate_json(text[text.index("{") :])


def _check(manifest: DatasetManifest, scores: dict[str, tuple[float, float]], engine: str, validation: float) -> None:
    folder = Path(manifest.uri)
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "train.jsonl",
        "train.parquet",
        "validation.jsonl",
        "validation.parquet",
    ]
    assert DatasetManifest.model_validate_json((folder / "manifest.json").read_text()) == manifest
    for name, digest in manifest.files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    train, val = pq.read_table(folder / "train.parquet"), pq.read_table(folder / "validation.parquet")
    assert train.schema == DATASET_SCHEMA and val.schema == DATASET_SCHEMA
    assert manifest.content_hash == content_hash(train, val)

    f = manifest.funnel
    assert f.scored == len(scores)
    assert f.above_threshold - f.exact_duplicates - f.near_duplicates - f.over_group_cap - f.not_selected == f.selected
    assert f.selected == f.train + f.validation == manifest.rows >= 8
    assert (f.train, f.validation) == (train.num_rows, val.num_rows) and f.validation >= 1
    assert f.above_threshold < f.scored  # the poor answers are left out

    rows = train.to_pylist() + val.to_pylist()
    ids = [r["interaction_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in val.to_pylist():
        assert split_fraction(row["interaction_id"]) < validation or val.num_rows == 1
    for row in train.to_pylist():
        assert split_fraction(row["interaction_id"]) >= validation
    for row in rows:
        language, task = row["domain"][:2]
        assert row["quality_score"] == scores[row["interaction_id"]][0]
        assert row["quality_score"] >= manifest.query.thresholds[f"{language}/{row['complexity']}"]
        assert task in TASKS and row["complexity"] in COMPLEXITIES and row["learning_type"] == "interaction"
        messages = json.loads(row["messages"])
        assert messages[-2] == {"role": "user", "content": row["instruction"]}
        assert messages[-1] == {"role": "assistant", "content": row["output"]}
        assert json.loads(row["project_context"])["technologies"][0] == "python"
        features = decode_features(row["features"])
        assert features["embedding"].shape == (384,) and abs(np.linalg.norm(features["embedding"]) - 1) < 1e-2

    counts = manifest.counts
    for name in ("domain", "task", "complexity"):
        assert sum(counts[name].values()) == f.selected
    assert counts["domain"] == {"python": f.selected}
    assert counts["split"] == {"train": f.train, "validation": f.validation}
    assert sum(manifest.quality_histogram.counts) == f.selected
    assert manifest.query.engine == engine and manifest.query.threshold == 0.70
    assert manifest.options["keep_fraction"] == 0.8

    lines = (folder / "train.jsonl").read_text().splitlines()
    expected = [{"messages": json.loads(m)} for m in train.column("messages").to_pylist()]
    assert [json.loads(line) for line in lines] == expected


@pytest.mark.integration
def test_builds_from_sqlite_through_the_command_line(scored, sqlite_build: DatasetManifest) -> None:
    _check(sqlite_build, scored[1], "sqlite", 0.2)
    assert sqlite_build.dataset_id == "ds-sqlite" and sqlite_build.uri.endswith("/root/datasets/ds-sqlite")


@pytest.mark.integration
def test_builds_from_postgres(scored, sqlite_build: DatasetManifest, pg_dsn: str, tmp_path: Path) -> None:
    _, scores = scored
    store = PostgresStore(pg_dsn)
    store.migrate()
    ingest_samples(store, SAMPLES)
    for interaction_id, (overall, confidence) in scores.items():  # the SQLite store's scores, not re-assessed
        store.set_quality(interaction_id, overall, confidence)
    store.close()
    cfg = KaizenConfig.model_validate(
        {
            "store": {"engine": "postgres", "postgres_dsn": pg_dsn},
            "model": {"storage_root": str(tmp_path)},
            "privacy": {"hmac_key": "k"},
        }
    )
    opts = DatasetConfig(min_examples=8, keep_fraction=0.8, validation_fraction=0.2, selection="k_means")
    manifest = main(cfg, opts)
    _check(manifest, scores, "postgres", 0.2)
    assert manifest.dataset_id.startswith("ds-")
    # Same interactions and scores: the same pool, whatever the engine (the selection differs).
    same = ("scored", "above_threshold", "exact_duplicates", "near_duplicates", "over_group_cap", "selected")
    assert {k: getattr(manifest.funnel, k) for k in same} == {k: getattr(sqlite_build.funnel, k) for k in same}


@pytest.mark.integration
def test_too_few_interactions_stop_with_the_count_and_threshold(scored, tmp_path: Path, ray_session, capsys) -> None:
    code = cli(["--config", str(_config_file(tmp_path, scored[0])), "dataset.min_examples=1000"])
    err = capsys.readouterr().err
    assert code == 1
    assert "min_examples=1000" in err and "threshold 0.70" in err and f"{len(scored[1])} scored" in err
    assert not (tmp_path / "root" / "datasets").exists()


def test_an_empty_store_says_there_is_nothing_scored(tmp_path: Path) -> None:
    cfg = KaizenConfig.model_validate({"store": {"sqlite_path": str(tmp_path / "empty.db")}})
    with pytest.raises(InsufficientDataError, match="no scored interactions in the sqlite store .since"):
        main(cfg, DatasetConfig(since="2025-01-01T00:00:00Z"))


def test_options_from_the_file_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store:\n  sqlite_path: k.db\ndataset:\n  keep_fraction: 0.3\n  balance_by: [language]\n")
    cfg, opts = load_job_config(str(path), ["dataset.validation_fraction=0.25", "quality.threshold=0.6"], "dataset")
    assert (opts.keep_fraction, opts.validation_fraction, opts.balance_by) == (0.3, 0.25, ["language"])
    assert cfg.quality.threshold == 0.6 and Path(cfg.store.sqlite_path).is_absolute()
    with pytest.raises(ConfigError) as err:
        load_job_config(str(path), ["dataset.nope=1", "quality.nope=2", "dataset.selection=random"], "dataset")
    text = str(err.value)
    assert "dataset.nope: unknown key" in text and "quality.nope: unknown key" in text
    assert "dataset.selection" in text and "k_center" in text
    assert cli(["--config", str(path), "dataset.keep_fraction=0"]) == 2
