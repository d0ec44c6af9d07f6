"""Stage 4 of ``jobs/build_dataset.py`` and the duplicates it finds: :func:`fingerprint` (a hash
of the normalised text and a MinHash signature of its shingles) runs on every batch, then on the
driver, over the whole pool, :func:`drop_exact_duplicates` and :func:`drop_near_duplicates`
(MinHash LSH, ``datasketch``) keep the best row of each set of duplicates."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping

import numpy as np

from app.learning.dataset.batch import Batch, as_text, best_first, num_rows, object_array, take

__all__ = ["drop_exact_duplicates", "drop_near_duplicates", "fingerprint", "normalize_text"]

_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, whitespace runs to one space, trimmed: what makes two texts the same."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _shingles(text: str, size: int) -> set[bytes]:
    tokens = _TOKEN.findall(text)
    if len(tokens) <= size:
        return {" ".join(tokens).encode()}
    return {" ".join(tokens[i : i + size]).encode() for i in range(len(tokens) - size + 1)}


def fingerprint(batch: Mapping[str, np.ndarray], num_perm: int = 128, shingle_size: int = 5, seed: int = 0) -> Batch:
    """Stage 4: ``text_hash`` (SHA-256 of the normalised request and answer) and ``minhash`` (a
    ``num_perm`` MinHash signature of their word shingles, one row of uint64 per interaction)."""
    from datasketch import MinHash

    hashes, signatures = [], np.zeros((num_rows(batch), num_perm), dtype=np.uint64)
    for i, (prompt, response) in enumerate(zip(batch["input"], batch["output"])):
        text = normalize_text(as_text(prompt)) + "\n\x00\n" + normalize_text(as_text(response))
        hashes.append(hashlib.sha256(text.encode()).hexdigest())
        minhash = MinHash(num_perm=num_perm, seed=seed)
        minhash.update_batch(sorted(_shingles(text, shingle_size)))
        signatures[i] = minhash.hashvalues
    out = dict(batch)
    out["text_hash"] = object_array(hashes)
    out["minhash"] = signatures
    return out


def drop_exact_duplicates(batch: Mapping[str, np.ndarray]) -> tuple[Batch, int]:
    """Keep one row per ``text_hash``, the best by quality (ties: the smaller id).

    Returns:
        The kept rows (best first) and how many were dropped.
    """
    if not num_rows(batch):
        return dict(batch), 0
    seen: set[str] = set()
    keep = []
    for i in best_first(batch):
        if batch["text_hash"][i] not in seen:
            seen.add(batch["text_hash"][i])
            keep.append(i)
    return take(batch, keep), num_rows(batch) - len(keep)


def drop_near_duplicates(
    batch: Mapping[str, np.ndarray], threshold: float = 0.8, num_perm: int = 128, seed: int = 0
) -> tuple[Batch, int]:
    """Drop rows whose MinHash Jaccard estimate with a better row is at or above ``threshold``.

    Rows are taken best first; each is looked up in a MinHash LSH index of the rows kept so far,
    and the candidates the index returns are confirmed with the signatures' Jaccard estimate
    (LSH alone admits some pairs below the threshold). Runs on the driver over the whole pool.

    Returns:
        The kept rows (best first) and how many were dropped.
    """
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    if not num_rows(batch):
        return dict(batch), 0
    signatures = np.asarray(batch["minhash"], dtype=np.uint64)
    scheme = MinHash(num_perm=num_perm, seed=seed).scheme  # the hashing scheme fingerprint() used
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    keep: list[int] = []
    for i in best_first(batch):
        minhash = LeanMinHash(seed=seed, hashvalues=signatures[i], scheme=scheme)
        similar = [int(j) for j in lsh.query(minhash) if np.mean(signatures[int(j)] == signatures[i]) >= threshold]
        if not similar:
            lsh.insert(str(i), minhash)
            keep.append(int(i))
    return take(batch, keep), num_rows(batch) - len(keep)
