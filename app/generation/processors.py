"""``generate``'s plug-ins: how tokens are chosen, when a row stops, and when the first token came.

:class:`Penalties` and :class:`RowTemperatureTopP` are OpenAI's sampling parameters applied row by
row (a batch of requests may differ in each); :class:`TopKTopP` is Self-Synthesized Rehearsal's
top-k and nucleus filter, one setting for the whole batch; :class:`RowStop` ends each row at its
own token limit or stop strings. :class:`GenerationEngine <app.generation.engine.GenerationEngine>`
chooses among them; nothing else calls ``generate``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, StoppingCriteria, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

if TYPE_CHECKING:
    from app.generation.engine import Prompt, Sampling

__all__ = [
    "FirstTokenClock",
    "Penalties",
    "RowStop",
    "RowTemperatureTopP",
    "TimedTextStreamer",
    "TopKTopP",
    "first_stop",
    "stop_prefix_length",
]


class Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, per row, on the tokens generated so far:
    ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``."""

    def __init__(self, rows: Sequence[Sampling], prompt_width: int, device: torch.device) -> None:
        self.prompt_width = prompt_width
        self.presence = torch.tensor([[r.presence_penalty] for r in rows], device=device)
        self.frequency = torch.tensor([[r.frequency_penalty] for r in rows], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


_TOP_P_CANDIDATES = 1024


class RowTemperatureTopP(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with each row's own values; a row with
    temperature 0 keeps only its most likely token, so sampling it is greedy."""

    def __init__(self, rows: Sequence[Sampling], device: torch.device) -> None:
        self.greedy = torch.tensor([r.temperature == 0 for r in rows], device=device)
        self.temperature = torch.tensor([[r.temperature or 1.0] for r in rows], device=device)
        self.top_p = torch.tensor([[r.top_p if r.temperature > 0 else 1.0] for r in rows], device=device)
        self.any_greedy = any(r.temperature == 0 for r in rows)
        # Sorting the whole vocabulary costs more than the tiny model's forward pass: only when needed.
        self.any_top_p = any(r.top_p < 1 and r.temperature > 0 for r in rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.any_greedy:
            best = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(dim=-1, keepdim=True), True)
            greedy_drop = self.greedy[:, None] & ~best
        scores = scores / self.temperature.to(scores.dtype)
        if self.any_top_p:
            probs = scores.softmax(dim=-1)
            # The smallest probability a row keeps, found among the likeliest tokens: top_p's mass
            # is usually within the first few hundred, and sorting all 150k costs tens of ms.
            ranked = probs.topk(min(_TOP_P_CANDIDATES, probs.shape[-1]), dim=-1).values
            if bool(((ranked.sum(dim=-1, keepdim=True) < self.top_p) & (self.top_p < 1)).any()):
                ranked = probs.sort(dim=-1, descending=True).values
            kept = ((ranked.cumsum(dim=-1) - ranked) < self.top_p).sum(dim=-1, keepdim=True).clamp(min=1)
            smallest = ranked.gather(1, kept - 1)
            drop = (probs < smallest) & (self.top_p < 1)  # rounding must not cut the tail of a top_p=1 row
            scores = scores.masked_fill(drop, float("-inf"))
        if self.any_greedy:
            scores = scores.masked_fill(greedy_drop, float("-inf"))
        return scores


class TopKTopP(LogitsProcessor):
    """Top-k, then nucleus (top-p) sampling within those k, one setting for every row; ``top_k``
    0 keeps the whole vocabulary (and sorts it). ``generate``'s own top-k and top-p sort the whole
    vocabulary at every step, which costs more than a small model's forward pass: this does both
    on the top k alone."""

    def __init__(self, top_k: int, top_p: float) -> None:
        self.top_k, self.top_p = top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = scores.shape[-1] if self.top_k == 0 else min(self.top_k, scores.shape[-1])
        values, indices = scores.topk(k, dim=-1)  # sorted, likeliest first
        probs = values.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= self.top_p  # the likeliest token always stays
        kept = values.masked_fill(drop, float("-inf"))
        return torch.full_like(scores, float("-inf")).scatter_(-1, indices, kept)


class RowStop(StoppingCriteria):
    """Ends each row at its own ``max_new_tokens`` or stop strings, and every row when cancelled.

    (``generate``'s own ``stop_strings`` index the whole vocabulary on every call, seconds each
    time; decoding the last few tokens of each row is enough to see a stop string complete.)
    """

    def __init__(
        self, rows: Sequence[Prompt], prompt_width: int, tokenizer: Any, cancel: threading.Event | None = None
    ) -> None:
        self.prompt_width = prompt_width
        self.max_new = [p.max_new_tokens for p in rows]
        self.stops = [p.stop for p in rows]
        # A stop string of n characters spans at most 4n tokens (one per UTF-8 byte), so
        # decoding that many of the last tokens is enough to see it when it completes.
        self.windows = [4 * max(map(len, s)) + 1 if s else 0 for s in self.stops]
        self.tokenizer = tokenizer
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = [generated >= limit for limit in self.max_new]
        for row, stops in enumerate(self.stops):
            if stops and not done[row]:
                tail = input_ids[row, -min(self.windows[row], generated) :].tolist()
                done[row] = first_stop(self.tokenizer.decode(tail, skip_special_tokens=True), stops) is not None
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class FirstTokenClock(BaseStreamer):
    """Notes when the first generated token arrives (``generate`` puts the prompt first)."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class TimedTextStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that also notes when the first generated token arrives."""

    first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().put(value)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The longest end of ``text`` that a stop string begins with (it may complete later)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
