"""``jobs/score.py``: a Ray Data actor pool scores stored interactions and writes the scores back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import KaizenConfig
from app.quality.aggregate import ASSESSOR_VERSION
from app.store.sqlite import SQLiteStore
from jobs import score
from tests.conftest import ingest_samples

pytestmark = pytest.mark.integration


def _config(tmp_path: Path) -> KaizenConfig:
    return KaizenConfig.model_validate({"store": {"sqlite_path": str(tmp_path / "k.db")}, "privacy": {"hmac_key": "k"}})


def test_pending_then_all_are_scored_by_the_actor_pool(tmp_path: Path, ray_session) -> None:
    cfg = _config(tmp_path)
    store = SQLiteStore(cfg.store.sqlite_path)
    store.migrate()
    ids = ingest_samples(store, 24)
    assert score.select_ids(cfg, status="pending", limit=5) == sorted(ids)[:5]

    result = score.main(cfg, status="pending", actors=2, batch_size=8, execute=False, progress=False)
    assert (result.selected, result.scored, result.no_evidence, result.missing) == (25, 24, 1, 0)
    assert result.assessor_versions == {ASSESSOR_VERSION: 24}
    assert store.stats()["quality_status"] == {"scored": 24, "no_evidence": 1}
    assert score.main(cfg, status="pending", progress=False).selected == 0  # nothing left

    # After a calibration, --all re-scores everything under the new version, beside the old scores.
    store.save_calibration(
        "cal-test", "positive-linear+linear-map", {"weights": {"functional_correctness": 1.0}, "xs": [], "ys": []}, {}
    )
    again = score.main(cfg, status=None, actors=1, batch_size=16, execute=False, progress=False)
    assert again.scored == 24 and again.assessor_versions == {f"{ASSESSOR_VERSION}+cal-test": 24}
    rows = store.quality_scores(ids[0])
    assert {r["assessor_version"] for r in rows} == {ASSESSOR_VERSION, f"{ASSESSOR_VERSION}+cal-test"}
    store.close()


def test_the_command_line(tmp_path: Path, ray_session) -> None:
    import ray

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"store:\n  sqlite_path: {tmp_path / 'k.db'}\nprivacy:\n  hmac_key: k\n")
    store = SQLiteStore(tmp_path / "k.db")
    store.migrate()
    ingest_samples(store, 3)
    store.close()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.score",
            "--config",
            str(cfg_file),
            "--actors",
            "1",
            "--no-execute",
            # It joins the session's Ray, as a job joins a cluster (starting its own takes longer).
            f"ray.address={ray.get_runtime_context().gcs_address}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout[out.stdout.index("{") :])["scored"] == 3
    bad = subprocess.run([sys.executable, "-m", "jobs.score", "--status", "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--status" in bad.stderr
