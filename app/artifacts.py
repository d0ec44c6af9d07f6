"""The one home of Kaizen's artifacts: how they are named, where they live, how they are published
and read back.

An artifact is a folder of files with a ``manifest.json`` that says what it is. Its kind decides
the folder it lives in under ``model.storage_root`` and the prefix of its generated ids:

=========  ==============================  ==========================================
kind       folder                          made by
=========  ==============================  ==========================================
dataset    ``datasets/ds-…``               ``jobs/build_dataset.py``
rehearsal  ``rehearsal/ssr-…``             ``jobs/synthesize.py`` (SSR rehearsal set)
adapter    ``adapters/adp-…``              ``jobs/finetune.py`` via :class:`AdapterStore`
model      ``models/<name>``               :mod:`app.model` (tokenizer, tiny models)
report     ``reports/report-…``            jobs that leave a record of a run
=========  ==============================  ==========================================

The storage root is a local path, used in place, or a URI that pyarrow understands
(``s3://bucket/kaizen``, ``gs://…``, ``file:///shared/kaizen``), reached through
``pyarrow.fs.FileSystem.from_uri`` (:func:`locate`).

An artifact is immutable once published and never visible half-written (:func:`publish`): its
files are staged in a local temporary folder; on a local disk that folder is a hidden sibling of
the target, renamed into place in one step; on a file system that renames directories (pyarrow's
local or HDFS) the files are uploaded under a hidden name and moved; on an object store, which
has no atomic rename, the files are uploaded in place with the manifest LAST. A folder without its
manifest is therefore not an artifact for any reader (:func:`artifact_exists`).

:func:`find_split` reads the rows of a Parquet file or of one split (``train``, ``validation``,
``rehearsal``…) of a data set's folder, :data:`TRAINING_ROW_SCHEMA` is the one Arrow schema of
a training row, and :data:`PREFERENCE_ROW_SCHEMA` that of a preference pair.

"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "DEFAULT_ROOT",
    "ID_PATTERN",
    "KINDS",
    "MANIFEST_FILE",
    "PREFERENCE_ROW_SCHEMA",
    "REHEARSAL_PROVENANCE_SCHEMA",
    "REHEARSAL_ROW_SCHEMA",
    "SPLITS_NOT_TRAINED_ON",
    "TRAINING_ROW_SCHEMA",
    "ArtifactKind",
    "Location",
    "Split",
    "artifact_exists",
    "artifact_location",
    "artifact_uri",
    "check_id",
    "conform",
    "data_hash",
    "ensure_directory",
    "file_sha256",
    "find_split",
    "is_uri",
    "is_valid_id",
    "list_artifacts",
    "locate",
    "manifest_hash",
    "models_dir",
    "new_id",
    "publish",
]

T = TypeVar("T")

DEFAULT_ROOT = Path("data")
"""The storage root, relative to the working directory like the config's other ``data/`` paths."""
MANIFEST_FILE = "manifest.json"
"""The file that makes a folder an artifact; published last."""


# --- kinds and ids -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact: the folder its artifacts live in, and the prefix of its ids."""

    name: str
    dirname: str
    id_prefix: str


KINDS: dict[str, ArtifactKind] = {
    k.name: k
    for k in (
        ArtifactKind("dataset", "datasets", "ds"),
        ArtifactKind("rehearsal", "rehearsal", "ssr"),
        ArtifactKind("adapter", "adapters", "adp"),
        ArtifactKind("model", "models", "model"),
        ArtifactKind("report", "reports", "report"),
        ArtifactKind("validation", "validations", "val"),
        ArtifactKind("deployment", "deployments", "dep"),
    )
}
"""Every artifact kind, by name."""

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""An id is a folder name and a URI part: letters, digits, '.', '_' and '-', no leading dot
(names starting with '.' are the temporary folders of publishes in progress) and no separators."""


def _kind(kind: str) -> ArtifactKind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"artifact kind {kind!r} is not one of {', '.join(KINDS)}") from None


def new_id(kind: str, now: datetime | None = None) -> str:
    """A fresh id of ``kind``, ``<prefix>-YYYYMMDD-HHMMSS-<6 hex>`` (``adp-…``, ``ds-…``): sortable
    by time; the random suffix keeps ids made by processes in the same second apart.

    Raises:
        ValueError: an unknown kind.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{_kind(kind).id_prefix}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def is_valid_id(value: object) -> bool:
    """Whether ``value`` may name an artifact (see :data:`ID_PATTERN`)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: str, kind: str = "artifact") -> str:
    """``value`` if it is safe as a folder name, else ValueError naming ``<kind>_id`` and why."""
    if not is_valid_id(value):
        raise ValueError(
            f"{kind}_id {value!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


# --- where artifacts live ------------------------------------------------------------------------


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI (``s3://…``, ``file://…``) rather than a plain local path.
    Every URI, ``file://`` included, goes through pyarrow: one rule, so a ``file://`` root behaves
    as ``s3://`` would."""
    return "://" in os.fspath(location)


def _local(location: str | os.PathLike[str]) -> Path:
    return Path(location).expanduser().absolute()


def artifact_uri(storage_root: str | os.PathLike[str], kind: str, artifact_id: str) -> str:
    """Where an artifact of ``kind`` lives: ``<storage_root>/<kind folder>/<artifact_id>``, an
    absolute local path for a local root, else a URI under the root's.

    Raises:
        ValueError: an unknown kind or an id that is not a safe folder name.
    """
    dirname = _kind(kind).dirname
    check_id(artifact_id, kind)
    root = os.fspath(storage_root)
    if is_uri(root):
        return f"{root.rstrip('/')}/{dirname}/{artifact_id}"
    return str(_local(root) / dirname / artifact_id)


def models_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder under ``root`` (default ``data/``) that holds built tokenizers and models
    (a local path, relative when ``root`` is: the model loaders use it as it is)."""
    return Path(root if root is not None else DEFAULT_ROOT) / KINDS["model"].dirname


# pyarrow file systems whose move() renames a directory in one step (object stores copy instead).
_RENAMING_FILESYSTEMS = frozenset({"local", "hdfs"})


@dataclass(frozen=True)
class Location:
    """A file or folder: its file system, its path within it, and the URI or path it was named by.

    ``uri`` is what messages and manifests show; ``filesystem`` and ``path`` are how it is read.
    A plain local path has ``local`` set (published with ``os.rename``); ``renames`` says whether
    the file system moves a directory in one step (pyarrow's local and HDFS ones), which decides
    how :func:`publish` commits.
    """

    uri: str
    filesystem: pafs.FileSystem
    path: str
    local: bool
    renames: bool

    def child(self, *names: str) -> Location:
        """The location of ``names`` under this folder, on the same file system object (an
        in-memory or authenticated one is not created again)."""
        path, uri = self.path.rstrip("/"), self.uri.rstrip("/")
        for name in names:
            path = f"{path}/{name}" if path else name
            uri = f"{uri}/{name}"
        return dataclasses.replace(self, path=path, uri=uri)

    @property
    def name(self) -> str:
        """The last part of the path (an artifact's id)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The folder that holds this location."""
        path, uri = self.path.rstrip("/").rsplit("/", 1)[0], self.uri.rstrip("/").rsplit("/", 1)[0]
        return dataclasses.replace(self, path=path, uri=uri)

    def file_type(self) -> pafs.FileType:
        """What is there: ``File``, ``Directory`` or ``NotFound`` (one call to the file system)."""
        return self.filesystem.get_file_info(self.path).type

    def is_file(self) -> bool:
        """Whether a file is there."""
        return self.file_type() == pafs.FileType.File

    def is_dir(self) -> bool:
        """Whether a folder is there."""
        return self.file_type() == pafs.FileType.Directory


def locate(location: str | os.PathLike[str] | Location) -> Location:
    """The :class:`Location` of a local path or a URI (``pyarrow.fs.FileSystem.from_uri``; each
    call makes a new file system object, so reuse the result, or its :meth:`Location.child`)."""
    if isinstance(location, Location):
        return location
    text = os.fspath(location)
    if is_uri(text):
        fs, path = pafs.FileSystem.from_uri(text)
        return Location(text, fs, path, local=False, renames=fs.type_name in _RENAMING_FILESYSTEMS)
    path = _local(text)
    return Location(str(path), pafs.LocalFileSystem(), path.as_posix(), local=True, renames=True)


def artifact_location(storage_root: str | os.PathLike[str] | Location, kind: str, artifact_id: str) -> Location:
    """:func:`artifact_uri` as a :class:`Location` (a root given as one keeps its file system)."""
    check_id(artifact_id, kind)
    return locate(storage_root).child(_kind(kind).dirname, artifact_id)


def artifact_exists(location: str | os.PathLike[str] | Location, *, manifest: str = MANIFEST_FILE) -> bool:
    """Whether a complete artifact is there: a folder holding its manifest (a folder without one is
    an upload in progress, or cut short, and absent for every reader)."""
    return locate(location).child(manifest).is_file()


def list_artifacts(folder: str | os.PathLike[str] | Location, *, manifest: str = MANIFEST_FILE) -> list[str]:
    """The ids of the complete artifacts in a kind's folder (``<root>/adapters``…), sorted; hidden
    names (publishes in progress), names no artifact may have, and folders without their
    manifest are skipped. A missing folder holds none."""
    folder = locate(folder)
    infos = folder.filesystem.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    return sorted(
        info.base_name
        for info in infos
        if info.type == pafs.FileType.Directory
        and is_valid_id(info.base_name)
        and artifact_exists(folder.child(info.base_name), manifest=manifest)
    )


# --- publishing ----------------------------------------------------------------------------------


def publish(
    target: str | os.PathLike[str] | Location,
    write: Callable[[Path], T],
    *,
    manifest: str = MANIFEST_FILE,
) -> T:
    """Publish an artifact at ``target``: ``write(staging)`` puts every file, ``manifest``
    included, into a fresh local folder, which then appears at ``target`` all at once or not at
    all (see the module docstring), and ``write``'s result is returned.

    A local target is staged in a hidden sibling (``.<name>.tmp-…``, mode 0755 so the other users
    of a cluster can read it) and renamed into place; a URI target is staged in the system's
    temporary folder and uploaded. Whatever goes wrong, the staging folder is removed.

    Raises:
        FileExistsError: an artifact is already at ``target`` (or another process published one
            there first); it is never overwritten.
        ValueError: ``write`` did not write ``manifest``.
    """
    target = locate(target)
    if artifact_exists(target, manifest=manifest):
        raise FileExistsError(f"an artifact is already stored at {target.uri}; it is never overwritten")
    if target.local:
        parent = Path(target.path).parent
        parent.mkdir(parents=True, exist_ok=True)
    else:
        parent = None
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        result = write(staging)
        if not (staging / manifest).is_file():
            raise ValueError(f"publishing {target.uri}: nothing wrote its {manifest}, so it would never exist")
        # mkdtemp makes the folder private (0700); an artifact is read by every process of a
        # cluster, which may run as other users.
        os.chmod(staging, 0o755)
        if target.local:
            _rename(staging, target)
        elif target.renames:
            _upload_and_move(staging, target, manifest)
        else:
            _upload(staging, target, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _rename(staging: Path, target: Location) -> None:
    try:
        # Atomic; replaces an empty folder, fails when the target exists with content (a racing
        # publish) or is a file.
        os.rename(staging, target.path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FileExistsError(f"something is already stored at {target.uri}; it is never overwritten") from exc
        raise


def _upload(staging: Path, target: Location, manifest: str) -> None:
    """Copy the staged files to ``target``, the manifest last: it is what makes the artifact exist."""
    local = pafs.LocalFileSystem()
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    names = [n for n in names if n != manifest] + [manifest]
    target.filesystem.create_dir(target.path, recursive=True)
    for name in names:
        destination = target.child(*name.split("/"))
        if "/" in name:
            target.filesystem.create_dir(destination.parent.path, recursive=True)
        pafs.copy_files(
            (staging / name).as_posix(),
            destination.path,
            source_filesystem=local,
            destination_filesystem=target.filesystem,
        )


def _upload_and_move(staging: Path, target: Location, manifest: str) -> None:
    hidden = target.parent.child(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        _upload(staging, hidden, manifest)
        target.filesystem.move(hidden.path, target.path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the upload's own error is the one to report
            target.filesystem.delete_dir(hidden.path)
        if isinstance(exc, OSError) and artifact_exists(target, manifest=manifest):
            raise FileExistsError(f"something is already stored at {target.uri}; it is never overwritten") from exc
        raise


def ensure_directory(target: str | os.PathLike[str], build: Callable[[Path], None], *, marker: str) -> Path:
    """Return the local folder ``target``, first building it with ``build(tmp_dir)`` if it does not
    exist yet: the create-once publish of the tokenizer and the tiny models, which every process
    of a cluster builds on first use.

    ``marker`` is a file every complete folder holds (``config.json``, ``tokenizer.json``): a
    target that has it is used as it is. The build is published with :func:`publish`; if another
    process published ``target`` meanwhile, its copy is kept and ours is deleted.

    Raises:
        FileExistsError: ``target`` exists, is not empty and lacks ``marker``, so it holds
            something else that must not be overwritten.
    """
    target = Path(target)
    if (target / marker).is_file():
        return target
    _refuse_foreign(target, marker)
    try:
        publish(target, build, manifest=marker)
    except FileExistsError:
        if not (target / marker).is_file():
            raise
    return target


def _refuse_foreign(target: Path, marker: str) -> None:
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists but has no {marker}: it is not a directory this module built, "
            "so it is left alone; remove it or pass another path"
        )
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; remove it or pass another path")


# --- hashes --------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> str:
    """SHA-256 (hex) of a file's bytes, read a megabyte at a time (from ``filesystem`` when given,
    ``path`` then being a path within it)."""
    digest = hashlib.sha256()
    with _open(path, filesystem) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(path: str | os.PathLike[str], filesystem: pafs.FileSystem | None) -> BinaryIO:
    if filesystem is None:
        return open(path, "rb")
    return filesystem.open_input_stream(os.fspath(path))


def manifest_hash(location: str | os.PathLike[str] | Location, *, manifest: str = MANIFEST_FILE) -> str | None:
    """SHA-256 of an artifact folder's manifest (what an adapter's lineage records), or None
    when the folder has none."""
    found = locate(location).child(manifest)
    return file_sha256(found.path, found.filesystem) if found.is_file() else None


def data_hash(
    files: Sequence[str | os.PathLike[str]],
    manifest: str | os.PathLike[str] | None,
    filesystem: pafs.FileSystem | None = None,
) -> str:
    """SHA-256 of a data set's manifest when ``manifest`` is a file, or else of its files' names and
    SHA-256s (so the same files give the same hash wherever they lie). Paths are local, or within
    ``filesystem`` when given."""
    if manifest is not None and _is_file(manifest, filesystem):
        return file_sha256(manifest, filesystem)
    digest = hashlib.sha256()
    for f in sorted(files, key=_base_name):
        digest.update(f"{_base_name(f)}\0{file_sha256(f, filesystem)}\n".encode())
    return digest.hexdigest()


def _base_name(path: str | os.PathLike[str]) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def _is_file(path: str | os.PathLike[str], filesystem: pafs.FileSystem | None) -> bool:
    if filesystem is None:
        return os.path.isfile(path)
    return filesystem.get_file_info(os.fspath(path)).type == pafs.FileType.File


# --- reading a split -----------------------------------------------------------------------------

SPLITS_NOT_TRAINED_ON = ("validation", "test")
"""Splits whose files are never training rows, even in a folder without a ``train`` split."""


@dataclass(frozen=True)
class Split:
    """The Parquet files of one split of a data set (:func:`find_split`), and its manifest."""

    location: Location
    """What was asked for: a Parquet file or a data set's folder."""
    files: tuple[str, ...]
    """The Parquet files, paths within ``location.filesystem``, in reading order."""
    manifest: str | None
    """The data set's manifest (for a file, the one beside it), None when there is none."""

    @property
    def manifest_hash(self) -> str | None:
        """SHA-256 of the manifest, None without one."""
        return file_sha256(self.manifest, self.location.filesystem) if self.manifest is not None else None

    @property
    def data_hash(self) -> str:
        """The set's hash: its manifest's SHA-256, else its files' (:func:`data_hash`)."""
        return data_hash(self.files, self.manifest, self.location.filesystem)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The rows of every file, concatenated (schemas promoted); only ``columns`` when given.

        Raises:
            ValueError: a file lacks one of ``columns`` (the message lists those it has).
        """
        fs = self.location.filesystem
        tables = []
        for f in self.files:
            if columns is not None:
                names = pq.read_schema(f, filesystem=fs).names
                for column in columns:
                    if column not in names:
                        raise ValueError(f"{f}: no {column!r} column (it has: {', '.join(names)})")
            tables.append(pq.read_table(f, columns=list(columns) if columns is not None else None, filesystem=fs))
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def find_split(location: str | os.PathLike[str] | Location, split: str | None = None) -> Split:
    """The Parquet files of ``split`` at ``location``, a Parquet file or a data set's folder.

    A file is read as it is, with the ``manifest.json`` beside it. A folder is read as its
    ``<split>.parquet`` or ``<split>/`` when ``split`` is given and present, else every Parquet
    file under it (hidden and ``_`` names skipped, e.g. ``.tmp`` uploads and ``_SUCCESS``
    markers), with its own ``manifest.json``. A folder without a ``train`` split, asked for
    ``train``, leaves out its ``validation`` and ``test`` files: they are still not training rows.

    Raises:
        FileNotFoundError: no Parquet file there.
    """
    where = locate(location)
    kind = where.file_type()
    if kind == pafs.FileType.File:
        files, manifest = [where.path], where.parent.child(MANIFEST_FILE)
    elif kind == pafs.FileType.Directory:
        manifest = where.child(MANIFEST_FILE)
        root = where
        if split is not None:
            candidates = (where.child(f"{split}.parquet"), where.child(split))
            root = next((c for c in candidates if c.file_type() != pafs.FileType.NotFound), where)
        files = [root.path] if root.is_file() else _parquet_files(root)
        if root is where and split == "train":
            files = [
                f for f in files if _relative_parts(where, f)[0].removesuffix(".parquet") not in SPLITS_NOT_TRAINED_ON
            ]
    else:
        files, manifest = [], where.child(MANIFEST_FILE)
    if not files:
        raise FileNotFoundError(f"no Parquet rows at {where.uri} (a .parquet file or a folder holding them)")
    return Split(where, tuple(files), manifest.path if manifest.is_file() else None)


def _relative_parts(root: Location, path: str) -> list[str]:
    return path[len(root.path.rstrip("/")) + 1 :].split("/")


def _parquet_files(root: Location) -> list[str]:
    """Every ``*.parquet`` file under ``root``, in path order, none under a hidden or ``_`` name."""
    infos = root.filesystem.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        parts = _relative_parts(root, info.path)
        if not any(part.startswith((".", "_")) for part in parts):
            found.append((parts, info.path))
    # Ordered by path components (as pathlib sorts), not by the raw string: 'a/b' before 'a-b/c'.
    return [path for _, path in sorted(found)]


# --- the training row ----------------------------------------------------------------------------

TRAINING_ROW_SCHEMA = pa.schema(
    [
        pa.field("interaction_id", pa.string()),
        # UTC, without a zone, in nanoseconds: what the dataset writer (``to_table``) has always
        # written, so every dataset already stored reads back as this schema.
        pa.field("timestamp", pa.timestamp("ns")),
        pa.field("instruction", pa.string()),
        pa.field("input", pa.string()),
        pa.field("output", pa.string()),
        pa.field("quality_score", pa.float64()),
        pa.field("domain", pa.list_(pa.string())),
        pa.field("complexity", pa.string()),
        pa.field("learning_type", pa.string()),
        pa.field("project_context", pa.string()),
        pa.field("features", pa.string()),
        pa.field("messages", pa.string()),
    ]
)
"""One training row, as a dataset's Parquet files hold it: the seed's training-dataset columns
plus ``messages``, a JSON list of chat messages (what fine-tuning reads)."""

PREFERENCE_ROW_SCHEMA = pa.schema(
    [
        pa.field("interaction_id", pa.string()),
        pa.field("timestamp", pa.timestamp("ns")),
        # A JSON list of the chat messages before the answer (system, user, the tool calls).
        pa.field("prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("rejected_quality_score", pa.float64()),
        pa.field("domain", pa.list_(pa.string())),
        pa.field("complexity", pa.string()),
    ]
)
"""One preference pair, as a dataset's ``<split>_preferences.parquet`` holds it: the conversation
before the answer (``prompt``, JSON chat messages), the answer a user wrote as a correction
(``chosen``) and the one the model had given (``rejected``), the stored quality score of the
rejected answer, and the domain and complexity of the interaction (as a training row has them).
Direct preference optimisation trains on these (``finetune.objective``)."""

REHEARSAL_PROVENANCE_SCHEMA = pa.schema(
    [
        pa.field("source_domain", pa.string()),
        pa.field("synthesized_by", pa.string()),
        pa.field("refined_by", pa.string()),
        pa.field("cluster", pa.int64()),
        pa.field("demonstration_ids", pa.list_(pa.string())),
        pa.field("output_confidence", pa.float64()),
    ]
)
"""Where an SSR rehearsal row came from: the columns a rehearsal set has beyond a training row's."""

REHEARSAL_ROW_SCHEMA = pa.schema([*TRAINING_ROW_SCHEMA, *REHEARSAL_PROVENANCE_SCHEMA])
"""A rehearsal set's row: a training row, then its provenance."""


def conform(table: pa.Table, schema: pa.Schema = TRAINING_ROW_SCHEMA, *, origin: str = "the table") -> pa.Table:
    """``table``'s rows with exactly ``schema``'s columns, in its order: the table's own where it has
    them (cast to the schema's type), else nulls; columns the schema lacks are dropped.

    Raises:
        ValueError: a column cannot be cast (the message names it, ``origin`` and the type).
    """
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, type=field.type))
            continue
        try:
            columns.append(table.column(field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ValueError(f"column {field.name!r} of {origin} cannot be read as {field.type}: {exc}") from exc
    return pa.Table.from_arrays(columns, schema=schema)
