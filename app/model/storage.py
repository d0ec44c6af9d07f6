"""Create-once directories under the storage root, safe when several processes race.

The tokenizer and the tiny model are built on first use and then read by every process of a
cluster (Serve replicas, Ray Train workers, jobs). A reader must never see a half-written
directory, and two builders must not corrupt each other, so a directory is built under a
temporary name beside its target and published with one ``os.rename``: a directory rename is
atomic on POSIX and fails when the target already exists with content, which is how a loser
learns that another process won.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_ROOT = Path("data")
"""The storage root, relative to the working directory like the config's other ``data/`` paths."""


def models_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder under ``root`` (default ``data/``) that holds built tokenizers and models."""
    return Path(root if root is not None else DEFAULT_ROOT) / "models"


def ensure_directory(target: Path, build: Callable[[Path], None], *, marker: str) -> Path:
    """Return ``target``, first building it with ``build(tmp_dir)`` if it does not exist yet.

    ``marker`` is a file that every complete directory holds (``config.json``,
    ``tokenizer.json``): a target that has it is used as it is. The build runs in a fresh
    temporary sibling of ``target``, which is then renamed onto it; if another process published
    ``target`` meanwhile, its copy is kept and ours is deleted.

    Raises:
        FileExistsError: ``target`` exists, is not empty and lacks ``marker``, so it holds
            something else that must not be overwritten.
    """
    target = Path(target)
    if (target / marker).is_file():
        return target
    _refuse_foreign(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        # mkdtemp makes the directory private (0700); a published model is read by every
        # process of the cluster, which may run as other users.
        os.chmod(tmp, 0o755)
        try:
            # Replaces an empty target directory; fails with ENOTEMPTY or EEXIST if a racing
            # process has already published a complete one.
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / marker).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _refuse_foreign(target: Path, marker: str) -> None:
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists but has no {marker}: it is not a directory this module built, "
            "so it is left alone; remove it or pass another path"
        )
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; remove it or pass another path")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
