"""The quality dimensions built so far, against the seed's formulas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.quality import assess_record, assess_text
from app.quality.aggregate import aggregate, confidence, context_completeness, time_decay
from app.quality.base import DimensionScore
from app.quality.code import check_python, extract_code_blocks
from app.quality.correctness import assess_correctness
from app.quality.efficiency import assess_efficiency
from app.quality.satisfaction import assess_satisfaction
from app.quality.thresholds import ThresholdManager

GOOD = "Use this:\n\n```python\nimport os\n\n\ndef join(a, b):\n    return os.path.join(a, b)\n```\n"
BROKEN = "Use this:\n\n```python\ndef join(a, b)\n    return a + b\n```\n"
TRUNCATED = "Use this:\n\n```python\ndef join(a, b):\n    return os.path"
TS = "```typescript\nexport function add(a: number, b: number): number {\n  return a + b;\n}\n```"


def test_satisfaction_is_the_seed_formula() -> None:
    full = assess_satisfaction(
        [{"explicit": {"rating": 4}, "implicit": {"accepted": True}, "temporal": {"time_to_first_use_s": 100}}]
    )
    assert full.score == pytest.approx(0.5 * 0.8 + 0.3 * 1.0 + 0.2 * 0.5)
    modified = assess_satisfaction([{"thumbs": "down", "modified": True, "time_to_first_use_s": 10}])
    assert modified.score == pytest.approx(0.5 * 0.0 + 0.3 * 0.7 + 0.2 * 1.0)


def test_missing_feedback_is_unknown_not_zero() -> None:
    assert assess_satisfaction([]) is None
    only_rating = assess_satisfaction([{"rating": 5}])
    assert only_rating.score == 1.0 and only_rating.subscores == {"explicit": 1.0}
    # Feedback in two events merges: the later value of a field wins.
    merged = assess_satisfaction([{"rating": 1}, {"rating": 5, "abandoned": True}])
    assert merged.subscores == {"explicit": 1.0, "implicit": 0.0}


def test_correctness_from_outcomes_is_the_seed_formula() -> None:
    all_ok = {
        k: True
        for k in (
            "code_compiles",
            "tests_pass",
            "lint_passes",
            "type_check_passes",
            "deployment_success",
            "no_runtime_errors",
        )
    }
    assert assess_correctness("", all_ok).score == 1.0
    tests_fail = dict(all_ok, tests_pass=False)
    assert assess_correctness("", tests_fail).score == pytest.approx(0.75)
    partial = assess_correctness("", [{"code_compiles": True}, {"tests_pass": False}])
    assert partial.score == pytest.approx(0.5) and partial.evidence["source"] == "outcomes"


def test_correctness_from_python_code() -> None:
    good, broken, truncated = (assess_correctness(r) for r in (GOOD, BROKEN, TRUNCATED))
    assert good.score == 1.0 and good.evidence["source"] == "static"
    assert broken.score <= 0.3 and "SyntaxError" in broken.evidence["errors"][0]
    assert truncated.score <= 0.5 and truncated.subscores["complete"] == 0.0
    unresolved = assess_correctness("```python\nimport surely_not_a_module\nx = 1\n```")
    assert unresolved.evidence["unresolved_imports"] == ["surely_not_a_module"] and unresolved.score < 1.0
    assert assess_correctness("Just use a loop.") is None  # no code, no outcomes: unknown


def test_code_blocks_and_languages() -> None:
    blocks = extract_code_blocks(GOOD + TS + "\n```\nconst x = () => 1;\n```")
    assert [b.language for b in blocks] == ["python", "typescript", "javascript"]
    assert all(b.closed for b in blocks) and not extract_code_blocks(TRUNCATED)[0].closed
    assert check_python("return 1").parses and not check_python("return 1").compiles


def test_efficiency_time_and_complexity() -> None:
    fast = assess_efficiency(GOOD, generation_time_ms=1500)
    slow = assess_efficiency(GOOD, generation_time_ms=12_000)
    assert fast.subscores["time"] == 1.0 and slow.subscores["time"] == 0.0
    branchy = (
        "```python\ndef f(x):\n"
        + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(12))
        + "    return -1\n```"
    )
    assert assess_efficiency(branchy).subscores["elegance"] < assess_efficiency(GOOD).subscores["elegance"]
    wall = "word " * 3000
    assert assess_efficiency(wall).subscores["conciseness"] == pytest.approx(0.2)


def test_aggregation_renormalises_over_known_dimensions() -> None:
    comps = {
        "user_satisfaction": DimensionScore("user_satisfaction", 1.0, evidence={"has_explicit": True}),
        "efficiency": DimensionScore("efficiency", 0.0),
    }
    score = aggregate(comps)
    assert score.overall == pytest.approx(0.30 / 0.40)
    assert set(score.components) == {"user_satisfaction", "efficiency"}
    assert score.interval[0] <= score.overall <= score.interval[1]
    with pytest.raises(ValueError, match="no dimension"):
        aggregate({})


def test_confidence_is_the_mean_of_the_seed_factors() -> None:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    explicit = {
        "user_satisfaction": DimensionScore("user_satisfaction", 1, evidence={"has_explicit": True}),
        "functional_correctness": DimensionScore("functional_correctness", 1, evidence={"source": "outcomes"}),
    }
    ctx = {
        "project_type": "lib",
        "technologies": ["python"],
        "architecture": "x",
        "git": {"branch": "m"},
        "build": {"system": "hatch"},
        "testing": {"framework": "pytest"},
    }
    assert confidence(explicit, ctx, now, now) == pytest.approx(1.0)
    assert confidence({}, None, now - timedelta(days=30), now) == pytest.approx((0.3 + 0.5 + 0.0 + 0.5) / 4)
    assert context_completeness({"project_type": "lib", "technologies": ["py"]}) == pytest.approx(2 / 6)
    assert time_decay(now - timedelta(days=60), now) == pytest.approx(0.25)


def test_assess_text_separates_good_from_broken_code() -> None:
    good = assess_text("join two paths", GOOD, generation_time_ms=800)
    broken = assess_text("join two paths", BROKEN, generation_time_ms=800)
    assert good.overall > broken.overall + 0.3
    assert 0 <= good.confidence <= 1 and good.assessor_version


def test_assess_record_reads_a_stored_interaction() -> None:
    record = {
        "input_raw": "join",
        "output_content": GOOD,
        "generation_time_ms": 500.0,
        "timestamp": "2026-11-01T10:00:00+00:00",
        "feedback": [{"rating": 5, "accepted": True}],
        "outcome": {"code_compiles": True, "tests_pass": True, "lint_passes": None},
        "context": None,
    }
    score = assess_record(record)
    assert score.components["user_satisfaction"] == 1.0 and score.components["functional_correctness"] == 1.0


def test_thresholds_follow_the_seed() -> None:
    tm = ThresholdManager()
    assert tm.threshold() == 0.70
    assert tm.threshold(complexity="simple") == pytest.approx(0.65)
    assert tm.threshold(complexity="expert") == pytest.approx(0.80)
    assert tm.threshold(level="exceptional", complexity="expert") == 0.95  # clamped
    tm.update({"typescript": 0.70, "python": 0.97})
    assert tm.threshold("typescript") == pytest.approx(0.72)
    assert tm.threshold("python") == pytest.approx(0.69)
    for _ in range(20):
        tm.update({"python": 0.99})
    assert tm.threshold("python", "simple") == 0.50
    with pytest.raises(ValueError, match="level"):
        tm.threshold(level="great")


@pytest.mark.parametrize(
    "code, ok",
    [
        (TS, True),
        ("```ts\nexport function add(a: number, b: number: number {\n  return a + ;\n}\n```", False),
        ("```javascript\nconst add = (a, b) => a + b;\nmodule.exports = { add };\n```", True),
        ("```js\nconst add = (a, b) => { return a + b;\n```", False),
        ('```tsx\nexport const App = () => <div className="x">hi</div>;\n```', True),
    ],
)
def test_typescript_and_javascript_are_parsed_with_tree_sitter(code: str, ok: bool) -> None:
    result = assess_correctness(code)
    assert result is not None and (result.score == 1.0) is ok
    if not ok:
        assert result.score <= 0.3 and "line" in result.evidence["errors"][0]


def test_languages_without_a_parser_give_no_evidence() -> None:
    assert assess_correctness('```haskell\nmain = putStrLn "hi"\n```') is None


BAD_PY = (
    "```python\nimport subprocess,pickle\ndef Run(cmd,l):\n  out=''\n  for a in l:\n    for b in l:\n"
    "      for c in l:\n        out += 'x'\n        l.index(c)\n  subprocess.call(cmd, shell=True)\n"
    "  return pickle.loads(out)\n```"
)


def test_code_quality_uses_ruff_radon_bandit_and_smells() -> None:
    from app.quality.code_quality import assess_code_quality, assess_code_quality_batch

    good = assess_code_quality(GOOD)
    bad = assess_code_quality(BAD_PY)
    assert good.score > 0.9 and bad.score < 0.5
    assert bad.evidence["ruff_violations"] > 0 and bad.evidence["bandit"].get("HIGH") == 1
    assert "loops nested three deep" in bad.evidence["smells"]
    assert bad.subscores["security"] < good.subscores["security"]
    batch = assess_code_quality_batch([GOOD, "no code here", BAD_PY, BROKEN])
    assert batch[1] is None and batch[3] is None  # nothing that parses: no evidence
    assert batch[0].score == good.score and batch[2].score == bad.score


PROJECT = {"project_type": "library", "technologies": ["python", "pytest"], "build": {"dependencies": ["requests>=2"]}}
REQUEST = "Write a Python function that joins two file system paths"


def test_relevance_uses_embeddings_language_and_libraries() -> None:
    from app.quality.relevance import assess_relevance

    fits = assess_relevance(REQUEST, GOOD, PROJECT)
    wrong_language = assess_relevance(REQUEST, TS, PROJECT)
    foreign_library = assess_relevance(
        REQUEST, "```python\nimport numpy as np\n\ndef join(a, b):\n    return np.char.add(a, b)\n```", PROJECT
    )
    off_topic = assess_relevance(REQUEST, "The weather in Paris is usually mild in spring, with some rain.", PROJECT)
    assert fits.score > 0.7
    assert wrong_language.score <= 0.3 and wrong_language.evidence["language_fit"] == 0.0
    assert foreign_library.evidence["missing_libraries"] == ["numpy"] and foreign_library.score < fits.score
    assert off_topic.score < 0.2
    # Without a project context, only the similarity to the request is known.
    bare = assess_relevance(REQUEST, GOOD)
    assert set(bare.subscores) == {"domain"}
    assert assess_relevance(REQUEST, "   ") is None


def test_assess_text_has_all_five_dimensions_with_full_evidence() -> None:
    score = assess_text(
        REQUEST,
        GOOD,
        feedback={"explicit": {"rating": 5}},
        outcome={"code_compiles": True},
        generation_time_ms=700,
        context=PROJECT,
    )
    assert set(score.components) == {
        "user_satisfaction",
        "functional_correctness",
        "code_quality",
        "context_relevance",
        "efficiency",
    }
    assert score.overall > 0.8


DOC_PROMPT = '''Complete this function:
```python
def below_zero(operations: list[int]) -> bool:
    """True if the running balance ever drops below zero.
    >>> below_zero([1, 2, 3])
    False
    >>> below_zero([1, 2, -4, 5])
    True
    """
```
'''
RIGHT = (
    "```python\ndef below_zero(operations: list[int]) -> bool:\n    balance = 0\n    for op in operations:\n"
    "        balance += op\n        if balance < 0:\n            return True\n    return False\n```"
)
OFF = RIGHT.replace("balance < 0", "balance < -1")  # off by one: still compiles, fails an example


def test_examples_in_the_prompt_run_against_the_response() -> None:
    right, wrong = assess_correctness(RIGHT, prompt=DOC_PROMPT), assess_correctness(OFF, prompt=DOC_PROMPT)
    assert right.subscores["tests"] == 1.0 and right.score == 1.0
    assert wrong.subscores["tests"] < 1.0 and wrong.score <= 0.5 and wrong.evidence["tests"]["failed"] >= 1
    static_only = assess_correctness(OFF, prompt=DOC_PROMPT, execute=False)
    assert "tests" not in static_only.subscores and static_only.score == 1.0  # why execution matters


def test_extracted_checks_cover_arrows_asserts_and_test_functions() -> None:
    from app.quality.examples import extract_tests

    prompt = "Write add. add(2, 3) -> 5 and add([1], [2]) == [1, 2].\nassert add(0, 0) == 0"
    response = "```python\ndef add(a, b):\n    return a + b\n\ndef test_add():\n    assert add(1, 1) == 2\n```"
    tests = extract_tests(prompt, response, {"add"})
    assert "assert (add(2, 3)) == (5)" in tests and "assert (add([1], [2])) == ([1, 2])" in tests
    assert "assert add(0, 0) == 0" in tests and any("test_add()" in t for t in tests)
    assert extract_tests("no examples here", response, {"add"}) == [tests[-1]]
    good = assess_correctness(response, prompt=prompt)
    bad = assess_correctness(response.replace("a + b", "a * b"), prompt=prompt)
    assert good.score == 1.0 and bad.score < 0.5
