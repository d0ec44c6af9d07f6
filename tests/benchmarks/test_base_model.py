"""The learning benchmarks' base model is the same model every time its settings are, and shared by them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.model.tokenizer import TOKENIZER_DIRNAME, ensure_tokenizer_dir
from benchmarks.base_model import BaseSettings, build_base_model, ensure_base_model
from benchmarks.data_selection import REQUIRED_ABILITIES
from benchmarks.forgetting import Settings

TINY = BaseSettings(pretrain_steps=12, copy_warmup_steps=4, pretrain_batch=8)


def test_pre_training_is_deterministic(tmp_path: Path) -> None:
    tokenizer_dir = ensure_tokenizer_dir(tmp_path / TOKENIZER_DIRNAME)
    s = TINY
    before = torch.are_deterministic_algorithms_enabled()
    stats = [build_base_model(tmp_path / f"base{i}", tokenizer_dir, s) for i in range(2)]
    assert torch.are_deterministic_algorithms_enabled() == before  # restored for the caller
    assert stats[0]["final_loss"] == stats[1]["final_loss"]
    first, second = (load_file(tmp_path / f"base{i}" / "model.safetensors") for i in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # A different seed is a different model: the check above can tell models apart.
    build_base_model(tmp_path / "other", tokenizer_dir, replace(s, seed=1))
    other = load_file(tmp_path / "other" / "model.safetensors")
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_words_bare_and_spaced_tokens_are_paired(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from benchmarks.base_model import spelling_pairs

    tokenizer = AutoTokenizer.from_pretrained(ensure_tokenizer_dir(tmp_path / TOKENIZER_DIRNAME), local_files_only=True)
    (apple,) = tokenizer("apple", add_special_tokens=False)["input_ids"]
    (spaced_apple,) = tokenizer(" apple", add_special_tokens=False)["input_ids"]
    (river,) = tokenizer("river", add_special_tokens=False)["input_ids"]
    remap = torch.full((151936,), -1, dtype=torch.long)
    remap[torch.tensor([apple, spaced_apple, river])] = torch.arange(3)
    # Rows of the pre-training table; "river" has no spaced token in the corpus, so no pair.
    assert spelling_pairs(tokenizer, remap) == [(int(remap[apple]), int(remap[spaced_apple]))]


def test_a_base_short_of_the_required_abilities_is_pre_trained_again_from_the_next_seed(tmp_path: Path) -> None:
    # 12 steps teach nothing, so every base falls short and each attempt is a seed of its own.
    s = replace(TINY, seed=5)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError) as caught:
        ensure_base_model(tmp_path / "work", cache, s, required=REQUIRED_ABILITIES, attempts=2)
    message = str(caught.value)
    assert "seeds 5 to 6" in message and "seed 5: " in message and "seed 6: " in message
    assert all(name in message for name in REQUIRED_ABILITIES)
    bases = sorted(cache.iterdir())
    assert [b.name for b in bases] == sorted(f"forgetting-base-{replace(s, seed=k).base_key()}" for k in (5, 6))
    # Without the requirement the first seed's base is taken, from the cache, as it was.
    base_dir, base = ensure_base_model(tmp_path / "work", cache, s, required=(), attempts=2)
    assert base_dir == cache / f"forgetting-base-{s.base_key()}"
    assert base["pretrain_seed"] == 5 and base["set_aside"] == [] and base["reused"] == str(base_dir)
    assert set(base["abilities"]) == {"copy", "last", "first", "first-two", "drop-last"}


def test_the_base_is_keyed_by_its_pre_training_alone() -> None:
    # The forgetting benchmark's own settings do not name another base: the benchmarks share one cache.
    assert Settings(train_rows=16, lr=0.1).base_key() == BaseSettings().base_key()
    assert Settings(seed=2).base_key() == BaseSettings(seed=2).base_key() != BaseSettings().base_key()
    assert BaseSettings(pretrain_steps=10).base_key() != BaseSettings().base_key()
