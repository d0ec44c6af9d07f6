"""The filter itself: :class:`PrivacyFilter` runs every scanner over a text, keeps the
highest-priority non-overlapping findings and splices in ``[REDACTED:<kind>]``; it also redacts JSON,
hashes ids and decides exclusion and sampling. :func:`redact` uses a default filter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.privacy.addresses import scan_emails, scan_home_paths, scan_url_passwords
from app.privacy.assignments import name_kind, scan_assignments
from app.privacy.candidates import P_TOKEN, Candidate, high_entropy, is_placeholder
from app.privacy.ip import scan_ipv6
from app.privacy.numbers import scan_numbers
from app.privacy.tokens import scan_tokens

__all__ = ["PrivacyFilter", "Redaction", "redact"]


@dataclass(frozen=True)
class Redaction:
    """The redacted text and the kinds replaced, one per replacement, in order of appearance."""

    text: str
    findings: tuple[str, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        """How many replacements of each kind."""
        return dict(Counter(self.findings))


def _placeholder(kind: str) -> str:
    return "[REDACTED:user]" if kind == "home_path" else f"[REDACTED:{kind}]"


# Each scan gets the text and its ASCII view (``encode("ascii", "replace")``: one byte per
# character, so offsets match, and fast ``bytes`` operations apply even to non-ASCII text).
_SCANS: tuple[Callable[[str, bytes, list[Candidate]], None], ...] = (
    scan_tokens,
    scan_numbers,
    scan_ipv6,
    scan_home_paths,
    scan_assignments,
)


def _compile_all(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, TypeError) as exc:
            raise ValueError(f"invalid {what} pattern {p!r}: {exc}") from None
    return compiled


def _json_key_kind(key: str) -> tuple[str | None, bool]:
    """(kind, needs_entropy) for a JSON key: its string value is replaced whole when the key names
    a password or secret; a bare ``key``/``keys`` or a ``…tokens`` count field only when the value
    looks generated (``{"key": "user_id"}``, ``{"max_tokens": "512"}`` are ordinary data)."""
    kind = name_kind(key)
    if kind is None:
        return None, False
    low = key.lower()
    return kind, low in ("key", "keys") or low.endswith("tokens")


class PrivacyFilter:
    """Redaction, exclusion, sampling and keyed hashing of ids, as configured for one collector.

    Args:
        hmac_key: the key for :meth:`hash_id`; kept private, never stored or returned.
        extra_patterns: regexes whose matches are redacted as ``custom``.
        exclude_patterns: regexes that exclude an interaction entirely (:meth:`excluded`).
        capture_rate: the share of sessions captured (:meth:`should_capture`), in [0, 1].

    Raises:
        ValueError: an invalid regex (named in the message), an empty key or a rate outside [0, 1].
    """

    def __init__(
        self,
        hmac_key: bytes,
        extra_patterns: Sequence[str] = (),
        exclude_patterns: Sequence[str] = (),
        capture_rate: float = 1.0,
    ) -> None:
        if not isinstance(hmac_key, (bytes, bytearray)) or not hmac_key:
            raise ValueError("hmac_key: must be non-empty bytes")
        if not 0.0 <= capture_rate <= 1.0:
            raise ValueError(f"capture_rate: {capture_rate} is outside [0, 1]")
        self.__key = bytes(hmac_key)
        self._custom = _compile_all(extra_patterns, "extra")
        self._exclude = _compile_all(exclude_patterns, "exclude")
        self.capture_rate = float(capture_rate)

    def __repr__(self) -> str:
        return (
            f"PrivacyFilter(extra_patterns={len(self._custom)}, exclude_patterns={len(self._exclude)}, "
            f"capture_rate={self.capture_rate})"
        )

    # --- redaction ------------------------------------------------------------------------------

    def redact(self, text: str) -> Redaction:
        """Replace personal data and secrets in ``text`` with ``[REDACTED:<kind>]``."""
        if not text:
            return Redaction(text)
        found: list[Candidate] = []
        ascii_view = text.encode("ascii", "replace")
        for scan in _SCANS:
            scan(text, ascii_view, found)
        if "@" in text:  # a memchr, ~50 ns: e-mails and URL passwords need an "@"
            scan_emails(text, found)
            if "://" in text:
                scan_url_passwords(text, found)
        for pattern in self._custom:
            found.extend((m.start(), m.end(), P_TOKEN, "custom") for m in pattern.finditer(text) if m.end() > m.start())
        if not found:
            return Redaction(text)
        return _apply(text, found)

    def redact_json(self, value: Any) -> tuple[Any, list[str]]:
        """Redact every string inside ``value`` (dicts, lists, tuples; keys too).

        A string under a key that names a password or secret (``password``, ``api_key``,
        ``token``, ``client_secret``…) is replaced whole unless it is a placeholder.

        Returns:
            The redacted copy and the kinds found, in traversal order.
        """
        found: list[str] = []
        return self._json(value, found, None), found

    def _json(self, value: Any, found: list[str], key_kind: tuple[str | None, bool] | None) -> Any:
        if isinstance(value, str):
            if key_kind and key_kind[0] and value.strip() and not is_placeholder(value):
                kind, needs_entropy = key_kind
                if not needs_entropy or high_entropy(value):
                    found.append(kind)
                    return _placeholder(kind)
            red = self.redact(value)
            found.extend(red.findings)
            return red.text
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for k, v in value.items():
                kind = _json_key_kind(k) if isinstance(k, str) else None
                if isinstance(k, str):
                    red = self.redact(k)
                    found.extend(red.findings)
                    k = red.text
                    while k in out:  # two keys redacted alike: keep both values
                        k += "'"
                out[k] = self._json(v, found, kind)
            return out
        if isinstance(value, (list, tuple)):
            items = [self._json(v, found, key_kind) for v in value]
            return items if isinstance(value, list) else tuple(items)
        return value

    # --- ids, exclusion, sampling ---------------------------------------------------------------

    def hash_id(self, value: str) -> str:
        """Keyed HMAC-SHA256 of ``value``, 32 hex characters: stable for a key, useless without it."""
        return hmac.new(self.__key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def excluded(self, *texts: str | None) -> bool:
        """True if any exclude pattern is found in any of ``texts`` (``None`` is skipped)."""
        return any(p.search(t) for t in texts if t for p in self._exclude)

    def should_capture(self, session_id: str) -> bool:
        """Whether this session is sampled: the same answer in every process for a session id.

        The SHA-256 of the id maps it to [0, 1); Python's ``hash()`` would differ per process.
        """
        if self.capture_rate >= 1.0:
            return True
        if self.capture_rate <= 0.0:
            return False
        digest = hashlib.sha256(b"kaizen-capture\0" + session_id.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.capture_rate


def _apply(text: str, found: list[Candidate]) -> Redaction:
    """Keep the highest-priority non-overlapping candidates and splice in their placeholders."""
    found.sort(key=lambda c: (-c[2], c[0], c[0] - c[1]))
    kept: list[Candidate] = []
    for c in found:
        if all(c[1] <= k[0] or c[0] >= k[1] for k in kept):
            kept.append(c)
    kept.sort()
    parts, pos = [], 0
    for start, end, _, kind in kept:
        parts += (text[pos:start], _placeholder(kind))
        pos = end
    parts.append(text[pos:])
    return Redaction("".join(parts), tuple(c[3] for c in kept))


# The module-level filter behind :func:`redact`. Its HMAC key is random because it never hashes
# anything that is stored; the collector builds its own :class:`PrivacyFilter` from config.
_DEFAULT = PrivacyFilter(hmac_key=secrets.token_bytes(32))


def redact(text: str) -> Redaction:
    """Redact ``text`` with the default filter (no extra patterns); see the module docstring."""
    return _DEFAULT.redact(text)
