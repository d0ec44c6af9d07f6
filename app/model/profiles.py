"""Base models by name: built-in profiles, local checkpoint directories, and Hugging Face ids
already in the local cache. Nothing is ever downloaded.

Profiles:

* ``tiny``: a ``Qwen2ForCausalLM`` with Qwen2.5's real vocabulary (151,936 embedding rows, as
  Qwen2.5's small models pad it) and the real tokenizer, but 64 wide and 2 layers deep, so that
  training, serving and tests run on a CPU in seconds. Its weights come from a fixed seed; it is
  built on first use into ``<root>/models/tiny`` as an ordinary Hugging Face directory
  (``config.json``, ``model.safetensors``, tokenizer files), so every other part loads it with
  ``AutoModelForCausalLM.from_pretrained`` exactly as it would load a real Qwen2.5 checkpoint.
* ``qwen2.5-7b-shape``: Qwen2.5-7B's (and Qwen2.5-Coder-7B's) exact architecture with random
  weights, for GPU benchmarks of memory and throughput without the real weights. It is created
  in memory on the GPU and never saved: 7.6 billion parameters would take ~30 GB on a CPU.

Real models (``Qwen/Qwen2.5-Coder-7B-Instruct`` or a local path) load in bf16 on a GPU and fp32
on a CPU, optionally quantised to 4 bits (NF4, as QLoRA does) with bitsandbytes.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from app.artifacts import ensure_directory, models_dir
from app.model.tokenizer import TOKENIZER_DIRNAME, ensure_tokenizer_dir, load_tokenizer

# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56; older releases
# would silently ignore the new name and load fp32.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Weight init draws from torch's process-wide generator: two threads creating models at once would
# interleave their draws and break "same seed, same weights".
_CREATE_LOCK = threading.Lock()

ENDOFTEXT_ID = 151643
IM_END_ID = 151645


@dataclass(frozen=True)
class ModelProfile:
    """A named model that Kaizen creates itself rather than loads from a checkpoint."""

    name: str
    description: str
    config: Mapping[str, Any] = field(repr=False)
    """Keyword arguments of ``Qwen2Config``."""
    seed: int = 0
    """The seed its weights are drawn from: the same seed gives bit-identical weights."""
    saved: bool = True
    """True: built once into ``<root>/models/<name>`` and loaded from there. False: built in
    memory on each load (too large to keep)."""
    cpu: bool = True
    """False: refuses to be materialised on a CPU."""


# Qwen2.5's common settings: the 0.5B model's config with 151,936 embedding rows and tied
# embeddings; width and depth shrunk to some 40,000 parameters per layer.
TINY = ModelProfile(
    name="tiny",
    description="Qwen2 architecture, real Qwen2.5 vocabulary, 64 wide, 2 layers: for CPU and tests",
    config={
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 2,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
    },
)

# Qwen2.5-7B-Instruct's config.json (Qwen2.5-Coder-7B-Instruct's is the same shape).
QWEN25_7B_SHAPE = ModelProfile(
    name="qwen2.5-7b-shape",
    description="Qwen2.5-7B's architecture with random weights: GPU benchmarks only",
    config={
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
    },
    saved=False,
    cpu=False,
)

PROFILES: dict[str, ModelProfile] = {p.name: p for p in (TINY, QWEN25_7B_SHAPE)}


class LoadedModel(NamedTuple):
    """What ``load_model`` returns; unpacks as ``model, tokenizer = load_model(...)``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no profile, no local checkpoint and not in the local HF cache."""


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantize_4bit: bool = False,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """A causal language model and its tokenizer, by profile name, local path or Hugging Face id.

    Args:
        name_or_path: a profile (``tiny``, ``qwen2.5-7b-shape``), a directory holding a Hugging
            Face checkpoint, or a hub id such as ``Qwen/Qwen2.5-Coder-7B-Instruct`` that is
            already in the local Hugging Face cache. A profile name wins over a same-named
            directory in the working directory.
        dtype: default bf16 on a GPU and fp32 on a CPU; a ``torch.dtype`` or its name.
        device: default ``cuda`` where CUDA is available, else ``cpu``.
        quantize_4bit: load the weights as 4-bit NF4 with bitsandbytes (QLoRA); GPU only.
        root: the storage root under which profiles and the tokenizer are built (default ``data``).
        cache_dir: the Hugging Face cache to look hub ids up in (default: HF_HUB_CACHE).

    Returns:
        ``LoadedModel(model, tokenizer)``, the model in eval mode on ``device``.

    Raises:
        ModelNotFoundError: the name is none of the above; the message lists what was tried.
        ValueError: a CPU was asked to hold ``qwen2.5-7b-shape``, or to quantise to 4 bits.
        ImportError: ``quantize_4bit`` without bitsandbytes installed (the ``gpu`` extra).
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    quantization = _four_bit_config(device, dtype) if quantize_4bit else None
    name = os.fspath(name_or_path)

    profile = PROFILES.get(name)
    if profile is not None and not profile.saved:
        if quantization is not None:
            raise ValueError(
                f"quantize_4bit=True needs a checkpoint to quantise; profile {name!r} is built in "
                "memory with random weights, so load it unquantised"
            )
        model = create_profile_model(name, dtype=dtype, device=device)
        return LoadedModel(model, load_tokenizer(models_dir(root) / TOKENIZER_DIRNAME))

    path = model_path(name, root=root, cache_dir=cache_dir)
    kwargs: dict[str, Any] = {_DTYPE_KWARG: dtype, "local_files_only": True}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device.type != "cpu":
        # Straight onto the device: a 7B checkpoint should not pass through host memory first.
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model, tokenizer)


def model_path(
    name_or_path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The checkpoint directory a name stands for, building a saved profile on first use.

    This is the path to hand to ``from_pretrained`` (or to vLLM, or a Ray Train worker): a
    profile's directory under ``<root>/models``, a local directory, or the snapshot directory
    of a hub id in the local Hugging Face cache. See ``load_model`` for the arguments.
    """
    name = os.fspath(name_or_path)
    if name in PROFILES:
        profile = PROFILES[name]
        if not profile.saved:
            raise ValueError(f"profile {name!r} is never saved: load_model builds it in memory on the GPU")
        return ensure_profile_dir(name, root=root)

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} is a directory without config.json: not a model checkpoint")
        return local

    tried = [f"a profile ({', '.join(PROFILES)})", f"a local directory ({local.absolute()})"]
    if _HUB_ID.match(name):
        snapshot = _cached_snapshot(name, cache_dir)
        if snapshot is not None:
            return snapshot
        tried.append(f"a Hugging Face id in the local cache ({_cache_location(cache_dir)})")
    raise ModelNotFoundError(
        f"no model {name!r}: it is not " + ", nor ".join(tried) + ". Nothing is downloaded at run "
        "time: fetch the checkpoint into the cache beforehand, or pass its local directory."
    )


def ensure_profile_dir(name: str, *, root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/models/<name>``, built on first use for a saved profile: fp32 weights from the
    profile's seed, with Qwen2.5's tokenizer files. Safe when several processes race."""
    profile = _profile(name)
    if not profile.saved:
        raise ValueError(f"profile {name!r} is never saved: load_model builds it in memory")
    models = models_dir(root)

    def build(directory: Path) -> None:
        model = create_profile_model(name, dtype=torch.float32, device="cpu")
        model.save_pretrained(directory)
        tokenizer_dir = ensure_tokenizer_dir(models / TOKENIZER_DIRNAME)
        for file in tokenizer_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, directory / file.name)

    return ensure_directory(models / name, build, marker="config.json")


def profile_config(name: str) -> Qwen2Config:
    """The ``Qwen2Config`` of a profile (cheap: nothing is materialised)."""
    return Qwen2Config(**_profile(name).config)


def create_profile_model(
    name: str,
    *,
    seed: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """A profile's model with fresh weights drawn from ``seed`` (default: the profile's).

    The caller's random state is left as it was, and concurrent calls from several threads are
    serialised so that each gets its seed's weights. ``device="meta"`` gives the shapes alone.

    Raises:
        ValueError: a profile that refuses the CPU (``qwen2.5-7b-shape``) was asked for there.
    """
    profile = _profile(name)
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if device.type == "cpu" and not profile.cpu:
        raise ValueError(
            f"profile {name!r} is for GPU benchmarks: materialising it on a CPU would take tens of "
            "gigabytes; pass a CUDA device (or device='meta' for its shapes alone)"
        )
    config = profile_config(name)
    cuda_devices = [device.index] if device.type == "cuda" else []
    with _CREATE_LOCK, torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(profile.seed if seed is None else seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KWARG: dtype})
    # As Qwen2.5-Instruct: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>. Greedy
    # by default (Instruct samples), so that a tiny model's output is reproducible.
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID
    )
    model.eval()
    return model


def _profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; profiles: {', '.join(PROFILES)}") from None


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available in this process")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype):
            return resolved
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dtype


def _four_bit_config(device: torch.device, dtype: torch.dtype) -> Any:
    if device.type != "cuda":
        raise ValueError(
            f"quantize_4bit=True needs a CUDA GPU (bitsandbytes' 4-bit kernels are GPU-only); "
            f"the device here is {device}"
        )
    try:
        import bitsandbytes  # noqa: F401  (a GPU-only extra: imported only when asked for)
    except ImportError as exc:
        raise ImportError(
            "quantize_4bit=True needs bitsandbytes, which is in the GPU extra: pip install 'kaizen[gpu]'"
        ) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def _cached_snapshot(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _cache_location(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
