"""Model profiles and loading: the tiny model as an ordinary Hugging Face directory, its
determinism, the 7B shape (config only on CPU), cached hub ids, errors, and the race-safe build."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from app.artifacts import ensure_directory, models_dir
from app.model import (
    PROFILES,
    ModelNotFoundError,
    create_profile_model,
    load_model,
    model_path,
    profile_config,
)


def _rope_theta(config) -> float:
    # transformers 5 keeps it in rope_parameters; 4.x as an attribute.
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-identical weights, ``b``'s cast to ``a``'s dtype (a no-op when they match)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.fixture(scope="module")
def tiny_reference() -> torch.nn.Module:
    """The tiny profile freshly created from its seed, to compare saved copies with."""
    return create_profile_model("tiny")


def test_tiny_config_has_qwen25_vocabulary_and_small_shape() -> None:
    config = profile_config("tiny")
    assert config.model_type == "qwen2"
    assert config.vocab_size == 151936
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (151643, 151645)
    assert _rope_theta(config) == 1e6


def test_tiny_is_saved_as_an_ordinary_hugging_face_directory(model_root: Path, tiny_reference) -> None:
    directory = model_path("tiny", root=model_root)
    assert directory == models_dir(model_root) / "tiny"
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # Tied embeddings keep it small: one 151936 x 64 fp32 matrix and a little more.
    assert (directory / "model.safetensors").stat().st_size < 45_000_000

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert isinstance(model, Qwen2ForCausalLM)
    assert _same_weights(model, tiny_reference)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    inputs = tokenizer(["def add(a, b):", "Hello, world!"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, inputs.input_ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    state = torch.random.get_rng_state()
    first = create_profile_model("tiny", seed=7)
    second = create_profile_model("tiny", seed=7)
    other = create_profile_model("tiny", seed=8)
    assert _same_weights(first, second)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr()  # tied
    # The caller's random stream is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)


def test_load_model_tiny_on_cpu_and_generate(model_root: Path) -> None:
    model, tokenizer = load_model("tiny", root=model_root)
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write add(a, b)."}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    n = inputs.input_ids.shape[1]
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, n + 4)
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False))
    assert isinstance(tokenizer.decode(out[0, n:]), str)
    assert model.generation_config.eos_token_id == [151645, 151643]


def test_load_model_rejects_a_dtype_that_is_not_one(model_root: Path) -> None:
    with pytest.raises(ValueError, match="dtype='int9'"):
        load_model("tiny", root=model_root, dtype="int9")


def test_qwen25_7b_shape_config_without_materialising_it() -> None:
    config = profile_config("qwen2.5-7b-shape")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (3584, 28, 18944)
    assert (config.num_attention_heads, config.num_key_value_heads) == (28, 4)
    assert config.vocab_size == 152064 and config.tie_word_embeddings is False
    assert _rope_theta(config) == 1e6
    # On the meta device: shapes without storage. Qwen2.5-7B has 7,615,616,512 parameters.
    model = create_profile_model("qwen2.5-7b-shape", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
    assert not PROFILES["qwen2.5-7b-shape"].saved


def test_qwen25_7b_shape_refuses_the_cpu(model_root: Path) -> None:
    with pytest.raises(ValueError, match="GPU benchmarks"):
        create_profile_model("qwen2.5-7b-shape", device="cpu")
    with pytest.raises(ValueError, match="GPU benchmarks"):
        load_model("qwen2.5-7b-shape", device="cpu", root=model_root)
    with pytest.raises(ValueError, match="never saved"):
        model_path("qwen2.5-7b-shape", root=model_root)


def test_local_directory_loads_by_path(model_root: Path, tmp_path: Path, tiny_reference) -> None:
    copy = tmp_path / "my-checkpoint"
    shutil.copytree(models_dir(model_root) / "tiny", copy)
    model, tokenizer = load_model(copy)
    assert _same_weights(model, tiny_reference)
    assert tokenizer.eos_token == "<|im_end|>"


def test_hub_id_loads_from_the_local_cache_only(model_root: Path, tmp_path: Path, tiny_reference) -> None:
    # The Hugging Face cache layout: models--<org>--<name>/refs/main names a snapshot folder.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kaizen-test--tiny-copy"
    shutil.copytree(models_dir(model_root) / "tiny", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    model, tokenizer = load_model("kaizen-test/tiny-copy", cache_dir=tmp_path / "hub", dtype="bfloat16")
    assert Path(model.name_or_path) == repo / "snapshots" / commit
    assert model.dtype == torch.bfloat16
    assert _same_weights(model, tiny_reference)
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]


def test_unknown_names_raise_and_say_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'no-such-model'.*tiny, qwen2.5-7b-shape.*local directory"):
        load_model("no-such-model", root=tmp_path)
    empty_cache = tmp_path / "empty-hub"
    with pytest.raises(ModelNotFoundError, match=rf"Hugging Face id in the local cache \({empty_cache}\)"):
        load_model("Qwen/Qwen2.5-Coder-7B-Instruct", cache_dir=empty_cache, root=tmp_path)
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        load_model(tmp_path)
    assert not (tmp_path / "models").exists()  # nothing was built on the way


def test_quantize_4bit_without_cuda_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize_4bit=True needs a CUDA GPU"):
        load_model("tiny", device="cpu", quantize_4bit=True, root=tmp_path)
    assert not (tmp_path / "models").exists()


def test_ensure_directory_keeps_the_winner_of_a_race(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def build_while_another_process_wins(directory: Path) -> None:
        (directory / "marker").write_text("loser")
        target.mkdir()
        (target / "marker").write_text("winner")

    assert ensure_directory(target, build_while_another_process_wins, marker="marker") == target
    assert (target / "marker").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # the loser's copy is gone


def test_ensure_directory_leaves_nothing_behind_when_the_build_fails(tmp_path: Path) -> None:
    def failing(directory: Path) -> None:
        (directory / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_directory(tmp_path / "thing", failing, marker="marker")
    assert list(tmp_path.iterdir()) == []


def test_threads_creating_tiny_at_once_agree(model_root: Path, tmp_path: Path, tiny_reference) -> None:
    # The tokenizer is already there (copied), so the race is over the model directory: both
    # threads build a copy, one publishes it, the other finds it published and drops its own.
    shutil.copytree(models_dir(model_root) / "qwen2.5-tokenizer", models_dir(tmp_path) / "qwen2.5-tokenizer")
    start = threading.Barrier(2)

    def create() -> Path:
        start.wait()
        return model_path("tiny", root=tmp_path)

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: create(), range(2)))
    assert paths == [models_dir(tmp_path) / "tiny"] * 2
    assert sorted(p.name for p in models_dir(tmp_path).iterdir()) == ["qwen2.5-tokenizer", "tiny"]
    loaded = AutoModelForCausalLM.from_pretrained(paths[0], local_files_only=True)
    assert _same_weights(loaded, tiny_reference)


@pytest.mark.gpu
def test_tiny_on_gpu_in_bf16(model_root: Path) -> None:
    model, tokenizer = load_model("tiny", root=model_root)
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    inputs = tokenizer("Hello, world!", return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.gpu
def test_qwen25_7b_shape_on_gpu(model_root: Path) -> None:
    model, tokenizer = load_model("qwen2.5-7b-shape", root=model_root)
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512
    inputs = tokenizer("def add(a, b):", return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], 152064)
    del model
    torch.cuda.empty_cache()
