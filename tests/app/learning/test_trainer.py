"""``app.learning.trainer``: the per-worker fine-tuning in one process, without Ray (a
:class:`~app.learning.worker_context.LocalContext`): a step, the trials, a checkpoint's resumption,
Fisher-guided masking and the preference objectives (DPO, SFT + DPO), on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from app.learning.checkpointing import STATE_FILE, trainable_state
from app.learning.run_state import StepWindow
from app.learning.tokenization import IGNORE_INDEX, tokenize_messages
from app.learning.trainer import Trainer
from app.learning.training import FinetuneConfig
from app.learning.worker_context import LocalContext, WorkerSpec, deterministic_algorithms

ANSWER = "```python\ndef add_one(x):\n    return x + 1\n```"
OLD_ANSWER = "SELECT name FROM users WHERE id = 1;"

# 8 training rows / batch 4 = 2 steps an epoch.
BASE = {
    "batch_size": 4,
    "epochs": 2,
    "lr": 1e-2,
    "max_length": 64,
    "rehearsal_ratio": 0.0,
    "continue_from": None,
    "early_stopping_patience": 0,
    "report_every_s": 0.0,
}


def _rows(n: int, start: int = 0, answer: str = ANSWER) -> list[dict[str, Any]]:
    return [
        {
            "messages": json.dumps(
                [
                    {"role": "system", "content": "You are a coding assistant."},
                    {"role": "user", "content": f"Task {i}: write the function we discussed."},
                    {"role": "assistant", "content": answer},
                ]
            )
        }
        for i in range(start, start + n)
    ]


PROMPT = [
    {"role": "system", "content": "You are a coding assistant."},
    {"role": "user", "content": "Task {i}: write add_one."},
]
CORRECTION = "def add_one(x):\n    return x + 1"
WRONG = "def add_one(x):\n    return x - 1"


def _pairs(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Preference rows as a dataset's train_preferences.parquet holds them: a user corrected a wrong answer."""
    return [
        {
            "interaction_id": f"p{i}",
            "prompt": json.dumps([{**m, "content": m["content"].format(i=i)} for m in PROMPT]),
            "chosen": CORRECTION,
            "rejected": WRONG,
        }
        for i in range(start, start + n)
    ]


def _trainer(model_root: Path, context: LocalContext, **options: Any) -> Trainer:
    spec = WorkerSpec(
        opts=FinetuneConfig(**{**BASE, **options}),
        base_model="tiny",
        storage_root=str(model_root),
        max_vram_gb=80.0,
        max_seconds=3600.0,
        datasets=sorted(context.datasets),
    )
    trainer = Trainer(spec, context)
    trainer.setup()
    return trainer


def test_one_step_lowers_the_loss_on_a_tiny_batch(model_root: Path) -> None:
    trainer = _trainer(model_root, LocalContext({"train": _rows(4)}), lora_dropout=0.0)
    batch = trainer.data["train"]
    before = trainer.loss_on(batch)

    step = trainer.train_step(StepWindow(targets=[batch]))

    assert step.label_tokens > 0 and step.input_tokens > step.label_tokens and step.pairs == 0
    assert step.loss == pytest.approx(before, rel=1e-4) and step.metrics() == {}
    assert trainer.loss_on(batch) < before


def test_trials_go_on_with_the_seed_of_the_best_validation_objective(model_root: Path) -> None:
    context = LocalContext({"train": _rows(8), "validation": _rows(4, start=100)})
    trainer = _trainer(model_root, context, epochs=3, trials=3, trial_fraction=1 / 3)

    final = trainer.fit()

    trials = final["trials"]
    assert [(t["seed"], t["steps"]) for t in trials] == [(0, 2), (1, 2), (2, 2)]
    assert len({t["objective"] for t in trials}) == 3  # three starts, three data orders
    winner = min(trials, key=lambda t: t["objective"])
    assert final["seed"] == trainer.state.seed == winner["seed"] and final["step"] == 6
    # Only the winner's steps are reported, each once, and its choice with every trial's figures.
    assert [m["step"] for r in context.reports if not r.get("final") for m in r["step_metrics"]] == list(range(1, 7))
    (choice,) = [r for r in context.reports if "trials" in r and not r.get("final")]
    assert choice["step"] == 2 and choice["objective"] == winner["objective"]


def _single_token_task(**options: Any) -> tuple[LocalContext, dict[str, Any]]:
    """A one-word answer the tiny model writes exactly after a few steps at a high rate, from some
    seeds sooner than from others; 10 steps an attempt."""
    context = LocalContext({"train": _rows(8, answer="yes"), "validation": _rows(4, start=100, answer="yes")})
    return context, {"epochs": 5, "lr": 5e-2, "eval_every_steps": 2, "lora_dropout": 0.0, "attempts": 3, **options}


def test_a_run_that_did_not_learn_its_task_starts_over_from_the_next_seed_until_one_does(
    model_root: Path, tmp_path: Path
) -> None:
    context, options = _single_token_task()
    context.checkpoint_root = tmp_path
    trainer = _trainer(model_root, context, checkpoint_every_steps=4, **options)

    final = trainer.fit()

    # Seed 0 answers no validation row exactly after its 10 steps; seed 1 answers all: no third.
    assert [(a["seed"], a["steps"], a["stop_reason"], a["val_exact_match"]) for a in final["attempts"]] == [
        (0, 10, "completed", 0.0),
        (1, 10, "completed", 1.0),
    ]
    assert final["attempt"] == 1 and final["seed"] == 1 and final["val_exact_match"] == 1.0
    evaluations = [(r["attempt"], r["step"]) for r in context.reports if "val_loss" in r and not r.get("final")]
    assert evaluations == [(0, s) for s in range(2, 11, 2)] + [(1, s) for s in range(2, 11, 2)]
    assert sorted(context.checkpoints) == [
        "checkpoint-attempt1-step000004",
        "checkpoint-attempt1-step000008",
        "checkpoint-final-attempt1-step000010",
        "checkpoint-step000004",
        "checkpoint-step000008",
    ]
    # A run resumed in its second attempt goes on there and ends as the uninterrupted one did.
    resumed = _trainer(
        model_root,
        LocalContext(context.datasets, resume_from=context.checkpoints["checkpoint-attempt1-step000004"]),
        **options,
    )
    assert (resumed.state.attempt, resumed.state.seed, resumed.state.step) == (1, 1, 4)
    again = resumed.fit()
    assert again["attempts"] == final["attempts"] and again["restarts"] == 1
    a, b = trainable_state(trainer.peft_model, None), trainable_state(resumed.peft_model, None)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # With one attempt the same run ends unlearned, as it did before attempts existed.
    alone = _trainer(model_root, _single_token_task()[0], **{**options, "attempts": 1}).fit()
    assert "attempts" not in alone and alone["seed"] == 0 and alone["val_exact_match"] == 0.0
    assert final["tokens"] == 2 * alone["tokens"]  # both attempts' tokens count


def test_a_run_that_learned_its_task_is_not_attempted_again(model_root: Path) -> None:
    context, options = _single_token_task(epochs=10)
    final = _trainer(model_root, context, **options).fit()
    assert final["val_exact_match"] == 1.0 and final["seed"] == 0 and final["step"] == 20
    assert "attempts" not in final


def test_the_best_attempt_is_kept_when_an_earlier_one_beats_the_last(model_root: Path) -> None:
    # Validation answers the training rows never teach: no attempt learns them, and the adapter
    # kept is the attempt whose best validation was best (here an earlier one than the last).
    context = LocalContext({"train": _rows(8), "validation": _rows(4, start=100, answer=OLD_ANSWER)})
    trainer = _trainer(model_root, context, epochs=3, attempts=3, eval_every_steps=1, lora_dropout=0.0)

    final = trainer.fit()

    attempts = final["attempts"]
    assert [a["seed"] for a in attempts] == [0, 1, 2] and all(a["val_exact_match"] == 0.0 for a in attempts)
    best = min(attempts, key=lambda a: a["objective"])
    assert best["attempt"] < 2 and final["attempt"] == best["attempt"] and final["seed"] == best["seed"]
    assert final["val_loss"] == best["val_loss"] and final["kept_step"] == best["kept_step"]
    kept = trainer.state.best_params
    now = trainable_state(trainer.peft_model, None)
    assert all(torch.equal(kept[k], now[k]) for k in kept)


def test_a_checkpoint_goes_on_at_its_step_with_its_optimizer_state(model_root: Path, tmp_path: Path) -> None:
    # No dropout: with the position, the weights and the optimizer restored, the resumed run is
    # the uninterrupted one to the last bit.
    datasets = {"train": _rows(8)}
    whole = LocalContext(datasets, checkpoint_root=tmp_path)
    uninterrupted = _trainer(model_root, whole, lora_dropout=0.0, checkpoint_every_steps=2)
    assert uninterrupted.fit()["step"] == 4
    assert sorted(whole.checkpoints) == ["checkpoint-final-step000004", "checkpoint-step000002"]
    checkpoint = whole.checkpoints["checkpoint-step000002"]
    saved = torch.load(checkpoint / STATE_FILE, weights_only=False)

    resumed = _trainer(model_root, LocalContext(datasets, resume_from=checkpoint), lora_dropout=0.0)

    assert (resumed.state.step, resumed.state.epoch, resumed.state.window) == (2, 1, 0)
    assert resumed.state.restarts == 1 and resumed.state.resumed_from_step == 2
    assert resumed.scheduler.state_dict()["last_epoch"] == 2
    state = resumed.optimizer.state_dict()
    assert state["param_groups"] == saved["optimizer"]["param_groups"]
    assert state["state"].keys() == saved["optimizer"]["state"].keys()
    for i, moments in state["state"].items():
        assert all(torch.equal(v, saved["optimizer"]["state"][i][k]) for k, v in moments.items())
    final = resumed.fit()
    assert final["step"] == 4 and final["restarts"] == 1
    a, b = trainable_state(uninterrupted.peft_model, None), trainable_state(resumed.peft_model, None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_is_not_resumed_with_other_options(model_root: Path, tmp_path: Path) -> None:
    # A second run under the same name with another adapter shape: refused before any weight is
    # copied, naming the option, not a tensor size mismatch; where it runs may change.
    whole = LocalContext({"train": _rows(8)}, checkpoint_root=tmp_path)
    assert _trainer(model_root, whole, lora_dropout=0.0, checkpoint_every_steps=2).fit()["step"] == 4
    checkpoint = whole.checkpoints["checkpoint-step000002"]

    refused = r"finetune\.lora_rank: the run's checkpoint was written with 8, this run has 4"
    with pytest.raises(ValueError, match=refused):
        _trainer(model_root, LocalContext({"train": _rows(8)}, resume_from=checkpoint), lora_dropout=0.0, lora_rank=4)
    resumed = _trainer(
        model_root, LocalContext({"train": _rows(8)}, resume_from=checkpoint), lora_dropout=0.0, report_every_s=5.0
    )
    assert resumed.state.resumed_from_step == 2


def test_fisher_guided_masking_keeps_the_masked_entries_in_place(model_root: Path) -> None:
    context = LocalContext({"train": _rows(8), "rehearsal": _rows(4, start=200, answer=OLD_ANSWER)})
    trainer = _trainer(model_root, context, rehearsal_ratio=0.2, masking="fggm", mask_fraction=0.5, fisher_samples=4)
    protection = trainer.protection
    assert protection is not None and protection.masks is not None

    final = trainer.fit()

    assert final["mask"]["updated_fraction"] == pytest.approx(0.5, abs=0.01)
    after = trainable_state(trainer.peft_model, None)
    moved = 0
    for name, mask in protection.masks.items():
        assert torch.equal(after[name][~mask], protection.anchor[name][~mask]), name
        moved += not torch.equal(after[name][mask], protection.anchor[name][mask])
    assert moved > 0


def test_a_run_whose_training_loss_falls_is_marked_as_learned(model_root: Path) -> None:
    trainer = _trainer(model_root, LocalContext({"train": _rows(8)}), epochs=3)

    final = trainer.fit()

    assert final["loss_fell"] is True and final["loss_end"] < final["loss_start"]
    # An epoch is 2 steps: the first epoch's mean against the last's.
    assert trainer.loss_window == 2 and final["loss_start"] == pytest.approx(sum(trainer.state.loss_head) / 2)


def test_a_run_whose_training_loss_does_not_fall_is_marked_as_failed(model_root: Path) -> None:
    """A learning rate too small to move the loss by the 5 % asked for."""
    trainer = _trainer(model_root, LocalContext({"train": _rows(8)}), epochs=3, lr=1e-9, min_loss_drop=0.05)

    final = trainer.fit()

    assert final["loss_fell"] is False
    assert not final["loss_end"] < final["loss_start"] * 0.95


def test_a_run_too_short_to_tell_is_neither_learned_nor_failed() -> None:
    from app.learning.run_state import RunState
    from app.learning.training import learned

    state = RunState()
    state.record_loss(3.0, window=20)
    assert state.loss_trend() is None and learned(state.loss_trend(), 0.0) is None
    for loss in (2.0, 1.0, 0.5):
        state.record_loss(loss, window=20)
    # Four steps: the first two against the last two, no step on both sides.
    assert state.loss_trend() == (2.5, 0.75) and learned(state.loss_trend(), 0.5) is True
    assert learned((2.5, 2.5), 0.0) is False and learned((2.5, float("nan")), 0.0) is False


def test_exact_match_is_what_greedy_decoding_writes(model_root: Path) -> None:
    """A row counts as answered exactly when every answer token is the most likely one given the
    reference's tokens before it: the tokens greedy decoding writes are an exact answer, and the
    same answer with one token changed is not."""
    from app.generation.engine import GenerationEngine, Prompt
    from app.learning.tokenization import IGNORE_INDEX

    trainer = _trainer(model_root, LocalContext({"train": _rows(4)}), lora_dropout=0.0)
    trainer.peft_model.eval()
    engine = GenerationEngine(trainer.peft_model, trainer.tokenizer)
    _, prompt = engine.chat_prompt(json.loads(_rows(1)[0]["messages"])[:-1])
    (written,) = engine.generate([Prompt(prompt, max_new_tokens=12)])
    answer = written.token_ids
    assert len(answer) == 12

    def measure(answer_ids: list[int]) -> tuple[int, int]:
        ids = torch.tensor([prompt + answer_ids])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer_ids])
        _, count, exact, rows = trainer.loss_module.measure(ids, torch.ones_like(ids), labels)
        assert int(count) == len(answer_ids)
        return int(exact), int(rows)

    assert measure(answer) == (1, 1)
    assert measure([*answer[:-1], (answer[-1] + 1) % 1000]) == (0, 1)
    assert measure([(answer[0] + 1) % 1000, *answer[1:]]) == (0, 1)


def test_selection_puts_exact_match_first_and_the_loss_second() -> None:
    from app.learning.training import EarlyStopping, selection_key

    worse_loss_more_exact = {"val_exact_match": 0.5, "objective": 2.0}
    better_loss_less_exact = {"val_exact_match": 0.25, "objective": 1.0}
    stopper = EarlyStopping(patience=2)
    assert stopper.update(selection_key(better_loss_less_exact, "exact_match"))
    assert stopper.update(selection_key(worse_loss_more_exact, "exact_match"))
    # The same exact match: the loss decides (and must fall by more than min_delta).
    assert not stopper.update(selection_key({"val_exact_match": 0.5, "objective": 2.5}, "exact_match"))
    assert stopper.update(selection_key({"val_exact_match": 0.5, "objective": 1.5}, "exact_match"))
    by_loss = EarlyStopping(patience=1)
    assert by_loss.update(selection_key(better_loss_less_exact, "loss"))
    assert not by_loss.update(selection_key(worse_loss_more_exact, "loss")) and by_loss.should_stop


def test_once_the_new_task_is_learned_forgetting_less_counts_first() -> None:
    """With held-out rows of earlier domains: past the learned threshold the adapter that keeps
    more of them wins over one with a higher validation match; below it, the new task comes first."""
    from app.learning.training import EarlyStopping, selection_key

    def key(exact: float, heldout: float, objective: float = 1.0) -> list[float]:
        return selection_key(
            {"val_exact_match": exact, "heldout_exact_match": heldout, "objective": objective}, "exact_match", 0.95
        )

    stopper = EarlyStopping(patience=2)
    assert stopper.update(key(1.0, 0.4))  # the new task learned, most of the earlier one forgotten
    assert stopper.update(key(0.97, 0.8))  # still learned (>= 0.95), the rehearsal teaching it back
    assert not stopper.update(key(0.9, 1.0))  # below the threshold: the new task first
    assert stopper.update(key(1.0, 0.8))  # equal held-out match: the higher validation match
    assert not stopper.update(key(1.0, 0.8, objective=2.0)) and not stopper.should_stop
    assert not stopper.update(key(1.0, 0.6)) and stopper.should_stop  # two without a better one
    # Without held-out rows the threshold plays no part: the validation match, then the objective.
    assert selection_key({"val_exact_match": 0.97, "objective": 1.0}, "exact_match", 0.95) == [
        pytest.approx(0.03),
        1.0,
    ]


def test_the_same_seed_and_data_train_the_same_adapter_under_deterministic_algorithms(model_root: Path) -> None:
    def adapter() -> dict[str, torch.Tensor]:
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled()
            trainer = _trainer(model_root, LocalContext({"train": _rows(8)}), seed=3)
            trainer.fit()
        return trainable_state(trainer.peft_model, None)

    before = torch.are_deterministic_algorithms_enabled()
    first, second = adapter(), adapter()
    assert torch.are_deterministic_algorithms_enabled() == before  # the caller's setting comes back
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)  # it trained


def _answer_logp(trainer: Trainer, pair: dict[str, Any], answer: str) -> float:
    """The summed log-probability of ``answer`` after the pair's prompt under the trainer's model
    (adapter on), from the model's logits: apart from the trainer's own loss module."""
    messages = [*json.loads(pair["prompt"]), {"role": "assistant", "content": answer}]
    row = tokenize_messages(trainer.tokenizer, messages, 256, last_turn_only=True)
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
    trainer.peft_model.eval()
    with torch.no_grad():
        logps = torch.log_softmax(trainer.peft_model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    trainer.peft_model.train()
    keep = labels != IGNORE_INDEX
    return float(logps[keep].gather(1, labels[keep, None]).sum())


def test_dpo_makes_the_correction_more_likely_than_the_rejected_answer(model_root: Path) -> None:
    pairs = _pairs(4)
    context = LocalContext({"train": _rows(4), "preferences": pairs})
    trainer = _trainer(model_root, context, objective="dpo", epochs=4, lora_dropout=0.0)
    # A fresh adapter changes nothing (LoRA's B is zero): the policy is the reference, every pair's
    # margin 0 and its loss log 2, which says the reference is the model with the adapter disabled.
    before = trainer.measure_pairs(trainer.pairs)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5) and before["reward_margin"] == pytest.approx(
        0.0, abs=1e-5
    )
    gaps_before = [_answer_logp(trainer, p, CORRECTION) - _answer_logp(trainer, p, WRONG) for p in pairs]

    final = trainer.fit()

    steps = [m for r in context.reports for m in r.get("step_metrics", [])]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]  # 4 pairs in batches of 4: one step an epoch
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4) and steps[0]["loss"] == steps[0]["dpo_loss"]
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"] - 0.05 and "sft_loss" not in steps[0]
    assert final["loss_fell"] is True
    assert final["dpo"]["pairs"] == 4 and final["dpo"]["accuracy"] == 1.0
    assert final["dpo"]["reward_margin"] > 0 and final["dpo"]["loss"] < math.log(2)
    gaps_after = [_answer_logp(trainer, p, CORRECTION) - _answer_logp(trainer, p, WRONG) for p in pairs]
    assert all(after > b + 0.1 for after, b in zip(gaps_after, gaps_before)), (gaps_before, gaps_after)
    # The margin is beta times the rise of that gap over the reference's.
    rise = sum(a - b for a, b in zip(gaps_after, gaps_before)) / len(pairs)
    assert final["dpo"]["reward_margin"] == pytest.approx(0.1 * rise, rel=1e-3)


def test_sft_plus_dpo_sums_both_losses_on_every_step(model_root: Path) -> None:
    context = LocalContext({"train": _rows(8), "preferences": _pairs(3, start=50)})
    trainer = _trainer(model_root, context, objective="sft+dpo", epochs=2)
    assert trainer.steps_per_epoch == 2  # the training rows set the epoch; the pairs go along

    final = trainer.fit()

    steps = [m for r in context.reports for m in r.get("step_metrics", [])]
    assert len(steps) == 4
    for m in steps:
        assert m["loss"] == pytest.approx(m["sft_loss"] + m["dpo_loss"], rel=1e-9)
        assert 0.0 <= m["dpo_accuracy"] <= 1.0
    assert final["loss_fell"] is True and final["dpo"]["pairs"] == 3
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"] and steps[-1]["sft_loss"] < steps[0]["sft_loss"]


def test_sft_leaves_the_pairs_alone_and_dpo_without_pairs_is_refused(model_root: Path) -> None:
    sft = _trainer(model_root, LocalContext({"train": _rows(8), "preferences": _pairs(4)}))
    assert sft.pairs == [] and "preferences" not in sft.data and sft.steps_per_epoch == 2
    for objective in ("dpo", "sft+dpo"):
        with pytest.raises(
            ValueError, match=rf"finetune\.objective: {objective.replace('+', '.')} trains on preference pairs"
        ):
            _trainer(model_root, LocalContext({"train": _rows(4)}), objective=objective)
    with pytest.raises(ValueError, match=r"finetune\.objective: dpo"):
        _trainer(model_root, LocalContext({"train": _rows(4), "preferences": []}), objective="dpo")


def test_a_run_stopped_early_on_an_epoch_boundary_reports_that_epochs_loss(model_root: Path) -> None:
    # Validation at the end of every epoch: an early stop always falls on an epoch's boundary, and
    # the final report still gives the epoch just trained (it read None when the loss was reset).
    context = LocalContext({"train": _rows(8), "validation": _rows(4, start=100, answer="something else entirely")})
    trainer = _trainer(model_root, context, epochs=30, early_stopping_patience=1, select_by="loss", lora_dropout=0.0)
    final = trainer.fit()
    assert final["stop_reason"] == "early_stopping" and final["step"] % trainer.steps_per_epoch == 0, final
    assert final["train_loss"] is not None and final["train_loss"] < final["first_loss"]


def test_trials_validate_on_the_runs_schedule_and_the_best_validation_of_all_is_kept(model_root: Path) -> None:
    # 2 steps an epoch, 4 epochs; each of 2 seeds trains the first 4 steps, validating at each.
    context = LocalContext({"train": _rows(8), "validation": _rows(4, start=100)})
    trainer = _trainer(
        model_root, context, epochs=4, trials=2, trial_fraction=0.5, eval_every_steps=1, select_by="loss", lr=0.05
    )
    initial = trainer.loss_on(trainer.data["validation"])

    final = trainer.fit()

    (choice,) = [r for r in context.reports if "trials" in r and not r.get("final")]
    in_trial = choice["trial_evaluations"]
    assert [e["step"] for e in in_trial] == [1, 2, 3, 4] and all(e["train_loss"] > 0 for e in in_trial)
    # The choice reports the winner's last validation; the trials compare their best ones.
    assert choice["step"] == 4 and choice["val_loss"] == in_trial[-1]["val_loss"]
    winner = min(final["trials"], key=lambda t: t["selection"])
    assert final["seed"] == winner["seed"]
    losses = {0: initial, **{e["step"]: e["val_loss"] for e in in_trial}}
    assert winner["kept_step"] == min(losses, key=lambda s: (losses[s], s))
    # The kept adapter is the best of every validation the run made, in its trial or after it.
    later = [r for r in context.reports if "val_loss" in r and "trials" not in r and not r.get("final")]
    assert [r["step"] for r in later] == [5, 6, 7, 8]
    losses.update({r["step"]: r["val_loss"] for r in later})
    assert final["kept_step"] == min(losses, key=lambda s: (losses[s], s))
    assert final["val_loss"] == losses[final["kept_step"]]
