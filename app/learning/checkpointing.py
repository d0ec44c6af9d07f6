"""What a fine-tuning checkpoint holds and how the adapter's weights go in and out of it.

A checkpoint is a folder (Ray Train copies it to the run's storage):

* ``adapter/``: the adapter as PEFT saves it (what :func:`app.learning.lineage.publish_adapter`
  stores);
* ``train_state.pt``: where the run is (:class:`app.learning.run_state.RunState`'s fields), the
  adapter's weights (``params``), the options that decide the run (``options``,
  :func:`run_options`) and, without DeepSpeed, the optimizer's and the schedule's state;
* ``forgetting.pt``: the Fisher information, anchor and masks of the run's protection against
  forgetting (:meth:`app.learning.masking.ForgettingProtection.state_dict`), when it has one;
* ``deepspeed/``: with DeepSpeed, every rank's partition of the optimizer state.

The trainer writes and reads it (:meth:`app.learning.trainer.Trainer.save_checkpoint`); the helpers
here are the pieces that do not need its state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.learning.masking import trainable_parameters
from app.learning.training import CheckpointingConfig, FinetuneConfig, ResourceConfig

__all__ = [
    "ADAPTER_DIR",
    "DEEPSPEED_DIR",
    "FORGETTING_FILE",
    "STATE_FILE",
    "check_resumable",
    "full_parameters",
    "load_trainable_state",
    "read_checkpoint",
    "run_options",
    "trainable_state",
]

ADAPTER_DIR = "adapter"
STATE_FILE = "train_state.pt"
FORGETTING_FILE = "forgetting.pt"
DEEPSPEED_DIR = "deepspeed"


def full_parameters(options: ResourceConfig, peft_model: nn.Module, *, modify: bool = False) -> Any:
    """Where ZeRO-3 partitions the adapter, a context (entered by every rank) in which its
    parameters are whole; with ``modify``, rank 0's changes are kept. Elsewhere a no-op."""
    if options.strategy != "deepspeed" or options.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = list(trainable_parameters(peft_model).values())
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def trainable_state(peft_model: nn.Module, options: ResourceConfig | None) -> dict[str, torch.Tensor]:
    """CPU copies of the adapter's weights (gathered first under ZeRO-3 when ``options`` is given)."""
    with full_parameters(options, peft_model) if options is not None else contextlib.nullcontext():
        return {name: p.detach().to("cpu", copy=True) for name, p in trainable_parameters(peft_model).items()}


@torch.no_grad()
def load_trainable_state(peft_model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (as :func:`trainable_state` gives it) into the adapter's weights.

    Raises:
        KeyError: ``state`` lacks one of the adapter's parameters.
    """
    params = trainable_parameters(peft_model)
    missing = sorted(set(params) - set(state))
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} adapter parameters, e.g. {missing[0]!r}")
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A checkpoint folder's train state and, when it has one, its forgetting protection's
    state, both on the CPU."""
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    path = directory / FORGETTING_FILE
    forgetting = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    return saved, forgetting


def run_options(opts: FinetuneConfig) -> dict[str, Any]:
    """The options that decide a run's path (all but where it runs and how it is checkpointed): a
    checkpoint records them, and a run that resumes it must have the same."""
    skip = {*ResourceConfig.model_fields, *CheckpointingConfig.model_fields, "deterministic"}
    return {k: v for k, v in opts.model_dump(mode="json").items() if k not in skip}


def check_resumable(saved: dict[str, Any] | None, opts: FinetuneConfig) -> None:
    """Refuse to resume a checkpoint written with other :func:`run_options` (a checkpoint without
    them, from before they were recorded, is resumed as it is).

    Raises:
        ValueError: naming the first option that differs, both values, and what to do."""
    if saved is None:
        return
    for key, value in run_options(opts).items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"finetune.{key}: the run's checkpoint was written with {saved[key]!r}, this run has {value!r}; "
                "a run resumes only with the options it started with (give a new run another name, or continue "
                "from its adapter with finetune.continue_from)"
            )
