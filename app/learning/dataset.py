"""Training-dataset building: the options, the stages of ``jobs/build_dataset.py``, and the writer.

Every stage is a plain function on a batch (a ``dict`` of equal-length NumPy arrays, Ray Data's
``numpy`` batch format) or, where it holds a connection or a model, a callable class; the job
chains them, and the tests call them without Ray. In the job's order:

1. :class:`ReadInteractions` (store connection): ids to flat rows with the score, the project
   context and the tool calls (the nested parts as JSON strings, so Arrow never unifies them);
2. :func:`classify`: domain (language from code fences, else the project's technologies, else the
   prompt; frameworks from the technologies and the code's imports; task type from the prompt)
   and complexity (code lines and cyclomatic complexity, radon for Python; prompt length);
3. :func:`filter_quality`: keeps rows at or above :class:`~app.quality.thresholds.ThresholdManager`'s
   inclusion threshold for their domain (the language) and complexity;
4. :func:`fingerprint`: a hash of the normalised text and a MinHash signature of its shingles;
5. on the driver, over everything at once: :func:`drop_exact_duplicates`,
   :func:`drop_near_duplicates` (MinHash LSH, ``datasketch``) and :func:`balance` (no group of
   domain, task and complexity above a share);
6. :func:`format_chatml`: the OpenAI / ChatML ``messages`` (system, user, the tool calls as
   assistant ``tool_calls`` and ``tool`` messages, the answer), the seed's columns;
7. :class:`EmbedBatch` (MiniLM): an embedding of each request; :func:`encode_features`;
8. on the driver: :func:`select_diverse` (k-center greedy or k-means over the embeddings, weighted
   by quality measured against similar requests, :func:`relative_quality`), :func:`assign_split`
   (a hash of the id), :func:`to_table` and :func:`write_dataset` (``train.parquet``,
   ``validation.parquet``, ``train.jsonl``, ``validation.jsonl``, ``manifest.json``).

Columns (:data:`DATASET_SCHEMA`) are the seed's training-dataset schema plus ``messages``:
``instruction`` is the user's request and ``input`` Alpaca's optional extra context (empty: the
store keeps none apart from the request); ``domain`` is ``[language, task, *frameworks]``;
``project_context`` is compact JSON of the project's descriptive fields; ``features`` is compact
JSON of the classification's measurements and the request's MiniLM embedding (float16, base64),
read back with :func:`decode_features`.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from app.learning import check_folder_id
from app.model.storage import file_sha256
from app.quality.code import extract_code_blocks
from app.quality.thresholds import ThresholdManager

__all__ = [
    "COMPLEXITIES",
    "DATASET_SCHEMA",
    "NEIGHBOUR_REFERENCE_ROWS",
    "TASKS",
    "Classification",
    "DatasetConfig",
    "DatasetManifest",
    "EmbedBatch",
    "Funnel",
    "InsufficientDataError",
    "QualityHistogram",
    "QueryInfo",
    "ReadInteractions",
    "assign_split",
    "balance",
    "batch_to_rows",
    "chat_template_messages",
    "classify",
    "classify_interaction",
    "content_hash",
    "count_rows",
    "dataset_uri",
    "decode_features",
    "diverse_indices",
    "drop_exact_duplicates",
    "drop_near_duplicates",
    "encode_features",
    "filter_quality",
    "fingerprint",
    "format_chatml",
    "interaction_messages",
    "interaction_row",
    "new_dataset_id",
    "normalize_text",
    "quality_histogram",
    "relative_quality",
    "rows_to_batch",
    "select_diverse",
    "selection_size",
    "split_fraction",
    "take",
    "task_of",
    "threshold_manager",
    "to_table",
    "write_dataset",
]

Batch = dict[str, np.ndarray]

TASKS = ("generation", "debugging", "refactoring", "explanation", "testing")
COMPLEXITIES = ("simple", "moderate", "complex", "expert")
LEARNING_TYPE = "interaction"
"""``learning_type`` of rows taken from real interactions (SSR's rehearsal rows say ``rehearsal``)."""
UNKNOWN_LANGUAGE = "general"
MANIFEST_FILE = "manifest.json"
DATASETS_DIRNAME = "datasets"
DATA_FILES = ("train.parquet", "validation.parquet", "train.jsonl", "validation.jsonl")

DATASET_SCHEMA = pa.schema(
    [
        pa.field("interaction_id", pa.string()),
        pa.field("timestamp", pa.timestamp("ns")),
        pa.field("instruction", pa.string()),
        pa.field("input", pa.string()),
        pa.field("output", pa.string()),
        pa.field("quality_score", pa.float64()),
        pa.field("domain", pa.list_(pa.string())),
        pa.field("complexity", pa.string()),
        pa.field("learning_type", pa.string()),
        pa.field("project_context", pa.string()),
        pa.field("features", pa.string()),
        pa.field("messages", pa.string()),
    ]
)
"""The seed's training-dataset schema (timestamps in UTC) plus ``messages``: a JSON list of
OpenAI / ChatML chat messages."""


# --- options -------------------------------------------------------------------------------------


class DatasetConfig(BaseModel):
    """Options of ``jobs/build_dataset.py``; on its command line each is ``dataset.<key>=<value>``."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str | None = Field(
        None, description="Name of the output folder <storage_root>/datasets/<id>; default a fresh ds-<time>-<hex>."
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Base inclusion threshold before the domain and complexity adjustments; None: quality.threshold.",
    )
    domain_adjustments: dict[str, float] = Field(
        default_factory=dict,
        description="Added to the threshold per domain (language), as ThresholdManager learns them: {python: 0.02}.",
    )
    since: datetime | None = Field(None, description="Only interactions at or after this time (ISO 8601).")
    until: datetime | None = Field(None, description="Only interactions before this time (ISO 8601).")
    min_examples: int = Field(
        16, ge=1, description="Fewest rows a dataset may have; fewer left after selection stops the job."
    )
    near_duplicate_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity of word shingles at or above which two are near duplicates.",
    )
    shingle_size: int = Field(5, ge=1, description="Words per shingle of the near-duplicate check.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a finer Jaccard estimate).")
    balance_by: list[Literal["language", "task", "complexity"]] = Field(
        default_factory=lambda: ["language", "task", "complexity"],
        description="What makes a group for balancing; empty: no balancing.",
    )
    max_group_share: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Largest share of the rows one group may keep (its best rows by quality); 1.0: no cap.",
    )
    keep_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the balanced rows the diverse selection keeps (rounded up)."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Most rows the selection keeps, whatever keep_fraction gives; None: no cap."
    )
    selection: Literal["k_center", "k_means"] = Field(
        "k_center",
        description="k_center: greedy farthest-first, O(n*k); k_means: one row per k-means cluster (large pools).",
    )
    quality_weight: float = Field(
        1.0, ge=0, description="Exponent of the quality score in the selection's priority (0: diversity alone)."
    )
    confidence_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Exponent of the score's confidence in the selection's priority: a score backed by evidence (a user's "
            "rating, tests that ran) outranks an equal one inferred without it (0: confidence ignored)."
        ),
    )
    quality_neighbours: int = Field(
        20,
        ge=0,
        description=(
            "The selection compares a row's quality with that of the requests most like it (this many nearest "
            "by embedding): the scorers rate some kinds of request higher than others (a one-word answer is "
            "less 'relevant' to its question than a long one), and the selection should take the best answers "
            "of every kind rather than more of the kinds that score high (0: raw scores)."
        ),
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of rows in validation, chosen by a hash of the interaction id."
    )
    include_tool_calls: bool = Field(
        True, description="Keep the interaction's tool calls as assistant tool_calls and tool messages."
    )
    max_tool_output_chars: int = Field(
        2000, ge=0, description="A tool message keeps at most this many characters of the tool's output."
    )
    seed: int = Field(0, description="Seed of MinHash and k-means (the split depends on the ids alone).")
    batch_size: int = Field(64, ge=1, description="Rows per batch of every stage.")
    read_actors: int = Field(1, ge=1, description="Store readers (each with its own connection).")
    embed_actors: int = Field(1, ge=1, description="Embedding actors (each loads MiniLM once).")
    embed_num_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor (torch threads).")

    @field_validator("dataset_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return check_folder_id(value)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("domain_adjustments")
    @classmethod
    def _small(cls, value: dict[str, float]) -> dict[str, float]:
        for domain, delta in value.items():
            if not -0.5 <= delta <= 0.5:
                raise ValueError(f"{domain}: an adjustment must lie in [-0.5, 0.5] (got {delta})")
        return value

    @model_validator(mode="after")
    def _window(self) -> DatasetConfig:
        if self.since and self.until and self.until <= self.since:
            raise ValueError(f"until ({self.until.isoformat()}) must be after since ({self.since.isoformat()})")
        return self


def threshold_manager(base: float, adjustments: Mapping[str, float] | None = None) -> ThresholdManager:
    """The threshold manager for a base inclusion threshold and per-domain adjustments."""
    return ThresholdManager(
        base={"training_inclusion": base},
        adjustments={f"domain_{domain}": delta for domain, delta in (adjustments or {}).items()},
    )


def new_dataset_id(now: datetime | None = None) -> str:
    """A fresh id, ``ds-YYYYMMDD-HHMMSS-<6 hex>``: sortable by time, apart within a second."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"ds-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class InsufficientDataError(RuntimeError):
    """Too few interactions are left to make a dataset; the message says how many and why."""


# --- batches ------------------------------------------------------------------------------------


def _objects(values: Iterable[Any]) -> np.ndarray:
    """A 1-D object array (never NumPy's fixed-width strings, which copy every text to the longest)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _size(batch: Mapping[str, Any]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def take(batch: Mapping[str, np.ndarray], index: np.ndarray | Sequence[int]) -> Batch:
    """The rows at ``index`` (positions or a boolean mask) of every column."""
    index = np.asarray(index)
    if index.dtype != bool:
        index = index.astype(np.int64)
    return {name: np.asarray(col)[index] for name, col in batch.items()}


def rows_to_batch(rows: Sequence[Mapping[str, Any]]) -> Batch:
    """Rows (``Dataset.take_all()``) as one batch: arrays stacked, numbers as float or int, the rest objects."""
    if not rows:
        return {}
    batch: Batch = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if isinstance(values[0], np.ndarray):
            batch[name] = np.stack(values)
        elif all(isinstance(v, (bool, np.bool_)) for v in values):
            batch[name] = np.asarray(values, dtype=bool)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            batch[name] = np.asarray(values, dtype=np.int64)
        elif all(isinstance(v, (int, float, np.integer, np.floating)) or v is None for v in values):
            batch[name] = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            batch[name] = _objects(values)
    return batch


def batch_to_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """A batch as rows (for ``ray.data.from_items``); array cells stay arrays, scalars become Python's."""
    names = list(batch)
    rows = []
    for i in range(_size(batch)):
        row = {}
        for name in names:
            value = batch[name][i]
            row[name] = value.item() if isinstance(value, np.generic) else value
        rows.append(row)
    return rows


# --- stage 1: read -----------------------------------------------------------------------------

READ_COLUMNS = (
    "interaction_id",
    "timestamp",
    "input",
    "output",
    "system_prompt",
    "quality_score",
    "quality_confidence",
    "context_json",
    "tool_usage_json",
)


def interaction_row(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """One stored interaction (``InteractionStore.get_interaction``) as a flat row, or None when it
    has no score or no answer. The request is the prompt as sent to the model when the agent
    recorded one (``input.processed``), else what the user typed."""
    output = _text(record.get("output_content"))
    score, confidence = record.get("quality_score"), record.get("quality_confidence")
    if score is None or not output.strip():
        return None
    tools = [
        {
            key: tool.get(key)
            for key in ("tool_name", "invocation_order", "parameters_raw", "success", "output", "error", "exit_code")
        }
        for tool in record.get("tool_usage") or []
    ]
    return {
        "interaction_id": str(record["id"]),
        "timestamp": _text(record.get("timestamp")),
        "input": _text(record.get("input_processed")) or _text(record.get("input_raw")),
        "output": output,
        "system_prompt": _text(record.get("system_prompt")),
        "quality_score": float(score),
        "quality_confidence": np.nan if confidence is None else float(confidence),
        "context_json": json.dumps(record.get("context") or {}, sort_keys=True, default=str),
        "tool_usage_json": json.dumps(tools, sort_keys=True, default=str),
    }


def _empty_read_batch() -> Batch:
    return {name: np.empty(0, dtype=np.float64 if "quality" in name else object) for name in READ_COLUMNS}


class ReadInteractions:
    """Stage 1 (an actor per reader): a batch of ``id`` to flat rows (:func:`interaction_row`),
    read with this actor's own store connection."""

    def __init__(self, store_config: Mapping[str, Any]):
        from app.config import StoreConfig
        from app.store import open_store

        self.store = open_store(StoreConfig.model_validate(dict(store_config)), migrate=False)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        rows = []
        for interaction_id in batch["id"]:
            record = self.store.get_interaction(str(interaction_id))
            row = interaction_row(record) if record is not None else None
            if row is not None:
                rows.append(row)
        return rows_to_batch(rows) if rows else _empty_read_batch()


# --- stage 2: classify ---------------------------------------------------------------------------

_LANGUAGE_WORDS = {
    "python": "python",
    "py": "python",
    "python3": "python",
    "typescript": "typescript",
    "ts": "typescript",
    "tsx": "typescript",
    "javascript": "javascript",
    "js": "javascript",
    "jsx": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
    "node.js": "javascript",
    "go": "go",
    "golang": "go",
    "rust": "rust",
    "java": "java",
    "kotlin": "kotlin",
    "c#": "csharp",
    "csharp": "csharp",
    "c++": "cpp",
    "cpp": "cpp",
    "c": "c",
    "ruby": "ruby",
    "php": "php",
    "swift": "swift",
    "scala": "scala",
    "bash": "bash",
    "shell": "bash",
    "sh": "bash",
    "sql": "sql",
    "html": "html",
    "css": "css",
    "r": "r",
    "dart": "dart",
    "lua": "lua",
    "haskell": "haskell",
    "elixir": "elixir",
}
# Languages a prompt may name in prose ("in TypeScript"); short or common words ("go", "c", "r",
# "sh") are left to code fences and the project's technologies.
_PROSE_LANGUAGES = re.compile(
    r"(?<![\w.])(python|typescript|javascript|node\.?js|golang|rust|java|kotlin|c\+\+|c#|ruby|php|swift|scala|"
    r"bash|sql|haskell|elixir|dart)(?![\w+#])",
    re.IGNORECASE,
)
# Libraries and frameworks by import name (Python modules, npm packages, Go and Rust crates).
_FRAMEWORK_IMPORTS = {
    "django": "django",
    "flask": "flask",
    "fastapi": "fastapi",
    "starlette": "starlette",
    "pytest": "pytest",
    "numpy": "numpy",
    "pandas": "pandas",
    "sqlalchemy": "sqlalchemy",
    "click": "click",
    "typer": "typer",
    "torch": "pytorch",
    "tensorflow": "tensorflow",
    "keras": "keras",
    "sklearn": "scikit-learn",
    "pydantic": "pydantic",
    "requests": "requests",
    "httpx": "httpx",
    "aiohttp": "aiohttp",
    "celery": "celery",
    "ray": "ray",
    "transformers": "transformers",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "react": "react",
    "react-dom": "react",
    "vue": "vue",
    "@angular/core": "angular",
    "express": "express",
    "@nestjs/core": "nestjs",
    "@nestjs/common": "nestjs",
    "next": "nextjs",
    "jest": "jest",
    "@jest/globals": "jest",
    "vitest": "vitest",
    "mocha": "mocha",
    "svelte": "svelte",
    "@prisma/client": "prisma",
    "typeorm": "typeorm",
    "zod": "zod",
    "axios": "axios",
    "redux": "redux",
    "@reduxjs/toolkit": "redux",
    "rxjs": "rxjs",
    "github.com/gin-gonic/gin": "gin",
    "tokio": "tokio",
    "actix_web": "actix-web",
    "serde": "serde",
}
_JS_IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(?\s*|\brequire\(\s*)['"]([^'"]+)['"]""")
_GO_IMPORT = re.compile(r'^\s*(?:import\s+)?"([\w./-]+)"', re.MULTILINE)
_RUST_USE = re.compile(r"^\s*(?:use|extern crate)\s+([a-z_][a-z0-9_]*)", re.MULTILINE)
_PY_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.MULTILINE)
_BRANCHES = re.compile(r"\b(?:if|for|while|case|catch|except|elif|when|match)\b|&&|\|\||\?\?|(?<![?.])\?(?![.?:])")

# Task types: the one whose first cue comes earliest in the request's prose wins (code removed, so
# words inside pasted code do not count; "Write a function that ... what is" stays generation);
# ties go to the more specific task, in _TASK_ORDER. No cue at all: generation.
_TASK_CUES: dict[str, re.Pattern[str]] = {
    "testing": re.compile(
        r"\b(?:write|add|create|generate|need|improve|increase|extend)\b[^.?!\n]{0,40}?"
        r"\b(?:unit |integration |e2e |end-to-end )?tests?\b"
        r"|\btest (?:cases?|suite|coverage)\b|\b(?:unit|integration|e2e) tests?\b|\bcoverage\b|\bmock(?:s|ing)?\b"
        r"|\b(?:pytest|jest|vitest|mocha|unittest) (?:tests?|cases?|suite|fixtures?)\b",
        re.IGNORECASE,
    ),
    "debugging": re.compile(
        r"\b(?:fix(?:es|ed|ing)?|debug\w*|bugs?|buggy|traceback|stack ?trace|segfault|crash(?:es|ed|ing)?)\b"
        r"|\b(?:fails?|failing|failed|broken|not working|(?:doesn'?t|does not|won'?t|isn'?t) work(?:ing)?)\b"
        r"|\b(?:get|gets|got|getting|throws?|throwing|raises?|raising)\s+(?:an?\s+|this\s+|the\s+)?(?:\w+\s+)?(?:error|exception)\b"
        r"|\b\w*(?:Error|Exception):",
        re.IGNORECASE,
    ),
    "refactoring": re.compile(
        r"\brefactor\w*|\bclean(?:ing)?[ -]?up\b|\bsimplif(?:y|ied|ies)\b|\brestructur\w*|\brename\b"
        r"|\bextract (?:a |the |this )?(?:method|function|class|component|helper)\b"
        r"|\bmore (?:readable|maintainable|idiomatic|pythonic|modular)\b"
        r"|\b(?:rewrite|reorganiz\w*|moderni[sz]e|deduplicate)\b"
        r"|\bimprove (?:the )?(?:readability|structure|design)\b",
        re.IGNORECASE,
    ),
    "explanation": re.compile(
        r"\bexplain\w*|\bwhat (?:does|is|are|do)\b|\bwhy (?:does|is|do|are|would)\b|\bhow does\b"
        r"|\bhow do\b[^.?!\n]{0,40}\bwork\b"
        r"|\bdifference between\b|\bwalk me through\b|\bmeaning of\b|\bdescribe\b|\bhelp me understand\b",
        re.IGNORECASE,
    ),
    # Generation verbs count as an instruction only: at the start of a sentence or after a request.
    "generation": re.compile(
        r"(?:^|[.!?:;]\s+|\b(?:please|can you|could you|would you|help me|i need to|i want to)\s+)"
        r"(?:write|implement|create|build|generate|scaffold)\b|\b(?:i need|i want|show me|give me)\b",
        re.IGNORECASE,
    ),
}
_TASK_ORDER = ("testing", "debugging", "refactoring", "explanation", "generation")
_FENCED = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)

# Complexity levels: code lines, cyclomatic complexity (the most complex function or module), and
# words of prose in the request; a level is the highest any measure reaches.
_LINE_LEVELS = (15, 50, 150)
_CC_LEVELS = (4, 10, 20)
_WORD_LEVELS = (80, 200, 500)


@dataclass(frozen=True)
class Classification:
    """What :func:`classify_interaction` found."""

    language: str
    frameworks: tuple[str, ...]
    task: str
    complexity: str
    code_blocks: int
    code_lines: int
    cyclomatic: int
    prompt_words: int

    @property
    def domain(self) -> list[str]:
        """The ``domain`` column: ``[language, task, *frameworks]``."""
        return [self.language, self.task, *self.frameworks]


def _level(value: float, bounds: Sequence[float]) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def _python_imports(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return [(a or b).split(".")[0] for a, b in _PY_IMPORT.findall(code)]
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.extend(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module.split(".")[0])
    return modules


def _package(spec: str) -> str:
    spec = spec.strip()
    if spec.startswith("@"):
        return "/".join(spec.split("/")[:2])
    return spec.split("/")[0]


def _imports(language: str, code: str) -> list[str]:
    if language == "python":
        return _python_imports(code)
    if language in ("typescript", "javascript"):
        found = []
        for spec in _JS_IMPORT.findall(code):
            if spec.startswith((".", "/", "node:")):
                continue
            found.extend([spec, _package(spec)])
        return found
    if language == "go":
        return _GO_IMPORT.findall(code)
    if language == "rust":
        return _RUST_USE.findall(code)
    return []


def _cyclomatic(language: str, code: str) -> int:
    """Cyclomatic complexity of the most complex function or of the module level: radon for
    Python; for other languages (and Python that does not parse) 1 + the branch points."""
    if language == "python":
        try:
            from radon.visitors import ComplexityVisitor

            visitor = ComplexityVisitor.from_code(code)
            return int(max([visitor.complexity, *(block.complexity for block in visitor.blocks)]))
        except (SyntaxError, ValueError, TypeError):
            pass
    stripped = re.sub(r"//[^\n]*|#[^\n]*|/\*.*?\*/", "", code, flags=re.DOTALL)
    stripped = re.sub(r"'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"", '""', stripped)
    return 1 + len(_BRANCHES.findall(stripped))


def _code_lines(code: str) -> int:
    return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith(("#", "//")))


_NOT_CODE = {"text", "txt", "plaintext", "plain", "output", "log", "markdown", "md"}


def _language_of(blocks: Sequence[Any]) -> str | None:
    weights: Counter[str] = Counter()
    for block in blocks:
        language = _LANGUAGE_WORDS.get(block.language, block.language)
        if language and language not in _NOT_CODE:
            weights[language] += len(block.code) + 1
    return max(sorted(weights), key=lambda k: weights[k]) if weights else None


def _prose(text: str) -> str:
    return _FENCED.sub(" ", text)


def task_of(prompt: str) -> str:
    """The task type a request asks for: the task whose cue comes first in the prose (see
    ``_TASK_CUES``); ``generation`` when no cue matches."""
    prose = _prose(prompt)[:2000]
    best: tuple[int, int, str] | None = None
    for rank, task in enumerate(_TASK_ORDER):
        match = _TASK_CUES[task].search(prose)
        if match and (best is None or (match.start(), rank) < best[:2]):
            best = (match.start(), rank, task)
    return best[2] if best else "generation"


def classify_interaction(prompt: str, response: str, context: Mapping[str, Any] | None = None) -> Classification:
    """Domain and complexity of one interaction.

    Language: the fenced code of the answer (by amount of code), else of the request, else the
    project's technologies, else a language the request names, else ``general``. Frameworks: the
    project's technologies that are not languages, and the known libraries the code imports.
    Task: :func:`task_of`. Complexity: the highest level that the code's lines (of the answer or
    of the request, whichever has more), its cyclomatic complexity (the most complex function or
    module; radon for Python) or the request's words of prose reach.
    """
    context = context or {}
    out_blocks = extract_code_blocks(response)
    in_blocks = extract_code_blocks(prompt)
    technologies = [str(t).strip().lower() for t in context.get("technologies") or [] if str(t).strip()]
    language = _language_of(out_blocks) or _language_of(in_blocks)
    if language is None:
        language = next((_LANGUAGE_WORDS[t] for t in technologies if t in _LANGUAGE_WORDS), None)
    if language is None:
        named = _PROSE_LANGUAGES.search(_prose(prompt))
        word = named.group(1).lower() if named else ""
        language = _LANGUAGE_WORDS.get(word.replace(".", ""), word) or None
    language = language or UNKNOWN_LANGUAGE

    frameworks = {t.replace(",", " ") for t in technologies if t not in _LANGUAGE_WORDS}
    # An answer often repeats the request's code, changed: the larger side measures the task.
    lines = max(sum(_code_lines(b.code) for b in out_blocks), sum(_code_lines(b.code) for b in in_blocks))
    cyclomatic = 0
    blocks = [*out_blocks, *in_blocks]
    for block in blocks:
        block_language = _LANGUAGE_WORDS.get(block.language, block.language) or language
        cyclomatic = max(cyclomatic, _cyclomatic(block_language, block.code))
        for name in _imports(block_language, block.code):
            if name in _FRAMEWORK_IMPORTS:
                frameworks.add(_FRAMEWORK_IMPORTS[name])
    words = len(_prose(prompt).split())
    level = _level(words, _WORD_LEVELS)
    if blocks:
        level = max(level, _level(lines, _LINE_LEVELS), _level(cyclomatic, _CC_LEVELS))
    return Classification(
        language=language,
        frameworks=tuple(sorted(frameworks)),
        task=task_of(prompt),
        complexity=COMPLEXITIES[level],
        code_blocks=len(blocks),
        code_lines=lines,
        cyclomatic=cyclomatic,
        prompt_words=words,
    )


def classify(batch: Mapping[str, np.ndarray]) -> Batch:
    """Stage 2: ``language``, ``task``, ``frameworks`` (comma-separated), ``complexity`` and the
    measurements behind them (``code_blocks``, ``code_lines``, ``cyclomatic``, ``prompt_words``)."""
    found = [
        classify_interaction(_text(prompt), _text(response), json.loads(_text(ctx) or "{}"))
        for prompt, response, ctx in zip(batch["input"], batch["output"], batch["context_json"])
    ]
    out = dict(batch)
    out["language"] = _objects(c.language for c in found)
    out["task"] = _objects(c.task for c in found)
    out["frameworks"] = _objects(",".join(c.frameworks) for c in found)
    out["complexity"] = _objects(c.complexity for c in found)
    for name in ("code_blocks", "code_lines", "cyclomatic", "prompt_words"):
        out[name] = np.asarray([getattr(c, name) for c in found], dtype=np.int64)
    return out


# --- stage 3: quality filter ----------------------------------------------------------------------


def filter_quality(batch: Mapping[str, np.ndarray], thresholds: ThresholdManager) -> Batch:
    """Stage 3: the rows whose score is at or above the inclusion threshold for their domain
    (the language) and complexity, with that threshold in a ``threshold`` column."""
    limits = np.asarray(
        [round(thresholds.threshold(_text(d), _text(c)), 6) for d, c in zip(batch["language"], batch["complexity"])],
        dtype=np.float64,
    )
    out = dict(batch)
    out["threshold"] = limits
    keep = np.asarray(batch["quality_score"], dtype=np.float64) >= limits
    return take(out, keep)


# --- stage 4: fingerprints and duplicates -------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize_text(text: str) -> str:
    """Unicode NFKC, lower case, whitespace runs to one space, trimmed: what makes two texts the same."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _shingles(text: str, size: int) -> set[bytes]:
    tokens = _TOKEN.findall(text)
    if len(tokens) <= size:
        return {" ".join(tokens).encode()}
    return {" ".join(tokens[i : i + size]).encode() for i in range(len(tokens) - size + 1)}


def fingerprint(batch: Mapping[str, np.ndarray], num_perm: int = 128, shingle_size: int = 5, seed: int = 0) -> Batch:
    """Stage 4: ``text_hash`` (SHA-256 of the normalised request and answer) and ``minhash`` (a
    ``num_perm`` MinHash signature of their word shingles, one row of uint64 per interaction)."""
    from datasketch import MinHash

    hashes, signatures = [], np.zeros((_size(batch), num_perm), dtype=np.uint64)
    for i, (prompt, response) in enumerate(zip(batch["input"], batch["output"])):
        text = normalize_text(_text(prompt)) + "\n\x00\n" + normalize_text(_text(response))
        hashes.append(hashlib.sha256(text.encode()).hexdigest())
        minhash = MinHash(num_perm=num_perm, seed=seed)
        minhash.update_batch(sorted(_shingles(text, shingle_size)))
        signatures[i] = minhash.hashvalues
    out = dict(batch)
    out["text_hash"] = _objects(hashes)
    out["minhash"] = signatures
    return out


def _best_first(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Row order by quality (best first), ties by id: which of duplicates is kept."""
    ids = np.asarray([_text(i) for i in batch["interaction_id"]], dtype=object)
    order = sorted(range(len(ids)), key=lambda i: (-float(batch["quality_score"][i]), ids[i]))
    return np.asarray(order, dtype=np.int64)


def drop_exact_duplicates(batch: Mapping[str, np.ndarray]) -> tuple[Batch, int]:
    """Keep one row per ``text_hash``, the best by quality (ties: the smaller id).

    Returns:
        The kept rows (best first) and how many were dropped.
    """
    if not _size(batch):
        return dict(batch), 0
    seen: set[str] = set()
    keep = []
    for i in _best_first(batch):
        if batch["text_hash"][i] not in seen:
            seen.add(batch["text_hash"][i])
            keep.append(i)
    return take(batch, keep), _size(batch) - len(keep)


def drop_near_duplicates(
    batch: Mapping[str, np.ndarray], threshold: float = 0.8, num_perm: int = 128, seed: int = 0
) -> tuple[Batch, int]:
    """Drop rows whose MinHash Jaccard estimate with a better row is at or above ``threshold``.

    Rows are taken best first; each is looked up in a MinHash LSH index of the rows kept so far,
    and the candidates the index returns are confirmed with the signatures' Jaccard estimate
    (LSH alone admits some pairs below the threshold). Runs on the driver over the whole pool.

    Returns:
        The kept rows (best first) and how many were dropped.
    """
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    if not _size(batch):
        return dict(batch), 0
    signatures = np.asarray(batch["minhash"], dtype=np.uint64)
    scheme = MinHash(num_perm=num_perm, seed=seed).scheme  # the hashing scheme fingerprint() used
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    keep: list[int] = []
    for i in _best_first(batch):
        minhash = LeanMinHash(seed=seed, hashvalues=signatures[i], scheme=scheme)
        similar = [int(j) for j in lsh.query(minhash) if np.mean(signatures[int(j)] == signatures[i]) >= threshold]
        if not similar:
            lsh.insert(str(i), minhash)
            keep.append(int(i))
    return take(batch, keep), _size(batch) - len(keep)


# --- stage 5: balance ------------------------------------------------------------------------------


def _group_keys(batch: Mapping[str, np.ndarray], by: Sequence[str]) -> list[str]:
    return ["/".join(_text(batch[name][i]) for name in by) or "all" for i in range(_size(batch))]


def balance(
    batch: Mapping[str, np.ndarray], max_share: float = 0.4, by: Sequence[str] = ("language", "task", "complexity")
) -> tuple[Batch, int, dict[str, Any]]:
    """Cap every group (rows alike in ``by``) at ``max_share`` of the rows kept, keeping each
    capped group's best rows by quality.

    The cap is the largest ``c`` with ``c <= max_share * sum(min(size, c))`` over the groups. With
    ``k`` groups no share can be below ``1 / k``: a smaller ``max_share`` acts as ``1 / k`` (every
    group cut to the smallest's size), and a single group is left whole.

    Returns:
        The kept rows (best first), how many were dropped, and ``{groups, cap, effective_share}``
        (rows per group before the cap).
    """
    n = _size(batch)
    keys = _group_keys(batch, by)
    sizes = Counter(keys)
    info: dict[str, Any] = {"groups": dict(sorted(sizes.items())), "cap": None, "effective_share": None}
    if n == 0 or not by or max_share >= 1.0 or len(sizes) < 2:
        return take(batch, _best_first(batch)) if n else dict(batch), 0, info
    share = max(max_share, 1.0 / len(sizes))
    counts = sorted(sizes.values())
    cap = counts[0]
    for c in range(counts[-1], counts[0] - 1, -1):
        if c <= share * sum(min(size, c) for size in counts) + 1e-9:
            cap = c
            break
    kept_per_group: Counter[str] = Counter()
    keep = []
    for i in _best_first(batch):
        if kept_per_group[keys[i]] < cap:
            kept_per_group[keys[i]] += 1
            keep.append(i)
    info.update(cap=cap, effective_share=round(share, 6))
    return take(batch, keep), n - len(keep), info


# --- stage 6: ChatML --------------------------------------------------------------------------------

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
                content = f"error: {_text(tool.get('error')) or 'failed'}"
                if tool.get("exit_code") not in (None, 0):
                    content += f" (exit code {tool['exit_code']})"
            else:
                content = _text(tool.get("output"))
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
        calls = json.loads(_text(tools) or "[]") if include_tool_calls else []
        rendered = interaction_messages(_text(system), _text(prompt), _text(response), calls, max_tool_output_chars)
        messages.append(json.dumps(rendered, ensure_ascii=False))
        contexts.append(_project_context(json.loads(_text(ctx) or "{}")))
        tool_calls.append(len(calls))
    out = dict(batch)
    out["instruction"] = _objects(_text(p) for p in batch["input"])
    out["input"] = _objects("" for _ in range(_size(batch)))
    out["messages"] = _objects(messages)
    out["project_context"] = _objects(contexts)
    out["tool_calls"] = np.asarray(tool_calls, dtype=np.int64)
    return out


# --- stage 7: embeddings and features ---------------------------------------------------------------

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class EmbedBatch:
    """Stage 7 (an actor): the request's MiniLM embedding (unit length, float32) as ``embedding``.

    The request says what an example teaches, and the model reads 128 tokens: embedding the
    answer too would mostly measure the prompt's first lines anyway."""

    def __init__(self, embedder: Any = None):
        if embedder is None:
            from app.quality.relevance import get_embedder

            embedder = get_embedder()
        self.embedder = embedder

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        out = dict(batch)
        out["embedding"] = np.asarray(self.embedder.embed([_text(t) for t in batch["instruction"]]), dtype=np.float32)
        return out


_FEATURES = ("code_blocks", "code_lines", "cyclomatic", "prompt_words", "tool_calls")


def encode_features(batch: Mapping[str, np.ndarray]) -> Batch:
    """Stage 7b: ``features``, compact JSON of the classification, its measurements, the answer's
    length, the score's confidence and the embedding (float16, base64); see :func:`decode_features`."""
    features = []
    for i in range(_size(batch)):
        vector = np.asarray(batch["embedding"][i], dtype="<f2")
        confidence = float(batch["quality_confidence"][i])
        item: dict[str, Any] = {
            "v": 1,
            "language": _text(batch["language"][i]),
            "task": _text(batch["task"][i]),
            "complexity": _text(batch["complexity"][i]),
            "frameworks": [f for f in _text(batch["frameworks"][i]).split(",") if f],
            **{name: int(batch[name][i]) for name in _FEATURES},
            "output_chars": len(_text(batch["output"][i])),
            "quality_confidence": None if math.isnan(confidence) else round(confidence, 4),
            "threshold": float(batch["threshold"][i]),
            "embedding": {
                "model": EMBEDDING_MODEL,
                "dtype": "float16",
                "dim": int(vector.size),
                "b64": base64.b64encode(vector.tobytes()).decode(),
            },
        }
        features.append(json.dumps(item, separators=(",", ":"), sort_keys=True))
    out = dict(batch)
    out["features"] = _objects(features)
    return out


def decode_features(text: str) -> dict[str, Any]:
    """A ``features`` value as a dict, its ``embedding`` a float32 vector."""
    item = json.loads(text)
    emb = item.get("embedding")
    if isinstance(emb, Mapping) and "b64" in emb:
        item["embedding"] = np.frombuffer(base64.b64decode(emb["b64"]), dtype="<f2").astype(np.float32)
    return item


# --- stage 8: selection, split ------------------------------------------------------------------


def selection_size(n: int, keep_fraction: float, max_rows: int | None = None) -> int:
    """How many of ``n`` rows a selection keeps: the fraction, rounded up, at least one of a
    non-empty pool, at most ``max_rows``."""
    size = 0 if n == 0 else min(n, max(1, math.ceil(n * keep_fraction - 1e-9)))
    return size if max_rows is None else min(size, max_rows)


NEIGHBOUR_REFERENCE_ROWS = 8192
""":func:`relative_quality` looks for a row's neighbours among at most this many rows (a seeded
sample of a larger pool), so its cost grows linearly with the pool."""


def relative_quality(
    unit: np.ndarray, quality: np.ndarray, neighbours: int, seed: int = 0, chunk: int = 1024
) -> np.ndarray:
    """Each row's quality measured against the requests most like it: its score minus the mean
    score of its ``neighbours`` nearest rows by cosine similarity (itself left out), plus the
    pool's mean, clipped to [0, 1].

    The scorers are not equally generous to every kind of request (a one-word answer is less
    "relevant" to its question than a long one is), so raw scores would make a selection prefer
    kinds over answers. Against its neighbours, a good answer to a kind of request that scores
    low still stands out, and a poor one to a kind that scores high does not. ``unit`` holds
    unit-length embeddings; pools over :data:`NEIGHBOUR_REFERENCE_ROWS` rows look for neighbours
    in a seeded sample of that many."""
    q = np.asarray(quality, dtype=np.float64)
    n = len(q)
    k = min(neighbours, n - 1)
    if k <= 0:
        return q.copy()
    reference = np.arange(n)
    if n > NEIGHBOUR_REFERENCE_ROWS:
        reference = np.sort(np.random.default_rng(seed).choice(n, NEIGHBOUR_REFERENCE_ROWS, replace=False))
    ref_unit, ref_q = unit[reference], q[reference]
    local = np.empty(n)
    for start in range(0, n, chunk):
        sim = unit[start : start + chunk] @ ref_unit.T
        rows = np.arange(start, min(start + chunk, n))
        # A row is not its own neighbour (when it is in the reference sample).
        own = np.searchsorted(reference, rows)
        is_own = (own < len(reference)) & (reference[np.minimum(own, len(reference) - 1)] == rows)
        sim[np.flatnonzero(is_own), own[is_own]] = -np.inf
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        local[start : start + chunk] = ref_q[nearest].mean(axis=1)
    return np.clip(q - local + q.mean(), 0.0, 1.0)


def diverse_indices(
    embeddings: np.ndarray,
    quality: np.ndarray,
    k: int,
    method: Literal["k_center", "k_means"] = "k_center",
    quality_weight: float = 1.0,
    seed: int = 0,
    confidence: np.ndarray | None = None,
    confidence_weight: float = 0.0,
    quality_neighbours: int = 0,
) -> np.ndarray:
    """``k`` row indices that cover the embedding space, weighted towards quality.

    A row's weight is ``quality ** quality_weight * confidence ** confidence_weight`` (a missing
    or NaN confidence counts as 1), the quality taken against its ``quality_neighbours`` nearest
    rows when that is not 0 (:func:`relative_quality`). ``k_center``: farthest-first greedy; it
    starts from the heaviest row and then takes the row whose cosine distance to the nearest
    chosen one, times its weight, is largest. ``k_means``: k clusters; from each, the row with
    the largest weight times its cosine similarity to the centroid (an empty cluster's place goes
    to the heaviest row left). Ties go to the lower index. Returns the indices in the order chosen.
    """
    n = len(embeddings)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    quality = np.asarray(quality, dtype=np.float64)
    if quality_neighbours:
        quality = relative_quality(x, quality, quality_neighbours, seed)
    weight = np.clip(quality, 1e-6, None) ** quality_weight
    if confidence is not None and confidence_weight:
        sure = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=1.0)
        weight = weight * np.clip(sure, 1e-6, None) ** confidence_weight
    chosen: list[int] = []
    if method == "k_center":
        first = int(np.argmax(weight))
        chosen.append(first)
        nearest = np.clip(1.0 - x @ x[first], 0.0, 2.0)
        taken = np.zeros(n, dtype=bool)
        taken[first] = True
        for _ in range(k - 1):
            priority = np.where(taken, -1.0, nearest * weight)
            i = int(np.argmax(priority))
            chosen.append(i)
            taken[i] = True
            nearest = np.minimum(nearest, np.clip(1.0 - x @ x[i], 0.0, 2.0))
        return np.asarray(chosen, dtype=np.int64)

    import warnings

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    model = (MiniBatchKMeans if n > 10_000 else KMeans)(n_clusters=k, random_state=seed, n_init=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates make fewer distinct points than k
        labels = model.fit_predict(x)
    centers = model.cluster_centers_
    centroids = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    taken = np.zeros(n, dtype=bool)
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        if members.size:
            best = members[int(np.argmax(weight[members] * (x[members] @ centroids[cluster])))]
            chosen.append(int(best))
            taken[best] = True
    for i in np.argsort(-weight, kind="stable"):
        if len(chosen) >= k:
            break
        if not taken[i]:
            chosen.append(int(i))
            taken[i] = True
    return np.asarray(chosen, dtype=np.int64)


def select_diverse(
    batch: Mapping[str, np.ndarray],
    keep_fraction: float = 0.5,
    method: Literal["k_center", "k_means"] = "k_center",
    quality_weight: float = 1.0,
    seed: int = 0,
    max_rows: int | None = None,
    confidence_weight: float = 0.0,
    quality_neighbours: int = 0,
) -> Batch:
    """Stage 8: the :func:`selection_size` rows :func:`diverse_indices` picks, by ``embedding``,
    ``quality_score`` (against its ``quality_neighbours`` nearest rows when not 0) and
    ``quality_confidence`` (when the batch has it). Rows are first put in id order, so the result
    does not depend on the order they arrived in."""
    n = _size(batch)
    if n == 0:
        return dict(batch)
    order = np.asarray(sorted(range(n), key=lambda i: _text(batch["interaction_id"][i])), dtype=np.int64)
    batch = take(batch, order)
    picked = diverse_indices(
        np.asarray(batch["embedding"]),
        np.asarray(batch["quality_score"]),
        selection_size(n, keep_fraction, max_rows),
        method,
        quality_weight,
        seed,
        batch.get("quality_confidence"),
        confidence_weight,
        quality_neighbours,
    )
    return take(batch, picked)


def split_fraction(interaction_id: str) -> float:
    """Where an id falls in [0, 1): the first 8 bytes of its SHA-256. The same interaction lands
    in the same split of every dataset, so no later dataset validates on what an earlier one trained on."""
    return int.from_bytes(hashlib.sha256(interaction_id.encode()).digest()[:8], "big") / 2.0**64


def assign_split(batch: Mapping[str, np.ndarray], validation_fraction: float = 0.1) -> Batch:
    """Stage 8b: ``split`` is ``validation`` where :func:`split_fraction` of the id is below the
    fraction, else ``train``. When that leaves validation empty (a small set) and there are at
    least two rows, the row with the lowest hash goes to validation, so one exists."""
    ids = [_text(i) for i in batch["interaction_id"]]
    where = np.asarray([split_fraction(i) for i in ids], dtype=np.float64)
    split = np.where(where < validation_fraction, "validation", "train").astype(object)
    if validation_fraction > 0 and len(ids) >= 2 and not (split == "validation").any():
        split[int(np.argmin(where))] = "validation"
    out = dict(batch)
    out["split"] = split
    return out


# --- writing ---------------------------------------------------------------------------------------


def _timestamp(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def to_table(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """The rows as a :data:`DATASET_SCHEMA` table, in interaction-id order."""
    n = _size(batch)
    order = sorted(range(n), key=lambda i: _text(batch["interaction_id"][i])) if n else []
    rows = take(batch, order) if n else {}

    def col(name: str) -> list[Any]:
        return [_text(v) for v in rows[name]] if n else []

    domains = (
        [
            [_text(lang), _text(task), *[f for f in _text(fw).split(",") if f]]
            for lang, task, fw in zip(rows["language"], rows["task"], rows["frameworks"])
        ]
        if n
        else []
    )
    arrays = {
        "interaction_id": col("interaction_id"),
        "timestamp": [_timestamp(t) for t in col("timestamp")],
        "instruction": col("instruction"),
        "input": col("input"),
        "output": col("output"),
        "quality_score": [float(q) for q in rows["quality_score"]] if n else [],
        "domain": domains,
        "complexity": col("complexity"),
        "learning_type": [LEARNING_TYPE] * n,
        "project_context": col("project_context"),
        "features": col("features"),
        "messages": col("messages"),
    }
    return pa.table({f.name: pa.array(arrays[f.name], type=f.type) for f in DATASET_SCHEMA}, schema=DATASET_SCHEMA)


def content_hash(*tables: pa.Table) -> str:
    """SHA-256 of the rows of the tables in order, every column, as canonical JSON (independent
    of the Parquet encoding, the dataset id and the time it was built)."""
    digest = hashlib.sha256()
    for table in tables:
        for row in table.to_pylist():
            digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
            digest.update(b"\n")
    return digest.hexdigest()


class QualityHistogram(BaseModel):
    """Quality scores of the rows written, in bins of 0.05."""

    model_config = ConfigDict(extra="forbid")

    edges: list[float] = Field(description="Bin edges, 0.0 to 1.0; a bin holds [left, right), the last also 1.0.")
    counts: list[int] = Field(description="Rows per bin.")
    mean: float | None = Field(description="Mean score (None without rows).")
    min: float | None = Field(description="Lowest score.")
    max: float | None = Field(description="Highest score.")


def quality_histogram(scores: Sequence[float] | np.ndarray) -> QualityHistogram:
    """The histogram of :class:`QualityHistogram` over ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    edges = np.round(np.linspace(0.0, 1.0, 21), 2)
    counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=edges)
    return QualityHistogram(
        edges=[float(e) for e in edges],
        counts=[int(c) for c in counts],
        mean=round(float(scores.mean()), 6) if scores.size else None,
        min=float(scores.min()) if scores.size else None,
        max=float(scores.max()) if scores.size else None,
    )


class Funnel(BaseModel):
    """Rows left after each stage, and what each stage removed."""

    model_config = ConfigDict(extra="forbid")

    scored: int = Field(description="Scored interactions in the window (the ids read).")
    above_threshold: int = Field(description="Read, with an answer, at or above their inclusion threshold.")
    exact_duplicates: int = Field(description="Removed: same normalised request and answer as a better row.")
    near_duplicates: int = Field(description="Removed: MinHash Jaccard at or above the threshold with a better row.")
    over_group_cap: int = Field(description="Removed by the balance: beyond their group's cap.")
    not_selected: int = Field(description="Removed by the diverse selection.")
    selected: int = Field(description="Rows written (train + validation).")
    train: int = Field(description="Rows in train.parquet.")
    validation: int = Field(description="Rows in validation.parquet.")


class QueryInfo(BaseModel):
    """Which interactions the dataset came from."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(description="Store engine: sqlite or postgres.")
    quality_status: str = Field(description="Status of the interactions read.")
    since: datetime | None = Field(description="Inclusive start of the window, if any.")
    until: datetime | None = Field(description="Exclusive end of the window, if any.")
    threshold: float = Field(description="Base inclusion threshold.")
    domain_adjustments: dict[str, float] = Field(description="Threshold adjustments per domain.")
    thresholds: dict[str, float] = Field(
        description="Inclusion threshold per 'language/complexity' ('*': a domain without an adjustment)."
    )


class DatasetManifest(BaseModel):
    """``manifest.json`` of a training dataset, beside its data files."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(description="The dataset's id, also its folder name.")
    created_at: datetime = Field(description="When it was written, in UTC.")
    uri: str = Field(description="Its folder: <storage_root>/datasets/<dataset_id>.")
    rows: int = Field(description="Rows written (train + validation).")
    content_hash: str = Field(description="SHA-256 of the rows, train then validation (content_hash()).")
    files: dict[str, str] = Field(description="SHA-256 of each data file, by name.")
    columns: dict[str, str] = Field(description="Parquet columns and their Arrow types.")
    funnel: Funnel = Field(description="Rows after each stage.")
    counts: dict[str, dict[str, int]] = Field(
        description="Rows written per domain (language), framework, task, complexity and split."
    )
    balance: dict[str, Any] = Field(description="Balance groups (rows per group before the cap), the cap, the share.")
    quality_histogram: QualityHistogram = Field(description="Quality scores of the rows written.")
    query: QueryInfo = Field(description="Which interactions it came from.")
    options: dict[str, Any] = Field(description="The DatasetConfig used.")
    seconds: float = Field(description="Time the build took.")


def count_rows(table: pa.Table) -> dict[str, dict[str, int]]:
    """``counts`` of a manifest for one table: rows per language, framework, task and complexity."""
    domains = table.column("domain").to_pylist()
    return {
        "domain": dict(sorted(Counter(d[0] for d in domains).items())),
        "framework": dict(sorted(Counter(f for d in domains for f in d[2:]).items())),
        "task": dict(sorted(Counter(d[1] for d in domains).items())),
        "complexity": dict(sorted(Counter(table.column("complexity").to_pylist()).items())),
    }


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"messages": json.loads(messages)}, ensure_ascii=False) + "\n"
            for messages in table.column("messages").to_pylist()
        )


def dataset_uri(storage_root: str, dataset_id: str) -> str:
    """Where a dataset lives: ``<storage_root>/datasets/<dataset_id>``."""
    if "://" in storage_root:
        return f"{storage_root.rstrip('/')}/{DATASETS_DIRNAME}/{dataset_id}"
    return str(Path(storage_root).expanduser().absolute() / DATASETS_DIRNAME / dataset_id)


def write_dataset(
    storage_root: str, train: pa.Table, validation: pa.Table, manifest: DatasetManifest
) -> DatasetManifest:
    """Write ``train.parquet``, ``validation.parquet`` (zstd), ``train.jsonl``, ``validation.jsonl``
    (one ``{"messages": [...]}`` per line, OpenAI's chat fine-tuning format) and ``manifest.json``
    under ``<storage_root>/datasets/<manifest.dataset_id>/``, filling in the manifest's ``uri``,
    ``files``, ``content_hash``, ``rows`` and ``columns``.

    A local root gets the folder built beside its target and renamed into place in one step; a
    URI root (``s3://…``) gets the files uploaded with ``manifest.json`` last, which is what makes
    the dataset exist for a reader.

    Raises:
        FileExistsError: a dataset with this id is already there.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    uri = dataset_uri(storage_root, manifest.dataset_id)
    remote = "://" in storage_root
    if remote:
        fs, target = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(f"{target}/{MANIFEST_FILE}").type != pafs.FileType.NotFound:
            raise FileExistsError(f"dataset_id {manifest.dataset_id!r} is already stored at {uri}")
        parent = None
    else:
        if Path(uri).exists():
            raise FileExistsError(f"dataset_id {manifest.dataset_id!r} is already stored at {uri}")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        parent = str(Path(uri).parent)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{manifest.dataset_id}-", dir=parent))
    try:
        pq.write_table(train, staging / "train.parquet", compression="zstd")
        pq.write_table(validation, staging / "validation.parquet", compression="zstd")
        _write_jsonl(train, staging / "train.jsonl")
        _write_jsonl(validation, staging / "validation.jsonl")
        manifest = manifest.model_copy(
            update={
                "uri": uri,
                "rows": train.num_rows + validation.num_rows,
                "content_hash": content_hash(train, validation),
                "files": {name: file_sha256(staging / name) for name in DATA_FILES},
                "columns": {f.name: str(f.type) for f in DATASET_SCHEMA},
            }
        )
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if remote:
            fs.create_dir(target, recursive=True)
            local = pafs.LocalFileSystem()
            for name in (*DATA_FILES, MANIFEST_FILE):
                pafs.copy_files(
                    (staging / name).as_posix(), f"{target}/{name}", source_filesystem=local, destination_filesystem=fs
                )
        else:
            os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide it from a cluster's other users
            try:
                os.rename(staging, uri)
            except OSError as exc:
                raise FileExistsError(f"dataset_id {manifest.dataset_id!r} is already stored at {uri}") from exc
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return manifest
