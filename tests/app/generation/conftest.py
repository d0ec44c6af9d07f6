"""Fixtures of the generation tests: an adapter store with trained adapters, and a service."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from app.generation import GeneratorService
from app.model.adapters import AdapterStore
from tests.app.generation.common import ANSWER, PROMPTS, request
from tests.conftest import train_answer_adapter


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> AdapterStore:
    """Adapters ``a1`` (trained to answer ANSWER), ``a2`` (a1 with its LoRA update negated:
    neither the base nor a1) and ``a3`` (a copy of a1 under another id). Shared by the test
    modules: nothing changes a stored adapter."""
    root = tmp_path_factory.mktemp("adapters")
    store = AdapterStore(root)
    a1 = train_answer_adapter(model_root, store, "a1", ANSWER, PROMPTS[:2])

    negated = root / "negated"
    negated.mkdir()
    source = store.local_path(a1.adapter_id)
    shutil.copy(source / "adapter_config.json", negated)
    weights = load_file(source / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, negated / "adapter_model.safetensors")
    store.save(negated, base_model="tiny", adapter_id="a2")
    store.save(source, base_model="tiny", adapter_id="a3")
    store.save(source, base_model="another-model", adapter_id="other-base")
    return store


@pytest.fixture(scope="module")
def service(model_root: Path, store: AdapterStore) -> GeneratorService:
    return GeneratorService("tiny", root=model_root, adapter_store=store, device="cpu")


@pytest.fixture(scope="module")
def base_texts(service: GeneratorService) -> dict[str, str]:
    """The base model's greedy text for each prompt, before any adapter was attached."""
    assert service.loaded_adapters() == []
    return {p: service.complete(request(p)).text for p in PROMPTS}
