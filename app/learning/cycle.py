"""Options of ``jobs/learn.py``: one learning cycle, from the store to a candidate adapter.

The stages' own options are their sections (``dataset``, ``ssr``, ``finetune``, ``sweep``);
this section says which stages run and what protects the earlier domains.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LearnConfig"]


class LearnConfig(BaseModel):
    """Options of ``jobs/learn.py``; on its command line each is ``learn.<key>=<value>``."""

    model_config = ConfigDict(extra="forbid")

    train_with: Literal["finetune", "sweep"] = Field(
        "finetune", description="finetune: one run with the finetune section; sweep: a Ray Tune sweep (sweep section)."
    )
    rehearsal: Literal["ssr", "real", "none"] = Field(
        "ssr",
        description=(
            "What is rehearsed of the earlier domains (the champion's dataset): ssr: Self-Synthesized Rehearsal "
            "from a small sample of it; real: its training rows themselves; none: nothing. The first cycle, "
            "without a champion, has nothing to rehearse."
        ),
    )
    carry_rehearsal: bool = Field(
        True,
        description=(
            "With ssr: keep the champion's own SSR rows of the domains before its dataset (ssr.carry_over), so "
            "that every earlier cycle's domains are rehearsed, each as the model that had just learned it answered."
        ),
    )
    measure_forgetting: bool = Field(
        True,
        description="Measure forgetting on the champion's dataset's validation split (held out from training).",
    )
    min_train_rows: int = Field(
        32, ge=1, description="Dataset check: fewest training rows a cycle trains on; fewer stop the cycle."
    )
    max_duplicate_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Dataset check: largest share of rows whose request repeats another row's; more stop the cycle.",
    )
    max_group_share: float = Field(
        0.8,
        gt=0,
        le=1,
        description=(
            "Dataset check: largest share of rows one group (alike in dataset.balance_by) may hold when there are "
            "several; more stop the cycle (a set of one group passes)."
        ),
    )
    max_redacted_share: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Dataset check: largest share of rows holding a privacy filter's [REDACTED:...] placeholder.",
    )
    run_id: str | None = Field(
        None,
        description=(
            "The scheduler's training run this cycle is (set by the scheduler): each stage is kept in its "
            "training_runs row as it starts and ends. None: a cycle run by hand, kept in its record file only."
        ),
    )
    validate_candidate: bool = Field(
        True,
        description="End the cycle with the validation job on the candidate (kaizen validate: the verdict, the report, "
        "the registry status); a production verdict is what the deployer takes up. false: the cycle ends with the "
        "candidate.",
    )
