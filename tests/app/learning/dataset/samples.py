"""Sample batches for the tests of the dataset stages: rows as stage 1 (read) gives them, and
rows taken through the corrections, classification, the quality filter, ChatML and the features."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.learning.dataset.chatml import format_chatml
from app.learning.dataset.classification import classify
from app.learning.dataset.features import EmbedBatch, encode_features
from app.learning.dataset.filter import filter_quality
from app.learning.dataset.options import threshold_manager
from app.learning.dataset.preferences import apply_corrections

__all__ = ["PY_ANSWER", "PY_PROMPT", "TS_ANSWER", "TS_PROMPT", "FakeEmbedder", "batch_of", "prepared_rows", "read_rows"]

PY_PROMPT = "Write a Python function `parse_port(value)` that returns the port of a URL, or None."
PY_ANSWER = """Here you go:

```python
from urllib.parse import urlsplit

from fastapi import FastAPI


def parse_port(value):
    return urlsplit(value).port
```
"""
TS_PROMPT = """My React component crashes with TypeError: Cannot read properties of undefined. Can you fix it?

```tsx
export function Price({ item }) {
  return <span>{item.price.toFixed(2)}</span>;
}
```
"""
TS_ANSWER = """The item can be missing while it loads; guard it:

```typescript
import React from "react";
import { z } from "zod";

const Item = z.object({ price: z.number() });

export function Price({ item }: { item?: { price: number } }): JSX.Element {
  if (!item) {
    return <span>-</span>;
  }
  return <span>{item.price.toFixed(2)}</span>;
}
```
"""


def batch_of(**columns: list[Any]) -> dict[str, np.ndarray]:
    """A batch of the given columns: lists of floats as float64 arrays, anything else as objects."""
    out = {}
    for name, values in columns.items():
        if values and isinstance(values[0], float):
            out[name] = np.asarray(values, dtype=np.float64)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
    return out


def read_rows(n: int, **overrides: list[Any]) -> dict[str, np.ndarray]:
    """``n`` rows with the columns stage 1 (read) gives, each a small Python generation request;
    ``overrides`` replace whole columns."""
    base = {
        "interaction_id": [f"id-{i:02d}" for i in range(n)],
        "timestamp": ["2025-01-02T03:04:05.123456+00:00"] * n,
        "input": [f"Write a function number {i}" for i in range(n)],
        "output": [f"```python\ndef f{i}():\n    return {i}\n```" for i in range(n)],
        "system_prompt": [""] * n,
        "quality_score": [0.8] * n,
        "quality_confidence": [0.9] * n,
        "context_json": ["{}"] * n,
        "tool_usage_json": ["[]"] * n,
        "correction": [""] * n,
        "rejected": [False] * n,
    }
    base.update(overrides)
    return batch_of(**base)


class FakeEmbedder:
    """Stands in for MiniLM: a one-hot 4-d embedding by the text's length."""

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.eye(4)[len(t) % 4] for t in texts]).astype(np.float32)


def prepared_rows(n: int, **overrides: list[Any]) -> dict[str, np.ndarray]:
    """``n`` rows through the corrections, classification, the quality filter, ChatML and the
    features (FakeEmbedder); ``overrides`` replace columns of :func:`read_rows`."""
    rows = read_rows(n, **{"context_json": ['{"technologies": ["python", "click"]}'] * n, **overrides})
    batch = classify(apply_corrections(rows))
    batch = filter_quality(batch, threshold_manager(0.7))
    batch = EmbedBatch(FakeEmbedder())(format_chatml(batch))
    return encode_features(batch)
