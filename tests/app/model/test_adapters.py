"""The adapter store, with a LoRA adapter trained here on the tiny model: saved, listed, fetched
from local and remote-style roots, and loaded back onto a fresh base model."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from app.model import load_model, model_path
from app.model.adapters import AdapterManifest, AdapterNotFoundError, AdapterStore
from app.registry import AdapterRegistry
from app.store.sqlite import SQLiteStore

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class Trained(NamedTuple):
    model: Any  # the PeftModel, in eval mode
    batch: dict[str, torch.Tensor]
    losses: list[float]
    logits: torch.Tensor  # the trained model's logits on ``batch``


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def trained(model_root: Path) -> Trained:
    """LoRA (r=4 on q_proj, v_proj) trained for 10 AdamW steps on one fixed batch."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # LoRA's A matrices are drawn at random
    base, tokenizer = load_model("tiny", root=model_root, device="cpu")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    batch = dict(
        tokenizer(["def add(a, b):\n    return a + b\n", "print('hello, world')\n"], padding=True, return_tensors="pt")
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return Trained(model, batch, losses, _logits(model, batch))


@pytest.fixture
def fresh_base(model_root: Path) -> Any:
    """The tiny base model as saved, untouched by any adapter (attaching one modifies it)."""
    # from_pretrained directly: load_model would also load the tokenizer, a second per test.
    model = AutoModelForCausalLM.from_pretrained(model_path("tiny", root=model_root), local_files_only=True)
    return model.eval()


def test_lora_training_lowers_the_loss(trained: Trained) -> None:
    # A fixed batch and a small rank: the loss falls by about half a nat in ten steps.
    assert trained.losses[-1] < trained.losses[0] - 0.3, trained.losses


def test_save_writes_peft_files_and_manifest(trained: Trained, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    lineage = {
        "dataset_manifest_hash": "d" * 64,
        "hyperparameters": {"lr": 2e-2, "steps": 10},
        "metrics": {"train_loss": trained.losses[-1]},
    }
    manifest = store.save(trained.model, base_model="tiny", lineage=lineage)

    assert re.fullmatch(r"adp-\d{8}-\d{6}-[0-9a-f]{6}", manifest.adapter_id)
    directory = tmp_path / "adapters" / manifest.adapter_id
    assert {p.name for p in directory.iterdir()} == PEFT_FILES | {"manifest.json"}
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == [manifest.adapter_id]  # no temporary left

    written = json.loads((directory / "manifest.json").read_text())
    assert set(written) == {"adapter_id", "base_model", "created_at", "peft", "lineage", "files"}
    assert written["adapter_id"] == manifest.adapter_id and written["base_model"] == "tiny"
    created = datetime.fromisoformat(written["created_at"])
    assert created.utcoffset() == timedelta(0) and datetime.now(UTC) - created < timedelta(minutes=5)
    assert manifest.adapter_id[4:19] == created.strftime("%Y%m%d-%H%M%S")
    assert written["peft"] == {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0,
    }
    assert written["lineage"] == {
        "dataset_manifest_hash": "d" * 64,
        "rehearsal_manifest_hash": None,
        "dataset_uri": None,
        "rehearsal_uri": None,
        "parent_adapter_id": None,
        "hyperparameters": {"lr": 2e-2, "steps": 10},
        "metrics": {"train_loss": trained.losses[-1]},
        "code_version": None,
    }
    assert written["files"] == {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in PEFT_FILES
    }

    assert store.exists(manifest.adapter_id) and not store.exists("adp-other")
    assert store.manifest(manifest.adapter_id) == manifest
    assert store.list() == [manifest]
    assert store.local_path(manifest.adapter_id) == directory
    assert store.uri(manifest.adapter_id) == str(directory)


def test_attached_adapter_reproduces_the_trained_logits(trained: Trained, tmp_path: Path, fresh_base: Any) -> None:
    store = AdapterStore(tmp_path)
    adapter_id = store.save(trained.model, base_model="tiny").adapter_id
    base_logits = _logits(fresh_base, trained.batch)
    assert not torch.allclose(base_logits, trained.logits)  # training changed something to reproduce

    model = store.attach(fresh_base, adapter_id)
    assert not model.training
    torch.testing.assert_close(_logits(model, trained.batch), trained.logits, rtol=0, atol=0)

    # A second adapter beside the first, under its own name, becomes the active one, frozen.
    assert store.attach(model, adapter_id, adapter_name="again") is model
    assert model.active_adapter == "again" and set(model.peft_config) == {"default", "again"}
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(model, trained.batch), trained.logits, rtol=0, atol=0)
    # Saving a model whose active adapter is not "default" stores that adapter's weights.
    again = store.save(model, base_model="tiny")
    weights = "adapter_model.safetensors"
    assert again.files[weights] == store.manifest(adapter_id).files[weights]


def test_file_uri_root_goes_through_pyarrow_and_the_cache(trained: Trained, tmp_path: Path, fresh_base: Any) -> None:
    root = f"file://{tmp_path}/remote"
    store = AdapterStore(root, cache_dir=tmp_path / "cache")
    manifest = store.save(trained.model, base_model="tiny", lineage={"parent_adapter_id": "adp-parent"})
    remote_dir = tmp_path / "remote" / "adapters" / manifest.adapter_id
    assert {p.name for p in remote_dir.iterdir()} == PEFT_FILES | {"manifest.json"}
    assert [p.name for p in remote_dir.parent.iterdir()] == [manifest.adapter_id]
    assert store.uri(manifest.adapter_id) == f"{root}/adapters/{manifest.adapter_id}"

    # Another process (a new store on the same root) sees it and downloads it once.
    other = AdapterStore(root, cache_dir=tmp_path / "cache")
    assert other.list() == [manifest] and other.manifest(manifest.adapter_id).lineage.parent_adapter_id == "adp-parent"
    local = other.local_path(manifest.adapter_id)
    assert local == tmp_path / "cache" / manifest.adapter_id
    assert {p.name for p in local.iterdir()} == PEFT_FILES | {"manifest.json"}
    inode = (local / "adapter_model.safetensors").stat().st_ino
    assert other.local_path(manifest.adapter_id) == local
    assert (local / "adapter_model.safetensors").stat().st_ino == inode  # reused, not fetched again

    model = other.attach(fresh_base, manifest.adapter_id)
    torch.testing.assert_close(_logits(model, trained.batch), trained.logits, rtol=0, atol=0)


def test_object_store_root_commits_with_the_manifest_last(trained: Trained, tmp_path: Path) -> None:
    # pyarrow's in-memory file system stands in for S3: no atomic directory rename.
    store = AdapterStore("mock:///bucket/kaizen", cache_dir=tmp_path / "cache")
    exported = tmp_path / "exported"
    trained.model.save_pretrained(exported)
    manifest = store.save(exported, base_model="tiny", adapter_id="adp-mock-1")
    assert store.list() == [manifest] and store.exists("adp-mock-1")
    assert (
        store.local_path("adp-mock-1").joinpath("adapter_model.safetensors").read_bytes()
        == (exported / "adapter_model.safetensors").read_bytes()
    )

    # An upload cut short (files, no manifest) is not an adapter for any reader.
    store._fs.create_dir("bucket/kaizen/adapters/adp-half")
    with store._fs.open_output_stream("bucket/kaizen/adapters/adp-half/adapter_config.json") as f:
        f.write(b"{}")
    assert not store.exists("adp-half") and [m.adapter_id for m in store.list()] == ["adp-mock-1"]
    with pytest.raises(AdapterNotFoundError, match="adp-half"):
        store.local_path("adp-half")
    assert not (tmp_path / "cache" / "adp-half").exists()

    # A stored file changed behind the manifest's back is refused on download.
    with store._fs.open_output_stream("bucket/kaizen/adapters/adp-mock-1/adapter_model.safetensors") as f:
        f.write(b"tampered")
    store.cache_dir = tmp_path / "cache2"
    with pytest.raises(ValueError, match="adapter_model.safetensors .*SHA-256"):
        store.local_path("adp-mock-1")
    assert not (tmp_path / "cache2" / "adp-mock-1").exists()


def test_save_and_lookup_errors_name_the_problem(trained: Trained, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "root")
    exported = tmp_path / "exported"
    trained.model.save_pretrained(exported)
    store.save(exported, base_model="tiny", adapter_id="adp-fixed")
    with pytest.raises(FileExistsError, match="adp-fixed"):
        store.save(exported, base_model="tiny", adapter_id="adp-fixed")
    with pytest.raises(ValueError, match="adapter_id '../escape' is not valid"):
        store.save(exported, base_model="tiny", adapter_id="../escape")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        store.save(tmp_path / "root", base_model="tiny")
    with pytest.raises(TypeError, match="peft_model_or_dir"):
        store.save(object(), base_model="tiny")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="dataset_hash"):
        store.save(exported, base_model="tiny", lineage={"dataset_hash": "x"})
    with pytest.raises(AdapterNotFoundError, match="adp-missing"):
        store.manifest("adp-missing")
    with pytest.raises(AdapterNotFoundError, match="adp-missing"):
        store.local_path("adp-missing")
    # Nothing half-made is left behind by the failures.
    assert [m.adapter_id for m in store.list()] == ["adp-fixed"]
    assert [p.name for p in (tmp_path / "root" / "adapters").iterdir()] == ["adp-fixed"]
    with pytest.raises(ValidationError, match="created_at"):
        AdapterManifest.model_validate(
            {**store.manifest("adp-fixed").model_dump(), "created_at": "2025-01-01T00:00:00"}
        )


def test_registered_champion_resolves_to_a_loadable_adapter(trained: Trained, tmp_path: Path, fresh_base: Any) -> None:
    adapters = AdapterStore(f"file://{tmp_path}/remote", cache_dir=tmp_path / "cache")
    manifest = adapters.save(trained.model, base_model="tiny")
    db = SQLiteStore(tmp_path / "kaizen.db")
    db.migrate()
    try:
        registry = AdapterRegistry(db)
        row = registry.register(manifest, adapters.uri(manifest.adapter_id), actor="learn-job")
        assert row["uri"] == adapters.uri(manifest.adapter_id) and row["manifest"] == manifest.model_dump(mode="json")
        registry.set_status(manifest.adapter_id, "validated", actor="validate-job", reason="beats champion")
        registry.set_alias("champion", manifest.adapter_id, actor="deployer", reason="first champion")
        adapter_id = registry.champion()
    finally:
        db.close()
    model = adapters.attach(fresh_base, adapter_id)
    torch.testing.assert_close(_logits(model, trained.batch), trained.logits, rtol=0, atol=0)
