"""Code in a response: fenced blocks and their languages, and what Python's own parser,
compiler and import system say about the Python ones."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["CodeBlock", "PythonCheck", "SyntaxCheck", "check_python", "check_syntax", "extract_code_blocks"]

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_ALIASES = {
    "py": "python",
    "python3": "python",
    "py3": "python",
    "ts": "typescript",
    "js": "javascript",
    "jsx": "javascript",
    "node": "javascript",
    "sh": "bash",
    "shell": "bash",
    "zsh": "bash",
    "console": "bash",
    "rs": "rust",
    "golang": "go",
    "c++": "cpp",
    "cc": "cpp",
    "cs": "csharp",
    "c#": "csharp",
    "yml": "yaml",
    "rb": "ruby",
    "kt": "kotlin",
}


@dataclass(frozen=True)
class CodeBlock:
    language: str  # normalised; "" when the fence names none and no guess applies
    code: str
    closed: bool  # False when the response ends inside the block (a truncated answer)


def _guess_language(code: str) -> str:
    head = code.lstrip()[:400]
    if re.search(r"^\s*(def |class |import |from \w+ import )", head, re.M):
        return "python"
    if re.search(r"\b(const|let|function|interface|=>)\b", head):
        return "typescript" if re.search(r":\s*(string|number|boolean)\b|\binterface\b", head) else "javascript"
    return ""


def extract_code_blocks(text: str) -> list[CodeBlock]:
    """Fenced code blocks in order, with their languages (named in the fence, else guessed)."""
    blocks = []
    for m in _FENCE.finditer(text):
        lang = m.group(1).lower()
        lang = _ALIASES.get(lang, lang) or _guess_language(m.group(2))
        blocks.append(CodeBlock(lang, m.group(2), closed=m.group(0).endswith("```")))
    return blocks


@dataclass(frozen=True)
class PythonCheck:
    parses: bool
    compiles: bool
    error: str | None
    imports: tuple[str, ...]
    unresolved: tuple[str, ...]
    tree: ast.Module | None

    @property
    def imports_resolvable(self) -> float | None:
        """Share of imported top-level modules that this interpreter can find; None if none."""
        if not self.imports:
            return None
        return 1.0 - len(self.unresolved) / len(self.imports)


def _resolvable(module: str) -> bool:
    if module in sys.builtin_module_names or module in sys.stdlib_module_names:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_python(code: str) -> PythonCheck:
    """Parse and compile (never run) Python code, and resolve its absolute imports."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return PythonCheck(False, False, f"SyntaxError: {exc.msg} (line {exc.lineno})", (), (), None)
    try:
        compile(tree, "<response>", "exec")
        compiles, error = True, None
    except (SyntaxError, ValueError) as exc:  # e.g. 'return' outside function
        compiles, error = False, f"{type(exc).__name__}: {exc}"
    modules: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.extend(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module.split(".")[0])
    imports = tuple(dict.fromkeys(modules))
    unresolved = tuple(m for m in imports if not _resolvable(m))
    return PythonCheck(True, compiles, error, imports, unresolved, tree)


# --- other languages: tree-sitter grammars shipped in wheels (nothing downloaded) -------------


@dataclass(frozen=True)
class SyntaxCheck:
    language: str
    parses: bool
    error: str | None


_PARSERS: dict[str, Any] = {}


def _parser(language: str) -> Any | None:
    """A cached tree-sitter parser for a language, or None when no grammar is installed."""
    if language not in _PARSERS:
        try:
            from tree_sitter import Language, Parser

            if language in ("typescript", "tsx"):
                import tree_sitter_typescript as grammar

                lang = Language(grammar.language_tsx() if language == "tsx" else grammar.language_typescript())
            elif language == "javascript":
                import tree_sitter_javascript as grammar

                lang = Language(grammar.language())
            else:
                _PARSERS[language] = None
                return None
            _PARSERS[language] = Parser(lang)
        except ImportError:
            _PARSERS[language] = None
    return _PARSERS[language]


def _first_error(node: Any) -> Any | None:
    if node.type == "ERROR" or node.is_missing:
        return node
    if not node.has_error:
        return None
    for child in node.children:
        found = _first_error(child)
        if found is not None:
            return found
    return node


def check_syntax(language: str, code: str) -> SyntaxCheck | None:
    """Parse a block with Python's parser or a tree-sitter grammar; None for a language with no
    parser here (no evidence either way)."""
    if language == "python":
        result = check_python(code)
        return SyntaxCheck("python", result.parses and result.compiles, result.error)
    parser = _parser(language)
    if parser is None:
        return None
    tree = parser.parse(code.encode("utf-8"))
    if not tree.root_node.has_error:
        return SyntaxCheck(language, True, None)
    bad = _first_error(tree.root_node)
    row, col = bad.start_point if bad is not None else (0, 0)
    what = "missing " + bad.type if bad is not None and bad.is_missing else "syntax error"
    return SyntaxCheck(language, False, f"{what} (line {row + 1}, column {col + 1})")
