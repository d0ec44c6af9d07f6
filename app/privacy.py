"""The privacy filter applied to every interaction before it is stored.

:func:`redact` (and :meth:`PrivacyFilter.redact`) replaces personal data and secrets in free text
with ``[REDACTED:<kind>]`` and reports the kinds found, never the values:

* personal data: ``email``, ``ipv4``, ``ipv6``, ``phone``, ``ssn``, ``card`` (Luhn-checked) and
  ``home_path`` (only the user name: ``/home/[REDACTED:user]/src``);
* secrets with a recognisable shape: ``aws_key``, ``gcp_key``, ``azure_key``, ``github_token``,
  ``gitlab_token``, ``slack_token``, ``openai_key``, ``stripe_key``, ``jwt``, ``private_key``
  (the whole PEM block) and ``url_password`` (``postgres://user:[REDACTED:url_password]@host``);
* secrets found by their name: ``password_assignment`` (any literal that is not a placeholder,
  assigned to a name ending in password/passwd/pwd/pass) and ``secret_assignment`` (a
  high-entropy literal assigned to a name ending in key/token/secret/credential/auth);
* ``custom``: the operator's extra regexes (``privacy.exclude_sensitive_patterns``).

Policy calls worth knowing (each has a test):

* Loopback and unspecified addresses (``127.0.0.1``, ``0.0.0.0``, ``::1``, ``::``) and netmasks
  (``255.x.x.x``) are kept: they identify nobody and are everywhere in code. Every other valid
  address is redacted, private ranges included (they map an internal network). A dotted quad
  right after ``==``/``>=``/``v``/``version`` is read as a version, not an address.
* Assignments in code keep their expressions: ``password = os.environ["DB_PASSWORD"]``,
  ``token = request.headers[...]``, ``secret_key = settings.SECRET_KEY``, ``password = None``
  are left alone; only literals are redacted, and the quotes around them are kept.
* Placeholders are kept: ``""``, ``"..."``, ``"xxx"``, ``"***"``, ``"<password>"``,
  ``"${DB_PASSWORD}"``, ``"{password}"``, ``"%(password)s"``, ``"your_password"``. A weak
  default such as ``"changeme"`` is a real password as far as a leak goes, so it is redacted.

Speed matters more than elegance here (every stored interaction passes through, ~5,000/s on two
cores), so each detector is one precompiled regex whose first character is a literal or a small
character class: ``re`` then skips along the text in C and only starts a match where one can
begin. Validation (Luhn, ``ipaddress``, entropy, placeholders) runs in Python on the rare matches.
Plain prose and code take about 30 µs per 2 KB (``python -m benchmarks.privacy``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString

__all__ = ["KINDS", "PrivacyFilter", "Redaction", "redact"]

KINDS = (
    "email", "ipv4", "ipv6", "phone", "ssn", "card", "aws_key", "gcp_key", "azure_key",
    "github_token", "gitlab_token", "slack_token", "openai_key", "stripe_key", "jwt", "private_key",
    "url_password", "password_assignment", "secret_assignment", "home_path", "custom",
)  # fmt: skip

# Overlapping matches are resolved by priority: a private key block swallows whatever its base64
# happens to look like, a shaped token beats the assignment around it (the kind is more precise),
# and an assignment beats the e-mail or number inside its value.
_P_BLOCK, _P_TOKEN, _P_ASSIGN, _P_PII = 4, 3, 2, 1

# (start, end, priority, kind) of one replacement.
_Candidate = tuple[int, int, int, str]


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


# --- placeholders and entropy -----------------------------------------------------------------

# A value made only of template references (``${X}``, ``$X``, ``{{ x }}``, ``{x}``, ``%(x)s``,
# ``%s``, ``<x>``) and punctuation is a placeholder, as is one of a few conventional fillers.
_TEMPLATE_REF = re.compile(r"\$\{[^}]*\}|\$\w+|\{\{.*?\}\}|\{[^{}]*\}|%\([^)]*\)[sdr]|%[sdr]|<[^<>]*>")
_FILLER = re.compile(
    r"[\s.*xX#?_\-•]*"
    r"|(?i:(?:your|my|the|enter|insert)[_\- ]?[\w\- ]*|replace[_\-]?me|todo|tbd|none|null|nil"
    r"|undefined|placeholder|redacted|example|dummy|fake|test|secret_here|password_here)"
    r"|\[REDACTED(?::\w+)?\]"
)
_CODE_LITERALS = frozenset({"none", "null", "nil", "true", "false", "undefined", "self", "this", "pass"})
_TYPE_NAMES = frozenset(
    {
        "str", "bytes", "int", "float", "bool", "none", "any", "object", "string", "number", "dict",
        "list", "tuple", "optional", "union", "callable", "type", "secretstr", "secretbytes", "char",
    }
)  # fmt: skip

_B64 = Base64HighEntropyString()  # detect-secrets' entropy over the base64 alphabet (limit 4.5)
_HEX = HexHighEntropyString()  # ... and over hex digits, with its penalty for all-digit strings


def _is_placeholder(value: str) -> bool:
    """True for an empty, filler or template-only value, which leaks nothing."""
    v = value.strip()
    if _FILLER.fullmatch(v):
        return True
    if "$" in v or "{" in v or "%" in v or "<" in v:
        rest = _TEMPLATE_REF.sub("", v)
        return rest != v and not rest.strip(" \t:/@.-_,;")
    return False


def _high_entropy(value: str) -> bool:
    """True for a value that looks generated (a key or token) rather than written by a person."""
    v = value
    if v[:7].lower() in ("bearer ", "digest ") or v[:6].lower() in ("basic ", "token "):
        v = v.split(None, 1)[1] if len(v.split(None, 1)) == 2 else v
    n = len(v)
    if n < 16 or n > 4096 or _is_placeholder(v):
        return False
    if any(c.isspace() for c in v) or v.startswith(("/", "./", "~/")) or "://" in v:
        return False  # prose, a path or a URL
    if not any(c.isdigit() for c in v) or not any(c.isalpha() for c in v):
        return False
    if all(c in "0123456789abcdefABCDEF" for c in v):
        return _HEX.calculate_shannon_entropy(v) > _HEX.entropy_limit
    # detect-secrets asks 4.5 bits/char of any base64 string; a random string of n characters
    # cannot reach log2(n), so shorter ones (16-40 chars, most API keys) get a length-aware bar.
    return _B64.calculate_shannon_entropy(v) >= min(_B64.entropy_limit, math.log2(n) - 1.0)


# --- shaped tokens and private keys -----------------------------------------------------------

# One alternation whose branches all start with a literal, so ``re`` derives a first-character set
# and skips in C; the kind is read from the first characters of the match.
_TOKEN_RE = re.compile(
    r"A(?:KIA|SIA|BIA|CCA)[0-9A-Z]{16}(?![0-9A-Za-z])"
    r"|AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"
    r"|AccountKey=[A-Za-z0-9+/]{20,}={0,2}"
    r"|SharedAccessKey=[A-Za-z0-9+/]{20,}={0,2}"
    r"|gh[pousr]_[A-Za-z0-9]{36,251}"
    r"|github_pat_[A-Za-z0-9_]{22,251}"
    r"|glpat-[A-Za-z0-9_\-]{20,50}(?![A-Za-z0-9_\-])"
    r"|xox[abposre]-[A-Za-z0-9\-]{10,250}"
    r"|sk-[A-Za-z0-9_\-]{20,250}"
    r"|sk_(?:live|test)_[0-9A-Za-z]{10,250}"
    r"|rk_(?:live|test)_[0-9A-Za-z]{10,250}"
    r"|pk_(?:live|test)_[0-9A-Za-z]{10,250}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"
    r"|-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"
)
# The body of a PEM block with no END line (a truncated paste): base64, whitespace and the
# ``\n`` escapes of a key embedded in JSON (a GCP service-account file).
_PEM_BODY = re.compile(r"(?:[A-Za-z0-9+/=\s]|\\[nr])*")


def _token_kind(tok: str) -> str:
    c = tok[0]
    if c == "A":
        return "gcp_key" if tok[1] == "I" else "azure_key" if tok[1] == "c" else "aws_key"
    if c == "S":
        return "azure_key"
    if c == "g":
        return "gitlab_token" if tok[1] == "l" else "github_token"
    if c == "x":
        return "slack_token"
    if c == "s":
        return "openai_key" if tok[2] == "-" else "stripe_key"
    if c in "rp":
        return "stripe_key"
    return "jwt" if c == "e" else "private_key"


def _scan_tokens(text: str, out: list[_Candidate]) -> None:
    for m in _TOKEN_RE.finditer(text):
        start, end = m.span()
        tok = m.group()
        kind = _token_kind(tok)
        if kind == "private_key":
            label = tok[len("-----BEGIN") : -len("-----")]
            close = text.find(f"-----END{label}-----", end)
            end = close + len(label) + len("-----END-----") if close >= 0 else _PEM_BODY.match(text, end).end()
            out.append((start, end, _P_BLOCK, kind))
            continue
        if start and text[start - 1].isalnum():
            continue  # the middle of a longer word or blob, not a token of its own
        if kind == "azure_key":
            start += tok.index("=") + 1  # keep ``AccountKey=``: the name says what was there
        elif kind == "openai_key":
            body = tok[3:]
            if not (any(c.isdigit() for c in body) and any(c.isalpha() for c in body)):
                continue  # kebab-case words after "sk-", not a key
        out.append((start, end, _P_TOKEN, kind))


# --- URLs, e-mail addresses, home directories -------------------------------------------------

# ``scheme://user:password@host``; the password may hold an unencoded "@", so it runs to the
# last "@" that is followed by a host.
_URL_PASSWORD_RE = re.compile(r"://([^\s:/?#@'\"<>\[\]]*):([^\s/?#'\"<>]+)@(?=[A-Za-z0-9\[.\-])")


def _scan_url_passwords(text: str, out: list[_Candidate]) -> None:
    for m in _URL_PASSWORD_RE.finditer(text):
        if not _is_placeholder(m.group(2)):
            out.append((m.start(2), m.end(2), _P_TOKEN, "url_password"))


# Found from the "@" (a literal, so ``re`` jumps between them); the local part is read backwards.
_EMAIL_DOMAIN_RE = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def _scan_emails(text: str, out: list[_Candidate]) -> None:
    for m in _EMAIL_DOMAIN_RE.finditer(text):
        at = m.start()
        start, stop = at, max(0, at - 64)
        while start > stop and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        local = text[start:at].lstrip(".")
        # No local part: a decorator (``@functools.wraps``). ``git@github.com`` is an SSH remote.
        if not local or local.endswith(".") or local == "git":
            continue
        out.append((at - len(local), m.end(), _P_PII, "email"))


_HOME_RE = re.compile(r"(?:/home/|/Users/|\\\\?[Uu]sers\\\\?)([^/\\\s'\"<>:|*?\[\]{}()$%`,;]{1,64})")
_SHARED_HOMES = frozenset({"Shared", "Public", "Default", "All Users", "Default User", "user"})


def _scan_home_paths(text: str, out: list[_Candidate]) -> None:
    for m in _HOME_RE.finditer(text):
        start = m.start()
        # ``example.com/home/x`` or ``/srv/www/home/x`` is not a home directory.
        if text[start] == "/" and start and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
            continue
        if m.group(1) not in _SHARED_HOMES:
            out.append((m.start(1), m.end(1), _P_PII, "home_path"))


# --- numbers: IPv4, SSN, phone, payment card ----------------------------------------------------

# One pass over numbers, started only at the first digit of a number (the lookbehind right after
# the first digit rejects digits inside words, versions, signed numbers and longer numbers).
_NUMBER_RE = re.compile(
    r"""
    \d(?<![\w.+\-]\d)
    (?:
        \d{0,2}(?:\.\d{1,3}){3}                 # IPv4
      | \d\d-\d\d-\d{4}                         # SSN
      | \d\d([-. ])\d{3}\1\d{4}                 # US phone 555-123-4567
      | ([-. ])\d{3}\2\d{3}\2\d{4}              # US phone 1-800-555-0199
      | \d{3}[ \-]?\d{6}[ \-]?\d{5}             # card grouped 4-6-5 (Amex)
      | \d{3}(?:[ \-]?\d{4}){2}[ \-]?\d{1,7}    # card, 13-19 digits, optionally grouped by 4
    )
    (?![\w@]|[.\-]\d)
    """,
    re.VERBOSE,
)
_SSN_RE = re.compile(r"(?!000|666|9)\d{3}-(?!00)\d\d-(?!0000)\d{4}")
# A dotted quad right after these is a version (``torch==2.13.0.1``, ``version 1.0.0.2``).
_VERSION_CONTEXT_RE = re.compile(r"(?i)(?:[=<>!~]=|version\w*|release|build|@)[\s\"':=(]*\Z")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_number(digits: str) -> bool:
    """A Luhn-valid number of a length and prefix that a card network issues (so that 13-digit
    millisecond timestamps and other long constants that happen to pass Luhn are left alone)."""
    n, d2 = len(digits), digits[:2]
    if digits[0] == "4":
        ok = n in (13, 16, 19)
    elif d2 in ("34", "37"):
        ok = n == 15
    elif d2 in ("30", "36", "38", "39"):
        ok = 14 <= n <= 19
    elif "51" <= d2 <= "55" or "2221" <= digits[:4] <= "2720":
        ok = n == 16
    elif digits[0] in "56":
        ok = 16 <= n <= 19
    else:
        ok = d2 == "35" and 16 <= n <= 19
    return ok and _luhn(digits)


# Reserved for documentation (RFC 5737, RFC 3849): example addresses identify nobody.
_DOC_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_CIDR_RE = re.compile(r"/(\d{1,3})(?!\d)")


def _identifying(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address can point at someone's machine: not loopback, unspecified, multicast,
    reserved, link-local, a net or host mask, or a documentation example."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _identifying(ip.ipv4_mapped)
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local:
        return False
    bits, ones = int(ip), (1 << ip.max_prefixlen) - 1
    if any(v & (v + 1) == 0 for v in (bits, bits ^ ones)):
        return False  # 255.255.255.0, 0.0.0.255
    return not any(ip.version == net.version and ip in net for net in _DOC_NETS)


def _network(text: str, end: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """``10.0.0.0/8``: a network (host bits zero) names a range, not anyone's host."""
    m = _CIDR_RE.match(text, end)
    if m is None or int(m.group(1)) > ip.max_prefixlen:
        return False
    try:
        ipaddress.ip_network(f"{ip}/{m.group(1)}", strict=True)
    except ValueError:
        return False
    return True


def _ipv4_kept(text: str, start: int, end: int) -> bool:
    """True for an address this filter keeps (see the module docstring), or a version string."""
    value = text[start:end]
    if any(int(o) > 255 for o in value.split(".")):
        return True  # not an address at all
    ip = ipaddress.IPv4Address(".".join(str(int(o)) for o in value.split(".")))
    if value.startswith("0") or not _identifying(ip) or _network(text, end, ip):
        return True
    return _VERSION_CONTEXT_RE.search(text, max(0, start - 24), start) is not None


def _scan_numbers(text: str, out: list[_Candidate]) -> None:
    for m in _NUMBER_RE.finditer(text):
        start, end = m.span()
        value = m.group()
        if value.count(".") == 3 and "-" not in value and " " not in value:
            if not _ipv4_kept(text, start, end):
                out.append((start, end, _P_PII, "ipv4"))
            continue
        digits = value.replace("-", "").replace(" ", "").replace(".", "")
        if len(digits) == 9 and value.count("-") == 2:
            if _SSN_RE.fullmatch(value):
                out.append((start, end, _P_PII, "ssn"))
        elif len(digits) in (10, 11) and len(value) - len(digits) in (2, 3):
            area = digits[-10]
            if area not in "01" and (len(digits) == 10 or digits[0] == "1"):
                out.append((start, end, _P_PII, "phone"))
        elif 13 <= len(digits) <= 19 and "." not in value and _card_number(digits):
            out.append((start, end, _P_PII, "card"))


# International and ``(555)`` phone numbers: anchored on "+" or "(", which ``re`` jumps between.
# The groups are possessive so that a long digit run cannot be re-split many ways on failure.
_PHONE_RE = re.compile(
    r"\+(?<![\w+)\]]\+)\d{1,3}(?:[ .\-]?\(?\d{1,5}\)?){1,6}+(?![\w+]|\.\d)"
    r"|\((?<!\w\()\d{3}\) ?\d{3}[\-. ]\d{4}(?![\w\-]|\.\d)"
)


def _scan_phones(text: str, out: list[_Candidate]) -> None:
    for m in _PHONE_RE.finditer(text):
        value = m.group()
        if value[0] == "+":
            digits = sum(c.isdigit() for c in value)
            if not 8 <= digits <= 15 or value.count(".") == 1:
                continue  # too short or long for E.164, or a signed decimal (+1.23456789)
            if digits == len(value) - 1 and digits < 10:
                continue  # +12345678 with no separators reads as a signed number
            if value.count("(") != value.count(")"):
                continue
        out.append((m.start(), m.end(), _P_PII, "phone"))


# --- IPv6 -------------------------------------------------------------------------------------

# Hints are cheap (anchored on ":"): "::" or a short hex group between two colons. Each hint is
# widened to a candidate, which ``ipaddress`` then validates.
_V6_HINT_RE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_BODY_RE = re.compile(
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.\-]{1,16})?(?![\w:]|\.\d)"
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")


def _scan_ipv6(text: str, out: list[_Candidate]) -> None:
    done = 0
    for h in _V6_HINT_RE.finditer(text):
        start = h.start()
        if start < done:
            continue
        stop = max(0, start - 40)
        while start > stop and text[start - 1] in _HEX_COLON:
            start -= 1
        # Inside a word: ``std::vector``, ``Foo::bar``, ``T10:30:00``.
        if start and (text[start - 1].isalnum() or text[start - 1] in "_.:"):
            continue
        m = _V6_BODY_RE.match(text, start)
        if m is None:
            continue
        done = m.end()
        value = m.group()
        try:
            addr = ipaddress.IPv6Address(value)
        except ValueError:
            continue  # a time (12:30:45), a slice (a[1:2:3]), a MAC address
        if not _identifying(addr) or _network(text, m.end(), addr):
            continue
        groups = [g for g in value.split("%")[0].split(":") if g]
        # Two short groups around "::" is a Python slice (``a[1::2]``) or a C++/Rust path
        # (``a::b``) far more often than an address; real ones (``fe80::1``) have a longer group
        # and a digit.
        if len(groups) <= 2 and (max(map(len, groups)) < 3 or not any(c.isdigit() for c in value)):
            continue
        out.append((m.start(), m.end(), _P_PII, "ipv6"))


# --- assignments: password = "...", api_key: ..., "token": "..." ------------------------------

# Matched on the lower-cased text (ASCII, so offsets are unchanged) where every branch starts with
# a literal; the name's start is read backwards. The value is a quoted string or a bare word; a
# Python annotation (``password: str = "x"``) is skipped to reach the value.
_ASSIGN_SRC = r"""
    (?:password|passwd|passphrase|pass|pwd|secret|token|key|credential|authorization|auth|apikey)
    (?:e?s)?\d{0,2}
    (?P<close>["'`]?\]?)
    [ \t]*
    (?P<op>:[ \t]*[a-z_][\w.\[\],| ]{0,40}?[ \t]*=(?!=)|=>|:=|\?=|=(?!=)|:(?![:=/]))
    [ \t]*
    (?P<val>
        [bru]{0,2}"[^"\\\n]*+(?:\\.[^"\\\n]*+)*+"
      | [bru]{0,2}'[^'\\\n]*+(?:\\.[^'\\\n]*+)*+'
      | (?:(?:bearer|basic|token|digest)[ \t]+)?[^\s,;'"`)\]}>&]{1,512}
    )
"""
_ASSIGN_LOWER_RE = re.compile(_ASSIGN_SRC, re.VERBOSE)
_ASSIGN_ANYCASE_RE = re.compile(_ASSIGN_SRC, re.VERBOSE | re.IGNORECASE)  # for non-ASCII text

# The name must END with the keyword, at a word-part boundary: ``db_password``, ``DB_PASS``,
# ``apiKey``, ``access_token``, ``credentials``; not ``password_field``, ``bypass``, ``monkey``.
_NAME_END_RE = re.compile(
    r"(password|passwd|passphrase|pass|pwd|secret|token|key|credential|authorization|auth)(?:e?s)?\d{0,2}\Z",
    re.IGNORECASE,
)
_PASSWORD_WORDS = frozenset({"password", "passwd", "passphrase", "pass", "pwd"})
# Run-together compounds that count as a boundary: ``apikey``, ``dbpass``, ``accesstoken``.
_COMPOUND_PREFIX_RE = re.compile(
    r"(?:api|access|secret|private|client|master|signing|encryption|session|auth|refresh|bearer|app"
    r"|consumer|webhook|deploy|db|database|admin|user|root|mysql|postgres|redis|smtp|mail|ftp|ssh"
    r"|vault|ldap|proxy|key|id)\Z",
    re.IGNORECASE,
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.$-")
_IDENTIFIER_RE = re.compile(r"[A-Za-z_]\w*")
_DOTTED_RE = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)+")
_ENV_NAME_RE = re.compile(r"[A-Z0-9_]*[A-Z][A-Z0-9_]*")
_AWS_SECRET_RE = re.compile(r"[A-Za-z0-9/+]{40}")
_AZURE_KEY_RE = re.compile(r"[A-Za-z0-9/+]{86}==")


def _name_kind(name: str) -> str | None:
    """``password_assignment``, ``secret_assignment`` or None for a variable/key name."""
    m = _NAME_END_RE.search(name)
    if m is None:
        return None
    k = m.start()
    if k:
        before, first = name[k - 1], name[k]
        camel = (before.islower() or before.isdigit()) and first.isupper()
        if not (camel or before in "_-.$" or _COMPOUND_PREFIX_RE.search(name, 0, k)):
            return None
    return "password_assignment" if m.group(1).lower() in _PASSWORD_WORDS else "secret_assignment"


def _secret_kind(name: str, value: str) -> str:
    """The precise kind of a secret found by its name, where the name and shape tell."""
    low = name.lower().replace("_", "").replace("-", "")
    if _AWS_SECRET_RE.fullmatch(value) and ("aws" in low or "secretaccesskey" in low):
        return "aws_key"
    if _AZURE_KEY_RE.fullmatch(value) and ("azure" in low or "accountkey" in low or "storagekey" in low):
        return "azure_key"
    return "secret_assignment"


def _bare_value_is_code(text: str, name: str, op: str, value: str, end: int) -> bool:
    """True when an unquoted value is an expression (a call, an attribute, a variable, a type)."""
    low = value.lower()
    if low in _CODE_LITERALS or value[0] in "$%{@<#(" or _DOTTED_RE.fullmatch(value):
        return True
    rest = text[end : end + 80].split("\n", 1)[0]
    if rest.lstrip()[:1] in ("(", "[", "."):
        return True  # getpass(), os.environ["X"], settings.x
    if not _IDENTIFIER_RE.fullmatch(value):
        return False
    if op[0] == ":" and (low in _TYPE_NAMES or (value[0].isupper() and not any(c.isdigit() for c in value))):
        return True  # ``password: str``, ``token: SecretStr``
    if value.isupper() and "_" in value:
        return True  # a constant: ``API_KEY = DEFAULT_API_KEY``
    # A literal context: an env file or shell (``DB_PASSWORD=x``), a CLI flag (``--password=x``),
    # a query string (``?token=x``), or a YAML line (``password: x`` and nothing after it).
    i = len(name)
    before = text[end - len(value) - len(op) - i - 2 : end - len(value)] if i else ""
    if _ENV_NAME_RE.fullmatch(name) or name.startswith("-") or before[:1] in ("?", "&"):
        return False
    if op == ":" and not rest.strip(" \t\r").lstrip("#")[:0] and (not rest.strip() or rest.lstrip()[0] == "#"):
        return False
    # ``password = hunter2`` in code is a variable, but a word with digits is a literal more often.
    return not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value) and len(value) >= 6)


def _scan_assignments(text: str, out: list[_Candidate]) -> None:
    if text.isascii():
        matches = _ASSIGN_LOWER_RE.finditer(text.lower())
    else:
        matches = _ASSIGN_ANYCASE_RE.finditer(text)
    for m in matches:
        kw_start = name_start = m.start()
        stop = max(0, kw_start - 64)
        while name_start > stop and text[name_start - 1] in _NAME_CHARS:
            name_start -= 1
        name = text[name_start : m.start("close")]
        kind = _name_kind(name)
        if kind is None:
            continue
        vs, ve = m.span("val")
        raw = text[vs:ve]
        quote = raw[-1]
        if quote in "\"'" and len(raw) >= 2 and raw.lstrip("bruBRU")[:1] == quote:
            vs, ve = vs + raw.index(quote) + 1, ve - 1
            value = text[vs:ve]
            if _is_placeholder(value):
                continue
            if kind == "password_assignment":
                # A prompt or message ("Enter your password: "), not a password.
                if " " in value.strip() and ("pass" in value.lower() or value.rstrip().endswith((":", "?"))):
                    continue
            elif not _high_entropy(value):
                continue
        else:
            value = raw
            if _is_placeholder(value):
                continue
            if kind == "secret_assignment":
                if not _high_entropy(value):
                    continue
            elif value.lstrip("-").isdigit():
                if len(value) < 4:
                    continue
            elif _bare_value_is_code(text, name, m.group("op"), value, ve):
                continue
        if kind == "secret_assignment":
            kind = _secret_kind(name, value)
        out.append((vs, ve, _P_ASSIGN, kind))


# --- the filter ---------------------------------------------------------------------------------

_SCANS: tuple[Callable[[str, list[_Candidate]], None], ...] = (
    _scan_tokens, _scan_numbers, _scan_phones, _scan_ipv6, _scan_home_paths, _scan_assignments,
)  # fmt: skip


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
    kind = _name_kind(key)
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
        found: list[_Candidate] = []
        for scan in _SCANS:
            scan(text, found)
        # Literal prefixes found by ``in`` (C, a few hundred ns) spare whole regex passes.
        if "@" in text:
            _scan_emails(text, found)
            if "://" in text:
                _scan_url_passwords(text, found)
        for pattern in self._custom:
            found.extend((m.start(), m.end(), _P_TOKEN, "custom") for m in pattern.finditer(text) if m.end() > m.start())
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
            if key_kind and key_kind[0] and value.strip() and not _is_placeholder(value):
                kind, needs_entropy = key_kind
                if not needs_entropy or _high_entropy(value):
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


def _apply(text: str, found: list[_Candidate]) -> Redaction:
    """Keep the highest-priority non-overlapping candidates and splice in their placeholders."""
    found.sort(key=lambda c: (-c[2], c[0], c[0] - c[1]))
    kept: list[_Candidate] = []
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
