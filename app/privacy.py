"""The privacy filter, applied to every interaction before anything is stored.

It replaces personal data and secrets with ``[REDACTED:<kind>]`` and records only the kinds:

- personal data: e-mail addresses, IPv4 and IPv6 addresses (loopback, unspecified and the
  documentation ranges are kept: they identify nobody), US and international phone numbers, SSNs, Luhn-valid payment card
  numbers with or without separators, user names in home-directory paths;
- secrets: AWS, GCP and Azure keys, GitHub, GitLab, Slack, OpenAI and Stripe tokens, JWTs,
  private-key blocks, passwords in connection URLs and in assignments, high-entropy values
  assigned to names like key, token or secret; plus the precise token rules of detect-secrets'
  plugins (SendGrid, Twilio, npm, PyPI, Discord, Telegram, Mailchimp, Square, more GitLab kinds).

It must leave ordinary code alone, so every rule is anchored (a literal prefix, a keyword, a
checksum, ``ipaddress`` validation) and each is run only when a cheap substring test says it can
match: a typical 2 KB interaction with nothing to redact costs tens of microseconds.

Public API: :func:`redact` (module default filter) and :class:`PrivacyFilter`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PrivacyFilter", "Redaction", "redact"]


@dataclass(frozen=True)
class Redaction:
    """The redacted text and the kinds found, one entry per replacement, in order; never values."""

    text: str
    findings: tuple[str, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(self.findings))


def placeholder(kind: str) -> str:
    return f"[REDACTED:{kind}]"


# --- validators ------------------------------------------------------------------------------------


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_CARD_PREFIX = re.compile(r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9]|2)|35(?:2[89]|[3-8])")


def _card_ok_text(raw: str) -> bool:
    digits = re.sub(r"[ -]", "", raw)
    if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match(digits):
        return False
    seps = set(re.findall(r"[ -]", raw))
    if len(seps) > 1:
        return False
    return _luhn(digits)


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character (the measure detect-secrets uses)."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


_PLACEHOLDER = re.compile(
    r"""^(?:|\.{2,}|…|x+|X+|\*+|-+|_+|<[^>]*>|\{\{.*\}\}|\$\{[^}]*\}|\$[A-Z_][A-Z0-9_]*|%\(\w+\)s|%s|\{\w*\}|
    none|null|nil|true|false|undefined|password|passwd|secret|token|your[_-]?\w*|my[_-]?\w*|example\w*|
    changeme|dummy|test|placeholder|redacted|\[redacted[^\]]*\])$""",
    re.IGNORECASE | re.VERBOSE,
)


def _is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.match(value.strip()))


def _high_entropy(value: str) -> bool:
    v = value.strip()
    if len(v) < 16 or _is_placeholder(v) or " " in v:
        return False
    if not (re.search(r"\d", v) and re.search(r"[A-Za-z]", v)):
        return False
    # Hex digests carry at most 4 bits per character, base64-like tokens up to 6.
    limit = 3.0 if re.fullmatch(r"[0-9a-fA-F-]+", v) else 3.5
    return _entropy(v) >= limit


# --- rules ---------------------------------------------------------------------------------------

Accept = Callable[[re.Match[str], str], "tuple[int, int, str] | None"]


@dataclass(frozen=True)
class Rule:
    """One detector: literal needles (any must occur for the rule to run at all), a pattern, and
    an ``accept`` that validates a match and returns the span to replace and its kind."""

    kind: str
    pattern: re.Pattern[str]
    needles: tuple[str, ...] = ()
    accept: Accept | None = None


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _before(text: str, i: int) -> str:
    return text[i - 1] if i > 0 else ""


def _after(text: str, i: int) -> str:
    return text[i] if i < len(text) else ""


def _whole(kind: str, bad_before: str = "", bad_after: str = "", word_before: bool = True,
           word_after: bool = True, check: Callable[[str], bool] | None = None) -> Accept:  # fmt: skip
    """Accept the whole match when its neighbours are not word characters (or ``bad_*``)."""

    def accept(m: re.Match[str], text: str) -> tuple[int, int, str] | None:
        s, e = m.span()
        b, a = _before(text, s), _after(text, e)
        if b and ((word_before and _is_word(b)) or b in bad_before):
            return None
        if a and ((word_after and _is_word(a)) or a in bad_after):
            return None
        if check is not None and not check(m.group(0)):
            return None
        return s, e, kind

    return accept


def _value(kind: str, check: Callable[[str], bool] | None = None) -> Accept:
    """Accept the ``value`` group only."""

    def accept(m: re.Match[str], text: str) -> tuple[int, int, str] | None:
        if check is not None and not check(m.group("value")):
            return None
        s, e = m.span("value")
        return (s, e, kind) if e > s else None

    return accept


# Reserved for documentation (RFC 5737, RFC 3849): example addresses identify nobody.
_DOC_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def _is_mask(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A netmask (ones then zeros) or hostmask (zeros then ones)."""
    bits = int(ip)
    width = ip.max_prefixlen
    inverted = bits ^ ((1 << width) - 1)
    return any(v & (v + 1) == 0 for v in (bits, inverted))


def _identifying(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address can point at a person's machine: not loopback, unspecified, multicast,
    reserved, link-local, a mask, or a documentation example."""
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local:
        return False
    if _is_mask(ip):
        return False
    return not any(ip.version == net.version and ip in net for net in _DOC_NETS)


def _network_cidr(text: str, end: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """``10.0.0.0/8``: a network (host bits zero) names a range of addresses, not a host."""
    m = re.match(r"/(\d{1,3})(?!\d)", text[end : end + 5])
    if not m or int(m.group(1)) > ip.max_prefixlen:
        return False
    try:
        ipaddress.ip_network(f"{ip}/{m.group(1)}", strict=True)
        return True
    except ValueError:
        return False


def _ip_accept(kind: str, base: Accept) -> Accept:
    def accept(m: re.Match[str], text: str) -> tuple[int, int, str] | None:
        span = base(m, text)
        if span is None:
            return None
        if _network_cidr(text, span[1], ipaddress.ip_address(text[span[0] : span[1]])):
            return None
        return span

    return accept


def _ipv4_check(s: str) -> bool:
    try:
        return _identifying(ipaddress.IPv4Address(s))
    except ValueError:
        return False


def _ipv4_accept(m: re.Match[str], text: str) -> tuple[int, int, str] | None:
    span = _whole("ipv4", bad_before=".=-", bad_after=".", check=_ipv4_check)(m, text)
    # "__version__ = '1.2.3.4'": a four-part version, not an address.
    if span and "version" in text[max(0, span[0] - 40) : span[0]].lower():
        return None
    return span


def _ipv6_check(s: str) -> bool:
    if s.count(":") < 2:
        return False
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return _identifying(ip) and ("::" not in s or len(s) >= 6)


def _us_phone_check(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    if len(digits) == 11:
        digits = digits[1:]
    return len(digits) == 10 and digits[0] in "23456789"


def _email_accept(m: re.Match[str], text: str) -> tuple[int, int, str] | None:
    # The pattern finds "@domain.tld"; walk left over the local part.
    at = m.start()
    s = at
    while s > 0 and s > at - 64 and (text[s - 1].isalnum() or text[s - 1] in "._%+-"):
        s -= 1
    while s < at and text[s] in "._%+-":
        s += 1
    local = text[s:at]
    b = _before(text, s)
    if not local or local == "git" or (b and b in "/:"):  # ssh remotes, URLs' user@host
        return None
    e = m.end()
    if _after(text, e) and (_is_word(_after(text, e))):
        return None
    return s, e, "email"


_PASSWORD_WORDS = ("password", "passwd", "passphrase", "pwd", "pass")
_SECRET_WORDS = ("secret", "token", "credential", "credentials", "auth", "key")
_KEYWORDS = _PASSWORD_WORDS + _SECRET_WORDS
# At a keyword: KEYWORD["']? (:|=|:=|=>) then a quoted value, or a bare value ending the line
# (.env, YAML, INI). Matched only where str.find located a keyword: one regex of thirty case
# variants would cost a full, slow scan of every text.
_ASSIGNMENT = re.compile(
    r"(?i:(?P<name>" + "|".join(sorted(_KEYWORDS, key=len, reverse=True)) + r"))[\"']?[ \t]*(?::=|=>|:|=)[ \t]*"
    r"(?:(?P<q>[\"'])(?P<quoted>[^\"'\r\n]{1,500})(?P=q)|(?P<bare>[^\s\"'#;,()\[\]{}]{3,500})[ \t]*(?=\r?\n|$))"
)
_LINE_NAME = re.compile(r"[ \t]*(?:export[ \t]+)?[\"']?[\w.-]*$")


def _assignment_accept(m: re.Match[str], text: str) -> tuple[int, int, str] | None:
    name = m.group("name").lower()
    b = _before(text, m.start())
    password = name in _PASSWORD_WORDS
    # "bypass", "compass", "monkey": only a name that ends in the keyword as its own word part.
    if name in ("pass", "key") and b.isalpha() and not (name == "key" and b.islower() is False):
        if name == "pass" or not text[max(0, m.start() - 8) : m.start()].lower().endswith(
            ("api", "access", "private", "signing", "secret", "encryption", "client", "master", "app")
        ):
            return None
    if _after(text, m.end("name")) not in "\"' \t:=":
        return None
    if m.group("quoted") is not None:
        value, group = m.group("quoted"), "quoted"
    else:
        value, group = m.group("bare"), "bare"
        # A bare value only on a line of its own, with the name starting the line.
        line_start = text.rfind("\n", 0, m.start()) + 1
        if not _LINE_NAME.fullmatch(text, line_start, m.start()):
            return None
        if re.fullmatch(r"\d+(?:\.\d+)?|\$\w+", value) or (
            re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", value) and not re.search(r"\d", value)
        ):
            return None  # an identifier, attribute path or number: code, not a secret
    if _is_placeholder(value):
        return None
    if not password and not _high_entropy(value):
        return None
    s, e = m.span(group)
    return s, e, "password_assignment" if password else "secret_assignment"


def _rx(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


_RULES: tuple[Rule, ...] = (
    Rule("private_key", _rx(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S), ("PRIVATE KEY",)),
    Rule("jwt", _rx(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{8,}"), ("eyJ",), _whole("jwt")),
    Rule("aws_key", _rx(r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"), ("A3T", "AKIA", "ASIA", "ABIA", "ACCA"), _whole("aws_key")),
    Rule("gcp_key", _rx(r"AIza[0-9A-Za-z_-]{35}"), ("AIza",), _whole("gcp_key", bad_after="-")),
    Rule("azure_key", _rx(r"(?i)(?:AccountKey|SharedAccessKey|SharedSecretValue)=(?P<value>[A-Za-z0-9+/=]{20,})"), ("Key=", "Value=", "key=", "value="), _value("azure_key")),
    Rule("azure_key", _rx(r"[?&]sig=(?P<value>[A-Za-z0-9%+/=]{30,})"), ("sig=",), _value("azure_key")),
    Rule("github_token", _rx(r"(?:gh[pousr]_[A-Za-z0-9_]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"), ("gh",), _whole("github_token")),
    Rule("gitlab_token", _rx(r"(?:glpat|gldt|glft|glsoat|glrt|glcbt|glimt|glptt|glagent|gloas)-[A-Za-z0-9_-]{20,1024}"), ("gl",), _whole("gitlab_token", bad_after="-")),
    Rule("slack_token", _rx(r"xox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+"), ("xox", "hooks.slack.com"), _whole("slack_token")),
    Rule("openai_key", _rx(r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"), ("sk-",), _whole("openai_key", bad_after="-")),
    Rule("stripe_key", _rx(r"(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}"), ("_live_", "_test_"), _whole("stripe_key")),
    Rule("url_password", _rx(r"[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@'\"]*:(?P<value>[^\s@/'\"]+)@"), ("://",), _value("url_password", lambda v: not _is_placeholder(v))),
    Rule("email", _rx(r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}"), ("@",), _email_accept),
    Rule("home_path", _rx(r"(?:/home/|/Users/|[A-Za-z]:(?:\\\\|\\)Users(?:\\\\|\\))(?P<value>[A-Za-z0-9._-]+)"), ("/home/", "Users"), _value("home_path", lambda v: v.lower() not in {"shared", "public", "default", "user", "username", "me", "you"})),
    Rule("ipv6", _rx(r"(?:[0-9A-Fa-f]{1,4}:|::)[0-9A-Fa-f:]{2,37}"), ("::",), _ip_accept("ipv6", _whole("ipv6", bad_before=":.", bad_after=":", check=_ipv6_check))),
)  # fmt: skip

# Full-form IPv6 (no "::") needs this shape somewhere; the gate is a literal-led, fast search.
_IPV6_FULL_GATE = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_IPV6_RULE = _RULES[-1]

# Rules over runs of digits run only inside candidate runs found by one pass over the text.
_DIGIT_CANDIDATE = re.compile(r"\d[\d ().\-]{5,24}\d")
_DIGIT_RULES: tuple[Rule, ...] = (
    Rule("ipv4", _rx(r"(?:\d{1,3}\.){3}\d{1,3}"), (), _ip_accept("ipv4", _ipv4_accept)),
    Rule("ssn", _rx(r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}"), (), _whole("ssn", bad_before="-", bad_after="-")),
    Rule("card", _rx(r"\d(?:[ -]?\d){12,18}"), (), _whole("card", bad_before=".-", bad_after=".-", check=lambda s: _card_ok_text(s))),
    Rule("phone", _rx(r"(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"), (), _whole("phone", bad_before="+.-", bad_after="-", check=_us_phone_check)),
    Rule("phone", _rx(r"\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,5}\)?){2,5}"), (), _whole("phone", bad_before="+", bad_after="-", check=lambda s: 8 <= sum(c.isdigit() for c in s) <= 15)),
)  # fmt: skip
def _detect_secrets_rules() -> tuple[Rule, ...]:
    """Precise token rules of detect-secrets' plugins that the rules above do not cover.

    Only plugins whose patterns start with a distinctive literal are taken: generic keyword and
    entropy plugins would flag ordinary code, and patterns without a literal (Discord, Telegram)
    would cost a full scan of every text for tokens that rarely occur.
    """
    try:
        from detect_secrets.plugins.mailchimp import MailchimpDetector
        from detect_secrets.plugins.npm import NpmDetector
        from detect_secrets.plugins.pypi_token import PypiTokenDetector
        from detect_secrets.plugins.sendgrid import SendGridDetector
        from detect_secrets.plugins.square_oauth import SquareOAuthDetector
        from detect_secrets.plugins.twilio import TwilioKeyDetector
    except ImportError:  # without detect-secrets the built-in rules still apply
        return ()
    plugins: list[tuple[str, Any, tuple[str, ...]]] = [
        ("sendgrid_key", SendGridDetector, ("SG.",)),
        ("twilio_key", TwilioKeyDetector, ()),  # literal-led patterns: no gate needed
        ("npm_token", NpmDetector, ("_authToken",)),
        ("pypi_token", PypiTokenDetector, ("pypi-",)),
        ("mailchimp_key", MailchimpDetector, ("-us",)),
        ("square_secret", SquareOAuthDetector, ("sq0csp-",)),
    ]
    return tuple(
        Rule(kind, pattern, needles, _whole(kind, bad_after="-"))
        for kind, plugin, needles in plugins
        for pattern in plugin.denylist
    )


_ALL_RULES: tuple[Rule, ...] = _RULES + _detect_secrets_rules()
_SENSITIVE_KEY = re.compile(
    r"(?i)^[\w.-]*(?:password|passwd|passphrase|pwd|secret|token|credentials?|api[_-]?key|apikey|"
    r"access[_-]?key|private[_-]?key|client[_-]?secret|auth[_-]?token)$|^(?:[\w.-]*[_.-])?pass$"
)


# --- the filter ----------------------------------------------------------------------------------


class PrivacyFilter:
    """Redaction, keyed id hashing, exclusion and deterministic session sampling.

    Args:
        hmac_key: Key of the HMAC that hashes session and user ids; never stored with the data.
        extra_patterns: Regexes whose matches are redacted as ``custom``.
        exclude_patterns: Regexes; an interaction whose text matches one is dropped whole.
        capture_rate: Share of sessions captured, 0.0-1.0.

    Raises:
        ValueError: an extra or exclude pattern that is not a valid regex (named).
    """

    def __init__(
        self,
        hmac_key: bytes,
        extra_patterns: Sequence[str] = (),
        exclude_patterns: Sequence[str] = (),
        capture_rate: float = 1.0,
    ):
        self._key = bytes(hmac_key)
        self.capture_rate = capture_rate
        self._rules = _ALL_RULES + tuple(Rule("custom", _compile(p, "extra pattern")) for p in extra_patterns)
        self._exclude = tuple(_compile(p, "exclude pattern") for p in exclude_patterns)

    def __repr__(self) -> str:  # never show the key
        return f"PrivacyFilter(rules={len(self._rules)}, exclude={len(self._exclude)}, capture_rate={self.capture_rate})"

    def redact(self, text: str) -> Redaction:
        """Replace personal data and secrets in ``text``; see the module docstring."""
        if not text:
            return Redaction(text)
        spans: list[tuple[int, int, str]] = []
        for rule in self._rules:
            if rule.needles:
                for needle in rule.needles:
                    if needle in text:
                        break
                else:
                    continue
            self._apply(rule, text, spans)
        self._assignments(text, spans)
        if ":" in text and _IPV6_FULL_GATE.search(text) and "::" not in text:
            self._apply(_IPV6_RULE, text, spans)
        for cand in _DIGIT_CANDIDATE.finditer(text):
            lo, hi = max(0, cand.start() - 3), min(len(text), cand.end() + 1)
            for rule in _DIGIT_RULES:
                self._apply(rule, text, spans, lo, hi)
        if not spans:
            return Redaction(text)
        # Earlier rules are more specific; among overlapping spans keep the first-found, widest.
        spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        out, findings, pos = [], [], 0
        for start, end, kind in spans:
            if start < pos:
                continue
            out.append(text[pos:start])
            out.append(placeholder(kind))
            findings.append(kind)
            pos = end
        out.append(text[pos:])
        return Redaction("".join(out), tuple(findings))

    @staticmethod
    def _assignments(text: str, spans: list[tuple[int, int, str]]) -> None:
        if "=" not in text and ":" not in text:
            return
        lower = text.lower()
        starts: set[int] = set()
        for word in ("pass", "pwd", "secret", "token", "credential", "auth", "key"):
            i = lower.find(word)
            while i != -1:
                starts.add(i)
                i = lower.find(word, i + 1)
        for i in sorted(starts):
            m = _ASSIGNMENT.match(text, i)
            if m is not None and (span := _assignment_accept(m, text)) is not None:
                spans.append(span)

    @staticmethod
    def _apply(rule: Rule, text: str, spans: list[tuple[int, int, str]], lo: int = 0, hi: int | None = None) -> None:
        matches = rule.pattern.finditer(text, lo, len(text) if hi is None else hi)
        for m in matches:
            if rule.accept is None:
                if m.end() > m.start():
                    spans.append((m.start(), m.end(), rule.kind))
            elif (span := rule.accept(m, text)) is not None:
                spans.append(span)

    def redact_json(self, value: Any) -> tuple[Any, list[str]]:
        """Redact every string inside nested dicts and lists; values under sensitive key names
        (password, token, api_key, secret, ...) are replaced whole.

        Returns:
            The redacted copy and the kinds found.
        """
        found: list[str] = []
        return self._walk(value, found, None), found

    def _walk(self, value: Any, found: list[str], key: str | None) -> Any:
        if isinstance(value, str):
            if key is not None and value.strip() and _SENSITIVE_KEY.match(key) and not _is_placeholder(value):
                kind = "password_assignment" if re.search(r"(?i)pass|pwd", key) else "secret_assignment"
                found.append(kind)
                return placeholder(kind)
            red = self.redact(value)
            found.extend(red.findings)
            return red.text
        if isinstance(value, dict):
            return {k: self._walk(v, found, k if isinstance(k, str) else None) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._walk(v, found, key) for v in value]
        return value

    def hash_id(self, value: str) -> str:
        """Keyed HMAC-SHA256 of an id, 32 hex characters: stable for a key, useless without it."""
        return hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def excluded(self, *texts: str | None) -> bool:
        """True when any exclude pattern occurs in any of ``texts``."""
        return any(p.search(t) for p in self._exclude for t in texts if t)

    def should_capture(self, session_id: str) -> bool:
        """Deterministic sampling by session: a session is always in or always out."""
        if self.capture_rate >= 1.0:
            return True
        if self.capture_rate <= 0.0:
            return False
        digest = hmac.new(self._key, b"capture:" + session_id.encode("utf-8"), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.capture_rate


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


_DEFAULT = PrivacyFilter(hmac_key=b"kaizen-default-filter")


def redact(text: str) -> Redaction:
    """Redact ``text`` with the default rules (no custom patterns)."""
    return _DEFAULT.redact(text)


def kinds() -> list[str]:
    """Every kind the default rules can report."""
    return sorted({r.kind for r in _ALL_RULES})


def iter_rules() -> Iterable[Rule]:
    return iter(_ALL_RULES)
