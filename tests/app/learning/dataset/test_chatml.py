"""Stage 6 (``app.learning.dataset.chatml``): ChatML messages, rendered by the real Qwen2.5 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.learning.dataset.chatml import chat_template_messages, format_chatml
from tests.app.learning.dataset.samples import PY_ANSWER, PY_PROMPT, read_rows

TOOLS = [
    {
        "tool_name": "run_tests",
        "invocation_order": 1,
        "parameters_raw": {"command": "pytest -q"},
        "success": False,
        "output": "",
        "error": "1 failed",
        "exit_code": 1,
    },
    {
        "tool_name": "read_file",
        "invocation_order": 0,
        "parameters_raw": {"path": "src/port.py"},
        "success": True,
        "output": "def parse_port(value): ...",
        "error": None,
        "exit_code": 0,
    },
]


def test_chatml_messages_with_tool_calls() -> None:
    batch = read_rows(
        1,
        input=[PY_PROMPT],
        output=[PY_ANSWER],
        system_prompt=["You are a coding assistant."],
        tool_usage_json=[json.dumps(TOOLS)],
        context_json=[
            json.dumps(
                {
                    "project_type": "cli",
                    "technologies": ["python"],
                    "git": {"branch": "main"},
                    "build": {"system": "hatch"},
                }
            )
        ],
    )
    out = format_chatml(batch)
    messages = json.loads(out["messages"][0])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "src/port.py"}'}}
    ]
    assert messages[3] == {"role": "tool", "tool_call_id": "call_0", "content": "def parse_port(value): ..."}
    assert messages[5]["content"] == "error: 1 failed (exit code 1)"
    assert messages[-1] == {"role": "assistant", "content": PY_ANSWER}
    assert out["instruction"][0] == PY_PROMPT and out["input"][0] == "" and out["tool_calls"][0] == 2
    assert json.loads(out["project_context"][0]) == {
        "build_system": "hatch",
        "project_type": "cli",
        "technologies": ["python"],
    }
    plain = json.loads(format_chatml(batch, include_tool_calls=False)["messages"][0])
    assert [m["role"] for m in plain] == ["system", "user", "assistant"]
    cut = json.loads(format_chatml(batch, max_tool_output_chars=3)["messages"][0])
    assert cut[3]["content"].startswith("def\n[... ")


@pytest.fixture(scope="module")
def tokenizer(model_root: Path):
    from app.model import load_tokenizer

    return load_tokenizer(model_root / "models" / "qwen2.5-tokenizer")


def test_messages_render_through_qwens_chat_template(tokenizer) -> None:
    batch = read_rows(
        1,
        input=["Is the port parsed?"],
        output=["Yes."],
        system_prompt=["Be brief."],
        tool_usage_json=[json.dumps(TOOLS[1:])],
    )
    messages = format_chatml(batch)["messages"][0]
    text = tokenizer.apply_chat_template(chat_template_messages(messages), tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nIs the port parsed?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "read_file", "arguments": {"path": "src/port.py"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\ndef parse_port(value): ...\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    # Without a system prompt the template puts in Qwen's default one.
    plain = format_chatml(read_rows(1, input=["Hi"], output=["Hello."]))["messages"][0]
    ids = tokenizer.apply_chat_template(chat_template_messages(plain), tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 151644 and ids[-2:] == [151645, 198]  # <|im_start|> ... <|im_end|>\n
    assert "You are Qwen" in tokenizer.decode(ids)
