"""Stage 2 of ``jobs/build_dataset.py``: the domain and the complexity of each interaction.

Domain: the language (from code fences, else the project's technologies, else the prompt), the
frameworks (from the technologies and the code's imports) and the task type (from the prompt).
Complexity: code lines and cyclomatic complexity (radon for Python), and the prompt's length.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.learning.dataset.batch import Batch, as_text, object_array
from app.quality.code import extract_code_blocks

__all__ = [
    "COMPLEXITIES",
    "TASKS",
    "UNKNOWN_LANGUAGE",
    "Classification",
    "classify",
    "classify_interaction",
    "task_of",
]

TASKS = ("generation", "debugging", "refactoring", "explanation", "testing")
COMPLEXITIES = ("simple", "moderate", "complex", "expert")
UNKNOWN_LANGUAGE = "general"

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
        classify_interaction(as_text(prompt), as_text(response), json.loads(as_text(ctx) or "{}"))
        for prompt, response, ctx in zip(batch["input"], batch["output"], batch["context_json"])
    ]
    out = dict(batch)
    out["language"] = object_array(c.language for c in found)
    out["task"] = object_array(c.task for c in found)
    out["frameworks"] = object_array(",".join(c.frameworks) for c in found)
    out["complexity"] = object_array(c.complexity for c in found)
    for name in ("code_blocks", "code_lines", "cyclomatic", "prompt_words"):
        out[name] = np.asarray([getattr(c, name) for c in found], dtype=np.int64)
    return out
