"""A storage root with the tiny model built once per test session, for the tests in ``tests/app``.

Building the tokenizer and the tiny model takes several seconds: once per session, shared by the
model, generation and Serve tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The code passes local_files_only everywhere; this also stops any library that reads the
# variable from reaching for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root with ``models/qwen2.5-tokenizer`` and ``models/tiny`` already built."""
    from app.model.profiles import ensure_profile_dir

    root = tmp_path_factory.mktemp("storage-root")
    ensure_profile_dir("tiny", root=root)
    return root
