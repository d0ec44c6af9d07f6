"""``app/generation/processors.py``: the sampling and stopping plug-ins, on hand-made scores and ids."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from app.generation import Prompt, Sampling
from app.generation.processors import RowStop, RowTemperatureTopP, TopKTopP, first_stop, stop_prefix_length
from app.model import load_tokenizer


def test_temperature_and_top_p_apply_row_by_row() -> None:
    rows = [Sampling(temperature=1.0, top_p=0.7), Sampling(temperature=0.5), Sampling(temperature=0, top_p=0.5)]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = RowTemperatureTopP(rows, torch.device("cpu"))(None, probs.log().repeat(3, 1))
    inf = float("-inf")
    # top_p=0.7: 0.5 and 0.3 (the likelier ones hold 0.5 < 0.7 before 0.3, 0.8 before 0.15).
    torch.testing.assert_close(scores[0], torch.tensor([0.5, 0.3, 0, 0]).log().nan_to_num(neginf=inf))
    torch.testing.assert_close(scores[1], probs.log() / 0.5)  # all kept, sharpened
    torch.testing.assert_close(scores[2], torch.tensor([0.5, 0, 0, 0]).log().nan_to_num(neginf=inf))  # greedy


def test_top_k_then_top_p() -> None:
    scores = torch.log(torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    kept = torch.isfinite(TopKTopP(3, 0.6)(None, scores))
    # Row 1: the top 3 are 0.5, 0.3, 0.1 -> renormalised 0.56, 0.33, 0.11: 0.6 needs two of them.
    assert kept.tolist()[0] == [False, True, False, True, False]
    assert kept[1].sum() == 2  # ties: 2 of the 3 candidates
    assert torch.isfinite(TopKTopP(0, 1.0)(None, scores)).all()  # no limits, nothing dropped


def test_a_row_stops_once_its_text_holds_a_stop_string(model_root: Path) -> None:
    tok = load_tokenizer(model_root / "models" / "qwen2.5-tokenizer")
    prompt = tok("Input:", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in (" Sort it.\nOutput:", " Sort it.\nOut")]
    width = min(map(len, rows))
    rows = [r + [tok.pad_token_id] * (max(map(len, rows)) - len(r)) for r in rows]
    prompts = [Prompt(prompt, 100, stop=("Output:",))] * 2
    assert RowStop(prompts, len(prompt), tok)(torch.tensor(rows), None).tolist() == [True, False]
    assert width > len(prompt)
    # Each row's own limit; a cancel stops them all.
    limits = [Prompt(prompt, len(rows[0]) - len(prompt)), Prompt(prompt, 100)]
    assert RowStop(limits, len(prompt), tok)(torch.tensor(rows), None).tolist() == [True, False]
    cancel = threading.Event()
    cancel.set()
    assert RowStop(limits, len(prompt), tok, cancel)(torch.tensor(rows), None).tolist() == [True, True]


def test_stop_string_helpers() -> None:
    assert first_stop("a stop and an end", ["end", "stop"]) == 2
    assert first_stop("nothing", ["end"]) is None
    assert stop_prefix_length("text ending in Outp", ["Output:"]) == 4  # may still become the stop string
    assert stop_prefix_length("text", ["Output:"]) == 0
