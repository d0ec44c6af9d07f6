"""The pure pieces of LoRA fine-tuning: options, the preference loss, rehearsal mixing, early
stopping, the learning-rate schedule and the lines that describe a run's reports. The trainer
(:mod:`app.learning.trainer`) runs them on every Ray Train worker; here they are plain Python and
torch, tested without Ray or a model.

* :class:`FinetuneConfig`: every option of ``jobs/finetune.py`` (``finetune.<key>=<value>`` on
  its command line), validated with errors that name the key; its groups (:class:`AdapterConfig`,
  :class:`ObjectiveConfig`, :class:`OptimizerConfig`, :class:`BatchConfig`, :class:`EvaluationConfig`,
  :class:`ForgettingConfig`, :class:`ResourceConfig`, :class:`CheckpointingConfig`) are typed
  models of their own.
* rows as token ids (chat rendering, labels, pairs, batches): :mod:`app.learning.tokenization`.
* :func:`dpo_loss`: the loss of direct preference optimisation on summed answer log-likelihoods.
* :func:`mix_rehearsal`: one epoch's rows, the training rows plus rehearsal rows of earlier
  domains making up a configured share of the epoch, shuffled; :func:`draw_pairs`: an epoch's
  preference pairs, in shuffled passes.
* :class:`EarlyStopping`: patience and a minimum improvement on the validation loss.
* :func:`lr_factor`: linear warm-up, then cosine, linear or constant.
* :func:`describe_report`: one line for a training report (jobs' progress output).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "OBJECTIVES_WITH_PAIRS",
    "AdapterConfig",
    "BatchConfig",
    "CheckpointingConfig",
    "EarlyStopping",
    "EvaluationConfig",
    "FinetuneConfig",
    "ForgettingConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "ResourceConfig",
    "describe_report",
    "dpo_loss",
    "draw_pairs",
    "format_metric",
    "learned",
    "lr_factor",
    "mix_rehearsal",
    "no_pairs_error",
    "rehearsal_count",
    "selection_key",
    "steps_per_epoch",
]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Qwen2/Llama block: LoRA on all of them, as QLoRA recommends."""

T = TypeVar("T")


# --- options -------------------------------------------------------------------------------------
#
# The options come in groups, each a typed model that a component can take by itself (the
# forgetting protection takes a ForgettingConfig, the trainer the whole FinetuneConfig). The groups
# are FinetuneConfig's bases rather than fields: the keys stay flat (finetune.lora_rank=8 on the
# command line, a flat ``finetune:`` section in a config file, flat hyper-parameters in an
# adapter's lineage), and an error names the key that was typed.


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterConfig(_Group):
    """The LoRA adapter: its shape, and the adapter it starts from."""

    lora_rank: int = Field(8, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch while training.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Module names LoRA wraps (Qwen2: q/k/v/o_proj, gate/up/down_proj).",
    )
    continue_from: str | None = Field(
        "champion",
        description=(
            "Adapter to continue training: 'champion' (the registry's champion; a fresh adapter when none is "
            "set), an adapter id, or null for a fresh adapter."
        ),
    )

    @field_validator("continue_from")
    @classmethod
    def _adapter_name(cls, value: str | None) -> str | None:
        if value is None or value == "champion":
            return value
        from app.model.adapters import check_adapter_id

        check_adapter_id(value)
        return value


OBJECTIVES_WITH_PAIRS = ("dpo", "sft+dpo")
"""The values of ``finetune.objective`` that train on preference pairs."""


class ObjectiveConfig(_Group):
    """What the adapter is trained to do: write the targets, prefer corrections, or both."""

    objective: Literal["sft", "dpo", "sft+dpo"] = Field(
        "sft",
        description=(
            "sft: supervised fine-tuning, the token cross-entropy of the training rows' answers (users' corrections "
            "among them); a dataset's preference pairs are not read. dpo: direct preference optimisation on the "
            "pairs alone (Rafailov et al., 2023): each correction is made more likely than the answer it replaced, "
            "relative to the base model (the adapter disabled), -log sigmoid(dpo_beta * ((log p(chosen) - log "
            "p_base(chosen)) - (log p(rejected) - log p_base(rejected)))), log-likelihoods summed over the answer's "
            "tokens. sft+dpo: the sum of both losses, each micro-batch of training rows joined by one of pairs. "
            "dpo and sft+dpo need pairs: the training folder's train_preferences.parquet (jobs.build_dataset)."
        ),
    )
    dpo_beta: float = Field(
        0.1,
        gt=0,
        description=(
            "DPO's beta, with objective dpo or sft+dpo: the scale of the log-likelihood ratios in the loss. A "
            "larger beta saturates the loss sooner, so the adapter moves less far from the base model; a smaller "
            "one lets it move further."
        ),
    )


class OptimizerConfig(_Group):
    """AdamW and its schedule: how far and how long the adapter moves."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW's decoupled weight decay; must be 0 with masking=fggm (it would move frozen entries).",
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up, to 0 at the last step (constant: none)."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Optimizer steps of linear warm-up from 0; None: warmup_fraction of the run's steps."
    )
    warmup_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description=(
            "With warmup_steps unset, the share of the run's steps that warm the learning rate up (at least one "
            "step when above 0): LoRA at a high peak rate without warm-up can blow up early and settle on one "
            "answer for every request."
        ),
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None: no clipping.")
    epochs: int = Field(3, ge=1, description="Passes over the training rows.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps even if epochs remain; None: no cap."
    )


class BatchConfig(_Group):
    """What one optimizer step trains on."""

    batch_size: int = Field(4, ge=1, description="Rows per micro-batch, per worker.")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, ge=8, description="Tokens per row; longer rows are cut at the end.")
    rehearsal_ratio: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share of each epoch's rows drawn from the rehearsal set (earlier domains); 0: none.",
    )


class EvaluationConfig(_Group):
    """Validation, early stopping, and the choice between restarts from other seeds."""

    eval_every_steps: int | None = Field(
        None, ge=1, description="Validate every N optimizer steps; None: at the end of each epoch."
    )
    early_stopping_patience: int = Field(
        2, ge=0, description="Stop after this many validations without improvement; 0: never stop early."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="A validation loss must fall by more than this to count as an improvement."
    )
    min_loss_drop: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Relative fall of the training loss a run must show to be published: the mean loss of its last "
            "steps must be below (1 - min_loss_drop) times that of its first steps (up to an epoch's steps, at "
            "most 20, each). A run short of it failed to learn: it is reported as failed and its adapter is "
            "not stored or registered. 0: the loss must merely fall."
        ),
    )
    select_by: Literal["exact_match", "loss"] = Field(
        "exact_match",
        description=(
            "What picks the kept adapter, the early stop and the winning trial: exact_match, the share of "
            "validation rows whose answer greedy decoding writes exactly (the objective breaks ties, so a model "
            "that answers nothing exactly yet is chosen by its loss); loss, the objective alone. A loss can keep "
            "falling on a run that has collapsed to one answer for every request; exact match does not."
        ),
    )
    learned_exact_match: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description=(
            "select_by exact_match with held-out rows of earlier domains: a validation exact match at or above "
            "this counts as the new task learned, and from there the adapter that answers more held-out rows "
            "exactly (forgets less) is kept, then the higher match, then the objective. Without it a run with "
            "rehearsal stops as soon as the new task is learned, before the rehearsal rows have taught the "
            "earlier domains back (SSR kept next at 0.39 instead of 0.91 in the forgetting benchmark). 1.0: "
            "the new task's match always counts first."
        ),
    )
    forgetting_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Weight of forgetting in the objective that early stopping, the kept adapter and a sweep follow: "
            "val_loss + weight * max(0, rise of the held-out earlier domains' loss); without held-out rows "
            "the objective is the validation loss."
        ),
    )
    trials: int = Field(
        1,
        ge=1,
        description=(
            "Start from this many seeds (seed, seed + 1, ...: the LoRA initialisation and the data order), train "
            "each for trial_fraction of the steps, validating as the run does, and go on with the one whose best "
            "validation is best (select_by); the others are dropped, and the winner's best adapter so far is the "
            "one kept unless a later one beats it (a small set can learn its task inside a trial, then memorise). "
            "On a few hundred rows the seed alone can decide whether an adapter learns the task, and a seed that "
            "fails shows it early (Dodge et al., 2020, 'Fine-Tuning Pretrained "
            "Language Models: Weight Initializations, Data Orders, and Early Stopping'). Costs "
            "(trials - 1) * trial_fraction more steps; needs validation rows."
        ),
    )
    trial_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="trials > 1: the share of the run's steps each seed trains before the choice."
    )
    attempts: int = Field(
        1,
        ge=1,
        description=(
            "Whole runs at most, while the task is not learned: a run that ends (early stop or step cap) with its "
            "kept adapter's validation exact match below learned_exact_match starts over from the next unused "
            "seed (a fresh adapter, or the parent's weights again), and the adapter kept is the best of the "
            "attempts (select_by). A few hundred rows can be memorised instead of learned, depending on the seed "
            "alone, and the run that will not learn them looks like one that will for hundreds of steps (the "
            "data-selection benchmark: 1 seed in 5 on one base, README), too late for trials to tell. Costs "
            "nothing on a run that learns; on a task whose answers are never matched exactly it costs every "
            "attempt, so leave it at 1 there. Needs validation rows."
        ),
    )


class ForgettingConfig(_Group):
    """Protection of what earlier domains taught the adapter (see :mod:`app.learning.masking`)."""

    masking: Literal["none", "fggm", "ewc"] = Field(
        "none",
        description="none; fggm: Fisher-guided gradient masking; ewc: elastic weight consolidation penalty.",
    )
    mask_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="fggm: share of the adapter's entries that are updated (per tensor)."
    )
    mask_mode: Literal["least_important", "most_important"] = Field(
        "least_important",
        description=(
            "fggm: least_important updates the entries that matter least to earlier tasks (Fisher on the "
            "rehearsal or --fisher-data rows) and freezes the rest; most_important updates the top ones for "
            "the new task (Fisher on the training rows, the FGGM paper's rule)."
        ),
    )
    mask_granularity: Literal["entry", "row"] = Field(
        "entry", description="fggm: mask single entries, or whole output rows scored by their mean Fisher."
    )
    ewc_lambda: float = Field(1000.0, gt=0, description="ewc: strength of the penalty lambda/2 * F * (w - w0)^2.")
    fisher_samples: int = Field(
        64,
        ge=1,
        description="fggm/ewc: rows (one per backward pass) the Fisher information is estimated on, per worker.",
    )


class ResourceConfig(_Group):
    """Workers, devices, distribution and precision."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); otherwise CPU with gloo.")
    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="ddp: torch DistributedDataParallel; deepspeed: DeepSpeed ZeRO (GPU only)."
    )
    zero_stage: Literal[2, 3] = Field(2, description="strategy=deepspeed: ZeRO stage 2 or 3.")
    quantize_4bit: bool = Field(False, description="QLoRA: base weights in 4-bit NF4 via bitsandbytes (GPU only).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about a third more compute."
    )
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="auto: bf16 autocast (and bf16 base weights) on GPU, fp32 on CPU."
    )

    @property
    def precision(self) -> Literal["bf16", "fp32"]:
        """The compute precision that ``mixed_precision`` resolves to."""
        if self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and self.use_gpu):
            return "bf16"
        return "fp32"


class CheckpointingConfig(_Group):
    """Reports to Ray Train, checkpoints, and recovery from worker failures."""

    report_every_s: float = Field(
        10.0,
        ge=0.0,
        description=(
            "Report to Ray Train at most this often, besides every evaluation, checkpoint and the end; the "
            "steps in between travel in the next report's 'step_metrics' list (an epoch's last step with "
            "'epoch_loss'). A report waits until Ray Train's controller has collected the one before (it polls "
            "every 2 s), so a report per step, or per epoch of a small set, would cap a run at one per poll. "
            "0: a report per step."
        ),
    )
    checkpoint_every_steps: int = Field(
        50, ge=1, description="Checkpoint (adapter, optimizer, step) to the run's storage every N optimizer steps."
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Most recent checkpoints kept in storage.")
    max_failures: int = Field(
        1, ge=-1, description="Worker-group failures to recover from (from the last checkpoint); -1: unlimited."
    )


class FinetuneConfig(
    # Pydantic lists the last base's fields first: in this order the keys read LoRA first.
    CheckpointingConfig,
    ResourceConfig,
    ForgettingConfig,
    EvaluationConfig,
    BatchConfig,
    OptimizerConfig,
    ObjectiveConfig,
    AdapterConfig,
):
    """Options of ``jobs/finetune.py``; on its command line each is ``finetune.<key>=<value>``.

    Every group's keys, flat: :class:`AdapterConfig`, :class:`ObjectiveConfig`, :class:`OptimizerConfig`,
    :class:`BatchConfig`, :class:`EvaluationConfig`, :class:`ForgettingConfig`,
    :class:`ResourceConfig`, :class:`CheckpointingConfig`, ``seed`` and ``deterministic``.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="Seed of the LoRA initialisation and the data order.")
    deterministic: bool = Field(
        True,
        description="Train with torch's deterministic algorithms (a warning where an op has none): the same "
        "data, seed, thread count and machine give the same adapter.",
    )

    @model_validator(mode="after")
    def _combinations(self) -> FinetuneConfig:
        if self.strategy == "deepspeed" and not self.use_gpu:
            raise ValueError("strategy: deepspeed needs use_gpu=true (DeepSpeed ZeRO runs on GPUs); use ddp on CPU")
        if self.quantize_4bit and not self.use_gpu:
            raise ValueError("quantize_4bit: 4-bit QLoRA (bitsandbytes) needs use_gpu=true")
        if self.quantize_4bit and self.strategy == "deepspeed" and self.zero_stage == 3:
            raise ValueError("quantize_4bit: not with strategy=deepspeed zero_stage=3 (use zero_stage=2 or ddp)")
        if self.masking != "none" and self.strategy == "deepspeed" and self.zero_stage == 3:
            raise ValueError(
                f"masking: {self.masking} needs whole parameters on every rank; ZeRO-3 partitions them "
                "(use zero_stage=2 or ddp)"
            )
        for key in ("trials", "attempts"):
            if getattr(self, key) > 1 and self.strategy == "deepspeed":
                raise ValueError(
                    f"{key}: restarts from other seeds reset the optimizer in place, which a DeepSpeed engine does "
                    f"not allow; use {key}=1 with strategy=deepspeed"
                )
        if self.masking == "fggm" and self.weight_decay > 0:
            raise ValueError(
                f"weight_decay: must be 0 with masking=fggm (got {self.weight_decay}); decoupled weight decay "
                "would move the entries the mask freezes"
            )
        return self


# --- the preference objective ----------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct preference optimisation (Rafailov et al., 2023) per pair, from each answer's summed
    log-likelihood under the policy and the reference model.

    Returns:
        ``(loss, margin)``: ``-log sigmoid(margin)`` and the reward margin
        ``beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))``,
        the implicit reward of the chosen answer over the rejected one (positive: the policy
        prefers the chosen answer more than the reference does).
    """
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -torch.nn.functional.logsigmoid(margin), margin


def no_pairs_error(objective: str) -> ValueError:
    """The error of a run whose ``finetune.objective`` trains on preference pairs and has none."""
    return ValueError(
        f"finetune.objective: {objective} trains on preference pairs and the run has none; build the dataset "
        "from interactions with users' corrections (jobs.build_dataset writes them to the training folder's "
        "train_preferences.parquet) or set finetune.objective=sft"
    )


# --- epochs --------------------------------------------------------------------------------------


def rehearsal_count(n_train: int, ratio: float) -> int:
    """Rehearsal rows to add to ``n_train`` training rows so that they make up ``ratio`` of the
    epoch: ``round(n_train * ratio / (1 - ratio))``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"rehearsal ratio must be in [0, 1), got {ratio}")
    return round(n_train * ratio / (1.0 - ratio))


def mix_rehearsal(train: Sequence[T], rehearsal: Sequence[T], ratio: float, *, seed: int, epoch: int) -> list[T]:
    """One epoch's rows: every training row once, plus rehearsal rows making up ``ratio`` of the
    epoch, shuffled together.

    Each epoch draws its own rehearsal rows (seeded by ``seed`` and ``epoch``, so an epoch is
    the same after a restart): without replacement while the rehearsal set is large enough, and
    whole passes over it plus a sample when it is smaller than the share asks for. With no
    rehearsal rows the epoch is the training rows alone, shuffled.

    Raises:
        ValueError: ``ratio`` outside [0, 1).
    """
    k = rehearsal_count(len(train), ratio) if rehearsal else 0
    rng = random.Random(seed * 1_000_003 + epoch)
    picked: list[int] = []
    while k - len(picked) >= len(rehearsal) > 0:
        picked.extend(rng.sample(range(len(rehearsal)), len(rehearsal)))
    picked.extend(rng.sample(range(len(rehearsal)), k - len(picked)))
    rows = list(train) + [rehearsal[i] for i in picked]
    rng.shuffle(rows)
    return rows


def draw_pairs(pairs: Sequence[T], count: int, *, seed: int, epoch: int) -> list[T]:
    """``count`` preference pairs for one epoch: whole shuffled passes over ``pairs`` and part of
    one more (a new order each pass, seeded by ``seed`` and ``epoch`` so an epoch is the same
    after a restart); none without pairs."""
    if not pairs:
        return []
    rng = random.Random(seed * 1_000_003 + epoch + 7_919)  # apart from mix_rehearsal's order
    drawn: list[T] = []
    while len(drawn) < count:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        drawn.extend(pairs[i] for i in order[: count - len(drawn)])
    return drawn


def steps_per_epoch(rows: int, batch_size: int, grad_accumulation: int) -> int:
    """Optimizer steps in an epoch of ``rows`` rows: micro-batches grouped by
    ``grad_accumulation``, the last group possibly shorter."""
    return math.ceil(math.ceil(rows / batch_size) / grad_accumulation)


@dataclass
class EarlyStopping:
    """Stop when the validation loss has not improved by more than ``min_delta`` for
    ``patience`` validations in a row (``patience=0``: never stop).

    ``update(loss)`` says whether this loss is a new best (the weights worth keeping);
    ``should_stop`` then says whether to stop.
    """

    patience: int
    min_delta: float = 0.0
    best: float | list[float] | None = None
    bad_evals: int = 0

    def update(self, loss: float | Sequence[float]) -> bool:
        """Record a validation loss, or a key compared in order (the trainer's selection key: its
        last item is the loss-like figure ``min_delta`` applies to); True when it is the best so
        far."""
        key = [float(loss)] if isinstance(loss, int | float) else [float(v) for v in loss]
        if not all(math.isfinite(v) for v in key):
            self.bad_evals += 1
            return False
        best = None if self.best is None else ([self.best] if isinstance(self.best, int | float) else self.best)
        if best is None or len(best) != len(key) or _better(key, best, self.min_delta):
            self.best = key[0] if isinstance(loss, int | float) else key
            self.bad_evals = 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.bad_evals = state["bad_evals"]


def selection_key(figures: dict[str, Any], select_by: str, learned_at: float = 1.0) -> list[float]:
    """What early stopping, the kept adapter and the choice between trials minimise, compared in
    order. With ``exact_match``: fewer validation rows answered exactly first, then the objective
    (the loss decides between equal exact matches, as on a model that answers nothing exactly
    yet); with held-out rows of earlier domains, the validation match counts up to ``learned_at``
    (the new task learned), then fewer held-out rows answered exactly (forgetting), then the
    validation match, then the objective. With ``loss``, the objective alone."""
    if select_by != "exact_match":
        return [figures["objective"]]
    exact = figures["val_exact_match"]
    if figures.get("heldout_exact_match") is None:
        return [1.0 - exact, figures["objective"]]
    return [1.0 - min(exact, learned_at), 1.0 - figures["heldout_exact_match"], 1.0 - exact, figures["objective"]]


def learned(trend: tuple[float, float] | None, min_drop: float) -> bool | None:
    """Whether a run's training loss fell: its last steps' mean below ``(1 - min_drop)`` times its
    first steps' (``RunState.loss_trend``); None for a run too short to tell (under 2 steps)."""
    if trend is None:
        return None
    start, end = trend
    return math.isfinite(end) and end < start * (1.0 - min_drop)


def _better(key: list[float], best: list[float], min_delta: float) -> bool:
    """Whether ``key`` beats ``best``: an earlier item decides where they differ, the last by more
    than ``min_delta``."""
    for ours, theirs in zip(key[:-1], best[:-1]):
        if ours != theirs:
            return ours < theirs
    return key[-1] < best[-1] - min_delta


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int = 0, schedule: Literal["cosine", "linear", "constant"] = "cosine"
) -> float:
    """The learning rate's multiplier before optimizer step ``step`` (0-based): a linear warm-up
    from 0 over ``warmup_steps``, then cosine or linear decay to 0 at ``total_steps``, or constant.
    Meant for ``torch.optim.lr_scheduler.LambdaLR``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- reports -------------------------------------------------------------------------------------


def describe_report(metrics: Mapping[str, Any]) -> str:
    """One line for a training report: step, loss, validation figures, speed."""
    if metrics.get("final"):
        line = (
            f"done: {metrics.get('step')} steps, val_loss {format_metric(metrics.get('val_loss'))}, "
            f"forgetting {format_metric(metrics.get('forgetting'))}, {metrics.get('stop_reason')}"
        )
        if metrics.get("attempts"):
            kept, tried = metrics["attempt"] + 1, len(metrics["attempts"])
            line += f"; attempt {kept} of {tried} kept (seed {metrics.get('seed')})"
        return line
    attempt = f"attempt {metrics['attempt'] + 1}, " if metrics.get("attempt") else ""
    line = (
        f"{attempt}step {metrics.get('step')} (epoch {metrics.get('epoch', 0):.2f}): "
        f"loss {format_metric(metrics.get('loss'))}"
    )
    for key in ("dpo_loss", "dpo_accuracy", "val_loss", "forgetting", "objective"):
        if metrics.get(key) is not None:
            line += f", {key} {format_metric(metrics[key])}"
    line += f", {metrics.get('tokens_per_s', 0):,.0f} tokens/s"
    if metrics.get("trials"):
        tried = ", ".join(f"{t['seed']}: {format_metric(t.get('objective'))}" for t in metrics["trials"])
        line += f"; seed {metrics.get('seed')} goes on (objectives {tried})"
    return line


def format_metric(value: Any) -> str:
    """A loss-like figure with four decimals, or '-' when there is none."""
    return "-" if value is None else f"{value:.4f}"
