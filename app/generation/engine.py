"""The generation engine: one causal language model and its tokenizer, continuing batches of prompts.

Everything that calls a model's ``generate`` goes through :class:`GenerationEngine`: the
Generator (:class:`~app.generation.service.GeneratorService`, behind Ray Serve) and
Self-Synthesized Rehearsal (``jobs/synthesize.py``, in Ray Data actors). It is plain Python,
usable without Serve or Ray:

* prompts are token ids (:meth:`GenerationEngine.encode` for plain text,
  :meth:`GenerationEngine.chat_prompt` for a conversation through the chat template), each with
  its own token limit and stop strings (:class:`Prompt`), left-padded into one ``generate`` call;
* each prompt is sampled with OpenAI's parameters (:class:`Sampling`: greedy at temperature 0),
  or every prompt of the call alike with SSR's (:class:`TopKSampling`); ``samples`` continuations
  of each, and a ``seed`` that makes the call reproducible without touching later calls;
* a continuation ends at an end-of-sequence token (the model's own, ``<|im_end|>`` or
  ``<|endoftext|>``), a stop string or the token limit; :class:`Continuation` has the text with
  and without what follows the first stop string, OpenAI's finish reason and token count, and
  optionally how sure the model was of the tokens it chose.

The model's own ``generation_config`` defaults (a real Qwen2.5 sets ``top_k=20``,
``repetition_penalty=1.05``) never apply: the call's options alone decide how to generate.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from app.generation.processors import Penalties, RowStop, RowTemperatureTopP, TopKTopP, first_stop
from app.model import load_model

__all__ = ["END_OF_TURN_TOKENS", "Continuation", "GenerationEngine", "Prompt", "Sampling", "TopKSampling"]

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end a continuation besides the model's own eos ids (Qwen2.5's ChatML)."""


@dataclass(frozen=True)
class Sampling:
    """How one prompt's tokens are chosen, with OpenAI's parameters: ``temperature`` 0 is greedy;
    otherwise the temperature divides the scores, then nucleus sampling keeps the likeliest tokens
    up to ``top_p`` of the mass. The penalties follow OpenAI's formula on the tokens generated so
    far (:class:`~app.generation.processors.Penalties`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TopKSampling:
    """One sampling for every prompt of a call, with the options Self-Synthesized Rehearsal takes
    from the paper (Hugging Face's names): the repetition penalty, then the ``top_k`` likeliest
    tokens and, among them, the nucleus of mass ``top_p`` (``top_k`` 0: the whole vocabulary),
    then the ``temperature``.

    The filters see the penalised scores *before* the temperature divides them (Hugging Face
    applies the temperature first): this is the order SSR has always sampled in, kept so that an
    SSR seed still gives the rehearsal rows it gave.
    """

    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


GREEDY = Sampling()


@dataclass(frozen=True)
class Prompt:
    """A prompt's token ids, and where its continuation ends: after ``max_new_tokens``, or at the
    token that completes one of the ``stop`` strings."""

    ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    sampling: Sampling = GREEDY


@dataclass(frozen=True)
class Continuation:
    """What the model wrote after one prompt."""

    token_ids: list[int]
    """The tokens generated, up to the first end-of-sequence token (excluded) and the limit."""
    ended: bool
    """An end-of-sequence token ended it."""
    raw_text: str
    """``token_ids`` decoded: a stop string, and whatever its last token held after it, included."""
    text: str
    """``raw_text`` up to the first stop string (OpenAI's completion text)."""
    finish_reason: Literal["stop", "length"]
    """``stop`` at an end-of-sequence token or a stop string, ``length`` at the token limit."""
    completion_tokens: int
    """Tokens generated, the end-of-sequence token or the one completing a stop string included."""
    truncated: bool
    """No end-of-sequence token before the token limit (stop strings not looked at)."""
    confidence: float | None = None
    """With ``confidence``: the geometric mean of the probabilities of the tokens chosen, the
    end-of-sequence token included, under the model's own distribution (before any sampling)."""


class GenerationEngine:
    """A model and its tokenizer, generating from left-padded batches of prompts.

    Args:
        model: a causal LM (a ``PeftModel`` too); its ``generation_config`` is replaced by one
            holding only the end-of-sequence and padding ids.
        tokenizer: its tokenizer.
        name: what the model is called in errors (default its ``name_or_path``).

    Raises:
        ValueError: the model and tokenizer have no end-of-sequence token to stop at.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        self.eos_ids = self._end_of_sequence_ids()
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        # The options of each call alone decide how to generate: a checkpoint's own defaults
        # (top_k, repetition_penalty...) would otherwise fill in whatever a call leaves unset.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        self.device = next(model.parameters()).device
        self._sanitize = "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters

    @classmethod
    def load(
        cls,
        base_model: str,
        *,
        root: str | Path,
        adapter_id: str | None = None,
        device: str | None = None,
    ) -> GenerationEngine:
        """The engine of a base model (:func:`app.model.load_model`: ``tiny``, a path, a cached hub
        id), with a stored LoRA adapter of ``AdapterStore(root)`` attached when ``adapter_id`` is
        given; ``device`` defaults to ``cuda`` where available."""
        model, tokenizer = load_model(base_model, root=root, device=device)
        if adapter_id is not None:
            from app.model.adapters import AdapterStore

            model = AdapterStore(root).attach(model, adapter_id)
        return cls(model, tokenizer, name=base_model)

    # --- prompts -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """A plain-text prompt's token ids, no special tokens added (a control token written in
        the text, ``<|im_start|>``..., is encoded as that token)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids as text, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_text(self, messages: Sequence[Mapping[str, Any]], **template: Any) -> str:
        """The chat template's prompt for ``messages``, ready for the assistant's turn; ``template``
        goes to the template (``tools``, ``tool_choice``)."""
        return self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False, **template
        )

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], **template: Any) -> tuple[str, list[int]]:
        """The chat template's prompt and its token ids. Control tokens written inside messages are
        encoded as plain text where the installed transformers can (``sanitize_control_tokens``),
        so a message cannot forge a turn.

        Raises:
            jinja2.TemplateError, TypeError, ValueError: the template's own checks failed.
        """
        text = self.chat_text(messages, **template)
        if not self._sanitize:
            return text, self.encode(text)
        encoded = self.tokenizer.apply_chat_template(
            list(messages),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            sanitize_control_tokens=True,
            **template,
        )
        return text, list(encoded["input_ids"])

    # --- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: TopKSampling | None = None,
        *,
        samples: int = 1,
        seed: int | None = None,
        confidence: bool = False,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Continuation]:
        """Continue the prompts in one ``generate`` call.

        Args:
            prompts: token ids, limits and stop strings; each sampled by its own :class:`Sampling`
                unless ``sampling`` is given.
            sampling: one sampling for every prompt instead (the prompts' own must be greedy).
            samples: continuations of each prompt (``generate``'s ``num_return_sequences``).
            seed: seeds the random generators for this call; their state is restored after it,
                so later calls are unaffected.
            confidence: compute :attr:`Continuation.confidence`.
            streamer: gets the tokens as they come (``generate``'s streamer).
            cancel: once set, every row stops at its next token.

        Returns:
            ``samples`` continuations per prompt, in the prompts' order.

        Raises:
            ValueError: ``sampling`` given beside a prompt's own non-greedy one.
        """
        if not prompts:
            return []
        rows = [p for p in prompts for _ in range(samples)]  # the order of generate's output rows
        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            input_ids[row, width - len(p.ids) :] = torch.tensor(p.ids, dtype=torch.long)
            attention_mask[row, width - len(p.ids) :] = 1

        processors, options = self._sampling(rows, sampling, width)
        config = GenerationConfig(
            max_new_tokens=max(p.max_new_tokens for p in prompts),
            num_return_sequences=samples,
            **options,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_logits=confidence,
            return_dict_in_generate=True,
        )
        cuda = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda) if seed is not None else nullcontext(), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([RowStop(rows, width, self.tokenizer, cancel)]),
                streamer=streamer,
            )
            chosen = None
            if confidence:  # log-probability of each chosen token: [rows, steps]
                logits = torch.stack(output.logits, dim=1).float()
                steps = output.sequences[:, width : width + logits.shape[1]]
                chosen = torch.log_softmax(logits, dim=-1).gather(-1, steps.unsqueeze(-1)).squeeze(-1).tolist()
        generated = output.sequences[:, width:].tolist()
        return [
            self._continuation(p, ids, None if chosen is None else chosen[i])
            for i, (p, ids) in enumerate(zip(rows, generated, strict=True))
        ]

    def _sampling(
        self, rows: list[Prompt], sampling: TopKSampling | None, width: int
    ) -> tuple[LogitsProcessorList, dict[str, Any]]:
        """The logits processors and ``GenerationConfig`` options that sample ``rows``."""
        if sampling is not None:
            if not all(p.sampling.greedy for p in rows):
                raise ValueError("sampling: a call's TopKSampling replaces the prompts' own; leave theirs greedy")
            # The filters come before the temperature: generate puts custom processors first.
            return LogitsProcessorList([TopKTopP(sampling.top_k, sampling.top_p)]), {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_k": 0,
                "top_p": 1.0,
                "repetition_penalty": sampling.repetition_penalty,
            }
        each = [p.sampling for p in rows]
        processors = LogitsProcessorList()
        if any(s.presence_penalty or s.frequency_penalty for s in each):
            processors.append(Penalties(each, width, self.device))
        if all(s.greedy for s in each):
            return processors, {"do_sample": False}
        processors.append(RowTemperatureTopP(each, self.device))
        # Sampling is all in RowTemperatureTopP, row by row; generate's own warpers stay off.
        return processors, {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}

    def _continuation(self, prompt: Prompt, row: list[int], chosen: list[float] | None) -> Continuation:
        """A row's text, finish reason and counts, from its generated ids (and their log-probabilities)."""
        ids = row[: prompt.max_new_tokens]
        end = next((i for i, token in enumerate(ids) if token in self.eos_ids), None)
        if end is not None:
            kept, count, reason = ids[:end], end + 1, "stop"
        else:
            # Shorter than the limit without an end token: stopped by a stop string (below).
            kept, count = ids, len(ids)
            reason = "length" if len(ids) >= prompt.max_new_tokens else "stop"
        raw = text = self.decode(kept)
        cut = first_stop(raw, prompt.stop)
        if cut is not None:
            # The tokens up to the one that completed the stop string (the rest, if any, are
            # padding after the row stopped): the fewest whose text holds it.
            low, high = 1, len(kept)
            while low < high:
                mid = (low + high) // 2
                if first_stop(self.decode(kept[:mid]), prompt.stop) is not None:
                    high = mid
                else:
                    low = mid + 1
            text, count, reason = raw[:cut], low, "stop"
        sure = None
        if chosen is not None:
            scored = chosen[: len(ids) if end is None else end + 1]
            sure = math.exp(sum(scored) / len(scored)) if scored else 0.0
        return Continuation(
            token_ids=kept,
            ended=end is not None,
            raw_text=raw,
            text=text,
            finish_reason=reason,
            completion_tokens=count,
            truncated=end is None and len(ids) >= prompt.max_new_tokens,
            confidence=sure,
        )

    def _end_of_sequence_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        ids.append(self.tokenizer.eos_token_id)
        for token in END_OF_TURN_TOKENS:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != self.tokenizer.unk_token_id:
                ids.append(token_id)
        unique = list(dict.fromkeys(i for i in ids if i is not None))
        if not unique:
            raise ValueError(f"{self.name!r} has no end-of-sequence token to stop generation at")
        return unique
