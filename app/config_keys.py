"""Every key of the configuration tree with its value, default and description: what
``kaizen config check --list`` and ``--markdown`` print (the README's key table), and what
``kaizen up`` audits of the config it starts with (:func:`changed_keys`, secrets masked)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from app.config import JOB_SECTIONS, KaizenConfig, job_options, job_options_class

__all__ = ["ConfigKey", "changed_keys", "config_keys", "masked"]


@dataclass(frozen=True)
class ConfigKey:
    """One leaf of the tree as ``kaizen config check --list`` prints it (values as in YAML)."""

    key: str
    value: Any
    default: Any
    description: str


def _leaves(model: BaseModel, default: BaseModel, prefix: str) -> Iterator[ConfigKey]:
    for name, info in type(model).model_fields.items():
        value, base = getattr(model, name), getattr(default, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, base, f"{prefix}{name}.")
        else:
            yield ConfigKey(
                f"{prefix}{name}", to_jsonable_python(value), to_jsonable_python(base), info.description or ""
            )


def config_keys(cfg: KaizenConfig, job_sections: bool = True) -> list[ConfigKey]:
    """Every key of ``cfg`` with its value, its default and its description, in tree order; the job
    sections (``dataset``, ``ssr``...) key by key through their options classes.

    Raises:
        ConfigError: a job section that its options class refuses.
    """
    keys = []
    for item in _leaves(cfg, KaizenConfig(), ""):
        if item.key not in JOB_SECTIONS:
            keys.append(item)
        elif job_sections:
            keys += _leaves(job_options(cfg, item.key), job_options_class(item.key)(), f"{item.key}.")
    return keys


def masked(key: str, value: Any) -> Any:
    """A key's value with its secret masked (a listing or an audit entry may end up in a ticket)."""
    if key == "privacy.hmac_key" and value:
        return "***"
    if key == "store.postgres_dsn" and isinstance(value, str):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", value)
    return value


def changed_keys(cfg: KaizenConfig) -> dict[str, Any]:
    """The keys set to something else than their default, secrets masked."""
    return {k.key: masked(k.key, k.value) for k in config_keys(cfg, job_sections=False) if k.value != k.default}
