"""Accuracy of an answer against a row's reference: exact, executed in the sandbox, or the
scorer's similarity; and the Python an answer holds."""

from __future__ import annotations

import json

import pytest

from app.validation.inputs import EvalCase, EvalSet, cases_from_table
from app.validation.measure import Answer, SetAnswers
from app.validation.performance import Judge, accuracy, python_code, same_text

ADD = "```python\ndef add(a, b):\n    return a + b\n```"


def _case(prompt: str, reference: str) -> EvalCase:
    rows = [
        {"messages": json.dumps([{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}])}
    ]
    (case,), _ = cases_from_table(rows, 1, prefix="t")
    return case


def test_python_code_of_an_answer() -> None:
    assert python_code(ADD) == "def add(a, b):\n    return a + b\n"
    assert python_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # unfenced program
    assert python_code("print(1)") == "print(1)"
    assert python_code("The answer is 42.") == ""  # prose, even where it would parse
    assert python_code("x = 1") == ""  # no definition, import or call: not a program
    assert python_code("") == ""
    assert same_text("  a  b\n", "a b") and not same_text("a b", "ab")


def test_exact_then_executed_then_similarity() -> None:
    judge = Judge()
    executed = _case("Write add(a, b).\n\nExample: add(2, 3) -> 5", ADD)
    assert executed.tests == ("assert (add(2, 3)) == (5)",)
    assert judge.score(executed, ADD + "\n") == ("exact", 1.0)
    other_way = "```python\ndef add(x, y):\n    return sum([x, y])\n```"
    assert judge.score(executed, other_way) == ("executed", 1.0)  # not the reference, still right
    assert judge.score(executed, "```python\ndef add(a, b):\n    return a - b\n```") == ("executed", 0.0)
    assert judge.score(executed, "I would add them.") == ("executed", 0.0)  # no code to run

    # A reference that fails the prompt's own examples makes them unusable: similarity instead.
    wrong_reference = _case("Write add(a, b).\n\nExample: add(2, 3) -> 6", ADD)
    assert judge.method(wrong_reference) == "similarity"

    prose = _case("How do I undo my last git commit but keep the changes?", "Run git reset --soft HEAD~1.")
    close = judge.score(prose, "Use git reset --soft HEAD~1 to undo the commit and keep your changes staged.")
    far = judge.score(prose, "Bananas are rich in potassium.")
    assert close[0] == far[0] == "similarity"
    assert close[1] > 0.5 > far[1]
    assert judge.score(prose, "") == ("similarity", 0.0)
    with pytest.raises(ValueError, match="no reference"):
        judge.score(EvalCase("s", ({"role": "user", "content": "x"},)), "y")


def test_accuracy_leaves_out_unanswered_rows() -> None:
    cases = tuple(_case(f"say {w}", w) for w in ("yes", "no", "maybe"))
    evaluated = EvalSet("own", "own", "/own", cases)

    def answer(text: str) -> Answer:
        return Answer(text, 5.0, 1, "stop")

    pair, rows = accuracy(
        Judge(),
        evaluated,
        SetAnswers(
            "own", (answer("yes"), answer("no"), None), (answer("yes"), answer("Bananas are rich in potassium."), None)
        ),
    )
    assert len(rows) == 2 and pair.candidate == 1.0 and pair.baseline < 1.0
    assert rows[1].candidate_method == "exact" and rows[1].baseline_method == "similarity"
    with pytest.raises(ValueError, match="no prompt fits"):
        accuracy(Judge(), evaluated, SetAnswers("own", (None,) * 3, (None,) * 3))
