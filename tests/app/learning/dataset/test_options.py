"""Options of ``jobs/build_dataset.py`` (``app.learning.dataset.options``), and the package's names."""

from __future__ import annotations

import importlib

import pytest

import app.learning.dataset as dataset_package
from app.config import JOB_SECTIONS, ConfigError, section_options
from app.learning.dataset.options import DatasetConfig


def test_options_name_the_bad_key() -> None:
    assert section_options("dataset", base={}).keep_fraction == 0.5
    with pytest.raises(ConfigError) as err:
        section_options("dataset", base={"keep_fraction": 2, "bogus": 1})
    text = str(err.value)
    assert "dataset.keep_fraction" in text and "dataset.bogus: unknown key" in text
    with pytest.raises(ConfigError, match="until .* must be after since"):
        section_options("dataset", base={"since": "2025-02-01", "until": "2025-01-01"})
    with pytest.raises(ConfigError, match="dataset.dataset_id"):
        section_options("dataset", base={"dataset_id": "../escape"})


def test_the_package_keeps_every_name_importable() -> None:
    # jobs/learn.py, the benchmarks and app.config's JOB_SECTIONS import from the package itself.
    assert all(hasattr(dataset_package, name) for name in dataset_package.__all__)
    module, _, name = JOB_SECTIONS["dataset"].partition(":")
    assert getattr(importlib.import_module(module), name) is DatasetConfig
