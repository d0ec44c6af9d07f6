"""Runnable checks found in a prompt or a response: doctest examples, ``f(x) == y`` and
``f(x) -> y`` examples, ``assert`` lines, and ``test_*`` functions. Each becomes a snippet that
:func:`app.quality.sandbox.run_sandboxed` runs against the response's code."""

from __future__ import annotations

import ast
import doctest
import re
from collections.abc import Iterable

from app.quality.code import extract_code_blocks

__all__ = ["extract_tests"]

_ARROW = re.compile(
    r"(?<![\w.])([A-Za-z_]\w*\([^()\n]*\))\s*(?:->|==>|==|=>|\u279e|\u2192|returns|should return|should be)\s*"
    r"(\[[^\]\n]*\]|\([^)\n]*\)|'[^'\n]*'|\"[^\"\n]*\"|[^\s,;]+?)[.,;]?(?=\s|$)"
)


def _docstrings(code: str) -> Iterable[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _examples(text: str) -> list[doctest.Example]:
    try:
        return doctest.DocTestParser().get_examples(text)
    except ValueError:  # inconsistent indentation: not a usable doctest
        return []


def _doctest_snippet(text: str) -> str | None:
    if not _examples(text):
        return None
    return (
        "import doctest\n"
        f"__t = doctest.DocTestParser().get_doctest({text!r}, dict(globals()), 'examples', None, 0)\n"
        "__r = doctest.DocTestRunner(verbose=False, optionflags=doctest.NORMALIZE_WHITESPACE).run(__t, out=lambda s: None)\n"
        "assert __r.failed == 0, f'{__r.failed} of {__r.attempted} examples failed'\n"
    )


def _literal_example(m: re.Match[str]) -> bool:
    """``f(1, [2]) -> 3`` is an example; ``fib(n) -> fib(n-1) + fib(n-2)`` is a definition."""
    try:
        call = ast.parse(m.group(1), mode="eval").body
        assert isinstance(call, ast.Call)
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(arg)
        ast.literal_eval(m.group(2))
        return True
    except (SyntaxError, ValueError, AssertionError, TypeError):
        return False


def _valid(snippet: str) -> bool:
    try:
        ast.parse(snippet)
        return True
    except SyntaxError:
        return False


def extract_tests(prompt: str, response: str, defined: set[str] | None = None) -> list[str]:
    """Test snippets from the prompt and the response (deduplicated, each one parses).

    Args:
        defined: names the solution defines; ``f(x) -> y`` examples are kept only for these.
    """
    code_blocks = [b.code for b in extract_code_blocks(response) if b.language == "python"]
    prompt_blocks = [b.code for b in extract_code_blocks(prompt) if b.language == "python"] or [prompt]
    tests: list[str] = []
    # Doctests in the docstrings of the prompt's code (e.g. a function signature to complete) and the
    # response's code, and in the prompt's prose.
    prose = re.sub(r"```.*?(?:```|\Z)", "", prompt, flags=re.S)
    if prompt_blocks == [prompt] and _valid(prompt):
        prose = ""  # the prompt is itself code (a signature to complete): its docstrings say it all
    texts = [d for code in prompt_blocks + code_blocks for d in _docstrings(code)] + [prose]
    for text in texts:
        snippet = _doctest_snippet(text)
        if snippet:
            tests.append(snippet)
    doctest_lines = {ex.source.strip() for t in texts for ex in _examples(t)}
    for text in texts:
        for line in text.splitlines():
            if line.lstrip().startswith((">>>", "assert ", "def ", "return ")):
                continue
            for m in _ARROW.finditer(line):
                name = m.group(1).split("(")[0]
                if (defined is None or name in defined) and m.group(1) not in doctest_lines and _literal_example(m):
                    tests.append(f"assert ({m.group(1)}) == ({m.group(2)})")
    for text in [prose, *code_blocks]:
        for line in text.splitlines():
            if line.startswith("assert "):
                tests.append(line.strip())
    for code in code_blocks + prompt_blocks:
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                tests.append(ast.unparse(node) + f"\n{node.name}()\n")
    unique = list(dict.fromkeys(t for t in tests if _valid(t)))
    return unique
