"""Restarts from other seeds, as a part of :class:`app.learning.trainer.Trainer`:

* ``finetune.trials``: each trial trains the first ``trial_fraction`` of the steps from the same
  starting point, validating on the run's schedule, and the one whose best validation was best goes
  on as if it had been alone (Dodge et al., 2020), its best adapter so far the one kept unless a
  later one beats it;
* ``finetune.attempts``: a run that ended without learning its task (its kept adapter's validation
  exact match below ``learned_exact_match``) starts over from the next unused seed, and the best
  attempt's adapter is the one kept. Trials choose early, by what a seed did in its first steps; an
  attempt is judged by where the whole run ended, which is what tells a set memorised from one
  learned.

:class:`TrialRestarts` is the trainer's base class: it works on the trainer's state (options, model,
optimizer and schedule, protection, early stopping, step metrics), which
:meth:`~app.learning.trainer.Trainer.setup` builds.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from app.learning.checkpointing import load_trainable_state, trainable_state
from app.learning.lora_model import init_lora
from app.learning.run_state import RngState, RunState, TrialResult

__all__ = ["TrialRestarts", "rng_state", "set_rng_state"]

log = logging.getLogger("kaizen.finetune")


class TrialRestarts:
    """``run_trials`` and the hand-over to the winning trial, and ``attempt_again``, for the trainer."""

    opts: Any
    spec: Any
    state: Any
    device: torch.device
    peft_model: Any
    optimizer: Any
    scheduler: Any
    protection: Any
    stopper: Any
    step_metrics: list[dict[str, Any]]
    steps_per_epoch: int
    total_steps: int
    resumed_at: float
    last_report: float
    evaluated_at: int | None
    trial_evaluations: list[dict[str, Any]] | None
    start_params: dict[str, torch.Tensor] | None
    fresh_optimizer: tuple[dict[str, Any], dict[str, Any]] | None

    def run_trials(self) -> str:
        """Restarts from other seeds: each trains the first ``trial_fraction`` of the steps from the
        same starting point (or until it stops early), validating as the run does, and the one
        whose best validation has the lowest selection key goes on as if alone (its choice reported
        with every trial's best figures). A small set can learn its task inside a trial and then
        memorise its rows, so the trial's best adapter, not its last, is what the trials compare
        and what the run keeps unless a later one beats it. Returns the stop reason: the winner's
        (``early_stopping`` when it stopped in its trial); a trial out of time ends the trials, and
        the run, with the best so far."""
        opts = self.opts
        start_state = copy.deepcopy(self.state)
        start_params = trainable_state(self.peft_model, opts)
        start_optimizer = copy.deepcopy(self.optimizer.state_dict())
        start_scheduler = self.scheduler.state_dict()
        limit = max(1, round(opts.trial_fraction * self.total_steps))
        trials: list[dict[str, Any]] = []
        best: TrialResult | None = None
        spent_tokens = 0
        stop_reason = winner_stop = "completed"
        for i in range(opts.trials):
            self.state = copy.deepcopy(start_state)
            self.state.seed = opts.seed + i
            if i > 0:
                if self.spec.parent_adapter_id is None:  # a fresh adapter: this seed's initialisation
                    init_lora(self.peft_model, self.state.seed)
                else:  # the parent's weights
                    load_trainable_state(self.peft_model, start_params)
                self.optimizer.load_state_dict(copy.deepcopy(start_optimizer))
                self.scheduler.load_state_dict(start_scheduler)
                if opts.masking != "none":  # the Fisher information of this seed's starting adapter
                    self.protection = self._estimate_protection()
            self.stopper.load_state_dict(self.state.early_stopping)
            self.trial_evaluations = []
            stop_reason = self.train_until(limit, trial=True)
            if self.evaluated_at != self.state.step:
                self.evaluate()
            evaluations, self.trial_evaluations = self.trial_evaluations, None
            figures = self.state.best_figures
            trials.append({"seed": self.state.seed, "steps": self.state.step, **figures})
            spent_tokens += self.state.tokens
            if best is None or figures["selection"] < best.figures["selection"]:
                winner_stop = stop_reason
                best = TrialResult(
                    figures=figures,
                    state=self.state,
                    params=trainable_state(self.peft_model, opts),
                    optimizer_state=copy.deepcopy(self.optimizer.state_dict()),
                    scheduler_state=self.scheduler.state_dict(),
                    protection=self.protection,
                    step_metrics=self.step_metrics.copy(),
                    rng=rng_state(self.device),
                    evaluations=evaluations,
                )
            self.step_metrics.clear()
            if stop_reason not in ("completed", "early_stopping"):  # out of time: the trials so far decide
                break
        assert best is not None
        self._go_on_with(best, trials, spent_tokens)
        if stop_reason in ("completed", "early_stopping"):
            stop_reason = winner_stop
            # The winner's steps, its last evaluation, its validations and the trials.
            last = {k: v for k, v in best.evaluations[-1].items() if k not in ("step", "train_loss")}
            self.report(
                {
                    **self.step_metrics[-1],
                    "epoch": self.state.step / self.steps_per_epoch,
                    "tokens": self.state.tokens,
                    "elapsed_s": self.state.elapsed_s,
                    **last,
                    "best_objective": self.stopper.best,
                    "seed": self.state.seed,
                    "trials": trials,
                    "trial_evaluations": best.evaluations,
                    "step_metrics": self.step_metrics,
                }
            )
            self.step_metrics, self.last_report = [], time.perf_counter()
        return stop_reason

    def attempt_again(self, stop_reason: str) -> str:
        """While the run ended (early stop, step cap or its epochs) without learning its task and
        ``finetune.attempts`` allows another, start over from the next unused seed and train again;
        then keep the best attempt's adapter (:meth:`_keep_best_attempt`). Returns the last
        attempt's stop reason (a run out of time stops the attempts)."""
        opts = self.opts
        while (
            stop_reason in ("completed", "early_stopping", "max_steps")
            and self.state.attempt + 1 < opts.attempts
            and not self._task_learned()
        ):
            self._next_attempt(stop_reason)
            stop_reason = self.train_until(self.total_steps)
        if self.state.attempt > 0:  # another attempt ran (or a checkpoint of one was resumed)
            self._keep_best_attempt(stop_reason)
        return stop_reason

    def _attempt_tag(self) -> str:
        """A checkpoint name's attempt part: none for the first, whose names stay as they were."""
        return f"attempt{self.state.attempt}-" if self.state.attempt else ""

    def _task_learned(self) -> bool:
        """Whether the kept adapter so far answers ``learned_exact_match`` of the validation rows
        exactly (True where nothing was validated: there is nothing to judge a new attempt by)."""
        exact = self.state.best_figures.get("val_exact_match")
        return exact is None or exact >= self.opts.learned_exact_match

    def _attempt_summary(self, stop_reason: str) -> dict[str, Any]:
        state, figures = self.state, self.state.best_figures
        return {
            "attempt": state.attempt,
            "seed": state.seed,
            "steps": state.step,
            "stop_reason": stop_reason,
            **{k: figures.get(k) for k in ("kept_step", "val_exact_match", "val_loss", "objective")},
        }

    def _next_attempt(self, stop_reason: str) -> None:
        """Start the next attempt: a fresh state on the next unused seed (the trials used ``seed`` to
        ``seed + trials - 1``), a fresh adapter from it (or the parent's weights), a fresh optimizer,
        schedule and early stopping; the best attempt so far is kept in ``state.earlier``. Time and
        tokens count on."""
        opts, state = self.opts, self.state
        ended = self._attempt_summary(stop_reason)
        earlier = state.earlier
        if earlier is None or state.best_figures["selection"] < earlier["best_figures"]["selection"]:
            earlier = {k: v for k, v in state.__dict__.items() if k not in ("earlier", "attempts")}
        self.state = RunState(
            seed=opts.seed + opts.trials + state.attempt,
            attempt=state.attempt + 1,
            attempts=[*state.attempts, ended],
            earlier=earlier,
            elapsed_s=state.elapsed_s,
            tokens=state.tokens,
            initial_val_loss=state.initial_val_loss,
            initial_heldout_loss=state.initial_heldout_loss,
            restarts=state.restarts,
            resumed_from_step=state.resumed_from_step,
            trials=state.trials,
        )
        if self.spec.parent_adapter_id is None:
            init_lora(self.peft_model, self.state.seed)
        else:
            load_trainable_state(self.peft_model, self.start_params)
        optimizer_state, scheduler_state = self.fresh_optimizer
        self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        self.scheduler.load_state_dict(scheduler_state)
        if opts.masking != "none":  # the Fisher information of this attempt's starting adapter
            self.protection = self._estimate_protection()
        self.stopper.load_state_dict(self.state.early_stopping)
        self.evaluated_at = None
        log.info(
            "attempt %d of %d: the kept adapter answered %.3f of the validation rows exactly (under "
            "learned_exact_match %.3f) after %d steps; starting over from seed %d",
            ended["attempt"] + 1,
            opts.attempts,
            ended["val_exact_match"],
            opts.learned_exact_match,
            ended["steps"],
            self.state.seed,
        )

    def _keep_best_attempt(self, stop_reason: str) -> None:
        """At the end: the attempts' record, and the best attempt's adapter and figures as the
        kept ones (an earlier attempt's where it beats the last: its seed, kept step and loss trend
        too; time, tokens and the last attempt's position stay the run's)."""
        state = self.state
        state.attempts = [*state.attempts, self._attempt_summary(stop_reason)]
        earlier, state.earlier = state.earlier, None
        if earlier is not None and (
            not state.best_figures or earlier["best_figures"]["selection"] <= state.best_figures["selection"]
        ):
            for key in ("attempt", "seed", "best_params", "best_figures", "first_loss", "loss_head", "loss_tail"):
                setattr(state, key, earlier[key])
            state.loss_steps = earlier["loss_steps"]
        log.info(
            "attempts: %s; attempt %d kept",
            ", ".join(f"seed {a['seed']}: exact {a['val_exact_match']:.3f}" for a in state.attempts),
            state.attempt + 1,
        )

    def _go_on_with(self, best: TrialResult, trials: list[dict[str, Any]], spent_tokens: int) -> None:
        """Make the winning trial the run: its state, weights, optimizer, protection, unreported
        steps and random state; tokens and time are every trial's, as they were spent."""
        self.state, self.protection, self.step_metrics = best.state, best.protection, best.step_metrics
        set_rng_state(self.device, best.rng)  # its dropout goes on as in a run of its own
        load_trainable_state(self.peft_model, best.params)
        self.optimizer.load_state_dict(best.optimizer_state)
        self.scheduler.load_state_dict(best.scheduler_state)
        self.stopper.load_state_dict(self.state.early_stopping)
        self.state.tokens, self.state.trials = spent_tokens, trials
        self.state.elapsed_s = time.perf_counter() - self.resumed_at
        log.info(
            "trials: seed %d goes on (objectives %s)",
            self.state.seed,
            ", ".join(f"{t['seed']}: {t['objective']:.4f}" for t in trials),
        )


def rng_state(device: torch.device) -> RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
