"""Protection against forgetting for LoRA fine-tuning: Fisher-guided gradient masking and EWC.

Both start from the diagonal of the Fisher information of the trainable (LoRA) parameters,
estimated empirically as the mean squared gradient of the loss over a data set
(:func:`estimate_fisher`): a large value says that the loss on that data is sensitive to that
entry, so the entry matters to it.

* **Gradient masking** (FGGM, Tan et al. 2026, "Fisher-Guided Gradient Masking for Continual
  Learning"): a binary mask per tensor lets only a share of the entries move
  (:func:`fisher_masks`, :func:`apply_masks` after each backward). Which share is a documented
  choice, ``mode``:

  - ``"least_important"`` (the default here): the Fisher comes from *earlier* tasks' data
    (rehearsal rows of earlier domains, or a held-out earlier set); the ``fraction`` of entries
    that matter least to them is updated and the rest, the ones that matter most, are frozen.
    This protects old knowledge directly.
  - ``"most_important"`` (the paper's own rule): the Fisher comes from the *new* task's data and
    only the top ``fraction`` of entries for it is updated, which keeps the change small and
    targeted without needing any old data.

  ``granularity="row"`` scores each output row (a weight matrix's row, i.e. one output unit)
  by the mean Fisher of its entries and masks whole rows, as the paper's input-dimension
  aggregation does; ``"entry"`` masks single entries.
* **EWC** (Kirkpatrick et al. 2017): instead of freezing, a quadratic penalty
  ``lam / 2 * sum(F * (theta - theta_anchor) ** 2)`` (:func:`ewc_penalty`) pulls the entries
  back towards their values before fine-tuning, each in proportion to its importance.

A masked entry stays exactly where it was only if nothing else moves it: its gradient is zero,
so Adam's moments stay zero and its step is zero, but decoupled weight decay (AdamW's
``weight_decay``) would still shrink it. Train masked runs without weight decay.

:class:`ForgettingProtection` is what a training run holds of either: the Fisher information, the
anchor and, for FGGM, the masks, behind the calls a training step makes (:meth:`~ForgettingProtection.penalty`
on the loss, :meth:`~ForgettingProtection.mask_gradients` after backward). :func:`fisher_source`
says which of a run's sets the Fisher information is estimated on.

Everything here is plain torch on ``named_parameters()`` names; it runs on any ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from app.learning.training import ForgettingConfig

__all__ = [
    "ForgettingProtection",
    "MaskGranularity",
    "MaskMode",
    "apply_masks",
    "estimate_fisher",
    "ewc_penalty",
    "fisher_masks",
    "fisher_source",
    "mask_summary",
    "register_mask_hooks",
    "snapshot_parameters",
    "trainable_parameters",
]

MaskMode = Literal["least_important", "most_important"]
MaskGranularity = Literal["entry", "row"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require gradients, by ``named_parameters()`` name (for a PEFT
    LoRA model: the adapter's ``lora_A``/``lora_B`` weights)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters: the anchor of :func:`ewc_penalty`."""
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A Hugging Face model's own loss: ``model(**batch).loss`` (labels in the batch)."""
    return model(**batch).loss


@torch.no_grad()
def _accumulate(fisher: dict[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
    for name, p in params.items():
        if p.grad is not None:
            fisher[name].add_(p.grad.detach().float().pow(2))


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher information of ``model``'s trainable parameters.

    For each batch the loss is back-propagated and the squared gradient of every trainable
    parameter is added up; the sum is divided by the number of batches. With batches of one
    example this is the textbook empirical Fisher, ``mean_j (d log p(y_j|x_j) / d theta) ** 2``;
    larger batches square the batch's mean gradient instead, a cheaper estimate that ranks
    parameters much the same.

    The model runs in eval mode (no dropout) and its ``.grad`` fields are left as they were
    found: the estimate does not leak into a later optimizer step.

    Args:
        model: any module; only parameters with ``requires_grad`` are scored.
        batches: what ``loss_fn`` takes, one item per backward pass.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss``.
        max_batches: stop after this many batches (default: all of them).

    Returns:
        ``{name: tensor}`` shaped like each trainable parameter, float32, on its device.

    Raises:
        ValueError: the model has no trainable parameters, or ``batches`` is empty.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters to estimate the Fisher information of")
    loss_fn = loss_fn or _default_loss
    saved_grads = {name: p.grad for name, p in params.items()}
    was_training = model.training
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    model.eval()
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            for p in params.values():
                p.grad = None
            loss = loss_fn(model, batch)
            loss.backward()
            _accumulate(fisher, params)
            count += 1
    finally:
        for name, p in params.items():
            p.grad = saved_grads[name]
        model.train(was_training)
    if count == 0:
        raise ValueError("no batches to estimate the Fisher information from")
    return {name: f / count for name, f in fisher.items()}


def _scores(value: torch.Tensor, granularity: MaskGranularity) -> torch.Tensor:
    """What entries are ranked by: the Fisher itself, or its mean over each output row."""
    if granularity == "row" and value.dim() >= 2:
        return value.flatten(1).mean(dim=1)
    return value.flatten()


def fisher_masks(
    fisher: Mapping[str, torch.Tensor],
    fraction: float,
    mode: MaskMode = "least_important",
    *,
    granularity: MaskGranularity = "entry",
) -> dict[str, torch.Tensor]:
    """Binary update masks from a Fisher estimate: ``True`` where an entry may change.

    In every tensor, ``round(fraction * n)`` of its ``n`` entries (or rows) are updated, at least
    one unless ``fraction`` is 0: thresholds are per tensor, because LoRA's A and B matrices
    have gradients of very different scales and one global threshold would freeze or free whole
    matrices. Ties (for example the all-zero Fisher of a fresh adapter's A matrices, whose
    gradient is zero while B is zero) are broken by position.

    Args:
        fisher: ``{name: tensor}`` as :func:`estimate_fisher` returns.
        fraction: the share of entries updated, in (0, 1].
        mode: ``"least_important"`` updates the entries the Fisher's data cares least about and
            freezes the rest (Fisher from earlier tasks: protection); ``"most_important"``
            updates the top ones (Fisher from the new task: FGGM's selection).
        granularity: ``"entry"`` or ``"row"`` (whole output rows, scored by their mean).

    Returns:
        ``{name: bool tensor}`` shaped like each Fisher tensor.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or an unknown ``mode`` or ``granularity``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if mode not in ("least_important", "most_important"):
        raise ValueError(f"mode must be 'least_important' or 'most_important', got {mode!r}")
    if granularity not in ("entry", "row"):
        raise ValueError(f"granularity must be 'entry' or 'row', got {granularity!r}")
    masks = {}
    for name, value in fisher.items():
        scores = _scores(value.detach().float(), granularity)
        k = max(1, round(fraction * scores.numel()))
        # A stable sort makes ties deterministic (by position), unlike topk.
        order = torch.sort(scores, descending=mode == "most_important", stable=True).indices
        keep = torch.zeros(scores.numel(), dtype=torch.bool, device=value.device)
        keep[order[:k]] = True
        if granularity == "row" and value.dim() >= 2:
            keep = keep.view(-1, *([1] * (value.dim() - 1))).expand_as(value)
        masks[name] = keep.reshape(value.shape).clone()
    return masks


def _check_names(masks: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(
            f"masks name {len(unknown)} parameters the model has not (or not trainable), e.g. "
            f"{unknown[0]!r}: build the masks from this model's named_parameters()"
        )


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of the masked-out entries; call after ``backward`` and before the
    optimizer step (and before gradient clipping, so the norm is that of what is applied).

    With DDP, call it on the wrapped module (``ddp.module``) after the synchronising backward:
    the gradients are already averaged, and every rank must hold the same masks.

    Raises:
        KeyError: a mask names a parameter that is not a trainable parameter of ``model``.
    """
    params = trainable_parameters(model)
    _check_names(masks, params)
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is not None:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


def register_mask_hooks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Mask gradients as they are computed, through tensor hooks: for engines that own the
    gradients after backward (DeepSpeed ZeRO-2 reduces them into its own partitioned buffers),
    where :func:`apply_masks` cannot reach them. Remove the returned handles to stop masking.

    Raises:
        KeyError: as :func:`apply_masks`.
    """
    params = trainable_parameters(model)
    _check_names(masks, params)
    handles = []
    for name, mask in masks.items():
        p = params[name]
        m = mask.to(device=p.device)
        handles.append(p.register_hook(lambda grad, m=m: grad * m.to(grad.dtype)))
    return handles


def mask_summary(masks: Mapping[str, torch.Tensor]) -> dict[str, int | float]:
    """How many entries the masks let move: ``{"entries", "updated", "updated_fraction"}``."""
    total = sum(m.numel() for m in masks.values())
    updated = sum(int(m.sum()) for m in masks.values())
    return {"entries": total, "updated": updated, "updated_fraction": updated / total if total else 0.0}


def ewc_penalty(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor],
    anchor_params: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """Elastic weight consolidation: ``lam / 2 * sum_i F_i * (theta_i - anchor_i) ** 2``.

    Add it to the loss; its gradient ``lam * F * (theta - anchor)`` pulls every entry back to
    its anchor (the value before fine-tuning, :func:`snapshot_parameters`) in proportion to its
    importance ``F`` for the earlier tasks.

    Raises:
        KeyError: ``fisher`` names a trainable parameter that ``anchor_params`` lacks, or a
            parameter the model does not train.
    """
    params = trainable_parameters(model)
    _check_names(fisher, params)
    missing = sorted(set(fisher) - set(anchor_params))
    if missing:
        raise KeyError(f"anchor_params lacks {len(missing)} parameters of the Fisher, e.g. {missing[0]!r}")
    total: torch.Tensor | None = None
    for name, f in fisher.items():
        p = params[name]
        diff = p.float() - anchor_params[name].to(device=p.device, dtype=torch.float32)
        term = (f.to(p.device) * diff.pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(iter(params.values())).device) if params else torch.zeros(())
    return 0.5 * lam * total


# --- a run's protection --------------------------------------------------------------------------


def fisher_source(options: ForgettingConfig, sets: Collection[str]) -> str | None:
    """Which of a run's ``sets`` the Fisher information comes from: old tasks to protect them
    (``fisher``, the ``--fisher-data`` rows, else ``rehearsal``), the new task's own rows
    (``train``) for FGGM's ``most_important`` rule; None when the run has none of them."""
    if "fisher" in sets:
        return "fisher"
    if options.masking == "fggm" and options.mask_mode == "most_important":
        return "train"
    return "rehearsal" if "rehearsal" in sets else None


@dataclass
class ForgettingProtection:
    """A run's protection against forgetting: the Fisher information of the adapter's entries,
    their values before training (the anchor) and, for FGGM, the update masks.

    A training step calls :meth:`penalty` on its loss (EWC's term; None for FGGM) and
    :meth:`mask_gradients` after backward (FGGM's masks; nothing for EWC), or once
    :meth:`register_hooks` where an engine owns the gradients. Checkpoints hold
    :meth:`state_dict`.
    """

    method: Literal["fggm", "ewc"]
    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    samples: int
    """Rows the Fisher information was estimated on (per worker)."""
    ewc_lambda: float
    masks: dict[str, torch.Tensor] | None = None
    """fggm: True where an entry may change."""

    @classmethod
    def estimate(
        cls,
        options: ForgettingConfig,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: LossFn,
        *,
        samples: int,
        average: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> ForgettingProtection:
        """The Fisher information of ``model``'s trainable entries on ``batches`` (at most
        ``options.fisher_samples``), the masks (fggm) and the anchor (the entries as they are now).

        Args:
            samples: how many rows ``batches`` will give (recorded, not counted).
            average: averages the estimate over the data-parallel ranks in place, so that every
                rank masks the same entries.

        Raises:
            ValueError: ``options.masking`` is ``none``, or as :func:`estimate_fisher`.
        """
        if options.masking == "none":
            raise ValueError("masking: none protects nothing; there is no Fisher information to estimate")
        fisher = estimate_fisher(model, batches, loss_fn, max_batches=options.fisher_samples)
        if average is not None:
            average(fisher)
        masks = None
        if options.masking == "fggm":
            masks = fisher_masks(fisher, options.mask_fraction, options.mask_mode, granularity=options.mask_granularity)
        return cls(
            method=options.masking,
            fisher=fisher,
            anchor=snapshot_parameters(model),
            samples=samples,
            ewc_lambda=options.ewc_lambda,
            masks=masks,
        )

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """EWC's penalty on ``model``'s distance from the anchor, to add to the loss; None for FGGM."""
        if self.method != "ewc":
            return None
        return ewc_penalty(model, self.fisher, self.anchor, self.ewc_lambda)

    def mask_gradients(self, model: nn.Module) -> None:
        """FGGM: zero the gradients of the frozen entries (after backward, before clipping)."""
        if self.masks is not None:
            apply_masks(model, self.masks)

    def register_hooks(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """FGGM for engines that own the gradients after backward (DeepSpeed): mask them as they
        are computed. Nothing to register for EWC."""
        return register_mask_hooks(model, self.masks) if self.masks is not None else []

    def summary(self) -> dict[str, int | float] | None:
        """How many entries the masks let move (:func:`mask_summary`); None without masks."""
        return mask_summary(self.masks) if self.masks is not None else None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds: ``fisher``, ``samples``, ``masks`` (fggm) and ``anchor``."""
        state: dict[str, Any] = {"fisher": self.fisher, "samples": self.samples}
        if self.masks is not None:
            state["masks"] = self.masks
        state["anchor"] = self.anchor
        return state

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], options: ForgettingConfig, device: torch.device
    ) -> ForgettingProtection:
        """A checkpoint's protection (:meth:`state_dict`), its tensors moved to ``device``."""
        moved = {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v) for k, v in state.items()}
        return cls(
            method=options.masking,
            fisher=moved["fisher"],
            anchor=moved["anchor"],
            samples=moved["samples"],
            ewc_lambda=options.ewc_lambda,
            masks=moved.get("masks"),
        )
