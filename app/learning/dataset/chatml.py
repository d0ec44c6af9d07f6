"""Stage 6 of ``jobs/build_dataset.py``: each interaction as OpenAI / ChatML ``messages`` (system,
user, the tool calls as assistant ``tool_calls`` and ``tool`` messages, the answer) and the seed's
columns ``instruction``, ``input`` and ``project_context``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, num_rows, object_array

__all__ = ["chat_template_messages", "format_chatml", "interaction_messages"]

_CONTEXT_FIELDS = ("project_type", "technologies", "architecture", "development_phase")


def _project_context(context: Mapping[str, Any]) -> str:
    """Compact JSON of what describes the project (type, technologies, architecture, phase, build
    system and dependencies, test framework); volatile state (git, paths, timings) is left out."""
    out: dict[str, Any] = {k: context[k] for k in _CONTEXT_FIELDS if context.get(k)}
    build = context.get("build") or {}
    if build.get("system"):
        out["build_system"] = build["system"]
    if build.get("dependencies"):
        out["dependencies"] = list(build["dependencies"])
    testing = context.get("testing") or {}
    if testing.get("framework"):
        out["test_framework"] = testing["framework"]
    return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters]"


def interaction_messages(
    system_prompt: str,
    prompt: str,
    response: str,
    tools: Sequence[Mapping[str, Any]] = (),
    max_tool_output_chars: int = 2000,
) -> list[dict[str, Any]]:
    """One interaction as OpenAI chat messages.

    ``system`` when the interaction had a system prompt, ``user`` with the request, then for each
    step of tool calls (calls with the same ``invocation_order`` were made together) an
    ``assistant`` message with ``tool_calls`` (arguments as a JSON string, as OpenAI has them) and
    a ``tool`` message per call with its output (or its error), and last the ``assistant`` answer.
    """
    messages: list[dict[str, Any]] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    steps: dict[int, list[Mapping[str, Any]]] = {}
    for tool in sorted(tools, key=lambda t: int(t.get("invocation_order") or 0)):
        steps.setdefault(int(tool.get("invocation_order") or 0), []).append(tool)
    call = 0
    for step in steps.values():
        calls, results = [], []
        for tool in step:
            call_id = f"call_{call}"
            call += 1
            arguments = tool.get("parameters_raw") or {}
            arguments_json = json.dumps(arguments, sort_keys=True, ensure_ascii=False)
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": str(tool["tool_name"]), "arguments": arguments_json},
                }
            )
            if tool.get("success") is False or (not tool.get("output") and tool.get("error")):
                content = f"error: {as_text(tool.get('error')) or 'failed'}"
                if tool.get("exit_code") not in (None, 0):
                    content += f" (exit code {tool['exit_code']})"
            else:
                content = as_text(tool.get("output"))
            results.append({"role": "tool", "tool_call_id": call_id, "content": _cut(content, max_tool_output_chars)})
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        messages.extend(results)
    messages.append({"role": "assistant", "content": response})
    return messages


def chat_template_messages(messages: Sequence[Mapping[str, Any]] | str) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them: tool-call arguments as objects, not the
    JSON strings OpenAI uses (Qwen2.5's template writes ``arguments | tojson``)."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function") or call)
                if isinstance(function.get("arguments"), str):
                    function["arguments"] = json.loads(function["arguments"] or "{}")
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out


def format_chatml(
    batch: Mapping[str, np.ndarray], include_tool_calls: bool = True, max_tool_output_chars: int = 2000
) -> Batch:
    """Stage 6: ``messages`` (a JSON list, :func:`interaction_messages`), ``instruction`` (the
    request), ``input`` (Alpaca's optional context: empty), ``project_context`` (compact JSON)."""
    messages, contexts, tool_calls = [], [], []
    for system, prompt, response, ctx, tools in zip(
        batch["system_prompt"], batch["input"], batch["output"], batch["context_json"], batch["tool_usage_json"]
    ):
        calls = json.loads(as_text(tools) or "[]") if include_tool_calls else []
        rendered = interaction_messages(
            as_text(system), as_text(prompt), as_text(response), calls, max_tool_output_chars
        )
        messages.append(json.dumps(rendered, ensure_ascii=False))
        contexts.append(_project_context(json.loads(as_text(ctx) or "{}")))
        tool_calls.append(len(calls))
    out = dict(batch)
    out["instruction"] = object_array(as_text(p) for p in batch["input"])
    out["input"] = object_array("" for _ in range(num_rows(batch)))
    out["messages"] = object_array(messages)
    out["project_context"] = object_array(contexts)
    out["tool_calls"] = np.asarray(tool_calls, dtype=np.int64)
    return out
