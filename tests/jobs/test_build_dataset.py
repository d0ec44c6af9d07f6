"""``jobs/build_dataset.py`` end to end on real stores: sample interactions scored by the quality
service, the Ray Data chain, and the files it writes (schema, manifest counts, JSONL), on SQLite
through the command line and on PostgreSQL through ``main``; users' corrections as targets and
preference pairs, and answers turned down without one left out."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.config import ConfigError, KaizenConfig, load_job_config
from app.learning.dataset import (
    COMPLEXITIES,
    DATASET_SCHEMA,
    PREFERENCE_SCHEMA,
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
from jobs.build_dataset import cli, main, summary
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
        "train_preferences.jsonl",
        "train_preferences.parquet",
        "validation.jsonl",
        "validation.parquet",
        "validation_preferences.jsonl",
        "validation_preferences.parquet",
    ]
    assert DatasetManifest.model_validate_json((folder / "manifest.json").read_text()) == manifest
    for name, digest in manifest.files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    train, val = pq.read_table(folder / "train.parquet"), pq.read_table(folder / "validation.parquet")
    assert train.schema == DATASET_SCHEMA and val.schema == DATASET_SCHEMA
    assert manifest.content_hash == content_hash(train, val)

    f = manifest.funnel
    assert f.scored == len(scores)
    removed = f.rejected + f.exact_duplicates + f.near_duplicates + f.over_group_cap + f.not_selected
    assert f.above_threshold - removed == f.selected
    assert (f.train_pairs, f.validation_pairs) == (0, 0)  # the samples have no corrections
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
    same = (
        "scored",
        "above_threshold",
        "rejected",
        "exact_duplicates",
        "near_duplicates",
        "over_group_cap",
        "selected",
    )
    assert {k: getattr(manifest.funnel, k) for k in same} == {k: getattr(sqlite_build.funnel, k) for k in same}


@pytest.mark.integration
def test_too_few_interactions_stop_with_the_count_and_threshold(scored, tmp_path: Path, ray_session, capsys) -> None:
    code = cli(["--config", str(_config_file(tmp_path, scored[0])), "dataset.min_examples=1000"])
    err = capsys.readouterr().err
    assert code == 1
    assert "min_examples=1000" in err and "threshold 0.70" in err and f"{len(scored[1])} scored" in err
    assert not (tmp_path / "root" / "datasets").exists()


@pytest.mark.integration
def test_the_loss_filter_drops_the_answers_its_probe_finds_implausible(scored, cfg: KaizenConfig, ray_session) -> None:
    db, scores = scored
    run_cfg = cfg.model_copy(
        update={
            "store": cfg.store.model_copy(update={"sqlite_path": str(db)}),
            # The recipe the probe trains with (the cycle's finetune section); the tiny model moves little.
            "finetune": {"batch_size": 4, "lr": 1e-2, "max_length": 256, "lora_dropout": 0.0},
        }
    )
    opts = DatasetConfig(
        dataset_id="ds-loss-filter",
        min_examples=8,
        keep_fraction=0.8,
        validation_fraction=0.2,
        # The tiny model's losses lie within a few percent of each other: above the median, at most a fifth.
        loss_filter_ratio=1.0,
        loss_filter_steps=10,
        loss_filter_max_steps=10,
    )
    manifest = main(run_cfg, opts)
    f, probe = manifest.funnel, manifest.loss_filter
    pool = f.above_threshold - f.rejected - f.exact_duplicates - f.near_duplicates - f.over_group_cap
    assert probe is not None and probe.rows == pool and probe.steps == 10 and probe.loss_fell is True
    assert probe.dropped == int(0.2 * pool) and f.implausible == probe.dropped == len(probe.dropped_rows)
    assert f.implausible + f.not_selected + f.selected == pool
    assert min(probe.dropped_rows.values()) > probe.limit and set(probe.dropped_rows) <= set(scores)
    written = {
        i
        for split in ("train", "validation")
        for i in pq.read_table(Path(manifest.uri) / f"{split}.parquet").column("interaction_id").to_pylist()
    }
    assert not written & set(probe.dropped_rows)
    assert f"loss filter: probe 10 steps on {pool} rows" in summary(manifest)
    assert manifest.options["loss_filter_ratio"] == 1.0


PROMPTS = {
    "ok-parse": "Write a Python function parse_port(url) that returns the port of a URL.",
    "ok-slug": "Write a Python function slugify(title) that makes a URL slug of a title.",
    "ok-median": "Write a Python function median(values) for a list of numbers.",
    "fixed": "Write a Python function add_one(x) that returns x plus one.",
    "declined": "Write a Python function is_even(n) that says whether n is even.",
}
ANSWERS = {
    "ok-parse": (
        "```python\nfrom urllib.parse import urlsplit\n\n\ndef parse_port(url):\n    return urlsplit(url).port\n```"
    ),
    "ok-slug": "```python\nimport re\n\n\ndef slugify(title):\n    return re.sub('\\W+', '-', title.lower())\n```",
    "ok-median": "```python\nimport statistics\n\n\ndef median(values):\n    return statistics.median(values)\n```",
    "fixed": "```python\ndef add_one(x):\n    return x - 1\n```",
    "declined": "```python\ndef is_even(n):\n    return n % 2 == 1\n```",
}
CORRECTION = "```python\ndef add_one(x):\n    return x + 1\n```"
FEEDBACK = {
    "ok-parse": {"implicit": {"accepted": True}},
    "ok-slug": {"explicit": {"rating": 5}},
    "ok-median": None,
    "fixed": {"explicit": {"thumbs": "down", "correction": CORRECTION}},
    "declined": {"explicit": {"thumbs": "down"}},
}
SCORES = {"ok-parse": 0.9, "ok-slug": 0.85, "ok-median": 0.8, "fixed": 0.3, "declined": 0.95}


@pytest.mark.integration
def test_a_correction_is_a_target_and_a_pair_and_a_declined_answer_is_left_out(tmp_path: Path, ray_session) -> None:
    """Through the whole chain: the corrected interaction trains on the correction (its stored score,
    the wrong answer's, below the threshold) and is a preference pair against the wrong answer; the
    answer turned down without a correction is left out although its score is the highest."""
    from app.config import KaizenConfig as Config
    from app.ingest import IngestPipeline

    store = SQLiteStore(tmp_path / "k.db")
    store.migrate()
    now = datetime.now(UTC).isoformat()
    events = []
    for key, prompt in PROMPTS.items():
        body = {"session_id": "s", "input": {"raw": prompt}, "output": {"content": ANSWERS[key]}}
        if FEEDBACK[key]:
            body["feedback"] = FEEDBACK[key]
        events.append({"id": key, "type": "interaction", "timestamp": now, "body": body})
    prepared = IngestPipeline(Config.model_validate({"privacy": {"hmac_key": "k"}})).prepare(events)
    assert all(r.status == "accepted" for r in prepared.finish(store.write(prepared.to_commit)))
    for key, score in SCORES.items():
        store.set_quality(key, score, 0.8)
    store.close()
    cfg = Config.model_validate(
        {"store": {"sqlite_path": str(tmp_path / "k.db")}, "model": {"storage_root": str(tmp_path / "root")}}
    )
    opts = DatasetConfig(min_examples=1, keep_fraction=1.0, validation_fraction=0.0, balance_by=[])

    manifest = main(cfg, opts)

    folder = Path(manifest.uri)
    f = manifest.funnel
    assert (f.scored, f.above_threshold, f.rejected, f.selected, f.train) == (5, 5, 1, 4, 4)
    assert (f.train_pairs, f.validation_pairs) == (1, 0)
    assert manifest.counts["learning_type"] == {"correction": 1, "interaction": 3}
    rows = {r["interaction_id"]: r for r in pq.read_table(folder / "train.parquet").to_pylist()}
    assert sorted(rows) == ["fixed", "ok-median", "ok-parse", "ok-slug"]  # "declined" is no target
    fixed = rows["fixed"]
    assert fixed["output"] == CORRECTION and fixed["learning_type"] == "correction" and fixed["quality_score"] == 1.0
    assert json.loads(fixed["messages"]) == [
        {"role": "user", "content": PROMPTS["fixed"]},
        {"role": "assistant", "content": CORRECTION},
    ]
    assert all(r["output"] not in (ANSWERS["fixed"], ANSWERS["declined"]) for r in rows.values())

    pairs = pq.read_table(folder / "train_preferences.parquet")
    assert pairs.schema == PREFERENCE_SCHEMA
    (pair,) = pairs.to_pylist()
    assert pair["interaction_id"] == "fixed" and pair["rejected_quality_score"] == 0.3
    assert (pair["chosen"], pair["rejected"]) == (CORRECTION, ANSWERS["fixed"])
    assert json.loads(pair["prompt"]) == [{"role": "user", "content": PROMPTS["fixed"]}]
    (line,) = [json.loads(x) for x in (folder / "train_preferences.jsonl").read_text().splitlines()]
    assert line == {
        "input": {"messages": [{"role": "user", "content": PROMPTS["fixed"]}]},
        "preferred_output": [{"role": "assistant", "content": CORRECTION}],
        "non_preferred_output": [{"role": "assistant", "content": ANSWERS["fixed"]}],
    }
    assert pq.read_table(folder / "validation_preferences.parquet").num_rows == 0

    # Learning without corrections (the baseline): the corrected answer is left out like the other
    # (here by its own score, below the threshold).
    without = main(cfg, opts.model_copy(update={"corrections": False, "dataset_id": "ds-without"}))
    assert (without.funnel.above_threshold, without.funnel.rejected, without.funnel.selected) == (4, 1, 3)
    assert without.funnel.train_pairs == 0 and without.counts["learning_type"] == {"interaction": 3}


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
