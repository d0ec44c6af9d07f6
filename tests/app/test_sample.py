from __future__ import annotations

import ast
from datetime import UTC, datetime

from app.sample import sample_interactions, stdlib_functions


def test_samples_are_real_code_with_a_realistic_share_of_poor_answers() -> None:
    samples = list(sample_interactions(400, seed=3))
    poor = [s for s in samples if s.poor]
    assert 0.15 < len(poor) / len(samples) < 0.35
    good = [s for s in samples if not s.poor]
    for s in good[:50]:
        code = s.interaction["response"].split("```python\n", 1)[1].split("```", 1)[0]
        ast.parse(code)  # a good answer is real, parseable source
    broken = [s for s in poor if s.poor == "syntax_error"]
    assert broken
    for s in broken:
        code = s.interaction["response"].split("```python\n", 1)[1].split("```", 1)[0]
        try:
            ast.parse(code)
        except SyntaxError:
            continue
        raise AssertionError("a syntax_error sample parses")
    assert any(s.tool_calls for s in samples) and any(s.feedback for s in samples) and any(s.outcome for s in samples)


def test_samples_are_deterministic_and_never_in_the_future() -> None:
    a = [s.interaction for s in sample_interactions(300, seed=11)]
    b = [s.interaction for s in sample_interactions(300, seed=11)]
    assert [x["id"] for x in a] == [x["id"] for x in b] and [x["prompt"] for x in a] == [x["prompt"] for x in b]
    now = datetime.now(UTC)
    assert all(datetime.fromisoformat(x["timestamp"]) <= now for x in a)


def test_stdlib_functions_have_docs_and_source() -> None:
    functions = stdlib_functions()
    assert len(functions) > 100
    assert all(f.doc and f.source.lstrip().startswith(("def ", "@", "async def ")) for f in functions)
