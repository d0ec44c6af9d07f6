"""Stage 2 (``app.learning.dataset.classification``): language, frameworks, task and complexity."""

from __future__ import annotations

import numpy as np
import pytest

from app.learning.dataset.classification import classify, classify_interaction, task_of
from tests.app.learning.dataset.samples import PY_ANSWER, PY_PROMPT, TS_ANSWER, TS_PROMPT, read_rows

BRANCHY = "\n".join(
    ["def route(kind, value):"]
    + [f"    {'if' if i == 0 else 'elif'} kind == {i} and value > {i}:\n        return {i}" for i in range(12)]
    + ["    return None"]
)


def test_classifies_a_python_generation_request() -> None:
    found = classify_interaction(PY_PROMPT, PY_ANSWER, {"technologies": ["python", "pytest"]})
    assert found.language == "python"
    assert found.frameworks == ("fastapi", "pytest")  # an import and a project technology
    assert found.task == "generation"
    assert found.complexity == "simple"
    assert found.domain == ["python", "generation", "fastapi", "pytest"]
    branchy = classify_interaction("Implement the router.", f"```python\n{BRANCHY}\n```")
    assert branchy.cyclomatic >= 13 and branchy.complexity in ("complex", "expert")


def test_classifies_a_typescript_debugging_request() -> None:
    found = classify_interaction(TS_PROMPT, TS_ANSWER, {"technologies": ["typescript", "nestjs"]})
    assert found.language == "typescript"
    assert found.frameworks == ("nestjs", "react", "zod")
    assert found.task == "debugging"
    assert found.complexity in ("simple", "moderate")
    # No code anywhere: the project's technologies, then the language the prompt names.
    go = classify_interaction("What is a closure?", "A function with its scope.", {"technologies": ["go"]})
    assert (go.language, go.task) == ("go", "explanation")
    node = classify_interaction("How does the event loop work in Node.js?", "It runs callbacks.")
    assert node.language == "javascript"
    assert classify_interaction("Hello", "Hi").language == "general"


@pytest.mark.parametrize(
    ("prompt", "task"),
    [
        ("Write unit tests for parse_config with pytest.", "testing"),
        ("Refactor this function to make it more readable.", "refactoring"),
        ("Explain what this regular expression does.", "explanation"),
        ("The build fails with ModuleNotFoundError: No module named 'yaml'.", "debugging"),
        ("Implement an LRU cache.\n```python\n# fix: tests fail, explain the bug\n```", "generation"),
        ("How do I implement `bisect_left` in Python?", "generation"),
    ],
)
def test_task_type_comes_from_the_prose_of_the_prompt(prompt: str, task: str) -> None:
    assert task_of(prompt) == task


def test_classify_stage_adds_columns() -> None:
    batch = read_rows(2, input=[PY_PROMPT, TS_PROMPT], output=[PY_ANSWER, TS_ANSWER])
    out = classify(batch)
    assert list(out["language"]) == ["python", "typescript"]
    assert list(out["task"]) == ["generation", "debugging"]
    assert out["frameworks"][1] == "react,zod" and out["code_lines"].dtype == np.int64
