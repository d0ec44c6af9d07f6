"""The tokenizer of the session's storage root (``model_root``, in ``tests/app/conftest.py``).

Building the tokenizer takes a few seconds (its merge list is recovered from the vocabulary), so
it is built once per session, and the tests that need a fresh build make their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Belt and braces: the code passes local_files_only everywhere; this also stops any library that
# reads the variable from reaching for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(model_root: Path) -> Path:
    return model_root / "models" / "qwen2.5-tokenizer"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from app.model import load_tokenizer

    return load_tokenizer(tokenizer_dir)
