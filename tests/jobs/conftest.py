"""Fixtures of the learning jobs' tests: a config with a storage root of its own that shares
the session's tiny model, and small training, validation and rehearsal sets."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.config import KaizenConfig

ANSWER = "```python\ndef add_one(x):\n    return x + 1\n```"
OLD_ANSWER = "SELECT name FROM users WHERE id = 1;"


def training_table(n: int, *, start: int = 0, answer: str = ANSWER, learning_type: str = "new") -> pa.Table:
    rows = []
    for i in range(start, start + n):
        messages = [
            {"role": "system", "content": "You are a coding assistant."},
            {"role": "user", "content": f"Task {i}: write the function we discussed."},
            {"role": "assistant", "content": answer},
        ]
        rows.append(
            {
                "interaction_id": f"i{i}",
                "messages": json.dumps(messages),
                "domain": ["python"],
                "quality_score": 0.9,
                "learning_type": learning_type,
            }
        )
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset folder (train/validation splits and a manifest), a rehearsal set and an earlier
    dataset's validation split (held-out rows of the old domain)."""
    root = tmp_path_factory.mktemp("finetune-data")
    dataset = root / "dataset"
    dataset.mkdir()
    pq.write_table(training_table(20), dataset / "train.parquet")
    pq.write_table(training_table(4, start=100), dataset / "validation.parquet")
    (dataset / "manifest.json").write_text(json.dumps({"dataset_id": "ds-test", "rows": 24}))
    rehearsal = root / "rehearsal"
    rehearsal.mkdir()
    pq.write_table(
        training_table(8, start=200, answer=OLD_ANSWER, learning_type="rehearsal"), rehearsal / "rehearsal.parquet"
    )
    (rehearsal / "manifest.json").write_text(json.dumps({"rehearsal_id": "ssr-test", "rows": 8}))
    # An earlier dataset: its validation split holds rows of the old domain that nobody trains on.
    earlier = root / "earlier"
    earlier.mkdir()
    pq.write_table(training_table(4, start=300, answer=OLD_ANSWER), earlier / "validation.parquet")
    (earlier / "manifest.json").write_text(json.dumps({"dataset_id": "ds-earlier", "rows": 4}))
    return {"dataset": dataset, "rehearsal": rehearsal, "earlier": earlier}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> KaizenConfig:
    """A storage root of its own (adapters, runs, database) that shares the session's models
    (the ``model_root`` fixture's) where there is one."""
    from app.model.profiles import ensure_profile_dir

    root = tmp_path_factory.mktemp("finetune-root")
    try:
        shared = request.getfixturevalue("model_root") / "models"
        (root / "models").symlink_to(shared, target_is_directory=True)
    except pytest.FixtureLookupError:
        ensure_profile_dir("tiny", root=root)
    return KaizenConfig.model_validate(
        {
            "model": {"base_model": "tiny", "storage_root": str(root), "checkpoint_dir": str(root / "checkpoints")},
            "store": {"sqlite_path": str(root / "kaizen.db")},
            "privacy": {"hmac_key": "k"},
        }
    )
