"""The fine-tuning that runs on every Ray Train worker, as an object that also runs in one process.

:class:`Trainer` keeps a run's state in its attributes:

* :meth:`~Trainer.setup`: the device, the base model with its LoRA adapter
  (:mod:`app.learning.lora_model`), this rank's share of each set, tokenized, the position and
  weights of a checkpoint to go on from, the protection against forgetting
  (:class:`app.learning.masking.ForgettingProtection`), AdamW with its schedule under DDP, or a
  DeepSpeed engine;
* :meth:`~Trainer.train_step`: one optimizer step over a window of micro-batches
  (:class:`StepWindow`): training rows for supervised fine-tuning, preference pairs for direct
  preference optimisation (``finetune.objective``), or both; the reference log-likelihoods of the
  pairs come from the same model with the adapter disabled, once, in :meth:`~Trainer.setup`;
* :meth:`~Trainer.evaluate`: the validation and held-out losses and the objective that early
  stopping and the kept adapter follow;
* :meth:`~Trainer.run_trials`: restarts from several seeds, the best by validation objective
  going on (:class:`app.learning.run_state.TrialResult`), and :meth:`~Trainer.attempt_again`:
  whole runs again from other seeds while the task is not learned (:mod:`app.learning.trials`);
* :meth:`~Trainer.save_checkpoint` and the resumption in :meth:`~Trainer.setup`
  (:mod:`app.learning.checkpoint_io`, the files :mod:`app.learning.checkpointing`'s);
* :meth:`~Trainer.fit`: the trials, the epochs, the attempts, the final report.

Where it runs is its context (:mod:`app.learning.worker_context`): a Ray Train worker
(:func:`app.learning.ray_trainer.train_loop`), or one process without Ray (tests).

The order of the calls is part of the result: the random generator is seeded before the model is
built, a fresh adapter is initialised from the seed alone, and dropout draws from the generator
step after step, so the same options and rows give the same adapter bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.learning.checkpoint_io import CheckpointIO
from app.learning.checkpointing import (
    full_parameters,
    load_trainable_state,
    trainable_state,
)
from app.learning.lora_model import CausalLMLoss, load_lora_model, require, setup_device
from app.learning.masking import ForgettingProtection, fisher_source, trainable_parameters
from app.learning.preference import PreferenceObjective
from app.learning.run_state import Rows, RunState, StepFigures, StepWindow, objective
from app.learning.tokenization import IGNORE_INDEX, collate, tokenize_messages, tokenize_pair
from app.learning.training import (
    OBJECTIVES_WITH_PAIRS,
    EarlyStopping,
    draw_pairs,
    learned,
    lr_factor,
    mix_rehearsal,
    no_pairs_error,
    selection_key,
)
from app.learning.trials import TrialRestarts
from app.learning.worker_context import CheckpointSource, TrainContext, WorkerSpec

__all__ = ["LOSS_WINDOW", "PREFERENCES", "StepFigures", "StepWindow", "Trainer"]

log = logging.getLogger("kaizen.finetune")


LOSS_WINDOW = 20
"""Most steps at each end of a run whose mean training loss says whether it learned: an epoch's
steps when an epoch is shorter, so that the two ends compare the same rows."""

PREFERENCES = "preferences"
"""The set of preference pairs (``prompt``, ``chosen``, ``rejected``) among a run's sets."""


class Trainer(TrialRestarts, CheckpointIO):
    """One worker's part of a fine-tuning run; see the module docstring.

    Args:
        spec: the options and what the worker needs of the config.
        context: where it runs (:class:`~app.learning.worker_context.RayTrainContext` or
            :class:`~app.learning.worker_context.LocalContext`).
    """

    def __init__(self, spec: WorkerSpec, context: TrainContext) -> None:
        self.spec = spec
        self.opts = spec.opts
        self.context = context
        self.device = context.device
        self.rank = context.rank
        self.state = RunState(seed=spec.opts.seed)
        self.protection: ForgettingProtection | None = None
        self.checkpoint: CheckpointSource | None = None
        """The checkpoint this run went on from; None for a fresh run."""
        self.step_metrics: list[dict[str, float]] = []
        """The steps since the last report."""
        self.last_report = time.perf_counter()
        self.resumed_at = time.perf_counter()
        """``perf_counter()`` less the time trained before: the run's clock."""
        self.evaluated_at: int | None = None
        """The step of the last validation."""
        self.trial_evaluations: list[dict[str, Any]] | None = None
        """In a trial (:meth:`run_trials`), its validations so far, each with the mean training loss
        of the steps before it: they are reported with the trials' choice, not one by one."""

    # --- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build the model, the data, the protection and the optimizer; go on from the context's
        checkpoint when it has one.

        Raises:
            ValueError: a row that cannot be tokenized (naming its set and index).
            ImportError: DeepSpeed or bitsandbytes asked for and not installed.
        """
        opts, spec = self.opts, self.spec
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
        setup_device(opts, self.device, spec.max_vram_gb)
        torch.manual_seed(opts.seed)  # the same LoRA initialisation on every rank

        self.peft_model, self.tokenizer = load_lora_model(
            opts,
            self.device,
            base_model=spec.base_model,
            storage_root=spec.storage_root,
            parent_adapter_id=spec.parent_adapter_id,
        )
        self.loss_module = CausalLMLoss(self.peft_model)
        self.data = self._tokenized_shards()
        tokenizer = self.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        enabled = opts.precision == "bf16"
        self.autocast = lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)
        self.pairs: Rows = self.data.get(PREFERENCES, [])
        """This rank's preference pairs, with their reference log-likelihoods; none with objective sft."""
        self.preference = PreferenceObjective(
            self.loss_module,
            self.peft_model,
            beta=opts.dpo_beta,
            batch_size=opts.batch_size,
            pad_id=self.pad_id,
            autocast=self.autocast,
            to_device=self._to_device,
        )
        if opts.objective in OBJECTIVES_WITH_PAIRS:
            if not self.pairs:
                raise no_pairs_error(opts.objective)
            self.preference.add_reference_logps(self.pairs)

        # What another attempt starts from (finetune.attempts): the parent's weights, taken before a
        # checkpoint's replace them; a fresh adapter is drawn from the attempt's seed instead.
        self.start_params = (
            trainable_state(self.peft_model, opts) if opts.attempts > 1 and spec.parent_adapter_id else None
        )
        saved = None
        self.checkpoint = self.context.latest_checkpoint()
        if self.checkpoint is not None:
            saved = self._resume_weights(self.checkpoint)
        if self.protection is None and opts.masking != "none":
            self.protection = self._estimate_protection()
        if self.protection is not None and opts.strategy == "deepspeed":
            self.protection.register_hooks(self.peft_model)

        self.steps_per_epoch = len(self._epoch_windows(0, opts.seed))
        self.total_steps = min(opts.epochs * self.steps_per_epoch, opts.max_steps or math.inf)
        self.loss_window = max(1, min(LOSS_WINDOW, self.steps_per_epoch))
        """How many first and latest steps' losses tell whether the run learned (``RunState.loss_trend``)."""
        self._setup_optimizer()
        self.fresh_optimizer = (
            (copy.deepcopy(self.optimizer.state_dict()), self.scheduler.state_dict()) if opts.attempts > 1 else None
        )
        """The optimizer and schedule before any step, for another attempt."""
        if saved is not None:
            self._resume_optimizer(saved)

        self.stopper = EarlyStopping(opts.early_stopping_patience, opts.early_stopping_min_delta)
        self.stopper.load_state_dict(self.state.early_stopping)
        self.validation, self.heldout = self.data.get("validation"), self.data.get("heldout")

    def _tokenized_shards(self) -> dict[str, Rows]:
        """This worker's share of each set, tokenized.

        Every worker reads each (small) set whole and keeps every ``world``-th row from its rank
        on, cut to the same count on every rank: the epochs mix rehearsal rows in per rank, and
        equal shares give every rank the same number of steps, which DDP's collectives need.
        Reading in-process also spares the split coordinator actors a streaming split would start.
        """
        rank, world = self.context.rank, self.context.world_size
        data = {}
        for name in self.spec.datasets:
            if name == PREFERENCES and self.opts.objective not in OBJECTIVES_WITH_PAIRS:
                continue  # objective sft: the pairs are not trained on
            rows = self.context.dataset_rows(name)
            share = len(rows) // world
            tokenized = []
            for i in range(rank, share * world, world):
                try:
                    tokenized.append(self._tokenize(name, rows[i]))
                except ValueError as exc:
                    raise ValueError(f"{name} row {i}: {exc}") from exc
            data[name] = tokenized
        if PREFERENCES in data:
            cut = sum(1 for p in data[PREFERENCES] for side in p.values() if _unlabelled(side))
            if cut:
                log.warning(
                    "%d answers of %d preference pairs lost every token to finetune.max_length=%d: the pair "
                    "compares what is left (nothing of that answer)",
                    cut,
                    len(data[PREFERENCES]),
                    self.opts.max_length,
                )
        return data

    def _tokenize(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        if name == PREFERENCES:
            return tokenize_pair(self.tokenizer, row["prompt"], row["chosen"], row["rejected"], self.opts.max_length)
        return tokenize_messages(self.tokenizer, row["messages"], self.opts.max_length)

    def _epoch_rows(self, epoch: int, seed: int) -> Rows:
        opts = self.opts
        return mix_rehearsal(
            self.data["train"], self.data.get("rehearsal", []), opts.rehearsal_ratio, seed=seed, epoch=epoch
        )

    def _epoch_windows(self, epoch: int, seed: int) -> list[StepWindow]:
        """One epoch's optimizer steps, by ``finetune.objective``: ``sft``, the training rows
        (rehearsal mixed in) in micro-batches of ``batch_size``, ``grad_accumulation`` to a step;
        ``dpo``, a shuffled pass over the preference pairs, batched alike; ``sft+dpo``, the rows of
        ``sft``, each micro-batch joined by one of ``batch_size`` pairs drawn in shuffled passes."""
        opts = self.opts
        size, accumulation = opts.batch_size, opts.grad_accumulation

        def batches(rows: Rows) -> list[Rows]:
            return [rows[i : i + size] for i in range(0, len(rows), size)]

        if opts.objective == "dpo":
            targets, pairs = [], batches(draw_pairs(self.pairs, len(self.pairs), seed=seed, epoch=epoch))
        else:
            targets = batches(self._epoch_rows(epoch, seed))
            pairs = []
            if opts.objective == "sft+dpo":
                pairs = batches(draw_pairs(self.pairs, size * len(targets), seed=seed, epoch=epoch))
        count = max(len(targets), len(pairs))
        return [
            StepWindow(targets[i : i + accumulation], pairs[i : i + accumulation])
            for i in range(0, count, accumulation)
        ]

    def _estimate_protection(self) -> ForgettingProtection:
        """The Fisher information on the rows :func:`~app.learning.masking.fisher_source` names
        (one row per backward pass), averaged over the ranks so that every rank masks the same
        entries; the masks (fggm) and the anchor."""
        rows = self.data[fisher_source(self.opts, self.data)]

        def loss_fn(_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.autocast():
                loss_sum, count = self.loss_module(**batch)
            return loss_sum / count.clamp(min=1)

        return ForgettingProtection.estimate(
            self.opts,
            self.peft_model,
            (self._to_device(collate([r], self.pad_id)) for r in rows),
            loss_fn,
            samples=min(len(rows), self.opts.fisher_samples),
            average=self.context.average,
        )

    def _setup_optimizer(self) -> None:
        """AdamW and its schedule, the loss module prepared by the context (DDP), or a DeepSpeed
        engine that takes over both."""
        opts = self.opts
        trainable = list(trainable_parameters(self.peft_model).values())
        optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)
        total = int(self.total_steps)

        warmup = opts.warmup_steps
        if warmup is None:
            warmup = max(1, round(opts.warmup_fraction * total)) if opts.warmup_fraction > 0 else 0
        self.warmup_steps = warmup

        def schedule(step: int) -> float:
            return lr_factor(step, total_steps=total, warmup_steps=warmup, schedule=opts.lr_schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine: Any = None
        if opts.strategy == "deepspeed":
            deepspeed = require("deepspeed", "finetune.strategy=deepspeed")
            ds_config = {
                "train_micro_batch_size_per_gpu": opts.batch_size,
                "gradient_accumulation_steps": opts.grad_accumulation,
                "gradient_clipping": opts.max_grad_norm or 0.0,
                "zero_optimization": {
                    "stage": opts.zero_stage,
                    "overlap_comm": True,
                    "contiguous_gradients": True,
                    **({"stage3_gather_16bit_weights_on_model_save": True} if opts.zero_stage == 3 else {}),
                },
                "bf16": {"enabled": opts.precision == "bf16"},
                "steps_per_print": 2**31 - 1,
            }
            engine, optimizer, _, scheduler = deepspeed.initialize(
                model=self.loss_module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
            )
            self.model: nn.Module = engine
            self.engine = engine
        else:
            self.model = self.context.prepare_model(self.loss_module)
        self.optimizer: torch.optim.Optimizer = optimizer
        self.scheduler: Any = scheduler

    # --- training --------------------------------------------------------------------------------

    def fit(self, until: Callable[[], bool] | None = None, every: int = 0) -> dict[str, Any]:
        """Train to the end (the trials first, on a fresh run with ``finetune.trials`` > 1), load
        the best adapter and make the final report and checkpoint; returns its metrics.

        With ``until``, a question asked after every ``every`` steps (a probe's: has it learned
        the pool?), training also ends when it answers True, with the stop reason ``until``."""
        if self.validation is not None and self.checkpoint is None:
            # The starting point is a candidate too: an adapter that only gets worse is not kept.
            self.state.initial_val_loss = self.evaluate()["val_loss"]
        self.resumed_at = time.perf_counter() - self.state.elapsed_s
        self.step_metrics = []
        self.last_report = time.perf_counter()

        stop_reason = "completed"
        if self.opts.trials > 1 and self.checkpoint is None:
            stop_reason = self.run_trials()
        if stop_reason == "completed":
            stop_reason = self.train_until(self.total_steps) if until is None else self._train_rounds(until, every)
        return self._finish(self.attempt_again(stop_reason))

    def _train_rounds(self, until: Callable[[], bool], every: int) -> str:
        """Train ``every`` steps at a time to the end, asking ``until`` after each round but the
        last; the stop reason (``until`` when it answered True)."""
        while True:
            stop_reason = self.train_until(min(self.state.step + max(1, every), self.total_steps))
            if stop_reason != "completed" or self.state.step >= self.total_steps:
                return stop_reason
            if until():
                return "until"

    def train_until(self, limit: float, trial: bool = False) -> str:
        """Train from the state's position to step ``limit`` (or an earlier stop); the stop reason.
        A ``trial`` validates on the run's schedule (its best adapter can be the one kept) but
        neither reports nor checkpoints: its steps travel in the next report."""
        opts, spe = self.opts, self.steps_per_epoch
        stop_reason = "completed"
        # Nothing left (a checkpoint of the last step): straight to the final report.
        done = self.state.step >= limit
        while not done and self.state.epoch < opts.epochs:
            state = self.state
            epoch = state.epoch
            windows = self._epoch_windows(epoch, state.seed)
            for w in range(state.window, len(windows)):
                t0 = time.perf_counter()
                figures = self.train_step(windows[w])
                state.step += 1
                end_of_epoch = w == len(windows) - 1
                state.epoch, state.window = (epoch + 1, 0) if end_of_epoch else (epoch, w + 1)
                state.elapsed_s = time.perf_counter() - self.resumed_at
                over_time = state.elapsed_s > self.spec.max_seconds
                report_due = not trial and time.perf_counter() - self.last_report >= opts.report_every_s
                # Summed over the ranks, so that every rank takes the same decisions (a report is a barrier).
                figures, (over_time, report_due) = figures.reduced(
                    self.context.all_reduce, float(over_time), float(report_due)
                )
                state.tokens += int(figures.input_tokens)
                if opts.objective == "sft":  # the epoch's loss, token-weighted
                    state.epoch_loss += figures.loss_sum
                    state.epoch_label_tokens += int(figures.label_tokens)
                else:  # with pairs, the mean of the steps' losses (epoch_label_tokens counts steps)
                    state.epoch_loss += figures.loss
                    state.epoch_label_tokens += 1
                self.step_metrics.append(
                    {
                        "step": state.step,
                        "loss": figures.loss,
                        **figures.metrics(),
                        "lr": self._current_lr(),
                        "tokens_per_s": figures.input_tokens / max(time.perf_counter() - t0, 1e-9),
                    }
                )
                metrics: dict[str, Any] = {
                    **self.step_metrics[-1],
                    "epoch": epoch + (w + 1) / len(windows),
                    "tokens": state.tokens,
                    "elapsed_s": state.elapsed_s,
                    **({"attempt": state.attempt} if opts.attempts > 1 else {}),
                }
                if state.first_loss is None:
                    state.first_loss = metrics["loss"]
                state.record_loss(metrics["loss"], self.loss_window)
                if end_of_epoch:
                    metrics["epoch_loss"] = self.step_metrics[-1]["epoch_loss"] = state.epoch_loss / max(
                        state.epoch_label_tokens, 1
                    )
                due = opts.eval_every_steps is not None and state.step % opts.eval_every_steps == 0
                at_epoch_end = opts.eval_every_steps is None and end_of_epoch
                if self.validation is not None and (due or at_epoch_end):
                    metrics.update(self.evaluate(), best_objective=self.stopper.best)
                    if self.stopper.should_stop:
                        stop_reason = "early_stopping"
                if state.step >= self.total_steps and stop_reason == "completed" and state.step < opts.epochs * spe:
                    stop_reason = "max_steps"
                if over_time and stop_reason == "completed":
                    stop_reason = "time_limit"
                done = stop_reason != "completed" or state.step >= limit
                # A new epoch's loss starts from nothing, unless the run stops here (its final
                # report gives the epoch just ended: an early stop on an epoch's boundary too).
                if (
                    end_of_epoch
                    and state.epoch < opts.epochs
                    and stop_reason == "completed"
                    and state.step < self.total_steps
                ):
                    state.epoch_loss, state.epoch_label_tokens = 0.0, 0
                save = not trial and state.step % opts.checkpoint_every_steps == 0 and not done
                if not trial and (save or done or report_due or "val_loss" in metrics):
                    metrics["step_metrics"] = self.step_metrics.copy()
                    name = f"checkpoint-{self._attempt_tag()}step{state.step:06d}"
                    self.report(metrics, checkpoint=name if save else None)
                    self.step_metrics.clear()
                    self.last_report = time.perf_counter()
                self._maybe_fail()
                if done:
                    break
        return stop_reason

    def train_step(self, window: StepWindow) -> StepFigures:
        """One optimizer step over ``window``'s micro-batches; this rank's sums. The targets' loss is
        normalised by the window's label tokens, so that it is a token-weighted mean however the
        rows fall into micro-batches, and the pairs' DPO loss by the window's pairs (a mean per
        pair); with both (``sft+dpo``) the step minimises their sum."""
        from torch.nn.parallel import DistributedDataParallel

        model, engine, protection = self.model, self.engine, self.protection
        figures = StepFigures(
            label_tokens=sum(_label_count(r) for batch in window.targets for r in batch),
            pairs=sum(len(batch) for batch in window.pairs),
        )
        parts = [(rows, False) for rows in window.targets] + [(pairs, True) for pairs in window.pairs]
        for j, (rows, are_pairs) in enumerate(parts):
            last = j == len(parts) - 1
            no_sync = not last and isinstance(model, DistributedDataParallel)
            if engine is not None:
                engine.set_gradient_accumulation_boundary(last)
            with model.no_sync() if no_sync else contextlib.nullcontext():
                if are_pairs:
                    losses, margins, tokens = self.preference.losses(model, rows)
                    loss = losses.sum() / figures.pairs
                    figures.dpo_loss_sum += float(losses.detach().sum())
                    figures.margin_sum += float(margins.detach().sum())
                    figures.preferred += float((margins.detach() > 0).sum())
                else:
                    batch = self._to_device(collate(rows, self.pad_id))
                    with self.autocast():
                        loss_sum, _ = model(**batch)
                    loss = loss_sum / max(figures.label_tokens, 1)
                    figures.loss_sum += float(loss_sum.detach())
                    tokens = int(batch["attention_mask"].sum())
                penalty = protection.penalty(self.peft_model) if last and protection is not None else None
                if penalty is not None:
                    loss = loss + penalty
                if engine is not None:
                    engine.backward(loss, scale_wrt_gas=False)
                else:
                    loss.backward()
            figures.input_tokens += tokens
        if engine is not None:
            engine.step()  # clips, steps the optimizer and the schedule at the boundary
            return figures
        if protection is not None:
            protection.mask_gradients(self.peft_model)  # after DDP's all-reduce, before clipping
        if self.opts.max_grad_norm is not None:
            params = [p for p in self.peft_model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.opts.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return figures

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Validation (and held-out) loss and exact match, the objective, and the selection key that
        early stopping and the kept adapter follow (``finetune.select_by``): a new best keeps the
        adapter's weights as the one to publish."""
        state = self.state
        self.evaluated_at = state.step
        state.last_val_loss, exact_match = self.measure_on(self.validation)
        result: dict[str, Any] = {"val_loss": state.last_val_loss, "val_exact_match": exact_match}
        if self.heldout is not None:
            state.last_heldout_loss, result["heldout_exact_match"] = self.measure_on(self.heldout)
            if state.initial_heldout_loss is None:
                state.initial_heldout_loss = state.last_heldout_loss
            result["heldout_loss"] = state.last_heldout_loss
            result["forgetting"] = state.last_heldout_loss - state.initial_heldout_loss
        result["objective"] = objective(state.last_val_loss, result.get("forgetting"), self.opts.forgetting_weight)
        result["selection"] = selection_key(result, self.opts.select_by, self.opts.learned_exact_match)
        if self.stopper.update(result["selection"]):
            state.best_params = trainable_state(self.peft_model, self.opts)
            state.best_figures = {**result, "kept_step": state.step}
        state.early_stopping = self.stopper.state_dict()
        if self.trial_evaluations is not None:
            since = self.trial_evaluations[-1]["step"] if self.trial_evaluations else 0
            losses = [m["loss"] for m in self.step_metrics if m["step"] > since and m.get("loss") is not None]
            train_loss = sum(losses) / len(losses) if losses else None
            self.trial_evaluations.append({"step": state.step, "train_loss": train_loss, **result})
        return result

    def loss_on(self, rows: Rows) -> float:
        """Token-weighted loss over every rank's shard of a set (:meth:`measure_on`)."""
        return self.measure_on(rows)[0]

    def _forward_eval(self, rows: Rows, forward: Callable[..., Any]) -> list[Any]:
        """``forward(**batch)`` on each micro-batch of ``rows``, on the device, under autocast, with
        the loss module in eval mode (its mode before restored after): the outputs, in order."""
        was_training = self.loss_module.training
        self.loss_module.eval()
        try:
            outputs = []
            for i in range(0, len(rows), self.opts.batch_size):
                with self.autocast():
                    outputs.append(forward(**self._to_device(collate(rows[i : i + self.opts.batch_size], self.pad_id))))
            return outputs
        finally:
            self.loss_module.train(was_training)

    @torch.no_grad()
    def measure_on(self, rows: Rows) -> tuple[float, float]:
        """Token-weighted loss and exact match (the share of rows whose answer greedy decoding
        would write exactly; :meth:`CausalLMLoss.measure`) over every rank's shard of a set. Runs
        the unwrapped module: DDP's forward would broadcast buffers, a collective that nothing
        here needs."""
        total, count, exact, answered = 0.0, 0, 0, 0
        for loss_sum, n, right, labelled in self._forward_eval(rows, self.loss_module.measure):
            total += float(loss_sum)
            count += int(n)
            exact += int(right)
            answered += int(labelled)
        total, count, exact, answered = self.context.all_reduce([total, float(count), float(exact), float(answered)])
        return (total / count if count else float("nan")), (exact / answered if answered else 0.0)

    @torch.no_grad()
    def row_losses(self, rows: Rows) -> list[float]:
        """Each row's mean loss per answer token under the current adapter, in the order given (NaN
        for a row whose answer lost every token to ``max_length``): this rank's rows only."""
        losses: list[float] = []
        for logps, counts in self._forward_eval(rows, functools.partial(self.loss_module, per_row=True)):
            for logp, count in zip(logps.tolist(), counts.tolist(), strict=True):
                losses.append(-logp / count if count else float("nan"))
        return losses

    @torch.no_grad()
    def measure_pairs(self, pairs: Rows) -> dict[str, float]:
        """The mean DPO loss and reward margin of the current adapter on every rank's shard of
        tokenized preference pairs, and its accuracy: the share of pairs whose chosen answer it
        prefers more than the reference does."""
        sums = StepFigures(pairs=len(pairs))
        sums.dpo_loss_sum, sums.margin_sum, sums.preferred = self.preference.sums(pairs)
        sums, _ = sums.reduced(self.context.all_reduce)
        if not sums.pairs:
            return {"pairs": 0}
        figures = sums.metrics()
        return {
            "loss": figures["dpo_loss"],
            "reward_margin": figures["dpo_reward_margin"],
            "accuracy": figures["dpo_accuracy"],
            "pairs": int(sums.pairs),
        }

    # --- the end ---------------------------------------------------------------------------------

    def _finish(self, stop_reason: str) -> dict[str, Any]:
        """Load the best adapter (by validation objective) and make the final report, with the
        final checkpoint; returns its metrics."""
        state, opts = self.state, self.opts
        if state.best_params is not None:
            with full_parameters(opts, self.peft_model, modify=True):
                load_trainable_state(self.peft_model, state.best_params)  # the best validation loss wins
        summary = self.protection.summary() if self.protection is not None else None
        # The kept adapter on the pairs it trained on (every rank takes part: it is a collective).
        pairs = self.measure_pairs(self.pairs) if opts.objective in OBJECTIVES_WITH_PAIRS else None
        trend = state.loss_trend()
        final = {
            "step": state.step,
            "epochs": state.step / self.steps_per_epoch,
            "first_loss": state.first_loss,
            "train_loss": state.epoch_loss / state.epoch_label_tokens if state.epoch_label_tokens else None,
            "last_val_loss": state.last_val_loss,
            "initial_val_loss": state.initial_val_loss,
            "initial_heldout_loss": state.initial_heldout_loss,
            "loss_start": trend[0] if trend else None,
            "loss_end": trend[1] if trend else None,
            "loss_fell": learned(trend, opts.min_loss_drop),
            **state.kept_figures(opts.forgetting_weight),
            "tokens": state.tokens,
            "train_time_s": state.elapsed_s,
            "stop_reason": stop_reason,
            "seed": state.seed,
            "trials": state.trials,
            **({"attempt": state.attempt, "attempts": state.attempts} if state.attempts else {}),
            "restarts": state.restarts,
            "resumed_from_step": state.resumed_from_step,
            "world_size": self.context.world_size,
            **self._peak_memory(),
            "final": True,
            **({"mask": summary} if summary is not None else {}),
            **({"dpo": pairs} if pairs is not None else {}),
        }
        self.report(final, checkpoint=f"checkpoint-final-{self._attempt_tag()}step{state.step:06d}")
        return final

    def _peak_memory(self) -> dict[str, float]:
        """The largest peak over the ranks: resident memory of the worker process (MB) and, on a
        GPU, memory allocated by torch (GB)."""
        import resource

        peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0]  # KB on Linux
        if self.device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(self.device) / 2**30)
        peaks = self.context.all_reduce(peaks, op="max")
        return {"peak_rss_mb": round(peaks[0], 1), **({"peak_vram_gb": round(peaks[1], 3)} if len(peaks) > 1 else {})}

    # --- helpers ---------------------------------------------------------------------------------

    def _current_lr(self) -> float:
        return float((self.engine.optimizer if self.engine is not None else self.optimizer).param_groups[0]["lr"])

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _maybe_fail(self) -> None:
        """Test hook (:class:`InjectedFault`): rank 0 fails once at the given step."""
        fault, step = self.spec.fault, self.state.step
        if fault is None or self.rank != 0 or step != fault.step:
            return
        marker = Path(fault.marker)
        if marker.exists():
            return
        marker.write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} (KAIZEN_TEST_FAIL_AT_STEP)")


def _label_count(row: dict[str, Any]) -> int:
    """Tokens of a tokenized row that carry a loss (the first token never does: nothing predicts it)."""
    return sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX)


def _unlabelled(row: dict[str, Any]) -> bool:
    return all(t == IGNORE_INDEX for t in row["labels"])
