"""A fine-tuning run's state, apart from the model: where it is (:class:`RunState`, what a
checkpoint records), a seed's trial at the choice (:class:`TrialResult`), the objective that
early stopping, the kept adapter and a sweep follow (:func:`objective`), and one optimizer step's
rows and sums (:class:`StepWindow`, :class:`StepFigures`)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any

import torch

from app.learning.masking import ForgettingProtection

__all__ = ["RngState", "Rows", "RunState", "StepFigures", "StepWindow", "TrialResult", "objective"]

Rows = list[dict[str, Any]]

RngState = tuple[torch.Tensor, torch.Tensor | None]
"""torch's CPU generator state and, on a GPU, the device's."""


def objective(val_loss: float, forgetting: float | None, weight: float) -> float:
    """What a run minimises and a sweep ranks by: the validation loss plus ``weight`` times the
    rise of the held-out earlier domains' loss (a fall is no credit: 0)."""
    return val_loss + weight * max(0.0, forgetting or 0.0)


@dataclass
class RunState:
    """Where a run is, as checkpointed: the next window to train is ``window`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    window: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0
    epoch_loss: float = 0.0
    epoch_label_tokens: int = 0
    first_loss: float | None = None
    initial_val_loss: float | None = None
    last_val_loss: float | None = None
    initial_heldout_loss: float | None = None
    last_heldout_loss: float | None = None
    early_stopping: dict[str, Any] = field(default_factory=lambda: {"best": None, "bad_evals": 0})
    best_params: dict[str, torch.Tensor] | None = None
    best_figures: dict[str, float] = field(default_factory=dict)
    """The evaluation figures of ``best_params``: val_loss, heldout_loss, forgetting, objective."""
    restarts: int = 0
    resumed_from_step: int | None = None
    seed: int = 0
    """The seed of the data order, and of the LoRA initialisation of a fresh adapter (see ``finetune.trials``)."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """With ``finetune.trials`` > 1: each seed's steps and evaluation at the choice."""
    loss_head: list[float] = field(default_factory=list)
    """The training loss of the run's first steps (:meth:`record_loss`)."""
    loss_tail: list[float] = field(default_factory=list)
    """The training loss of its latest steps, as many as ``loss_head`` holds at most."""
    loss_steps: int = 0
    """Steps whose loss was recorded."""
    attempt: int = 0
    """Which attempt this is (``finetune.attempts``), from 0; at the end, the kept adapter's."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """The attempts that ended: each one's seed, steps, stop reason and kept adapter's figures."""
    earlier: dict[str, Any] | None = None
    """The best earlier attempt's state (its fields, ``best_params`` among them), until the run ends."""

    def record_loss(self, loss: float, window: int) -> None:
        """Keep a step's training loss among the first and the latest ``window`` steps, from which
        :meth:`loss_trend` tells whether the run learned."""
        if len(self.loss_head) < window:
            self.loss_head.append(loss)
        self.loss_tail = [*self.loss_tail, loss][-window:]
        self.loss_steps += 1

    def loss_trend(self) -> tuple[float, float] | None:
        """The mean training loss of the first and of the latest steps, the same number at each end
        and no step at both (half the steps each in a short run); None with fewer than 2 steps,
        where no trend can be told."""
        k = min(len(self.loss_head), self.loss_steps // 2)
        if k < 1:
            return None
        return sum(self.loss_head[:k]) / k, sum(self.loss_tail[-k:]) / k

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> RunState:
        """The state a checkpoint's train state records, counted as one more restart."""
        state = cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
        state.restarts += 1
        state.resumed_from_step = state.step
        return state

    def kept_figures(self, forgetting_weight: float) -> dict[str, Any]:
        """The kept adapter's figures: the best objective's (else the last evaluation's)."""
        if self.best_params is None:
            forgetting = None if self.last_heldout_loss is None else self.last_heldout_loss - self.initial_heldout_loss
            kept = {"val_loss": self.last_val_loss, "heldout_loss": self.last_heldout_loss, "forgetting": forgetting}
            if self.last_val_loss is not None:
                kept["objective"] = objective(self.last_val_loss, forgetting, forgetting_weight)
            return kept
        return {"heldout_loss": None, "forgetting": None, **self.best_figures}


@dataclass
class TrialResult:
    """A seed's trial at the choice: its evaluation and everything the run goes on from if it wins."""

    figures: dict[str, float]
    state: RunState
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    protection: ForgettingProtection | None
    step_metrics: list[dict[str, float]]
    """Its steps, not reported yet."""
    rng: RngState
    """The random generators' state after it, so that its dropout goes on as in a run of its own."""
    evaluations: list[dict[str, Any]]
    """Its validations, the last at its end."""


@dataclass
class StepWindow:
    """What one optimizer step trains on: micro-batches of training rows (their answers are
    targets) and of preference pairs (tokenized by :func:`~app.learning.tokenization.tokenize_pair`,
    with their reference log-likelihoods)."""

    targets: list[Rows] = field(default_factory=list)
    pairs: list[Rows] = field(default_factory=list)


@dataclass
class StepFigures:
    """One optimizer step's sums on this rank, or over every rank (:meth:`reduced`)."""

    loss_sum: float = 0.0
    """Summed token cross-entropy of the targets' answers."""
    label_tokens: float = 0.0
    input_tokens: float = 0.0
    dpo_loss_sum: float = 0.0
    """Summed DPO loss of the pairs."""
    pairs: float = 0.0
    margin_sum: float = 0.0
    """Summed reward margins of the pairs (:func:`~app.learning.training.dpo_loss`)."""
    preferred: float = 0.0
    """Pairs whose margin is positive: the policy prefers the chosen answer more than the reference does."""

    def reduced(self, all_reduce: Any, *extra: float) -> tuple[StepFigures, list[float]]:
        """These sums over every rank (``all_reduce`` of the context), and ``extra`` values summed with them."""
        values = all_reduce([*astuple(self), *extra])
        n = len(astuple(self))
        return StepFigures(*values[:n]), values[n:]

    @property
    def loss(self) -> float:
        """The step's loss: the targets' token-weighted cross-entropy plus the pairs' mean DPO loss."""
        return self.loss_sum / max(self.label_tokens, 1.0) + (self.dpo_loss_sum / self.pairs if self.pairs else 0.0)

    def metrics(self) -> dict[str, float]:
        """The DPO figures of a step with pairs (and its SFT loss beside them): empty without pairs."""
        if not self.pairs:
            return {}
        out = {"sft_loss": self.loss_sum / self.label_tokens} if self.label_tokens else {}
        return {
            **out,
            "dpo_loss": self.dpo_loss_sum / self.pairs,
            "dpo_reward_margin": self.margin_sum / self.pairs,
            "dpo_accuracy": self.preferred / self.pairs,
        }
