"""Streaming assessment: provisional scores per window, and the circuit breaker on its budget."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.quality.streaming import CircuitBreaker, StreamingAssessor, _python_so_far, _tree_sitter_so_far


class SlowEmbedder:
    """An embedder that takes ``delay_s`` per call: the breaker's budget is what is under test."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def embed(self, texts):
        time.sleep(self.delay_s)
        return np.ones((len(texts), 4)) / 2.0


def _stream(assessor: StreamingAssessor, text: str, chunk: int = 17) -> list:
    windows = [w for i in range(0, len(text), chunk) for w in assessor.feed(text[i : i + chunk])]
    return windows + [assessor.finish()]


@pytest.mark.parametrize(
    ("code", "closed", "ok"),
    [
        ("def f(x):\n    return (x +", False, True),  # cut off mid-expression: incomplete
        ("def f(x:\n", False, True),
        ("def f(x):\n    return x +\nprint(1)\n", False, False),  # an error before the last line
        ("def f(x):\n    return (x +", True, False),  # the block closed: no longer incomplete
    ],
)
def test_python_syntax_so_far(code: str, closed: bool, ok: bool) -> None:
    assert _python_so_far(code, closed)[0] is ok


@pytest.mark.parametrize(
    ("code", "closed", "ok"),
    [
        ("function f(a: number) {\n  if (a > 1) {\n    return a;\n", False, True),
        ("function f(a: number) {\n  const x = ;\n  return a;\n", False, False),
        ("function f(a: number) {\n  return a;\n}\n", True, True),
        ("function f(a: number) {\n  return a;\n", True, False),
    ],
)
def test_typescript_syntax_so_far(code: str, closed: bool, ok: bool) -> None:
    assert _tree_sitter_so_far("typescript", code, closed)[0] is ok


def test_windows_follow_the_text_and_the_last_is_final() -> None:
    text = "Here you go:\n```python\n" + "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(20)) + "```\n"
    assessor = StreamingAssessor(
        "Write Python helpers",
        {"technologies": ["python"]},
        window_chars=100,
        budget_ms=5_000,
        embedder=SlowEmbedder(0.0),
    )
    windows = _stream(assessor, text)
    assert [w.window for w in windows] == list(range(1, len(windows) + 1))
    assert [w.chars for w in windows[:-1]] == [100 * (i + 1) for i in range(len(windows) - 1)]
    assert windows[-1].final and windows[-1].chars == len(text)
    assert all(w.checks["syntax"] == 1.0 and w.checks["language"] == 1.0 for w in windows[1:])
    assert not any(w.degraded for w in windows) and not any(w.flags for w in windows)


def test_a_secret_appearing_is_flagged_once_and_caps_the_score() -> None:
    text = "Configure the client:\n```python\nimport boto3\nKEY = 'AKIAIOSFODNN7EXAMPLE'\n```\n" + "More prose. " * 40
    assessor = StreamingAssessor(
        "Connect to S3 in Python", window_chars=40, budget_ms=5_000, embedder=SlowEmbedder(0.0)
    )
    windows = _stream(assessor, text, chunk=7)
    flagged = [w for w in windows if any(f.startswith("secret:") for f in w.flags)]
    assert len(flagged) == 1 and "secret:aws_key" in flagged[0].flags  # straddling windows: found once
    after = windows[windows.index(flagged[0]) :]
    assert all(w.provisional <= 0.2 for w in after)


def test_drifting_into_the_wrong_language_is_flagged() -> None:
    text = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assessor = StreamingAssessor(
        "Add two numbers",
        {"technologies": ["typescript", "react"]},
        window_chars=30,
        budget_ms=5_000,
        embedder=SlowEmbedder(0.0),
    )
    windows = _stream(assessor, text)
    assert any(f.startswith("language_drift:python") for f in windows[-1].flags)
    assert windows[-1].provisional <= 0.3
    # Without a project context the request's own words say which language is wanted.
    bare = _stream(
        StreamingAssessor("Write it in TypeScript", window_chars=30, budget_ms=5_000, embedder=SlowEmbedder(0.0)), text
    )
    assert bare[-1].checks["language"] == 0.0


def test_a_syntax_error_in_finished_code_is_flagged() -> None:
    text = "```typescript\nconst x: number = ;\nexport function f(): number { return x; }\n```\n"
    windows = _stream(StreamingAssessor("", window_chars=20, budget_ms=5_000), text)
    assert windows[-1].checks["syntax"] == 0.0
    assert any(f.startswith("syntax_error:typescript") for f in windows[-1].flags)


def test_past_the_budget_the_cheap_score_answers_and_the_breaker_opens() -> None:
    breaker = CircuitBreaker(failures=3, reset_after_s=0.3)
    assessor = StreamingAssessor(
        "Write a sort function", window_chars=10, budget_ms=20, breaker=breaker, embedder=SlowEmbedder(0.2)
    )
    started = time.perf_counter()
    windows = assessor.feed("x" * 60)
    assert len(windows) == 6
    assert all(w.degraded for w in windows)
    assert [w.breaker for w in windows[:3]] == ["closed", "closed", "open"]
    assert all(w.breaker == "open" for w in windows[3:])
    assert all(w.elapsed_ms < 100 for w in windows)  # never waits for the slow embedder
    assert time.perf_counter() - started < 0.6
    assert breaker.state == "open"
    time.sleep(0.35)
    assert breaker.state == "half_open"  # one window may try again
    breaker.record(True)
    assert breaker.state == "closed"
