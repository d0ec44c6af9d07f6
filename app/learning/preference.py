"""Direct preference optimisation on a run's preference pairs (``finetune.objective`` ``dpo`` or
``sft+dpo``; Rafailov et al., 2023), for :class:`app.learning.trainer.Trainer`.

:class:`PreferenceObjective` holds what the DPO loss needs beside the policy: each pair's reference
log-likelihoods, computed once from the same model with the adapter disabled (the base model), and
the loss and reward margin of a micro-batch of pairs under the policy (the loss module, or its DDP
or DeepSpeed wrapper in a training step). The loss itself is :func:`app.learning.training.dpo_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from app.learning.run_state import Rows
from app.learning.tokenization import collate
from app.learning.training import dpo_loss

__all__ = ["PreferenceObjective"]


class PreferenceObjective:
    """DPO on tokenized pairs (``chosen`` and ``rejected`` token rows, from
    :func:`app.learning.tokenization.tokenize_pair`) with ``beta`` (``finetune.dpo_beta``)."""

    def __init__(
        self,
        loss_module: nn.Module,
        peft_model: Any,
        *,
        beta: float,
        batch_size: int,
        pad_id: int,
        autocast: Callable[[], AbstractContextManager[Any]],
        to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    ) -> None:
        self.loss_module, self.peft_model = loss_module, peft_model
        self.beta, self.batch_size, self.pad_id = beta, batch_size, pad_id
        self.autocast, self.to_device = autocast, to_device

    @torch.no_grad()
    def add_reference_logps(self, pairs: Rows) -> None:
        """Each pair's reference log-likelihoods, ``reference_chosen`` and ``reference_rejected``: the
        answers' summed log-probabilities under the same model with the adapter disabled (the base
        model), without dropout. The reference never changes, so one pass serves every step."""
        loss_module = self.loss_module
        was_training = loss_module.training
        loss_module.eval()
        with self.peft_model.disable_adapter():
            for i in range(0, len(pairs), self.batch_size):
                chunk = pairs[i : i + self.batch_size]
                with self.autocast():
                    logps, _ = loss_module(**self.batch(chunk), per_row=True)
                for pair, chosen, rejected in zip(chunk, logps[: len(chunk)], logps[len(chunk) :]):
                    pair["reference_chosen"], pair["reference_rejected"] = float(chosen), float(rejected)
        loss_module.train(was_training)

    def batch(self, pairs: Rows) -> dict[str, torch.Tensor]:
        """The chosen answers of ``pairs``, then their rejected ones, as one batch on the device."""
        return self.to_device(collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], self.pad_id))

    def losses(self, model: nn.Module, pairs: Rows) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The DPO loss and reward margin of each of ``pairs`` under ``model``, and the batch's input
        tokens."""
        batch = self.batch(pairs)
        with self.autocast():
            logps, _ = model(**batch, per_row=True)
        k = len(pairs)
        reference = torch.tensor(
            [[p["reference_chosen"], p["reference_rejected"]] for p in pairs], dtype=logps.dtype, device=logps.device
        )
        losses, margins = dpo_loss(logps[:k], logps[k:], reference[:, 0], reference[:, 1], self.beta)
        return losses, margins, int(batch["attention_mask"].sum())

    @torch.no_grad()
    def sums(self, pairs: Rows) -> tuple[float, float, float]:
        """The current adapter's summed DPO loss, summed reward margin and count of pairs whose chosen
        answer it prefers more than the reference does, over ``pairs``; the unwrapped module, without
        dropout."""
        loss_module = self.loss_module
        was_training = loss_module.training
        loss_module.eval()
        loss_sum = margin_sum = preferred = 0.0
        for i in range(0, len(pairs), self.batch_size):
            losses, margins, _ = self.losses(loss_module, pairs[i : i + self.batch_size])
            loss_sum += float(losses.sum())
            margin_sum += float(margins.sum())
            preferred += float((margins > 0).sum())
        loss_module.train(was_training)
        return loss_sum, margin_sum, preferred
