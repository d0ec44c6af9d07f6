"""``app.learning.training``: tokenization with assistant-only labels (the real Qwen2.5 tokenizer),
preference pairs and the DPO loss, batching, rehearsal mixing, early stopping, the schedule and
the options."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from app.config import ConfigError, section_options
from app.learning.tokenization import IGNORE_INDEX, collate, tokenize_messages, tokenize_pair
from app.learning.training import (
    AdapterConfig,
    BatchConfig,
    CheckpointingConfig,
    EarlyStopping,
    EvaluationConfig,
    FinetuneConfig,
    ForgettingConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ResourceConfig,
    describe_report,
    dpo_loss,
    draw_pairs,
    lr_factor,
    mix_rehearsal,
    rehearsal_count,
    steps_per_epoch,
)


@pytest.fixture(scope="module")
def tokenizer(model_root: Path):
    from app.model import load_tokenizer

    return load_tokenizer(model_root / "models" / "qwen2.5-tokenizer")


def _labelled(tokenizer, out) -> str:
    return tokenizer.decode([t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])


def test_labels_cover_the_assistant_turn_only(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ]
    out = tokenize_messages(tokenizer, json.dumps(messages), max_length=512)

    # The ids are exactly what the chat template gives at inference.
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert out["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(out["labels"]) == len(out["input_ids"]) and not out["truncated"]
    assert _labelled(tokenizer, out) == "def add(a, b):\n    return a + b<|im_end|>"
    # Labels are the ids themselves where set, and the prompt is all -100.
    first = out["labels"].index(next(lab for lab in out["labels"] if lab != IGNORE_INDEX))
    assert tokenizer.decode(out["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert all(lab == IGNORE_INDEX for lab in out["labels"][:first])
    assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(out["labels"], out["input_ids"]))
    assert out["labels"][-1] == IGNORE_INDEX  # the newline after <|im_end|>


def test_every_assistant_turn_is_labelled_and_tool_output_is_not(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "What is in main.py?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "main.py"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "print('hi')"},
        {"role": "assistant", "content": "It prints hi."},
    ]
    out = tokenize_messages(tokenizer, messages, max_length=1024)
    labelled = _labelled(tokenizer, out)
    assert labelled == (
        '<tool_call>\n{"name": "read_file", "arguments": {"path": "main.py"}}\n</tool_call><|im_end|>'
        "It prints hi.<|im_end|>"
    )
    assert "print('hi')" not in labelled and "What is in main.py?" not in labelled
    # The default system prompt is there (unlabelled) when the conversation has none.
    assert "You are Qwen" in tokenizer.decode(out["input_ids"])


def test_truncation_and_bad_rows(tokenizer) -> None:
    messages = [{"role": "user", "content": "hi " * 100}, {"role": "assistant", "content": "ok"}]
    out = tokenize_messages(tokenizer, messages, max_length=16)
    assert len(out["input_ids"]) == len(out["labels"]) == 16 and out["truncated"]
    assert all(lab == IGNORE_INDEX for lab in out["labels"])  # the answer was cut away
    with pytest.raises(ValueError, match="assistant"):
        tokenize_messages(tokenizer, [{"role": "assistant", "content": "x"}], max_length=16)
    with pytest.raises(ValueError, match="role"):
        tokenize_messages(tokenizer, [{"content": "x"}], max_length=16)


def test_a_pair_labels_its_answer_alone_after_the_same_prompt(tokenizer) -> None:
    prompt = [
        {"role": "user", "content": "What is in main.py?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "main.py"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "print('hi')"},
    ]
    pair = tokenize_pair(tokenizer, json.dumps(prompt), "It prints hi.", "It prints nothing.", max_length=1024)

    # The tool call is the same on both sides: only the answers carry labels.
    assert _labelled(tokenizer, pair["chosen"]) == "It prints hi.<|im_end|>"
    assert _labelled(tokenizer, pair["rejected"]) == "It prints nothing.<|im_end|>"
    first = pair["chosen"]["labels"].index(next(t for t in pair["chosen"]["labels"] if t != IGNORE_INDEX))
    assert pair["chosen"]["input_ids"][:first] == pair["rejected"]["input_ids"][:first]
    whole = tokenize_messages(tokenizer, [*prompt, {"role": "assistant", "content": "It prints hi."}], 1024)
    assert whole["input_ids"] == pair["chosen"]["input_ids"]  # the same tokens as a training row
    with pytest.raises(ValueError, match="ends with an assistant answer"):
        tokenize_pair(tokenizer, [*prompt, {"role": "assistant", "content": "x"}], "a", "b", max_length=64)


def test_dpo_loss_is_log_2_at_the_reference_and_falls_as_the_chosen_answer_gains() -> None:
    reference_chosen, reference_rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    loss, margin = dpo_loss(reference_chosen, reference_rejected, reference_chosen, reference_rejected, beta=0.1)
    assert torch.allclose(loss, torch.full((2,), math.log(2))) and torch.equal(margin, torch.zeros(2))

    policy_chosen = reference_chosen.clone().requires_grad_(True)
    policy_rejected = reference_rejected.clone().requires_grad_(True)
    loss, margin = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    loss.sum().backward()
    # Descending the loss raises the chosen answer's log-likelihood and lowers the rejected one's.
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()
    # Chosen up by 2 nats and rejected down by 1 against the reference: margin beta * 3.
    loss, margin = dpo_loss(
        torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]), torch.tensor([-12.0]), 0.5
    )
    assert margin.item() == pytest.approx(1.5) and loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))


def test_pairs_are_drawn_in_shuffled_passes() -> None:
    pairs = ["a", "b", "c"]
    drawn = draw_pairs(pairs, 8, seed=0, epoch=0)
    assert len(drawn) == 8 and sorted(drawn[:3]) == sorted(drawn[3:6]) == pairs  # whole passes first
    assert draw_pairs(pairs, 8, seed=0, epoch=0) == drawn  # the same epoch after a restart
    assert any(draw_pairs(pairs, 3, seed=0, epoch=e) != draw_pairs(pairs, 3, seed=0, epoch=0) for e in range(1, 6))
    assert draw_pairs([], 5, seed=0, epoch=0) == []


def test_a_report_line_shows_the_dpo_figures() -> None:
    line = describe_report({"step": 3, "epoch": 1.5, "loss": 0.6, "dpo_loss": 0.6, "dpo_accuracy": 0.75})
    assert line.startswith("step 3 (epoch 1.50): loss 0.6000, dpo_loss 0.6000, dpo_accuracy 0.7500")


def test_report_lines_name_the_attempt() -> None:
    assert describe_report({"step": 4, "epoch": 2.0, "loss": 0.5, "attempt": 1}).startswith("attempt 2, step 4 ")
    assert describe_report({"step": 4, "epoch": 2.0, "loss": 0.5, "attempt": 0}).startswith("step 4 ")
    final = {"final": True, "step": 10, "stop_reason": "max_steps", "seed": 3, "attempt": 0, "attempts": [{}, {}]}
    assert describe_report(final).endswith("max_steps; attempt 1 of 2 kept (seed 3)")


def test_collate_pads_on_the_right() -> None:
    batch = collate(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def test_rehearsal_makes_up_the_configured_share_of_each_epoch() -> None:
    train = [f"t{i}" for i in range(30)]
    rehearsal = [f"r{i}" for i in range(100)]
    epoch0 = mix_rehearsal(train, rehearsal, 0.25, seed=1, epoch=0)
    assert len(epoch0) == 40 and rehearsal_count(30, 0.25) == 10
    assert sum(r.startswith("r") for r in epoch0) / len(epoch0) == 0.25
    assert sorted(r for r in epoch0 if r.startswith("t")) == sorted(train)  # every training row once
    assert epoch0 != train + sorted(set(epoch0) - set(train))  # shuffled together

    # The same epoch again after a restart; another epoch draws other rehearsal rows.
    assert mix_rehearsal(train, rehearsal, 0.25, seed=1, epoch=0) == epoch0
    epoch1 = mix_rehearsal(train, rehearsal, 0.25, seed=1, epoch=1)
    assert {r for r in epoch1 if r.startswith("r")} != {r for r in epoch0 if r.startswith("r")}

    # A small rehearsal set is cycled through evenly.
    small = mix_rehearsal(train, ["a", "b", "c", "d"], 0.5, seed=0, epoch=0)
    counts = Counter(r for r in small if r in "abcd")
    assert sum(counts.values()) == 30 and max(counts.values()) - min(counts.values()) <= 1

    assert sorted(mix_rehearsal(train, rehearsal, 0.0, seed=0, epoch=0)) == sorted(train)
    assert sorted(mix_rehearsal(train, [], 0.5, seed=0, epoch=0)) == sorted(train)
    with pytest.raises(ValueError):
        mix_rehearsal(train, rehearsal, 1.0, seed=0, epoch=0)
    assert steps_per_epoch(40, 4, 3) == 4  # 10 micro-batches in windows of 3


def test_early_stopping_waits_for_patience_and_min_delta() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert stopper.update(1.0) and not stopper.should_stop
    assert stopper.update(0.9)
    assert not stopper.update(0.895)  # better, but not by more than min_delta
    assert not stopper.should_stop
    assert stopper.update(0.8) and stopper.bad_evals == 0  # a real improvement resets the count
    assert not stopper.update(0.85) and not stopper.update(float("nan"))
    assert stopper.should_stop and stopper.best == 0.8

    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop and restored.best == 0.8
    never = EarlyStopping(patience=0)
    assert never.update(1.0) and not any(never.update(2.0) for _ in range(10)) and not never.should_stop


def test_learning_rate_schedule() -> None:
    assert [lr_factor(s, total_steps=10, warmup_steps=3) for s in range(3)] == [0.25, 0.5, 0.75]
    assert lr_factor(3, total_steps=10, warmup_steps=3) == 1.0
    assert lr_factor(10, total_steps=10, warmup_steps=3) == pytest.approx(0.0)
    assert lr_factor(5, total_steps=10, schedule="linear") == 0.5
    assert lr_factor(5, total_steps=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(9, total_steps=10, schedule="constant") == 1.0


def test_options_come_in_typed_groups_under_flat_keys() -> None:
    groups = (
        AdapterConfig,
        ObjectiveConfig,
        OptimizerConfig,
        BatchConfig,
        EvaluationConfig,
        ForgettingConfig,
        ResourceConfig,
        CheckpointingConfig,
    )
    # Every key is in one group (seed and deterministic aside), and the whole takes and gives them flat.
    keys = [k for group in groups for k in group.model_fields]
    assert len(keys) == len(set(keys)) and set(keys) | {"seed", "deterministic"} == set(FinetuneConfig.model_fields)
    opts = FinetuneConfig(lora_rank=4, masking="fggm", num_workers=2)
    assert all(isinstance(opts, group) for group in groups)
    assert opts.model_dump()["lora_rank"] == 4 and FinetuneConfig.model_validate(opts.model_dump()) == opts
    assert (
        ForgettingConfig.model_validate(opts.model_dump(include=set(ForgettingConfig.model_fields))).masking == "fggm"
    )
    assert ResourceConfig(use_gpu=True).precision == "bf16"


def test_options_refuse_unknown_keys_and_bad_combinations() -> None:
    opts = FinetuneConfig()
    assert opts.masking == "none" and opts.continue_from == "champion" and opts.precision == "fp32"
    assert (opts.objective, opts.dpo_beta) == ("sft", 0.1)
    assert list(FinetuneConfig.model_fields).index("objective") == len(AdapterConfig.model_fields)  # after LoRA
    assert FinetuneConfig(use_gpu=True).precision == "bf16"
    assert all(f.description for f in FinetuneConfig.model_fields.values())

    loaded = section_options("finetune", ["finetune.lora_rank=4", "finetune.masking=fggm"], {"lr": 0.01})
    assert (loaded.lora_rank, loaded.masking, loaded.lr) == (4, "fggm", 0.01)

    with pytest.raises(ConfigError) as info:
        section_options("finetune", ["finetune.lora_rnk=4", "finetune.masking=l2"])
    text = str(info.value)
    assert "finetune.lora_rnk: unknown key (allowed:" in text and "lora_rank" in text
    assert "finetune.masking:" in text and "'none', 'fggm' or 'ewc'" in text
    for override, key in [
        ("finetune.strategy=deepspeed", "finetune.strategy: deepspeed needs use_gpu=true"),
        ("finetune.quantize_4bit=true", "finetune.quantize_4bit: 4-bit QLoRA"),
        ("finetune.continue_from=../x", "finetune.continue_from:"),
        ("finetune.objective=ppo", "finetune.objective:"),
        ("finetune.dpo_beta=0", "finetune.dpo_beta:"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            section_options("finetune", [override])
    with pytest.raises(ConfigError, match=r"finetune\.weight_decay: must be 0 with masking=fggm"):
        section_options("finetune", ["finetune.masking=fggm", "finetune.weight_decay=0.01"])
    with pytest.raises(ConfigError, match=r"finetune\.masking: fggm needs whole parameters"):
        section_options(
            "finetune",
            ["finetune.masking=fggm", "finetune.use_gpu=true", "finetune.strategy=deepspeed", "finetune.zero_stage=3"],
        )
    with pytest.raises(ConfigError, match=r"finetune\.trials: restarts from other seeds reset the optimizer"):
        section_options("finetune", ["finetune.trials=3", "finetune.use_gpu=true", "finetune.strategy=deepspeed"])
    with pytest.raises(ConfigError, match=r"finetune\.attempts: restarts from other seeds reset the optimizer"):
        section_options("finetune", ["finetune.attempts=2", "finetune.use_gpu=true", "finetune.strategy=deepspeed"])
    with pytest.raises(ConfigError, match=r"finetune\.attempts:"):
        section_options("finetune", ["finetune.attempts=0"])
    with pytest.raises(ConfigError, match=r"finetune\.trial_fraction:"):
        section_options("finetune", ["finetune.trials=3", "finetune.trial_fraction=1.0"])
    with pytest.raises(ConfigError, match="unknown section"):
        section_options("finetune", ["model.base_model=x"])
