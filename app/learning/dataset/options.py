"""Options of ``jobs/build_dataset.py`` (:class:`DatasetConfig`), the threshold manager and the
dataset id they make, and the error that stops the job when too few interactions are left."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.artifacts import new_id
from app.learning import check_folder_id
from app.quality.thresholds import ThresholdManager

__all__ = ["DatasetConfig", "InsufficientDataError", "new_dataset_id", "threshold_manager"]


class DatasetConfig(BaseModel):
    """Options of ``jobs/build_dataset.py``; on its command line each is ``dataset.<key>=<value>``."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str | None = Field(
        None, description="Name of the output folder <storage_root>/datasets/<id>; default a fresh ds-<time>-<hex>."
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Base inclusion threshold before the domain and complexity adjustments; None: quality.threshold.",
    )
    domain_adjustments: dict[str, float] = Field(
        default_factory=dict,
        description="Added to the threshold per domain (language), as ThresholdManager learns them: {python: 0.02}.",
    )
    since: datetime | None = Field(None, description="Only interactions at or after this time (ISO 8601).")
    until: datetime | None = Field(None, description="Only interactions before this time (ISO 8601).")
    corrections: bool = Field(
        True,
        description=(
            "Learn from users' corrections: a corrected interaction's answer becomes the correction "
            "(learning_type 'correction'; it passes the quality threshold) and (prompt, correction, the model's "
            "answer) a preference pair in <split>_preferences.parquet; false: a corrected answer is left out like "
            "every answer a user turned down (learning without corrections). Answers turned down without a "
            "correction are never training targets either way."
        ),
    )
    min_examples: int = Field(
        16, ge=1, description="Fewest rows a dataset may have; fewer left after selection stops the job."
    )
    near_duplicate_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity of word shingles at or above which two are near duplicates.",
    )
    shingle_size: int = Field(5, ge=1, description="Words per shingle of the near-duplicate check.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a finer Jaccard estimate).")
    balance_by: list[Literal["language", "task", "complexity"]] = Field(
        default_factory=lambda: ["language", "task", "complexity"],
        description="What makes a group for balancing; empty: no balancing.",
    )
    max_group_share: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Largest share of the rows one group may keep (its best rows by quality); 1.0: no cap.",
    )
    keep_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the balanced rows the diverse selection keeps (rounded up)."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Most rows the selection keeps, whatever keep_fraction gives; None: no cap."
    )
    selection: Literal["k_center", "k_means"] = Field(
        "k_center",
        description="k_center: greedy farthest-first, O(n*k); k_means: one row per k-means cluster (large pools).",
    )
    quality_weight: float = Field(
        1.0, ge=0, description="Exponent of the quality score in the selection's priority (0: diversity alone)."
    )
    confidence_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Exponent of the score's confidence in the selection's priority: a score backed by evidence (a user's "
            "rating, tests that ran) outranks an equal one inferred without it (0: confidence ignored)."
        ),
    )
    quality_neighbours: int = Field(
        20,
        ge=0,
        description=(
            "The selection compares a row's quality with that of the requests most like it (this many nearest "
            "by embedding): the scorers rate some kinds of request higher than others (a one-word answer is "
            "less 'relevant' to its question than a long one), and the selection should take the best answers "
            "of every kind rather than more of the kinds that score high (0: raw scores)."
        ),
    )
    loss_filter_ratio: float = Field(
        0.0,
        ge=0,
        description=(
            "Before the selection, drop answers a probe finds implausible: a short LoRA fine-tune of the base model "
            "on the pool (the finetune section's recipe, until loss_filter_learned_loss) learns what most answers "
            "to each kind of request say, and a row whose answer loss per token is above this multiple of the median "
            "contradicts them: the assistant's systematic mistakes that users rated well, which the scores cannot "
            "tell from good answers. Corrections are never dropped. 0: no probe (it costs a short training run)."
        ),
    )
    loss_filter_steps: int = Field(
        300,
        ge=1,
        description=(
            "The probe's optimizer steps between two measurements of the pool's answer losses (with "
            "loss_filter_ratio): after each round it stops if it has learned the pool (loss_filter_learned_loss)."
        ),
    )
    loss_filter_max_steps: int = Field(
        1200,
        ge=1,
        description=(
            "The most optimizer steps the probe takes (its learning rate decays over them); at least "
            "loss_filter_steps. A probe that reaches them without learning the pool judges with what it has."
        ),
    )
    loss_filter_learned_loss: float = Field(
        0.05,
        gt=0,
        description=(
            "The probe has learned what most answers say once the median answer loss per token over the pool is at "
            "most this (the answer's tokens predicted with a probability of about 0.95 each), and stops there. "
            "Before that, the median is high and an answer that contradicts the rest is not far above it: on the "
            "data-selection benchmark a probe at a median of 0.46 left 130 of 206 poor rows in, at 0.035 none."
        ),
    )
    loss_filter_max_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description=(
            "Most of the pool the loss filter may drop (the highest losses first): a pool in which one kind of "
            "request is answered unlike the rest is not thrown away with its mistakes."
        ),
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of rows in validation, chosen by a hash of the interaction id."
    )
    include_tool_calls: bool = Field(
        True, description="Keep the interaction's tool calls as assistant tool_calls and tool messages."
    )
    max_tool_output_chars: int = Field(
        2000, ge=0, description="A tool message keeps at most this many characters of the tool's output."
    )
    seed: int = Field(0, description="Seed of MinHash and k-means (the split depends on the ids alone).")
    batch_size: int = Field(64, ge=1, description="Rows per batch of every stage.")
    read_actors: int = Field(1, ge=1, description="Store readers (each with its own connection).")
    embed_actors: int = Field(1, ge=1, description="Embedding actors (each loads MiniLM once).")
    embed_num_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor (torch threads).")

    @field_validator("dataset_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return check_folder_id(value)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("domain_adjustments")
    @classmethod
    def _small(cls, value: dict[str, float]) -> dict[str, float]:
        for domain, delta in value.items():
            if not -0.5 <= delta <= 0.5:
                raise ValueError(f"{domain}: an adjustment must lie in [-0.5, 0.5] (got {delta})")
        return value

    @model_validator(mode="after")
    def _window(self) -> DatasetConfig:
        if self.since and self.until and self.until <= self.since:
            raise ValueError(f"until ({self.until.isoformat()}) must be after since ({self.since.isoformat()})")
        if self.loss_filter_max_steps < self.loss_filter_steps:
            raise ValueError(
                f"loss_filter_max_steps ({self.loss_filter_max_steps}) must be at least loss_filter_steps "
                f"({self.loss_filter_steps}), the probe's first round"
            )
        return self


def threshold_manager(base: float, adjustments: Mapping[str, float] | None = None) -> ThresholdManager:
    """The threshold manager for a base inclusion threshold and per-domain adjustments."""
    return ThresholdManager(
        base={"training_inclusion": base},
        adjustments={f"domain_{domain}": delta for domain, delta in (adjustments or {}).items()},
    )


def new_dataset_id(now: datetime | None = None) -> str:
    """A fresh id, ``ds-YYYYMMDD-HHMMSS-<6 hex>``: sortable by time, apart within a second."""
    return new_id("dataset", now)


class InsufficientDataError(RuntimeError):
    """Too few interactions are left to make a dataset; the message says how many and why."""
