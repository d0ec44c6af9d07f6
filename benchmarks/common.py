"""What every benchmark program shares: percentiles, the printed table, a training run's learning
curve, and the seeds that a stopped multi-seed run had finished."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["curve_summary", "finished_seeds", "keep_evaluations", "pct", "print_table", "train_answer_adapter"]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def train_answer_adapter(model_root: Any, store: Any, adapter_id: str, answer: str, prompts: Sequence[str]) -> Any:
    """Train a LoRA adapter on the tiny model, for a few steps, to answer ``answer`` to each of
    ``prompts``; save it in ``store`` and return its manifest."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.model import load_model

    torch.manual_seed(0)  # LoRA's A matrices are drawn at random
    base, tokenizer = load_model("tiny", root=model_root, device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=targets)
    model = get_peft_model(base, config)
    # Prompts followed by the answer and <|im_end|>, left-padded; the loss is on the answer only,
    # so the vocabulary-wide head is computed for those few positions alone (it is most of the cost).
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] + answer_ids for p in rendered]
    width = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = input_ids[:, -len(answer_ids) :]
    inner = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(15):
        hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = inner.lm_head(hidden[:, -len(answer_ids) - 1 : -1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    if not (logits.argmax(-1) == labels).all():
        raise RuntimeError(f"adapter {adapter_id!r} did not learn its answer {answer!r} in 15 steps; choose another")
    return store.save(model, base_model="tiny", adapter_id=adapter_id)


def keep_evaluations(curve: list[dict[str, Any]]) -> Any:
    """A progress callback that keeps each evaluation of a run (with ``finetune.trials``, from the
    winning trial's): its step, the training loss of the steps since the last one, the validation
    loss and exact match (and, with held-out rows of earlier domains, theirs)."""

    def point(e: dict[str, Any], train_loss: Any) -> dict[str, Any]:
        return {
            "step": e.get("step"),
            "train_loss": train_loss,
            "val_loss": e["val_loss"],
            "val_exact_match": e.get("val_exact_match"),
            **(
                {"heldout_exact_match": e["heldout_exact_match"], "heldout_loss": e["heldout_loss"]}
                if e.get("heldout_exact_match") is not None
                else {}
            ),
        }

    def keep(metrics: dict[str, Any]) -> None:
        if metrics.get("trial_evaluations"):  # the winning trial's validations, the last at the choice
            curve.extend(point(e, e.get("train_loss")) for e in metrics["trial_evaluations"])
        elif "val_loss" in metrics and not metrics.get("final"):
            steps = metrics.get("step_metrics") or []
            losses = [m["loss"] for m in steps if m.get("loss") is not None]
            curve.append(point(metrics, sum(losses) / len(losses) if losses else metrics.get("loss")))

    return keep


def curve_summary(name: str, info: dict[str, Any]) -> str:
    """One line for a stage: where its curve started and ended, the step whose adapter was kept,
    and what that adapter scored on the stage's own task."""
    curve = info.get("curve") or []
    if not curve:
        return f"    {name}: no evaluations"
    first, last = curve[0], curve[-1]
    return (
        f"    {name}: {len(curve)} evaluations to step {last['step']}, train loss {first['train_loss']:.3f} -> "
        f"{last['train_loss']:.3f}, val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}, val exact "
        f"{first['val_exact_match']:.2f} -> {last['val_exact_match']:.2f}"
        + (
            f", held-out exact {first['heldout_exact_match']:.2f} -> {last['heldout_exact_match']:.2f}"
            if "heldout_exact_match" in first
            else ""
        )
        + f"; kept step {info.get('kept_step')} "
        f"(val exact {info.get('val_exact_match') or 0:.2f}); test {info.get('own_score', float('nan')):.2f}"
    )


def finished_seeds(
    output: Path, benchmark: str, key: str, seeds: Sequence[int], settings: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The runs of ``seeds`` that a stopped run of ``benchmark`` left in its partial results file
    ``output`` (``complete: false``, the runs under ``key``), so that ``--resume`` runs only the
    others; none when the file is missing or complete.

    Raises:
        ValueError: the file is another benchmark's, or a finished run's settings (its own
            ``settings``, else the file's ``options``; the seed aside) differ from ``settings``,
            naming the first that does."""
    if not output.is_file():
        return []
    prior = json.loads(output.read_text())
    if prior.get("benchmark") != benchmark:
        raise ValueError(f"{output} holds {prior.get('benchmark')!r} results, not {benchmark!r}")
    if prior.get("complete"):
        return []
    runs = [r for r in prior.get(key, []) if r.get("seed") in seeds]
    for run in runs:
        theirs = _plain(run.get("settings", prior.get("options", {})))
        for name, value in _plain(settings).items():
            if name != "seed" and theirs.get(name) != value:
                raise ValueError(
                    f"{output}: seed {run['seed']} ran with {name}={theirs.get(name)!r}, this run has {value!r}; "
                    "resume only with the settings it started with"
                )
    return runs


def _plain(value: Any) -> Any:
    """``value`` as it reads back from the results file (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))
