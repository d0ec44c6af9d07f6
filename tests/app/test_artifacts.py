"""The artifacts' home: ids, where each kind lives, atomic publish on a local disk, through
pyarrow's file:// and on an object store (manifest last), the split reader's rules, hashes, and
the one schema of a training row."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from app import artifacts
from app.artifacts import (
    KINDS,
    REHEARSAL_ROW_SCHEMA,
    TRAINING_ROW_SCHEMA,
    artifact_exists,
    artifact_location,
    artifact_uri,
    check_id,
    conform,
    data_hash,
    file_sha256,
    find_split,
    list_artifacts,
    locate,
    manifest_hash,
    new_id,
    publish,
)


def _write_files(**files: str):
    """A ``write`` for :func:`publish` that puts ``files`` (name: text) and a manifest, returning 'done'."""

    def write(staging: Path) -> str:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        (staging / "manifest.json").write_text(json.dumps({"files": sorted(files)}))
        return "done"

    return write


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --- ids and places -------------------------------------------------------------------------------


def test_new_ids_have_their_kinds_prefix_sort_by_time_and_differ_within_a_second() -> None:
    now = datetime(2025, 1, 31, 12, 0, 5, tzinfo=UTC)
    prefixes = {
        "dataset": "ds",
        "rehearsal": "ssr",
        "adapter": "adp",
        "model": "model",
        "report": "report",
        "validation": "val",
        "deployment": "dep",
    }
    assert set(KINDS) == set(prefixes)
    for kind, prefix in prefixes.items():
        assert re.fullmatch(rf"{prefix}-20250131-120005-[0-9a-f]{{6}}", new_id(kind, now))
    # Another zone is the same instant: ids are in UTC.
    assert new_id("adapter", now.astimezone(timezone(timedelta(hours=2)))).startswith("adp-20250131-120005-")
    assert new_id("dataset", now) < new_id("dataset", now + timedelta(seconds=1))
    assert len({new_id("adapter", now) for _ in range(20)}) == 20
    with pytest.raises(ValueError, match="artifact kind 'sweep' is not one of dataset, rehearsal"):
        new_id("sweep")


def test_ids_are_safe_folder_names() -> None:
    for good in ("adp-20250131-120005-abcdef", "tiny", "a.b_c-1", "x" * 128):
        assert check_id(good) == good
    for bad in ("", ".hidden", "../escape", "a/b", "a b", "x" * 129, None, 7):
        with pytest.raises(ValueError, match="dataset_id .* is not valid"):
            check_id(bad, "dataset")  # type: ignore[arg-type]
    # The adapter names stay importable where they always were, with their messages.
    from app.model.adapters import check_adapter_id, new_adapter_id

    assert re.fullmatch(r"adp-\d{8}-\d{6}-[0-9a-f]{6}", new_adapter_id())
    with pytest.raises(ValueError, match="adapter_id '../escape' is not valid"):
        check_adapter_id("../escape")


def test_every_kind_has_its_folder_under_the_storage_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert artifact_uri("data", "dataset", "ds-1") == str(tmp_path / "data" / "datasets" / "ds-1")
    assert artifact_uri("data", "rehearsal", "ssr-1") == str(tmp_path / "data" / "rehearsal" / "ssr-1")
    assert artifact_uri("s3://bucket/kaizen/", "adapter", "adp-1") == "s3://bucket/kaizen/adapters/adp-1"
    assert artifact_uri(f"file://{tmp_path}", "report", "r-1") == f"file://{tmp_path}/reports/r-1"
    assert artifact_uri(tmp_path, "model", "tiny") == str(tmp_path / "models" / "tiny")
    assert artifacts.models_dir() == Path("data/models")
    with pytest.raises(ValueError, match="rehearsal_id '../x' is not valid"):
        artifact_uri("data", "rehearsal", "../x")
    with pytest.raises(ValueError, match="artifact kind 'checkpoint'"):
        artifact_uri("data", "checkpoint", "c-1")
    # A location keeps its root's file system object (an in-memory one exists once).
    root = locate("mock:///bucket/kaizen")
    where = artifact_location(root, "dataset", "ds-1")
    assert where.filesystem is root.filesystem and where.path == "bucket/kaizen/datasets/ds-1"
    assert where.uri == "mock:///bucket/kaizen/datasets/ds-1" and not where.local and not where.renames


# --- publishing -----------------------------------------------------------------------------------


def test_local_publish_renames_a_complete_folder_into_place_and_never_overwrites(tmp_path: Path) -> None:
    target = artifact_uri(tmp_path, "dataset", "ds-1")
    assert publish(target, _write_files(**{"train.parquet": "rows", "nested/part.txt": "x"})) == "done"
    assert _tree(Path(target)) == ["manifest.json", "nested", "nested/part.txt", "train.parquet"]
    assert Path(target).stat().st_mode & 0o777 == 0o755  # readable by a cluster's other users
    assert artifact_exists(target) and list_artifacts(tmp_path / "datasets") == ["ds-1"]

    with pytest.raises(FileExistsError, match="already stored at .*ds-1"):
        publish(target, _write_files(**{"train.parquet": "other rows"}))
    assert (Path(target) / "train.parquet").read_text() == "rows"
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == ["ds-1"]  # no staging folder left


def test_a_crash_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    def crash(staging: Path) -> None:
        (staging / "train.parquet").write_text("half")
        raise RuntimeError("disk full")

    target = artifact_uri(tmp_path, "dataset", "ds-crash")
    with pytest.raises(RuntimeError, match="disk full"):
        publish(target, crash)
    assert list((tmp_path / "datasets").iterdir()) == []  # neither the target nor a staging folder

    # A write that forgets the manifest would publish something no reader ever sees: refused.
    with pytest.raises(ValueError, match="nothing wrote its manifest.json"):
        publish(target, lambda staging: (staging / "train.parquet").write_text("rows"))
    assert list((tmp_path / "datasets").iterdir()) == []


def test_a_racing_publish_of_the_same_id_loses_without_overwriting(tmp_path: Path) -> None:
    target = Path(artifact_uri(tmp_path, "rehearsal", "ssr-race"))

    def write_while_another_process_wins(staging: Path) -> None:
        _write_files(**{"rehearsal.parquet": "loser"})(staging)
        _write_files(**{"rehearsal.parquet": "winner"})(target.parent / "winner")
        (target.parent / "winner").rename(target)

    with pytest.raises(FileExistsError, match="ssr-race"):
        publish(target, write_while_another_process_wins)
    assert (target / "rehearsal.parquet").read_text() == "winner"
    assert [p.name for p in target.parent.iterdir()] == ["ssr-race"]


def test_file_uri_publish_goes_through_pyarrow_with_a_hidden_name_and_a_move(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/remote"
    target = artifact_location(root, "adapter", "adp-1")
    assert target.filesystem.type_name == "local" and target.renames and not target.local
    publish(target, _write_files(**{"adapter_model.safetensors": "w", "adapter_config.json": "{}"}))
    folder = tmp_path / "remote" / "adapters"
    assert [p.name for p in folder.iterdir()] == ["adp-1"]
    assert _tree(folder / "adp-1") == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert artifact_exists(target) and list_artifacts(locate(root).child("adapters")) == ["adp-1"]
    with pytest.raises(FileExistsError, match="adp-1"):
        publish(artifact_uri(root, "adapter", "adp-1"), _write_files())


def test_object_store_publish_writes_the_manifest_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file:// location that is told it cannot rename: the object-store branch, on real files.
    target = dataclasses.replace(artifact_location(f"file://{tmp_path}", "dataset", "ds-obj"), renames=False)
    folder = tmp_path / "datasets" / "ds-obj"
    uploaded: list[str] = []
    cut = {"before the manifest": True}
    copy_files = pafs.copy_files

    def cut_before_the_manifest(source: str, destination: str, **kwargs) -> None:
        name = Path(destination).name
        if name == "manifest.json" and cut["before the manifest"]:
            raise OSError("connection reset")
        uploaded.append(name)
        copy_files(source, destination, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", cut_before_the_manifest)
    write = _write_files(**{"validation.parquet": "v", "train.parquet": "t", "train.jsonl": "j"})
    with pytest.raises(OSError, match="connection reset"):
        publish(target, write)
    # The data files arrived in place, the manifest did not: for every reader there is no dataset.
    assert uploaded == ["train.jsonl", "train.parquet", "validation.parquet"]
    assert _tree(folder) == ["train.jsonl", "train.parquet", "validation.parquet"]
    assert not artifact_exists(target) and list_artifacts(tmp_path / "datasets") == []
    assert manifest_hash(target) is None

    # A retry completes it (the upload cut short is no artifact, so nothing is overwritten), and
    # the manifest is the last file written.
    uploaded.clear()
    cut["before the manifest"] = False
    publish(target, write)
    assert uploaded == ["train.jsonl", "train.parquet", "validation.parquet", "manifest.json"]
    assert artifact_exists(target) and list_artifacts(tmp_path / "datasets") == ["ds-obj"]
    with pytest.raises(FileExistsError, match="ds-obj"):
        publish(target, write)


def test_in_memory_object_store_publish_and_read_back() -> None:
    root = locate("mock:///bucket/kaizen")
    target = artifact_location(root, "rehearsal", "ssr-1")
    table = pa.table({"messages": ["[]", "[]"]})

    def write(staging: Path) -> None:
        pq.write_table(table, staging / "rehearsal.parquet")
        (staging / "manifest.json").write_text("{}")

    publish(target, write)
    assert artifact_exists(target) and list_artifacts(root.child("rehearsal")) == ["ssr-1"]
    split = find_split(target, "rehearsal")
    assert split.files == ("bucket/kaizen/rehearsal/ssr-1/rehearsal.parquet",)
    assert split.read(["messages"]).equals(table)
    assert split.manifest_hash == hashlib.sha256(b"{}").hexdigest() == manifest_hash(target)


def test_list_artifacts_skips_what_is_no_complete_artifact(tmp_path: Path) -> None:
    folder = tmp_path / "adapters"
    for name in ("adp-b", "adp-a", ".adp-c.tmp-1234", "adp-half", "not an id"):
        (folder / name).mkdir(parents=True)
    for name in ("adp-b", "adp-a", ".adp-c.tmp-1234", "not an id"):
        (folder / name / "manifest.json").write_text("{}")
    (folder / "adp-file").write_text("a file, not a folder")
    assert list_artifacts(folder) == ["adp-a", "adp-b"]
    assert list_artifacts(tmp_path / "missing") == []


# --- reading a split -------------------------------------------------------------------------------


def _parquet(path: Path, ids: list[str], **extra: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"interaction_id": ids, "messages": [f"[{i}]" for i in ids], **extra}), path)


def _ids(split) -> list[str]:
    return split.read(["interaction_id"]).column("interaction_id").to_pylist()


def _names(split, root: Path) -> list[str]:
    return [Path(f).relative_to(root).as_posix() for f in split.files]


def test_a_file_is_read_as_it_is_with_the_manifest_beside_it(tmp_path: Path) -> None:
    _parquet(tmp_path / "d" / "train.parquet", ["a", "b"])
    split = find_split(tmp_path / "d" / "train.parquet", "validation")  # a file ignores the split
    assert _ids(split) == ["a", "b"] and split.manifest is None
    (tmp_path / "d" / "manifest.json").write_text('{"id": 1}')
    split = find_split(tmp_path / "d" / "train.parquet")
    assert split.manifest == (tmp_path / "d" / "manifest.json").as_posix()
    assert split.manifest_hash == split.data_hash == hashlib.sha256(b'{"id": 1}').hexdigest()


def test_a_dataset_folder_is_read_by_its_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _parquet(root / "train.parquet", ["t1", "t2"])
    _parquet(root / "validation.parquet", ["v1"])
    assert _ids(find_split(root, "train")) == ["t1", "t2"]
    assert _ids(find_split(root, "validation")) == ["v1"]
    # No such split, or no split asked for: every Parquet file, in path order.
    assert _names(find_split(root, "rehearsal"), root) == ["train.parquet", "validation.parquet"]
    assert _names(find_split(root), root) == ["train.parquet", "validation.parquet"]


def test_a_split_folder_is_read_whole_skipping_hidden_and_underscore_names(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for name in ("train/part-1.parquet", "train/part-0.parquet", "train/a-b/x.parquet", "train/a/part-0.parquet"):
        _parquet(root / name, [name])
    for skipped in ("train/.tmp/part-9.parquet", "train/_temporary/part-9.parquet", "train/_part.parquet"):
        _parquet(root / skipped, ["skipped"])
    (root / "train" / "_SUCCESS").write_text("")
    (root / "train" / "notes.txt").write_text("not parquet")
    (root / "train" / "dir.parquet").mkdir()  # a folder with a Parquet name is no file
    _parquet(root / "validation" / "part-0.parquet", ["v"])
    # Sorted by path parts, as pathlib sorts: a/ before a-b/ (as strings, '-' sorts before '/').
    assert _names(find_split(root, "train"), root / "train") == [
        "a/part-0.parquet",
        "a-b/x.parquet",
        "part-0.parquet",
        "part-1.parquet",
    ]
    assert _ids(find_split(root, "validation")) == ["v"]


def test_a_folder_without_a_train_split_keeps_its_validation_and_test_files_out_of_training(tmp_path: Path) -> None:
    root = tmp_path / "rows"
    for name in ("part-0.parquet", "more/part-1.parquet", "validation.parquet", "validation/p.parquet", "test.parquet"):
        _parquet(root / name, [name])
    assert _names(find_split(root, "train"), root) == ["more/part-1.parquet", "part-0.parquet"]
    # Any other split, or none, reads them all.
    assert len(find_split(root, "rehearsal").files) == 5 and len(find_split(root).files) == 5
    assert _names(find_split(root, "validation"), root) == ["validation.parquet"]


def test_nothing_to_read_and_missing_columns_are_errors_that_say_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Parquet rows at .*missing"):
        find_split(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet rows"):
        find_split(tmp_path / "empty", "train")
    _parquet(tmp_path / "only-validation" / "validation.parquet", ["v"])
    with pytest.raises(FileNotFoundError, match="no Parquet rows"):
        find_split(tmp_path / "only-validation", "train")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match=r"plain.parquet: no 'messages' column \(it has: text\)"):
        find_split(tmp_path / "plain.parquet").read(["messages"])


def test_files_of_differing_schemas_are_read_together(tmp_path: Path) -> None:
    _parquet(tmp_path / "d" / "part-0.parquet", ["a"])
    _parquet(tmp_path / "d" / "part-1.parquet", ["b"], quality_score=[0.5])
    table = find_split(tmp_path / "d").read()
    assert table.column("interaction_id").to_pylist() == ["a", "b"]
    assert table.column("quality_score").to_pylist() == [None, 0.5]


def test_a_file_uri_reads_the_same_files_as_the_local_path(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _parquet(root / "train" / "part-0.parquet", ["t"])
    _parquet(root / "train" / "_tmp" / "part-0.parquet", ["skipped"])
    _parquet(root / "validation.parquet", ["v"])
    (root / "manifest.json").write_text("{}")
    local, remote = find_split(root, "train"), find_split(f"file://{root}", "train")
    assert local.files == remote.files and local.manifest == remote.manifest
    assert _ids(remote) == ["t"] and local.data_hash == remote.data_hash


# --- hashes ----------------------------------------------------------------------------------------


def test_hashes_follow_the_manifest_else_the_files_names_and_bytes(tmp_path: Path) -> None:
    blob = b"x" * (3 << 20)  # more than one read block
    (tmp_path / "big.bin").write_bytes(blob)
    assert file_sha256(tmp_path / "big.bin") == hashlib.sha256(blob).hexdigest()
    assert file_sha256((tmp_path / "big.bin").as_posix(), pafs.LocalFileSystem()) == hashlib.sha256(blob).hexdigest()

    first = tmp_path / "first"
    _parquet(first / "train.parquet", ["a"])
    _parquet(first / "validation.parquet", ["b"])
    files = [first / "train.parquet", first / "validation.parquet"]
    digest = data_hash(files, first / "manifest.json")  # no manifest there: the files decide
    expected = hashlib.sha256()
    for f in files:
        expected.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    assert digest == expected.hexdigest()
    assert data_hash(list(reversed(files)), None) == digest  # order given does not matter
    assert find_split(first).data_hash == digest

    # The same files elsewhere hash the same; other bytes do not.
    second = tmp_path / "second"
    shutil.copytree(first, second)
    assert data_hash([second / "validation.parquet", second / "train.parquet"], None) == digest
    _parquet(second / "train.parquet", ["changed"])
    assert find_split(second).data_hash != digest

    # With a manifest, the manifest's SHA-256 is the hash, wherever the set is read from.
    (first / "manifest.json").write_text('{"dataset_id": "ds-1"}')
    assert find_split(first, "train").data_hash == hashlib.sha256(b'{"dataset_id": "ds-1"}').hexdigest()
    assert (
        find_split(f"file://{first}", "validation").data_hash
        == manifest_hash(first)
        == manifest_hash(f"file://{first}")
    )


# --- the training row ------------------------------------------------------------------------------


def test_the_training_row_schema_is_what_the_dataset_writer_writes() -> None:
    from app.learning.dataset import DATASET_SCHEMA

    assert TRAINING_ROW_SCHEMA.equals(DATASET_SCHEMA)
    assert REHEARSAL_ROW_SCHEMA.names[: len(TRAINING_ROW_SCHEMA)] == TRAINING_ROW_SCHEMA.names
    assert REHEARSAL_ROW_SCHEMA.names[len(TRAINING_ROW_SCHEMA) :] == [
        "source_domain",
        "synthesized_by",
        "refined_by",
        "cluster",
        "demonstration_ids",
        "output_confidence",
    ]


def test_conform_casts_orders_fills_and_drops(tmp_path: Path) -> None:
    when = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    rows = pa.table(
        {
            "messages": ['[{"role": "user", "content": "hi"}]'],
            "extra": [1],
            "timestamp": pa.array([when], type=pa.timestamp("us", tz="UTC")),  # the benchmark's type
            "interaction_id": ["i-1"],
            "quality_score": pa.array([1], type=pa.int64()),
        }
    )
    table = conform(rows)
    assert table.schema.equals(TRAINING_ROW_SCHEMA)
    row = table.to_pylist()[0]
    assert row["timestamp"] == when.replace(tzinfo=None)  # the same instant, UTC without a zone
    assert row["quality_score"] == 1.0 and row["interaction_id"] == "i-1"
    assert row["domain"] is None and row["output"] is None and "extra" not in row
    # It survives Parquet as it is.
    pq.write_table(table, tmp_path / "rows.parquet")
    assert pq.read_table(tmp_path / "rows.parquet").schema.equals(TRAINING_ROW_SCHEMA)
    # Into another schema (a rehearsal row): the provenance columns it lacks are null.
    assert conform(table, REHEARSAL_ROW_SCHEMA).column("cluster").null_count == 1
    assert conform(pa.table({"messages": pa.array([], pa.string())})).num_rows == 0

    with pytest.raises(ValueError, match="column 'quality_score' of the carried set cannot be read as double"):
        conform(pa.table({"quality_score": ["high"]}), origin="the carried set")
