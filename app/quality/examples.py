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
    r"(\[[^\]\n]*\]|\([^)\n]*\)|'[^'\n]*'|\"[^\"\n]*\"|[^\s,;]+?)[.,;]?(?=\s|$)(?!\s*[-+*/%=<>])"
)
# "Input: arr = [1, 2], k = 1" then "Output: [2]" (arguments by name or by position).
_INPUT_OUTPUT = re.compile(r"^\s*Input\s*:\s*(.+?)\s*\n(?:\s*\n)*\s*Output\s*:\s*(.+?)\s*$", re.M | re.I)
# "For s = "abc", c = "a" the result should be ('bc', False)" / "... the output should be 3."
_FOR_SHOULD = re.compile(
    r"\bFor\s+(.+?)\s*,?\s+the\s+(?:output|result)\s+(?:should|will)\s+be\s+(.+?)\s*\.?\s*$", re.M | re.I
)
_JSON_WORDS = {"true": "True", "false": "False", "null": "None"}


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


# Runs a docstring's examples in the sandbox. Written examples are often loose: ``>>> f(x) == y``
# with no output line (meant as a check), or ``"21"`` where Python prints ``'21'``; a comparison
# without output must print True, and outputs that are literals compare by value.
_DOCTEST_RUNNER = """import ast, doctest
class _Checker(doctest.OutputChecker):
    def check_output(self, want, got, flags):
        if super().check_output(want, got, flags):
            return True
        try:
            return ast.literal_eval(want.strip()) == ast.literal_eval(got.strip())
        except Exception:
            return False
__t = doctest.DocTestParser().get_doctest({text!r}, dict(globals()), 'examples', None, 0)
for __e in __t.examples:
    if not __e.want.strip():
        try:
            if isinstance(ast.parse(__e.source, mode='eval').body, ast.Compare):
                __e.want = 'True\\n'
        except SyntaxError:
            pass
__r = doctest.DocTestRunner(_Checker(), verbose=False, optionflags=doctest.NORMALIZE_WHITESPACE)
__r = __r.run(__t, out=lambda s: None)
assert __r.failed == 0, f'{{__r.failed}} of {{__r.attempted}} examples failed'
"""


def _doctest_snippet(text: str) -> str | None:
    if not _examples(text):
        return None
    return _DOCTEST_RUNNER.format(text=text)


def _literal(text: str) -> str | None:
    """``text`` as a Python literal (``true``/``false``/``null`` as written in prose), or None."""
    text = text.strip()
    for candidate in (text, _JSON_WORDS.get(text.lower(), text)):
        try:
            ast.literal_eval(candidate)
            return candidate
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _literal_example(m: re.Match[str]) -> str | None:
    """The expected value of ``f(1, [2]) -> 3``, an example; None for ``fib(n) -> fib(n-1) + ...``,
    a definition."""
    try:
        call = ast.parse(m.group(1), mode="eval").body
        if not isinstance(call, ast.Call):
            return None
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(arg)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return _literal(m.group(2))


def _literal_arguments(text: str) -> str | None:
    """``arr = [1, 2], k = 3`` or ``[1, 2], 3`` as positional call arguments (in the order written,
    which is the signature's in such examples); the longest comma-separated prefix that is one.
    None when nothing is."""
    pieces = text.split(",")
    for end in range(len(pieces), 0, -1):
        candidate = ",".join(pieces[:end]).strip()
        try:
            call = ast.parse(f"f({candidate})", mode="eval").body
        except SyntaxError:
            continue
        if not isinstance(call, ast.Call) or not (call.args or call.keywords):
            continue
        try:
            values = [*call.args, *(k.value for k in call.keywords)]
            for v in values:
                ast.literal_eval(v)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        return ", ".join(ast.unparse(v) for v in values)
    return None


def _target_function(prompt_blocks: list[str], code_blocks: list[str]) -> str | None:
    """The function that examples without a name are about: the last one the prompt's code
    declares (a signature to complete), else the one public function the response defines."""
    for blocks, only_one in ((prompt_blocks, False), (code_blocks, True)):
        names = []
        for code in blocks:
            try:
                tree = ast.parse(code)
            except SyntaxError:
                continue
            names += [
                n.name
                for n in tree.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
            ]
        if names and (not only_one or len(set(names)) == 1):
            return names[-1]
    return None


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
                expected = _literal_example(m)
                if (defined is None or name in defined) and m.group(1) not in doctest_lines and expected:
                    tests.append(f"assert ({m.group(1)}) == ({expected})")
    target = _target_function(prompt_blocks, code_blocks)
    if target is not None and (defined is None or target in defined):
        for text in texts:
            for pattern in (_INPUT_OUTPUT, _FOR_SHOULD):
                for m in pattern.finditer(text):
                    args, expected = _literal_arguments(m.group(1)), _literal(m.group(2))
                    if args is not None and expected is not None:
                        tests.append(f"assert ({target}({args})) == ({expected})")
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
