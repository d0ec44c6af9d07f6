"""Checkpoints, as a part of :class:`app.learning.trainer.Trainer`: writing this rank's part of one
(:meth:`CheckpointIO.save_checkpoint`), reporting with one (:meth:`CheckpointIO.report`), and going
on from one (:meth:`CheckpointIO._resume_weights`, then :meth:`CheckpointIO._resume_optimizer` once
the optimizer exists). The files are :mod:`app.learning.checkpointing`'s.

:class:`CheckpointIO` is a base class of the trainer: it works on the trainer's state (options,
model, optimizer and schedule or DeepSpeed engine, protection, run state, context), which
:meth:`~app.learning.trainer.Trainer.setup` builds.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.learning.checkpointing import (
    ADAPTER_DIR,
    DEEPSPEED_DIR,
    FORGETTING_FILE,
    STATE_FILE,
    check_resumable,
    full_parameters,
    load_trainable_state,
    read_checkpoint,
    run_options,
    trainable_state,
)
from app.learning.masking import ForgettingProtection, trainable_parameters
from app.learning.run_state import RunState
from app.learning.worker_context import CheckpointSource

__all__ = ["CheckpointIO"]

log = logging.getLogger("kaizen.finetune")


class CheckpointIO:
    """Saving, reporting with and resuming from checkpoints, for the trainer."""

    opts: Any
    rank: int
    context: Any
    state: RunState
    peft_model: Any
    optimizer: Any
    scheduler: Any
    engine: Any
    protection: ForgettingProtection | None
    checkpoint: Any

    def _resume_weights(self, checkpoint: CheckpointSource) -> dict[str, Any]:
        """Load a checkpoint's position, protection and adapter weights; the optimizer's state,
        returned, is loaded once the optimizer exists (:meth:`_resume_optimizer`)."""
        with checkpoint.as_directory() as directory:
            saved, forgetting = read_checkpoint(Path(directory))
        check_resumable(saved.get("options"), self.opts)
        load_trainable_state(self.peft_model, saved["params"])
        self.state = RunState.resumed(saved)
        if forgetting is not None:
            device = next(iter(trainable_parameters(self.peft_model).values())).device
            self.protection = ForgettingProtection.from_state_dict(forgetting, self.opts, device)
        log.info("resuming at step %d (epoch %d, window %d)", self.state.step, self.state.epoch, self.state.window)
        if "seed" not in saved:  # a checkpoint from before finetune.trials
            self.state.seed = self.opts.seed
        return saved

    def _resume_optimizer(self, saved: dict[str, Any]) -> None:
        if self.engine is None:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            return
        assert self.checkpoint is not None
        with self.checkpoint.as_directory() as directory:
            self.engine.load_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag="state", load_module_strict=False)

    def save_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of a checkpoint into ``directory``: rank 0 the adapter (PEFT
        files), the position and the optimizer, and with DeepSpeed every rank its partition of
        the optimizer state (Ray merges the ranks' folders)."""
        opts, rank = self.opts, self.rank
        with full_parameters(opts, self.peft_model):
            params = trainable_state(self.peft_model, None)
            if rank == 0:
                self.peft_model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
        if rank == 0:
            train_state = {**self.state.__dict__, "params": params, "options": run_options(opts)}
            if self.engine is None:
                train_state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            torch.save(train_state, directory / STATE_FILE)
            if self.protection is not None:
                torch.save(self.protection.state_dict(), directory / FORGETTING_FILE)
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)

    def report(self, metrics: dict[str, Any], *, checkpoint: str | None = None) -> None:
        """Report on every rank (it is a barrier); with ``checkpoint``, a checkpoint of that name."""
        if checkpoint is None:
            self.context.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="kaizen-ckpt-") as tmp:
            self.save_checkpoint(Path(tmp))
            keep = self.rank == 0 or self.engine is not None
            self.context.report(metrics, checkpoint=Path(tmp) if keep else None, name=checkpoint)
