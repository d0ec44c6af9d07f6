"""Chat rows as token ids for training: the ChatML rendering, labels on the assistant's turns only
(``IGNORE_INDEX`` elsewhere), preference pairs as a chosen and a rejected answer to one prompt,
and padded batches."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "collate", "parse_messages", "tokenize_messages", "tokenize_pair"]

IGNORE_INDEX = -100
"""The label of tokens that carry no loss (PyTorch's ``cross_entropy`` default ``ignore_index``)."""


def parse_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A row's ``messages`` (a JSON string or a list of dicts) as a list of dicts that the chat
    template can render: ``content`` None becomes "" except on assistant turns with tool calls,
    and tool-call ``arguments`` given as a JSON string (the OpenAI wire format) become the
    object the Qwen template serialises.

    Raises:
        ValueError: not a list of messages with a ``role`` each.
    """
    if isinstance(messages, (str, bytes)):
        messages = json.loads(messages)
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of chat messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{i}] has no role: {message!r}")
        message = dict(message)
        if message.get("content") is None and not (message["role"] == "assistant" and message.get("tool_calls")):
            message["content"] = ""
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function", call))
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        pass  # kept as the string it is; the template quotes it
                calls.append({**call, "function": function} if "function" in call else function)
            message["tool_calls"] = calls
        out.append(message)
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``text``: each turn's content and its end-of-turn
    token (``<|im_end|>``), not the newline after it nor the ``<|im_start|>assistant`` header.

    Found by rendering the conversation up to each assistant turn: with and without the
    generation prompt, that is where the turn starts, and through the turn, where it ends. This
    needs a template whose renderings of a prefix are prefixes of the whole (ChatML's is).
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant message; a prompt must come first")
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(head) and text.startswith(through) and len(through) > len(head)):
            raise ValueError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole; "
                "assistant tokens cannot be located"
            )
        end = len(through)
        # The separator after the end-of-turn token belongs to no one's answer.
        while end > len(head) and through[end - 1] in "\n":
            end -= 1
        spans.append((len(head), end))
    return spans


def tokenize_messages(
    tokenizer: Any, messages: str | Sequence[Mapping[str, Any]], max_length: int, *, last_turn_only: bool = False
) -> dict[str, Any]:
    """Token ids and labels of one conversation for supervised fine-tuning.

    The conversation is rendered with the tokenizer's chat template (for Qwen2.5, ChatML with its
    default system prompt when the conversation has none) and tokenized as one text, so tokens
    are exactly those the model sees at inference. Labels copy the ids of the assistant turns'
    tokens (content and ``<|im_end|>``; every assistant turn of a multi-turn chat) and are
    :data:`IGNORE_INDEX` elsewhere: system, user and tool messages are context, not targets.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template (offsets are needed).
        messages: OpenAI-style chat messages, or their JSON string (the ``messages`` column).
        max_length: rows are cut to this many tokens, at the end (the answer's tail goes first).
        last_turn_only: labels on the last assistant turn alone (a preference pair's answer; the
            turns before it, tool calls included, are the same on both sides).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``; a row whose answers
        were cut away entirely has no label left (its loss is zero; count those with
        ``all(l == IGNORE_INDEX ...)``).

    Raises:
        ValueError: malformed messages, or a template whose assistant turns cannot be located.
    """
    messages = parse_messages(messages)
    text = _render(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, text)
    if last_turn_only:
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if start >= spans[span][0] and end > start:
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def tokenize_pair(
    tokenizer: Any, prompt: str | Sequence[Mapping[str, Any]], chosen: str, rejected: str, max_length: int
) -> dict[str, Any]:
    """A preference pair (a :data:`app.artifacts.PREFERENCE_ROW_SCHEMA` row's ``prompt``, ``chosen``
    and ``rejected``) as two tokenized conversations, the prompt followed by each answer, with
    labels on that answer only (:func:`tokenize_messages` with ``last_turn_only``).

    Returns:
        ``{"chosen": tokenized, "rejected": tokenized}``; either may have lost every label to
        ``max_length`` (count those with ``all(l == IGNORE_INDEX ...)``).

    Raises:
        ValueError: malformed prompt messages, or a prompt that ends with an assistant message.
    """
    messages = parse_messages(prompt)
    if messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        raise ValueError("the prompt ends with an assistant answer; a pair's answers come after it")
    return {
        side: tokenize_messages(
            tokenizer, [*messages, {"role": "assistant", "content": answer}], max_length, last_turn_only=True
        )
        for side, answer in (("chosen", chosen), ("rejected", rejected))
    }


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of tokenized rows as right-padded ``input_ids``, ``attention_mask`` and ``labels``
    (``pad_token_id`` and :data:`IGNORE_INDEX` in the padding), each ``[batch, longest]``.

    Raises:
        ValueError: an empty batch, or a row whose ids and labels differ in length.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if len(e["labels"]) != n:
            raise ValueError(f"row {i}: {n} input ids but {len(e['labels'])} labels")
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
