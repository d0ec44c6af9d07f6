"""The adapter store: PEFT LoRA adapters kept under the storage root, each with a manifest.

Layout: ``<root>/adapters/<adapter_id>/`` holds PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` beside Kaizen's ``manifest.json`` (:class:`AdapterManifest`): the
base model, the LoRA settings, the SHA-256 of each file, and the lineage the learning pipeline
fills in (dataset and rehearsal manifests, parent adapter, hyper-parameters, metrics, code version).

The root is a local path, used in place, or a URI that pyarrow understands (``s3://bucket/kaizen``,
``gs://…``, ``file:///shared/kaizen``), from which :meth:`AdapterStore.local_path` downloads an
adapter once into a local cache: PEFT, vLLM and Ray Train workers all want a local directory.

An adapter is immutable once saved, and never visible half-written: it is one kind of artifact,
named, placed and published by :mod:`app.artifacts` (on a local disk built under a temporary name
and renamed into place in one step; on an object store, which has no atomic directory rename, its
``manifest.json`` written last, which is what makes it exist).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.artifacts import (
    DEFAULT_ROOT,
    KINDS,
    MANIFEST_FILE,
    artifact_exists,
    check_id,
    ensure_directory,
    file_sha256,
    is_uri,
    list_artifacts,
    locate,
    new_id,
    publish,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

__all__ = [
    "ADAPTER_FILES",
    "MANIFEST_FILE",
    "AdapterLineage",
    "AdapterManifest",
    "AdapterNotFoundError",
    "AdapterStore",
    "LoraSummary",
    "check_adapter_id",
    "new_adapter_id",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The PEFT files every stored adapter has (what ``save_pretrained`` writes, less its README)."""
ADAPTERS_DIRNAME = KINDS["adapter"].dirname
DEFAULT_CACHE_DIR = Path("~/.cache/kaizen/adapters")
"""Where adapters from a remote root are downloaded to, one folder per root."""


class AdapterNotFoundError(FileNotFoundError):
    """No complete adapter with this id under the store's root."""


class LoraSummary(BaseModel):
    """The LoRA settings of an adapter, as its ``adapter_config.json`` has them."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(gt=0, description="LoRA rank.")
    lora_alpha: int | float = Field(description="LoRA scaling numerator (the update is scaled by alpha / r).")
    target_modules: list[str] | str = Field(
        description="The wrapped modules: names (sorted), or one regular expression as PEFT allows."
    )
    lora_dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the LoRA branch while training.")


class AdapterLineage(BaseModel):
    """Where an adapter came from; the learning pipeline fills what it knows, the rest stays empty."""

    model_config = ConfigDict(extra="forbid")

    dataset_manifest_hash: str | None = Field(None, description="Hash of the training dataset's manifest.")
    rehearsal_manifest_hash: str | None = Field(None, description="Hash of the SSR rehearsal set's manifest.")
    dataset_uri: str | None = Field(None, description="Where the training dataset was (a folder or a Parquet file).")
    rehearsal_uri: str | None = Field(None, description="Where the rehearsal set was.")
    parent_adapter_id: str | None = Field(None, description="The adapter this one was trained from, if any.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="Training hyper-parameters.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Training and validation metrics.")
    code_version: str | None = Field(None, description="The code that trained it (a git commit or a version).")


class AdapterManifest(BaseModel):
    """``manifest.json``: what an adapter is, what it applies to, and how it was made."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str = Field(description="The adapter's id, also its directory name.")
    base_model: str = Field(min_length=1, description="The base model it was trained on (profile, path or hub id).")
    created_at: datetime = Field(description="When it was saved, in UTC.")
    peft: LoraSummary = Field(description="The LoRA settings.")
    lineage: AdapterLineage = Field(default_factory=AdapterLineage, description="How it was made.")
    files: dict[str, str] = Field(description="SHA-256 (hex) of each PEFT file, by file name.")

    @field_validator("adapter_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_adapter_id(value)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created_at must carry a time zone (UTC), e.g. 2025-01-31T12:00:00Z")
        return value.astimezone(UTC)


def new_adapter_id(now: datetime | None = None) -> str:
    """A fresh id, ``adp-YYYYMMDD-HHMMSS-<6 hex>``: sortable by time; the random
    suffix keeps ids from processes saving in the same second apart."""
    return new_id("adapter", now)


def check_adapter_id(adapter_id: str) -> str:
    """``adapter_id`` if it is safe as a directory name, else ValueError saying why."""
    return check_id(adapter_id, "adapter")


class AdapterStore:
    """Saves, lists and fetches LoRA adapters under a storage root (see the module docstring).

    Args:
        root: a local directory (default ``data``) or a pyarrow URI (``s3://…``, ``file:///…``).
            Adapters live in its ``adapters/`` folder.
        cache_dir: where adapters of a URI root are downloaded to (default
            ``~/.cache/kaizen/adapters/<hash of the root>``); unused for a local root.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_ROOT,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = os.fspath(root)
        # Any URI, file:// included, goes through pyarrow and the cache; only a plain path is used
        # in place. One rule, so a file:// root behaves exactly as s3:// would.
        self.remote = is_uri(self.root)
        # One file system object for the store's life (pyarrow's in-memory one exists once).
        self._folder = locate(self.root).child(ADAPTERS_DIRNAME)
        self._fs = self._folder.filesystem
        if self.remote:
            # Adapter ids are unique per root, not across roots: one cache folder per root.
            default_cache = DEFAULT_CACHE_DIR / hashlib.sha256(self.root.encode()).hexdigest()[:16]
            self.cache_dir = Path(cache_dir if cache_dir is not None else default_cache).expanduser()
        else:
            self._dir = Path(self._folder.path)
            self.cache_dir = None

    def __repr__(self) -> str:
        return f"AdapterStore({self.root!r})"

    # --- writing -----------------------------------------------------------------------------

    def save(
        self,
        peft_model_or_dir: PeftModel | str | os.PathLike[str],
        *,
        base_model: str,
        adapter_id: str | None = None,
        lineage: AdapterLineage | Mapping[str, Any] | None = None,
    ) -> AdapterManifest:
        """Store a LoRA adapter with its manifest and return the manifest.

        Args:
            peft_model_or_dir: a ``PeftModel`` (its active adapter is saved) or a directory that
                ``save_pretrained`` wrote (``adapter_config.json``, ``adapter_model.safetensors``).
            base_model: the name the base model is loaded by (``tiny``, a hub id, a path).
            adapter_id: default a fresh ``adp-YYYYMMDD-HHMMSS-<6 hex>``.
            lineage: what the learning pipeline knows of the adapter's origin (fields of
                :class:`AdapterLineage`); unknown fields stay null or empty.

        Raises:
            FileExistsError: an adapter with this id is already stored.
            FileNotFoundError: the directory lacks one of the PEFT files.
            ValueError: a bad ``adapter_id``, lineage field, or an adapter that is not LoRA.
            TypeError: ``peft_model_or_dir`` is neither a ``PeftModel`` nor a path.
        """
        now = datetime.now(UTC)
        adapter_id = check_adapter_id(adapter_id) if adapter_id is not None else new_adapter_id(now)
        lineage = AdapterLineage.model_validate(dict(lineage) if isinstance(lineage, Mapping) else lineage or {})
        if self.exists(adapter_id):
            raise FileExistsError(f"adapter_id {adapter_id!r} is already stored at {self.uri(adapter_id)}")

        def write(staging: Path) -> AdapterManifest:
            _write_peft_files(peft_model_or_dir, staging)
            config = json.loads((staging / "adapter_config.json").read_text(encoding="utf-8"))
            manifest = AdapterManifest(
                adapter_id=adapter_id,
                base_model=base_model,
                created_at=now,
                peft=_lora_summary(config, staging / "adapter_config.json"),
                lineage=lineage,
                files={name: file_sha256(staging / name) for name in ADAPTER_FILES},
            )
            (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
            return manifest

        try:
            return publish(self._folder.child(adapter_id), write)
        except FileExistsError as exc:  # a racing save of the same id published first
            raise FileExistsError(f"adapter_id {adapter_id!r} is already stored at {self.uri(adapter_id)}") from exc

    # --- reading -----------------------------------------------------------------------------

    def exists(self, adapter_id: str) -> bool:
        """True when a complete adapter with this id is stored."""
        return artifact_exists(self._folder.child(check_adapter_id(adapter_id)))

    def manifest(self, adapter_id: str) -> AdapterManifest:
        """The stored manifest of an adapter.

        Raises:
            AdapterNotFoundError: no complete adapter with this id.
        """
        if not self.exists(adapter_id):
            raise self._not_found(adapter_id)
        with self._fs.open_input_stream(f"{self._remote_dir(adapter_id)}/{MANIFEST_FILE}") as stream:
            return AdapterManifest.model_validate_json(stream.read())

    def list(self) -> list[AdapterManifest]:
        """Every complete adapter's manifest, oldest first."""
        # Skipped: saves in progress or cut short, and names no adapter may have. A broken
        # manifest, though, is an error, not something to hide.
        manifests = [self.manifest(adapter_id) for adapter_id in list_artifacts(self._folder)]
        return sorted(manifests, key=lambda m: (m.created_at, m.adapter_id))

    def uri(self, adapter_id: str) -> str:
        """Where the adapter lives: a local path, or a URI under a remote root (for the registry)."""
        return self._folder.child(check_adapter_id(adapter_id)).uri

    def local_path(self, adapter_id: str) -> Path:
        """A local directory holding the adapter, for ``PeftModel.from_pretrained`` or vLLM.

        A local root's directory is returned as it is. From a remote root the adapter is
        downloaded once into the cache (atomically, so concurrent callers are safe) and its
        files' SHA-256 are checked against the manifest; later calls reuse that copy, which
        stays valid because a stored adapter never changes.

        Raises:
            AdapterNotFoundError: no complete adapter with this id.
            ValueError: a downloaded file does not match the manifest's checksum.
        """
        check_adapter_id(adapter_id)
        if not self.remote:
            directory = self._dir / adapter_id
            if not (directory / MANIFEST_FILE).is_file():
                raise self._not_found(adapter_id)
            return directory
        assert self.cache_dir is not None
        return ensure_directory(
            self.cache_dir / adapter_id, lambda tmp: self._download(adapter_id, tmp), marker=MANIFEST_FILE
        )

    def _download(self, adapter_id: str, directory: Path) -> None:
        manifest = self.manifest(adapter_id)  # raises AdapterNotFoundError before any copying
        local = pafs.LocalFileSystem()
        for name in ADAPTER_FILES:
            pafs.copy_files(
                f"{self._remote_dir(adapter_id)}/{name}",
                (directory / name).as_posix(),
                source_filesystem=self._fs,
                destination_filesystem=local,
            )
            if file_sha256(directory / name) != manifest.files.get(name):
                raise ValueError(
                    f"adapter {adapter_id!r}: {name} from {self.uri(adapter_id)} does not match the "
                    "SHA-256 in its manifest (corrupt or modified after saving)"
                )
        # The manifest last: ensure_directory treats it as the mark of a complete copy.
        (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")

    # --- loading into a model ------------------------------------------------------------------

    def attach(
        self,
        model: PreTrainedModel | PeftModel,
        adapter_id: str,
        adapter_name: str = "default",
        *,
        is_trainable: bool = False,
    ) -> PeftModel:
        """Load a stored adapter onto a model and make it the active one.

        A plain base model is wrapped with ``PeftModel.from_pretrained``, which injects the LoRA
        layers into it in place (so pass a base model that nothing else uses). A ``PeftModel``
        gets the adapter beside its others under ``adapter_name`` (``load_adapter``), and that
        adapter is activated. Unless ``is_trainable``, the model is left in eval mode with the
        adapter frozen.

        Returns:
            The ``PeftModel`` with the adapter active.
        """
        from peft import PeftModel

        path = self.local_path(adapter_id)
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)
            model.set_adapter(adapter_name)
            if not is_trainable:
                _freeze(model, adapter_name)
            return model
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable)

    def delete(self, adapter_id: str) -> bool:
        """Remove a stored adapter's files (and a remote root's cached copy); False when there was
        none. Its registry row, manifest history and audit entries stay."""
        adapter_id = check_adapter_id(adapter_id)
        found = self.exists(adapter_id)
        if found:
            self._fs.delete_dir(self._remote_dir(adapter_id))
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir / adapter_id, ignore_errors=True)
        return found

    # --- helpers -------------------------------------------------------------------------------

    def _remote_dir(self, adapter_id: str) -> str:
        """The adapter's folder, as a path within the store's file system."""
        return self._folder.child(adapter_id).path

    def _not_found(self, adapter_id: str) -> AdapterNotFoundError:
        return AdapterNotFoundError(
            f"no adapter {adapter_id!r} under {self.root}: {self.uri(adapter_id)}/{MANIFEST_FILE} does not exist"
        )


def _write_peft_files(source: Any, directory: Path) -> None:
    """Put the PEFT files of a ``PeftModel`` or of a saved adapter directory into ``directory``."""
    from peft import PeftModel

    if isinstance(source, PeftModel):
        name = source.active_adapter
        if not isinstance(name, str):
            raise ValueError(f"the model has several active adapters ({name}); activate one to save it")
        exported = directory / "_peft"
        source.save_pretrained(exported, selected_adapters=[name], safe_serialization=True)
        # PEFT writes a non-default adapter into a subdirectory named after it.
        source_dir = exported if name == "default" else exported / name
    elif isinstance(source, (str, os.PathLike)):
        source_dir = Path(source)
        exported = None
    else:
        raise TypeError(f"peft_model_or_dir must be a PeftModel or an adapter directory, not {type(source).__name__}")
    for name in ADAPTER_FILES:
        if not (source_dir / name).is_file():
            raise FileNotFoundError(
                f"{source_dir} has no {name}: not a PEFT adapter directory saved with safetensors "
                "(save_pretrained(..., safe_serialization=True))"
            )
        shutil.copyfile(source_dir / name, directory / name)
    if exported is not None:
        shutil.rmtree(exported)


def _freeze(model: PeftModel, adapter_name: str) -> None:
    """Freeze one adapter's weights. ``set_adapter`` makes the adapter it activates trainable
    (in every PEFT release; only recent ones take ``inference_mode`` to say otherwise)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                layers = getattr(module, layer_name)
                if adapter_name in layers:
                    layers[adapter_name].requires_grad_(False)


def _lora_summary(config: dict[str, Any], path: Path) -> LoraSummary:
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: peft_type is {config.get('peft_type')!r}; the adapter store keeps LoRA adapters only"
        )
    targets = config.get("target_modules")
    # PEFT keeps names as a set, saved in arbitrary order: sort them so manifests compare equal.
    targets = sorted(targets) if isinstance(targets, (list, tuple)) else targets
    return LoraSummary(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        target_modules=targets,
        lora_dropout=config.get("lora_dropout", 0.0),
    )
