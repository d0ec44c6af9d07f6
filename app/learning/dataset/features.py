"""Stage 7 of ``jobs/build_dataset.py``: the request's MiniLM embedding (:class:`EmbedBatch`, an
actor) and ``features`` (:func:`encode_features`): compact JSON of the classification's
measurements and the embedding (float16, base64), read back with :func:`decode_features`."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, num_rows, object_array

__all__ = ["EMBEDDING_MODEL", "EmbedBatch", "decode_features", "encode_features"]

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class EmbedBatch:
    """Stage 7 (an actor): the request's MiniLM embedding (unit length, float32) as ``embedding``.

    The request says what an example teaches, and the model reads 128 tokens: embedding the
    answer too would mostly measure the prompt's first lines anyway."""

    def __init__(self, embedder: Any = None):
        if embedder is None:
            from app.quality.relevance import get_embedder

            embedder = get_embedder()
        self.embedder = embedder

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        out = dict(batch)
        out["embedding"] = np.asarray(self.embedder.embed([as_text(t) for t in batch["instruction"]]), dtype=np.float32)
        return out


_FEATURES = ("code_blocks", "code_lines", "cyclomatic", "prompt_words", "tool_calls")


def encode_features(batch: Mapping[str, np.ndarray]) -> Batch:
    """Stage 7b: ``features``, compact JSON of the classification, its measurements, the answer's
    length, the score's confidence and the embedding (float16, base64); see :func:`decode_features`."""
    features = []
    for i in range(num_rows(batch)):
        vector = np.asarray(batch["embedding"][i], dtype="<f2")
        confidence = float(batch["quality_confidence"][i])
        item: dict[str, Any] = {
            "v": 1,
            "language": as_text(batch["language"][i]),
            "task": as_text(batch["task"][i]),
            "complexity": as_text(batch["complexity"][i]),
            "frameworks": [f for f in as_text(batch["frameworks"][i]).split(",") if f],
            **{name: int(batch[name][i]) for name in _FEATURES},
            "output_chars": len(as_text(batch["output"][i])),
            "quality_confidence": None if math.isnan(confidence) else round(confidence, 4),
            "threshold": float(batch["threshold"][i]),
            "embedding": {
                "model": EMBEDDING_MODEL,
                "dtype": "float16",
                "dim": int(vector.size),
                "b64": base64.b64encode(vector.tobytes()).decode(),
            },
        }
        features.append(json.dumps(item, separators=(",", ":"), sort_keys=True))
    out = dict(batch)
    out["features"] = object_array(features)
    return out


def decode_features(text: str) -> dict[str, Any]:
    """A ``features`` value as a dict, its ``embedding`` a float32 vector."""
    item = json.loads(text)
    emb = item.get("embedding")
    if isinstance(emb, Mapping) and "b64" in emb:
        item["embedding"] = np.frombuffer(base64.b64decode(emb["b64"]), dtype="<f2").astype(np.float32)
    return item
