"""Options of ``jobs/sweep.py``: the search space over the fine-tuning options and how the
trials are scheduled.

A search entry is a list of values (drawn uniformly) or a range ``{min, max, log}`` (uniform, or
log-uniform with ``log: true``; whole numbers for integer options such as ``lora_rank``). Only the
options below may be searched: they are the ones that change what a run learns and forgets.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.learning import check_folder_id

__all__ = [
    "SEARCHABLE",
    "SearchRange",
    "SweepConfig",
    "check_search",
    "new_sweep_id",
    "relevant_search",
]

SEARCHABLE = (
    "lr",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "rehearsal_ratio",
    "mask_fraction",
    "ewc_lambda",
    "weight_decay",
    "epochs",
)
"""The fine-tuning options a sweep may search over."""

_INTEGER = {"lora_rank", "epochs"}


class SearchRange(BaseModel):
    """A continuous (or, for an integer option, whole-number) range."""

    model_config = ConfigDict(extra="forbid")

    min: float = Field(description="Lowest value.")
    max: float = Field(description="Highest value.")
    log: bool = Field(False, description="Draw log-uniformly (both bounds must be positive).")

    @model_validator(mode="after")
    def _order(self) -> SearchRange:
        if self.max <= self.min:
            raise ValueError(f"max ({self.max}) must be above min ({self.min})")
        if self.log and self.min <= 0:
            raise ValueError(f"log: a log-uniform range needs min > 0 (got {self.min})")
        return self


def _default_search() -> dict[str, Any]:
    return {
        "lr": SearchRange(min=5e-5, max=1e-3, log=True),
        "lora_rank": [4, 8, 16],
        "lora_alpha": [8.0, 16.0, 32.0],
        "rehearsal_ratio": [0.1, 0.2, 0.3],
        "mask_fraction": [0.3, 0.5, 0.7],
    }


class SweepConfig(BaseModel):
    """Options of ``jobs/sweep.py``; on its command line each is ``sweep.<key>=<value>``."""

    model_config = ConfigDict(extra="forbid")

    sweep_id: str | None = Field(
        None, description="Name of the sweep's folder <model.checkpoint_dir>/sweeps/<id>; default sweep-<time>-<hex>."
    )
    search: dict[str, list[float] | SearchRange] = Field(
        default_factory=_default_search,
        description=(
            "Fine-tuning option -> a list of values or {min, max, log}; searchable: " + ", ".join(SEARCHABLE) + ". "
            "Options that cannot matter (mask_fraction without finetune.masking=fggm, rehearsal_ratio without "
            "rehearsal rows, ewc_lambda without masking=ewc) are left out of a sweep with a note."
        ),
    )
    method: Literal["random", "grid"] = Field(
        "random",
        description="random: num_samples configurations drawn from the space; grid: every combination of the "
        "listed values (ranges are refused), each run num_samples times.",
    )
    num_samples: int = Field(4, ge=1, description="Trials: configurations drawn (random), or repeats of the grid.")
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials run at once (each takes finetune.num_workers x finetune.cpus_per_worker CPUs)."
    )
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop trials whose objective trails at each rung; fifo: run every trial to the end."
    )
    grace_period_steps: int = Field(
        4, ge=1, description="asha: optimizer steps every trial gets before it can be stopped (its first rung)."
    )
    reduction_factor: float = Field(2.0, gt=1, description="asha: 1/reduction_factor of the trials go on at each rung.")
    max_failures: int = Field(0, ge=0, description="Times a failed trial is retried (on top of finetune.max_failures).")
    seed: int = Field(0, description="Seed of the configurations drawn.")

    @field_validator("sweep_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return check_folder_id(value)

    @field_validator("search")
    @classmethod
    def _searchable(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(SEARCHABLE))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not searchable (searchable: {', '.join(SEARCHABLE)})")
        for key, space in value.items():
            if isinstance(space, list) and not space:
                raise ValueError(f"{key}: an empty list of values")
            if key in _INTEGER and isinstance(space, list) and any(float(v) != int(v) for v in space):
                raise ValueError(f"{key}: takes whole numbers (got {space})")
        if not value:
            raise ValueError("nothing to search: give at least one option")
        return value

    @model_validator(mode="after")
    def _grid(self) -> SweepConfig:
        ranges = sorted(k for k, v in self.search.items() if isinstance(v, SearchRange))
        if self.method == "grid" and ranges:
            raise ValueError(f"method: grid takes lists of values; {', '.join(ranges)} is a range")
        return self


def new_sweep_id(now: datetime | None = None) -> str:
    """A fresh id, ``sweep-YYYYMMDD-HHMMSS-<6 hex>``."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"sweep-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def relevant_search(
    search: Mapping[str, Any], finetune: Mapping[str, Any], *, has_rehearsal: bool
) -> tuple[dict[str, Any], list[str]]:
    """The entries of ``search`` that can change a run with these fine-tuning options, and a note
    for each one left out."""
    masking = finetune.get("masking", "none")
    reasons = {
        "mask_fraction": None if masking == "fggm" else f"finetune.masking is {masking}, not fggm",
        "ewc_lambda": None if masking == "ewc" else f"finetune.masking is {masking}, not ewc",
        "rehearsal_ratio": None if has_rehearsal else "there are no rehearsal rows",
    }
    kept, notes = {}, []
    for key, space in search.items():
        if reasons.get(key):
            notes.append(f"sweep.search.{key} left out: {reasons[key]}")
        else:
            kept[key] = space
    return kept, notes


def check_search(search: Mapping[str, Any], finetune: Mapping[str, Any]) -> list[str]:
    """Errors (``sweep.search.<key>: reason``) for values that no fine-tuning run would accept
    with these options: each list value and each range's ends are checked."""
    from app.learning.training import FinetuneConfig

    errors = []
    for key, space in search.items():
        values = space if isinstance(space, list) else [space.min, space.max]
        for value in values:
            value = int(value) if key in _INTEGER else float(value)
            try:
                FinetuneConfig.model_validate({**finetune, key: value})
            except ValidationError as exc:
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                errors.append(f"sweep.search.{key}: {value!r} is refused by finetune ({reason})")
                break
    return errors


def tune_space(search: Mapping[str, Any], *, grid: bool = False) -> dict[str, Any]:
    """The search space as Ray Tune domains (with ``grid``, every list is a grid axis)."""
    from ray import tune

    space = {}
    for key, entry in search.items():
        if isinstance(entry, list):
            values = [int(v) if key in _INTEGER else float(v) for v in entry]
            space[key] = tune.grid_search(values) if grid else tune.choice(values)
        elif key in _INTEGER:
            low, high = int(entry.min), int(entry.max) + 1  # randint's upper bound is exclusive
            space[key] = tune.lograndint(max(low, 1), high) if entry.log else tune.randint(low, high)
        else:
            space[key] = tune.loguniform(entry.min, entry.max) if entry.log else tune.uniform(entry.min, entry.max)
    return space
