"""Streaming assessment: a provisional quality score per window of a response while it is generated.

Every window runs the cheap checks on the text so far: do the code blocks parse *so far* (a block
still being written is incomplete, not wrong), has a secret or personal datum appeared (the
privacy filter), has the answer drifted into a language the project does not use. Within the
window's time budget it also runs the expensive check, the MiniLM similarity of the text so far to
the request. A :class:`CircuitBreaker` guards the budget: a window whose expensive check does not
finish in time is answered with the cheap score and marked ``degraded``; after ``failures`` such
windows in a row the breaker opens and later windows skip the expensive check until
``reset_after_s`` has passed (then one window tries again).
"""

from __future__ import annotations

import ast
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from app.privacy import KINDS, redact
from app.quality.base import clamp, weighted
from app.quality.code import _parser, extract_code_blocks
from app.quality.relevance import _LANGUAGE_NAMES, _language_fit, _project_words, _similarity_score, get_embedder

__all__ = ["CircuitBreaker", "StreamingAssessor", "WindowScore"]

# Kinds of finding that are secrets or personal data in an answer (a home path is only redacted).
_SENSITIVE = frozenset(KINDS) - {"home_path", "ipv4", "ipv6"}
_MENTION = {
    lang: re.compile(r"\b(" + "|".join(map(re.escape, sorted(words))) + r")\b", re.I)
    for lang, words in _LANGUAGE_NAMES.items()
    if lang != "tsx"
}
STREAM_EMBED_CHARS = 400
_SECRET_OVERLAP = 200  # characters of the previous window scanned again: a secret may straddle two


class CircuitBreaker:
    """Closed: the expensive check runs. Open: it is skipped. Half-open: one try decides."""

    def __init__(self, failures: int = 3, reset_after_s: float = 5.0):
        self.failures = failures
        self.reset_after_s = reset_after_s
        self._consecutive = 0
        self._opened_at: float | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if time.monotonic() - self._opened_at >= self.reset_after_s else "open"

    def allow(self) -> bool:
        return self.state != "open"

    def record(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._consecutive, self._opened_at = 0, None
                return
            self._consecutive += 1
            if self._consecutive >= self.failures or self._opened_at is not None:
                self._opened_at = time.monotonic()  # open, or re-open after a failed half-open try


@dataclass
class WindowScore:
    """The provisional assessment after one window."""

    window: int
    chars: int
    provisional: float
    checks: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    degraded: bool = False  # the expensive check was skipped or ran past the budget
    breaker: str = "closed"
    elapsed_ms: float = 0.0
    final: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _python_so_far(code: str, closed: bool) -> tuple[bool, str | None]:
    """(no syntax error so far, the error); code cut off mid-statement is incomplete, not wrong."""
    try:
        ast.parse(code)
        return True, None
    except SyntaxError as exc:
        last = len(code.rstrip("\n").split("\n"))
        incomplete = (
            "was never closed" in (exc.msg or "")
            or "unexpected EOF" in (exc.msg or "")
            or (exc.lineno is not None and exc.lineno >= last)
        )
        if incomplete and not closed:
            return True, None
        return False, f"{exc.msg} (line {exc.lineno})"


def _tree_sitter_so_far(language: str, code: str, closed: bool) -> tuple[bool, str | None] | None:
    parser = _parser(language)
    if parser is None:
        return None
    data = code.encode("utf-8")
    end = len(data.rstrip())
    stack = [parser.parse(data).root_node]
    while stack:
        node = stack.pop()
        if not node.has_error and not node.is_missing and node.type != "ERROR":
            continue
        if node.type == "ERROR" or node.is_missing:
            # A missing '}' or an error running into the end is a block still being written.
            if closed or (not node.is_missing and node.end_byte < end):
                row, col = node.start_point
                return False, f"syntax error (line {row + 1}, column {col + 1})"
            continue
        stack.extend(node.children)
    return True, None


def _expected_languages(prompt: str, context: Mapping[str, Any] | None) -> set[str]:
    """What the project or, without a project, the request names: language words as in relevance."""
    words = _project_words(context or {})
    if not words:
        words = {m.group(1).lower() for pattern in _MENTION.values() for m in pattern.finditer(prompt)}
    return words


class StreamingAssessor:
    """Feed a response chunk by chunk; get a :class:`WindowScore` per ``window_chars`` of new text.

    One assessor per response. ``executor`` and ``breaker`` may be shared by the assessors of a
    process (a replica), so that a slow embedder trips the breaker for every stream at once.
    """

    def __init__(
        self,
        prompt: str,
        context: Mapping[str, Any] | None = None,
        *,
        window_chars: int = 256,
        budget_ms: float = 20.0,
        breaker: CircuitBreaker | None = None,
        executor: ThreadPoolExecutor | None = None,
        embedder: Any | None = None,
    ):
        self.prompt = prompt
        self.window_chars = window_chars
        self.budget_s = budget_ms / 1000.0
        self.breaker = breaker or CircuitBreaker()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="kaizen-stream")
        self._embedder = embedder
        self._expected = _expected_languages(prompt, context)
        self.text = ""
        self._scored_upto = 0
        self._window = 0
        self._secrets: set[str] = set()
        self._prompt_vector: Any | None = None
        self._embedded_text: str | None = None
        self._similarity: float | None = None  # the latest similarity computed
        self._similarity_at = 0  # how much of the text it covers
        self._inflight: Future | None = None
        if prompt.strip() and self.breaker.allow():
            # Load the embedder and embed the request before the first window needs them.
            self._executor.submit(self._embed_prompt)

    def feed(self, chunk: str) -> list[WindowScore]:
        """Append generated text; the windows it completed (often none, sometimes several).

        Between windows the similarity is refreshed in the background, one computation at a time,
        so that a window usually finds a fresh one ready instead of waiting for it."""
        self.text += chunk
        self._refresh()
        out = []
        while len(self.text) - self._scored_upto >= self.window_chars:
            out.append(self._score(self._scored_upto + self.window_chars))
        return out

    def finish(self) -> WindowScore:
        """The last window (whatever text is left) marked final."""
        score = self._score(len(self.text))
        score.final = True
        return score

    # --- one window ------------------------------------------------------------------------------

    def _score(self, upto: int) -> WindowScore:
        started = time.perf_counter()
        text = self.text[:upto]
        new = self.text[max(0, self._scored_upto - _SECRET_OVERLAP) : upto]
        self._scored_upto = upto
        self._window += 1
        flags: list[str] = []

        # Cheap: syntax so far, per code block.
        syntax_ok: list[bool] = []
        languages = set()
        for block in extract_code_blocks(text):
            languages.add(block.language)
            if block.language == "python":
                ok, err = _python_so_far(block.code, block.closed)
            else:
                checked = _tree_sitter_so_far(block.language, block.code, block.closed)
                if checked is None:
                    continue
                ok, err = checked
            syntax_ok.append(ok)
            if not ok:
                flags.append(f"syntax_error:{block.language}: {err}")
        syntax = None if not syntax_ok else sum(syntax_ok) / len(syntax_ok)

        # Cheap: a secret or personal datum appearing in the new text.
        found = {kind for kind in redact(new).counts if kind in _SENSITIVE}
        for kind in sorted(found - self._secrets):
            flags.append(f"secret:{kind}")
        self._secrets |= found

        # Cheap: drifting into a language the project (or the request) does not use.
        language = _language_fit(languages, self._expected)
        if language == 0.0:
            flags.append("language_drift:" + ",".join(sorted(lang for lang in languages if lang in _LANGUAGE_NAMES)))

        # Expensive: the similarity of the text so far to the request. Fresh means computed on
        # text at most one window behind; a refresh in flight gets what is left of the budget.
        degraded = False
        if self.prompt.strip():
            if self.breaker.allow():
                deadline = started + self.budget_s
                while self._stale(upto):
                    self._refresh()  # a no-op while one is in flight
                    remaining = deadline - time.perf_counter()
                    if self._inflight is None or remaining <= 0:
                        break
                    try:
                        self._inflight.result(timeout=remaining)
                    except Exception:  # past the budget, or the embedder failed: the cheap score answers
                        break
            degraded = self._stale(upto)
            if self.breaker.state != "open":
                self.breaker.record(not degraded)

        parts = {
            "syntax": (0.4, syntax),
            "language": (0.3, language),
            "relevance": (0.3, None if self._similarity is None else _similarity_score(self._similarity)),
        }
        combined = weighted(parts)
        score, checks = combined if combined else (0.5, {})  # nothing to judge yet: undecided
        if self._secrets:
            score = min(score, 0.2)  # a leaked secret makes the answer unusable as it stands
            checks["secrets"] = 0.0
        if language == 0.0:
            score = min(score, 0.3)
        return WindowScore(
            window=self._window,
            chars=upto,
            provisional=round(clamp(score), 4),
            checks={k: round(v, 4) for k, v in checks.items()},
            flags=flags,
            degraded=degraded,
            breaker=self.breaker.state,
            elapsed_ms=round((time.perf_counter() - started) * 1000.0, 3),
        )

    def _stale(self, upto: int) -> bool:
        """No similarity yet, or one computed on text more than a window behind ``upto``."""
        return self._similarity is None or upto - self._similarity_at > self.window_chars

    def _refresh(self) -> None:
        """Start a similarity computation on the text so far, unless one is running or the
        breaker is open."""
        if not self.prompt.strip() or not self.breaker.allow():
            return
        if self._inflight is not None and not self._inflight.done():
            return
        if self._similarity_at >= min(len(self.text), STREAM_EMBED_CHARS) and self._similarity is not None:
            self._similarity_at = len(self.text)  # past the embedded head nothing can change
            return
        self._inflight = self._executor.submit(self._similarity_to_prompt, self.text, len(self.text))

    def _embed_prompt(self) -> Any:
        if self._prompt_vector is None:
            self._prompt_vector = (self._embedder or get_embedder()).embed([self.prompt[:STREAM_EMBED_CHARS]])[0]
        return self._prompt_vector

    def _similarity_to_prompt(self, text: str, covers: int) -> float:
        # What an answer is about shows in its first ~100 tokens; a short input keeps the
        # embedding within a window's budget, and past it the similarity cannot change.
        head = text[:STREAM_EMBED_CHARS]
        if head != self._embedded_text:
            vector = (self._embedder or get_embedder()).embed([head])[0]
            self._similarity = float(self._embed_prompt() @ vector)
            self._embedded_text = head
        self._similarity_at = max(self._similarity_at, covers)
        return self._similarity
