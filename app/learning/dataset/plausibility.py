"""Stage 7c of ``jobs/build_dataset.py``: answers a model trained on the pool finds implausible.

The quality scores and the users' ratings miss one kind of poor answer: the assistant's own
systematic mistake on some kind of request, rated well by users who did not notice. It scores like a
good answer (the same rating; a longer wrong answer can even look more relevant), and its requests do
not sit together by embedding, so the quality measured against similar requests does not see it
either; a diverse selection then keeps it at several times its share of the pool. What does see it is
the answer itself: a probe, a short LoRA fine-tune of the base model on the pool (the cycle's own
recipe, ``finetune`` section), learns what most answers to each kind of request say, and an answer
that contradicts them keeps a loss far above the rest (measured in the data-selection benchmark,
``benchmarks/data_selection.py``: README).

* :func:`probe_options`: the cycle's fine-tuning options made a probe's (a fresh adapter, no
  validation, trials, rehearsal or protection, at most ``steps`` optimizer steps);
* :func:`answer_losses`: trains the probe in this process (the same :class:`~app.learning.trainer.Trainer`
  as every run, on a :class:`~app.learning.worker_context.LocalContext`), a round of steps at a time
  until the median answer loss over the pool says it has learned what most answers say (or to its
  last step), and returns each row's mean loss per answer token and the probe's final report; the
  job runs it as a Ray task with the resources of one fine-tuning worker;
* :func:`implausible_rows`: the rows over ``ratio`` times the median loss (at most ``max_share`` of
  them, the highest first; users' corrections never: they are meant to differ from what the model
  says), and :func:`drop_implausible` removes them and says what it did
  (:class:`~app.learning.dataset.write.LossFilterInfo`).

A probe whose training loss did not fall (``finetune.min_loss_drop``) judges nothing: its losses are
the base model's, which would take a new task's answers for mistakes, so no row is dropped.

A probe judges well only once it has learned the pool, and how many steps that takes depends on the
base model and the seed: on the data-selection benchmark's pool of 1,767 rows (206 poor) one base
had a median answer loss of 0.46 after a 300-step probe, whose 5x limit left 130 poor rows in; a
probe whose rate decayed over 1,200 steps had a median of 0.035 at step 600, and dropped all 206
(README). So the probe trains in rounds until the median is low enough
(``dataset.loss_filter_learned_loss``), with a cap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, num_rows, take
from app.learning.dataset.preferences import SOURCE_CORRECTION
from app.learning.dataset.write import LossFilterInfo
from app.learning.training import FinetuneConfig
from app.learning.worker_context import WorkerSpec

__all__ = ["answer_losses", "drop_implausible", "implausible_rows", "probe_options"]


def probe_options(finetune: FinetuneConfig, steps: int, seed: int) -> FinetuneConfig:
    """The probe's options: ``finetune`` (rank, rate, batch, length, precision, device) trained for
    at most ``steps`` optimizer steps (its learning rate's schedule runs over them) on one worker
    from a fresh adapter, without validation, trials, attempts, rehearsal, protection against
    forgetting or checkpoints, on the supervised objective."""
    return FinetuneConfig.model_validate(
        {
            **finetune.model_dump(),
            "objective": "sft",
            "continue_from": None,
            "max_steps": steps,
            "epochs": 10_000,  # max_steps is the limit
            "eval_every_steps": None,
            "early_stopping_patience": 0,
            "trials": 1,
            "attempts": 1,
            "rehearsal_ratio": 0.0,
            "masking": "none",
            "num_workers": 1,
            "strategy": "ddp",
            "checkpoint_every_steps": steps + 1,
            "seed": seed,
        }
    )


def answer_losses(
    spec: WorkerSpec, messages: Sequence[str], every: int | None = None, learned_loss: float = 0.0
) -> tuple[list[float], dict[str, Any]]:
    """Train the probe ``spec`` describes on ``messages`` (ChatML rows as JSON) in this process, then
    measure each row's mean loss per answer token (NaN where ``max_length`` left no answer token).

    The probe trains ``every`` steps at a time (all its steps at once when None), and after each
    round measures the rows' losses: it has learned what most answers say, and stops, once their
    median is at most ``learned_loss``; else it trains to its last step. Returns the losses, in
    order, and the probe's final report (``loss_fell``, ``train_time_s``...) with ``rounds`` (each
    round's step and median loss), ``learned`` (whether the last median is at most
    ``learned_loss``) and ``scoring_s`` (the time spent measuring).

    Raises:
        ValueError: a row that cannot be tokenized (naming its index).
    """
    import torch

    from app.learning.trainer import Trainer
    from app.learning.worker_context import LocalContext, deterministic_algorithms

    torch.set_num_threads(max(1, int(spec.opts.cpus_per_worker)))
    device = torch.device("cuda" if spec.opts.use_gpu and torch.cuda.is_available() else "cpu")
    trainer = Trainer(spec, LocalContext({"train": [{"messages": m} for m in messages]}, device=device))
    rounds: list[dict[str, Any]] = []
    measured: list[float] = []
    scoring_s = 0.0

    def measure() -> float:
        nonlocal measured, scoring_s
        t0 = time.perf_counter()
        measured = trainer.row_losses(trainer.data["train"])
        scoring_s += time.perf_counter() - t0
        finite = [x for x in measured if math.isfinite(x)]
        median = float(np.median(finite)) if finite else math.nan
        rounds.append({"step": trainer.state.step, "median_loss": round(median, 6)})
        return median

    with deterministic_algorithms(spec.opts.deterministic):
        trainer.setup()
        final = trainer.fit(until=lambda: measure() <= learned_loss, every=every or spec.opts.max_steps or 0)
        if not rounds or rounds[-1]["step"] != trainer.state.step:
            measure()  # the last round: the probe's last step
    learned = rounds[-1]["median_loss"] <= learned_loss
    return measured, {**final, "rounds": rounds, "learned": learned, "scoring_s": scoring_s}


def implausible_rows(
    losses: np.ndarray, corrections: np.ndarray, ratio: float, max_share: float
) -> tuple[np.ndarray, float | None, float | None, int]:
    """Which rows to drop: loss above ``ratio`` times the median of the finite losses, never a
    correction, at most ``floor(max_share * rows)`` of them (the highest losses). Returns a boolean
    mask, the median, the limit, and how many rows were over it."""
    losses = np.asarray(losses, dtype=np.float64)
    drop = np.zeros(len(losses), dtype=bool)
    finite = np.isfinite(losses)
    if not finite.any():
        return drop, None, None, 0
    median = float(np.median(losses[finite]))
    limit = ratio * median
    over = np.flatnonzero(finite & (losses > limit) & ~np.asarray(corrections, dtype=bool))
    keep_out = over[np.argsort(-losses[over], kind="stable")][: math.floor(max_share * len(losses))]
    drop[keep_out] = True
    return drop, median, limit, len(over)


def drop_implausible(
    batch: Mapping[str, np.ndarray],
    losses: Sequence[float],
    final: Mapping[str, Any],
    ratio: float,
    max_share: float,
) -> tuple[Batch, LossFilterInfo]:
    """Stage 7c: ``batch`` without its implausible rows (:func:`implausible_rows` on the probe's
    ``losses``; none when the probe's ``final`` report says its loss did not fall), and what was done."""
    values = np.asarray(losses, dtype=np.float64)
    sources = batch.get("source", [""] * num_rows(batch))  # a correction's row says so (apply_corrections)
    corrections = np.asarray([as_text(s) == SOURCE_CORRECTION for s in sources], dtype=bool)
    drop, median, limit, over = implausible_rows(values, corrections, ratio, max_share)
    if final.get("loss_fell") is False:
        drop[:] = False
    info = LossFilterInfo(
        rows=num_rows(batch),
        steps=int(final.get("step") or 0),
        loss_fell=final.get("loss_fell"),
        median_loss=None if median is None else round(median, 6),
        limit=None if limit is None else round(limit, 6),
        over_limit=over,
        dropped=int(drop.sum()),
        rounds=list(final.get("rounds") or []),
        learned=final.get("learned"),
        dropped_rows={
            as_text(batch["interaction_id"][i]): round(float(values[i]), 4)
            for i in sorted(np.flatnonzero(drop), key=lambda i: -values[i])
        },
        train_time_s=round(float(final.get("train_time_s") or 0.0), 2),
        scoring_s=round(float(final.get("scoring_s") or 0.0), 2),
    )
    return take(batch, ~drop), info
