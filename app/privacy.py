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
* detect-secrets' token rules for services with a distinctive prefix: ``sendgrid_key``,
  ``pypi_token``, ``mailchimp_key``, ``square_secret``, ``twilio_key``;
* ``custom``: the operator's extra regexes (``privacy.exclude_sensitive_patterns``).

Policy calls worth knowing (each has a test):

* Addresses that identify nobody are kept: loopback, unspecified, multicast, reserved and
  link-local addresses, net and host masks, the documentation ranges (``192.0.2.0/24``,
  ``2001:db8::/32``...), networks written as CIDR (``10.0.0.0/8``), public resolvers and dotted
  quads that read as versions or section numbers (three one-digit parts first: ``2.7.2.2``, or
  after ``==``, ``version``, ``section``). Other addresses, private ones included, are redacted.
* Assignments in code keep their expressions: ``password = os.environ["DB_PASSWORD"]``,
  ``token = request.headers[...]``, ``secret_key = settings.SECRET_KEY``, ``password = None``
  are left alone; only literals are redacted, and the quotes around them are kept. The name must
  end with the keyword: ``password_field = "x"`` and ``monkey = "..."`` are not secrets.
* Placeholders are kept: ``""``, ``"..."``, ``"xxx"``, ``"***"``, ``"<password>"``,
  ``"${DB_PASSWORD}"``, ``"{password}"``, ``"%(password)s"``, ``"your_password"``. A weak
  default such as ``"changeme"`` is a real password as far as a leak goes, so it is redacted.

Speed matters more than elegance here: every stored interaction passes through, ~5,000/s on two
cores. Every regex that scans a whole text starts with one literal character, the only case in
which ``re`` skips ahead in C at memchr-like speed (see "Why these regexes look odd" below); Luhn,
``ipaddress``, entropy and placeholder checks run in Python on the rare matches. A 2 KB mix of
prose and code costs about 20 µs, the whole standard library about 30 µs per 2 KB
(``python -m benchmarks.privacy``).
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
    "email",
    "ipv4",
    "ipv6",
    "phone",
    "ssn",
    "card",
    "aws_key",
    "gcp_key",
    "azure_key",
    "github_token",
    "gitlab_token",
    "slack_token",
    "openai_key",
    "stripe_key",
    "jwt",
    "private_key",
    "url_password",
    "password_assignment",
    "secret_assignment",
    "home_path",
    "custom",
    "sendgrid_key",
    "pypi_token",
    "mailchimp_key",
    "square_secret",
    "twilio_key",
)

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
        "str",
        "bytes",
        "int",
        "float",
        "bool",
        "none",
        "any",
        "object",
        "string",
        "number",
        "dict",
        "list",
        "tuple",
        "optional",
        "union",
        "callable",
        "type",
        "secretstr",
        "secretbytes",
        "char",
    }
)

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

# Why these regexes look odd: ``re`` finds where a match can start fast (~0.3 ns/char) only when the
# pattern starts with one literal character; a first-character *class* or a lookbehind makes it
# test every position (~6 ns/char, 15 µs per 2 KB per regex). So each family of tokens shares a
# literal anchor (often a rare character inside the prefix) and checks the characters before it
# with a fixed-width lookbehind; the kind and the real start are read back in Python.
_DASH_TOKENS_RE = re.compile(
    rb"-(?:----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    rb"|(?<=glpat-)[A-Za-z0-9_\-]{20,50}(?![A-Za-z0-9_\-])"
    rb"|(?<=sk-)[A-Za-z0-9_\-]{20,250}"
    rb"|(?<=xox[abposre]-)[A-Za-z0-9\-]{10,250}"
    rb"|(?<=pypi-)AgE(?:IcHlwaS5vcmc|NdGVzdC5weXBpLm9yZw)[A-Za-z0-9_\-]{70,}"
    rb"|(?<=sq0csp-)[0-9A-Za-z\\\-_]{43}"
    rb"|(?<=[0-9a-z]{32}-)us[0-9]{1,2}(?![0-9A-Za-z]))"
)
_A_TOKENS_RE = re.compile(
    rb"A(?:(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])[0-9A-Z]{16}(?![0-9A-Za-z])"
    rb"|Iza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"
    rb"|ccountKey=[A-Za-z0-9+/]{20,}={0,2}"
    rb"|C[a-z0-9]{32}(?![0-9A-Za-z]))"
)
_S_TOKENS_RE = re.compile(
    rb"S(?:haredAccessKey=[A-Za-z0-9+/]{20,}={0,2}"
    rb"|G\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])"
    rb"|K[a-z0-9]{32}(?![0-9A-Za-z]))"
)
_G_TOKENS_RE = re.compile(rb"g(?:h[pousr]_[A-Za-z0-9]{36,251}|ithub_pat_[A-Za-z0-9_]{22,251})")
_STRIPE_RE = re.compile(rb"k_(?:live|test)_[0-9A-Za-z]{10,250}")  # after s, r or p (checked)
_JWT_RE = re.compile(rb"J(?<=eyJ)[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{8,}")
_SAS_SIG_RE = re.compile(rb"sig=(?<=[?&]sig=)([A-Za-z0-9%+/=]{30,})")  # an Azure SAS URL's signature
_SLACK_HOOK_RE = re.compile(rb"https://hooks\.slack\.com/services/T\w+/B\w+/\w+")
# The body of a PEM block with no END line (a truncated paste): base64, whitespace and the
# ``\n`` escapes of a key embedded in JSON (a GCP service-account file).
_PEM_BODY_RE = re.compile(r"(?:[A-Za-z0-9+/=\s]|\\[nr])*")
# After "-", the token's prefix (read backwards) and its kind.
_DASH_PREFIXES = (("glpat", "gitlab_token"), ("sk", "openai_key"), ("pypi", "pypi_token"), ("sq0csp", "square_secret"))


def _add_token(text: str, start: int, end: int, kind: str, out: list[_Candidate]) -> None:
    """Add a token found at ``start``, unless it is the tail of a longer word."""
    if not (start and text[start - 1].isalnum()):  # not the middle of a longer word or blob
        out.append((start, end, _P_TOKEN, kind))


def _scan_tokens(text: str, ascii_view: bytes, out: list[_Candidate]) -> None:
    # The regexes run on the ASCII view (bytes: faster on non-ASCII text, same offsets).
    for m in _DASH_TOKENS_RE.finditer(ascii_view):
        dash, end = m.span()
        if text.startswith("-----", dash):
            label = text[dash + len("-----BEGIN") : end - len("-----")]
            close = text.find(f"-----END{label}-----", end)
            end = close + len(label) + len("-----END-----") if close >= 0 else _PEM_BODY_RE.match(text, end).end()
            out.append((dash, end, _P_BLOCK, "private_key"))
            continue
        for prefix, kind in _DASH_PREFIXES:
            if text.endswith(prefix, 0, dash):
                if kind != "openai_key" or _letters_and_digits(text[dash + 1 : end]):
                    _add_token(text, dash - len(prefix), end, kind, out)
                break
        else:
            if text[dash - 4 : dash - 1] == "xox":
                _add_token(text, dash - 4, end, "slack_token", out)
            else:
                _add_token(text, dash - 32, end, "mailchimp_key", out)
    for m in _A_TOKENS_RE.finditer(ascii_view):
        start, end = m.span()
        c = text[start + 1]
        if c == "c":  # keep "AccountKey=": the name says what was there
            out.append((start + len("AccountKey="), end, _P_TOKEN, "azure_key"))
        else:
            _add_token(text, start, end, {"I": "gcp_key", "C": "twilio_key"}.get(c, "aws_key"), out)
    for m in _S_TOKENS_RE.finditer(ascii_view):
        start, end = m.span()
        c = text[start + 1]
        if c == "h":
            out.append((start + len("SharedAccessKey="), end, _P_TOKEN, "azure_key"))
        else:
            _add_token(text, start, end, "sendgrid_key" if c == "G" else "twilio_key", out)
    for m in _G_TOKENS_RE.finditer(ascii_view):
        _add_token(text, m.start(), m.end(), "github_token", out)
    for m in _STRIPE_RE.finditer(ascii_view):
        if m.start() and text[m.start() - 1] in "srp":
            _add_token(text, m.start() - 1, m.end(), "stripe_key", out)
    for m in _JWT_RE.finditer(ascii_view):
        _add_token(text, m.start() - 2, m.end(), "jwt", out)
    if b"&" in ascii_view:  # a memchr: a SAS query string has several parameters
        for m in _SAS_SIG_RE.finditer(ascii_view):
            out.append((m.start(1), m.end(1), _P_TOKEN, "azure_key"))
    if b"hooks.slack.com" in ascii_view:
        for m in _SLACK_HOOK_RE.finditer(ascii_view):
            out.append((m.start(), m.end(), _P_TOKEN, "slack_token"))


def _letters_and_digits(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


# --- URLs, e-mail addresses, home directories -------------------------------------------------

# ``scheme://user:password@host``; the password may hold an unencoded "@", so it runs to the
# last "@" that is followed by a host.
_URL_PASSWORD_RE = re.compile(r"://([^\s:/?#@'\"<>\[\]]*):([^\s/?#'\"<>]+)@(?=[A-Za-z0-9\[.\-])")


def _scan_url_passwords(text: str, out: list[_Candidate]) -> None:
    for m in _URL_PASSWORD_RE.finditer(text):
        if not _is_placeholder(m.group(2)):
            out.append((m.start(2), m.end(2), _P_TOKEN, "url_password"))


# Found from the "@"; the local part is read backwards.
_EMAIL_DOMAIN_RE = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def _scan_emails(text: str, out: list[_Candidate]) -> None:
    for m in _EMAIL_DOMAIN_RE.finditer(text):
        at = m.start()
        start, stop = at, max(0, at - 64)
        while start > stop and (text[start - 1] in _LOCAL_CHARS or text[start - 1].isalnum()):
            start -= 1  # isalnum: internationalised local parts (zoë@...)
        local = text[start:at].lstrip(".")
        # No local part: a decorator (``@functools.wraps``). ``git@github.com`` is an SSH remote.
        if not local or local.endswith(".") or local == "git":
            continue
        # ``x@self.weight``: matrix multiplication onto an attribute, not an address.
        if text.startswith(("self.", "cls.", "this."), at + 1):
            continue
        out.append((at - len(local), m.end(), _P_PII, "email"))


_USER_NAME = r"([^/\\\s'\"<>:|*?\[\]{}()$%`,;]{1,64})"
_HOME_POSIX_RE = re.compile(r"/(?:home|Users)/" + _USER_NAME)
_HOME_WINDOWS_RE = re.compile(r"\\\\?[Uu]sers\\\\?" + _USER_NAME)
_SHARED_HOMES = frozenset({"Shared", "Public", "Default", "All Users", "Default User", "user", "username"})


def _scan_home_paths(text: str, ascii_view: bytes, out: list[_Candidate]) -> None:
    for m in _HOME_POSIX_RE.finditer(text):
        start = m.start()
        # ``example.com/home/x`` or ``/srv/www/home/x`` is not a home directory.
        if start and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
            continue
        if m.group(1) not in _SHARED_HOMES:
            out.append((m.start(1), m.end(1), _P_PII, "home_path"))
    if "\\" in text:  # a memchr: Windows paths are rare
        for m in _HOME_WINDOWS_RE.finditer(text):
            if m.group(1) not in _SHARED_HOMES:
                out.append((m.start(1), m.end(1), _P_PII, "home_path"))


# --- numbers: IPv4, SSN, phone, payment card ----------------------------------------------------

# Digits are not one character, so a regex that starts with ``\d`` tests every position (15 µs
# per 2 KB). Instead every digit of the ASCII view is mapped to "\x01" (``bytes.translate``, a C
# table lookup) and one regex anchored on that literal finds all number shapes; each branch is a named group so
# that the Python side knows which shape matched. The lookbehind right after the first digit
# rejects digits inside words, versions, decimals and longer numbers.
_NUMBER_SRC = r"""
    \x01(?<![\w\x01.\-]\x01)
    (?=[\x01() .\-]{6})   # every shape goes on for 6 more digits or separators: a quick no
    (?:
        (?P<intl>(?<=\+\x01)\x01{0,2}(?:[ .\-]?\(?\x01{1,5}\)?){1,6}+)     # +44 20 7946 0958
      | (?P<ipv4>\x01{0,2}(?:\.\x01{1,3}){3})                              # 10.20.30.40
      | (?P<ssn>\x01\x01-\x01\x01-\x01{4})                                 # 123-45-6789
      | (?P<us>\x01\x01(?P<s1>[-. ])\x01{3}(?P=s1)\x01{4})                 # 555-123-4567
      | (?P<us1>(?P<s2>[-. ])\x01{3}(?P=s2)\x01{3}(?P=s2)\x01{4})          # 1-800-555-0199
      | (?P<paren>(?<=\(\x01)\x01\x01\)\ ?\x01{3}[-.\ ]\x01{4})             # (555) 123-4567
      | (?P<card>\x01{3}(?:[\ \-]?\x01{4}){2}[\ \-]?\x01{1,7}               # 13-19 digits by 4
                |\x01{3}[\ \-]?\x01{6}[\ \-]?\x01{5})                        # 4-6-5 (Amex)
    )
    (?![\w\x01@]|[.\-]\x01)
"""
_NUMBER_RE = re.compile(_NUMBER_SRC.encode(), re.VERBOSE)
_DIGITS = bytes.maketrans(b"0123456789", b"\x01" * 10)
_SSN_RE = re.compile(r"(?!000|666|9)\d{3}-(?!00)\d\d-(?!0000)\d{4}")
# A dotted quad right after these is a version (``torch==2.13.0.1``, ``version 1.0.0.2``).
_VERSION_CONTEXT_RE = re.compile(r"(?i)(?:[=<>!~]=|version\w*|release|build|section|@)[\s\"':=(]*\Z")


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
    """True for an address this filter keeps (see the module docstring), or not an address."""
    octets = [int(o) for o in text[start:end].split(".")]
    if max(octets) > 255 or text[start] == "0":
        return True
    if text.startswith(".in-addr.arpa", end):  # reverse DNS: the octets are backwards
        octets.reverse()
    ip = ipaddress.IPv4Address(".".join(map(str, octets)))
    if not _identifying(ip) or _network(text, end, ip):
        return True
    # Three one-digit parts first: a version or section number (2.7.2.2, 8.2.4.44) or a public
    # resolver (1.1.1.1, 8.8.8.8), never a person. Digits counting up (123.45.67.89): an example.
    if max(octets[:3]) < 10 or "".join(map(str, octets)) in "0123456789":
        return True
    return _VERSION_CONTEXT_RE.search(text, max(0, start - 24), start) is not None


def _scan_numbers(text: str, ascii_view: bytes, out: list[_Candidate]) -> None:
    for m in _NUMBER_RE.finditer(ascii_view.translate(_DIGITS)):
        shape = m.lastgroup
        start, end = m.span()
        value = text[start:end]
        if shape == "ipv4":
            if not _ipv4_kept(text, start, end):
                out.append((start, end, _P_PII, "ipv4"))
        elif shape == "ssn":
            if _SSN_RE.fullmatch(value):
                out.append((start, end, _P_PII, "ssn"))
        elif shape == "card":
            digits = value.replace(" ", "").replace("-", "")
            if 13 <= len(digits) <= 19 and _card_number(digits):
                out.append((start, end, _P_PII, "card"))
        elif shape == "intl":
            if start > 1 and (text[start - 2].isalnum() or text[start - 2] in ")]_"):
                continue  # x+12345678: arithmetic
            digits = sum(c.isdigit() for c in value)
            if not 8 <= digits <= 15 or value.count(".") == 1 or value.count("(") != value.count(")"):
                continue  # too short or long for E.164, or a signed decimal (+1.23456789)
            if digits == len(value) and digits < 10:
                continue  # +12345678 with no separators reads as a signed number
            out.append((start - 1, end, _P_PII, "phone"))
        else:  # a US number: the area code cannot start with 0 or 1
            digits = [c for c in value if c.isdigit()]
            if shape == "paren":
                start -= 1
            if digits[-10] not in "01" and (len(digits) == 10 or digits[0] == "1"):
                out.append((start, end, _P_PII, "phone"))


# --- IPv6 -------------------------------------------------------------------------------------

# Hints are cheap (anchored on ":"): "::" or a short hex group between two colons. Each hint is
# widened to a candidate, which ``ipaddress`` then validates.
_V6_HINT_RE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_BODY_RE = re.compile(
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.\-]{1,16})?(?![\w:]|\.\d)"
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")


def _scan_ipv6(text: str, ascii_view: bytes, out: list[_Candidate]) -> None:
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
        # (``a::b``) far more often than an address; real ones (``2a00::1``) have a longer group
        # and a digit.
        if len(groups) <= 2 and (max(map(len, groups)) < 3 or not any(c.isdigit() for c in value)):
            continue
        out.append((m.start(), m.end(), _P_PII, "ipv6"))


# --- assignments: password = "...", api_key: ..., "token": "..." ------------------------------

# One regex per keyword, each starting with its keyword as a literal (see "Why these regexes look
# odd" above), run on the lower-cased text: ``password = "x"``, ``"token": "x"``,
# ``PASSWORD: x``, ``config["key"] = "x"``, ``password: str = "x"``, ``Authorization: Bearer x``.
# The name's start is read backwards in Python. The value is a quoted string or a bare word.
_ASSIGN_TAIL = r"""
    (?:e?s)?\d{0,2}
    (?P<close>["'`]?\]?)
    [ \t]*
    (?P<op>:[ \t]*[a-z_][\w.\[\],| ]{0,40}?[ \t]*=(?!=)|=>|:=|\?=|=(?!=)|:(?![:=/]))
    [ \t]*
    (?P<val>
        [bru]{0,2}"[^"\\\n]*+(?:\\.[^"\\\n]*+)*+"
      | [bru]{0,2}'[^'\\\n]*+(?:\\.[^'\\\n]*+)*+'
      | (?:(?:bearer|basic|token|digest)[ \t]+)?[^\s,;'"`()\[\]{}<>&]{1,512}
    )
"""
# Keywords that share a letter share a regex, anchored on that letter: "k" finds key and token,
# "cre" secret and credential (the name, read backwards, includes the letters before the anchor).
_KEYWORDS = ("pass(?:word|wd|phrase)?", "pwd", "k(?:ey|(?<=tok)en)", "cre(?:(?<=secre)t|dential)", "auth(?:orization)?")
_ASSIGN_RES = tuple(re.compile((k + _ASSIGN_TAIL).encode(), re.VERBOSE) for k in _KEYWORDS)

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


def _is_expression(text: str, m: re.Match[bytes], value: str) -> bool:
    """True when an unquoted value is code: a call, subscript, attribute, constant or type."""
    low = value.lower()
    if low in _CODE_LITERALS or value[0] in "$%{@#" or _DOTTED_RE.fullmatch(value):
        return True
    end = m.end("val")
    if text[end : end + 2].lstrip(" ")[:1] in ("(", "[", "."):
        return True  # getpass(), os.environ["X"]
    if not _IDENTIFIER_RE.fullmatch(value):
        return False
    if text[m.start("op")] == ":" and (
        low in _TYPE_NAMES or (value[0].isupper() and not any(c.isdigit() for c in value))
    ):
        return True  # ``password: str``, ``token: SecretStr``
    return value.isupper() and "_" in value  # a constant: ``API_KEY = DEFAULT_API_KEY``


def _bare_password(text: str, m: re.Match[bytes], name_start: int, name: str, value: str) -> bool:
    """Whether an unquoted, non-expression value assigned to a password name is a literal."""
    if value.lstrip("-").isdigit():
        return len(value) >= 4  # PASSWORD=1234, not pwd = 0
    if not _IDENTIFIER_RE.fullmatch(value):
        return True  # hunter2!, p@ss
    # An identifier is a variable in code (``password = pw``) but a literal in an env file or a
    # shell (``DB_PASSWORD=x``), a CLI flag (``--password=x``), a query string (``?pass=x``) or
    # a YAML line (``password: x`` with nothing after it).
    if _ENV_NAME_RE.fullmatch(name) or name.startswith("-") or text[name_start - 1 : name_start] in ("?", "&"):
        return True
    end = m.end("val")
    rest = text[end : end + 80].split("\n", 1)[0].strip()
    if m.group("op") == b":" and not m.group("close") and (not rest or rest[0] == "#"):
        return True
    # Otherwise a word with digits (hunter2) is a literal more often than a variable name.
    return _letters_and_digits(value) and len(value) >= 6


def _scan_assignments(text: str, ascii_view: bytes, out: list[_Candidate]) -> None:
    lower = ascii_view.lower()  # ASCII letters only, so offsets are the text's
    for regex in _ASSIGN_RES:
        for m in regex.finditer(lower):
            _assignment(text, m, out)


def _assignment(text: str, m: re.Match[bytes], out: list[_Candidate]) -> None:
    name_start = m.start()
    stop = max(0, name_start - 64)
    while name_start > stop and text[name_start - 1] in _NAME_CHARS:
        name_start -= 1
    name = text[name_start : m.start("close")]
    kind = _name_kind(name)
    if kind is None:
        return
    vs, ve = m.span("val")
    raw = text[vs:ve]
    quote = raw[-1]
    if quote in "\"'" and len(raw) >= 2 and raw.lstrip("bruBRU")[:1] == quote:
        vs, ve = vs + raw.index(quote) + 1, ve - 1
        value = text[vs:ve]
        if _is_placeholder(value):
            return
        if kind == "password_assignment":
            # A prompt or message ("Enter your password: "), not a password.
            if " " in value.strip() and ("pass" in value.lower() or value.rstrip().endswith((":", "?"))):
                return
        elif not _high_entropy(value):
            return
    else:
        value = raw
        if _is_placeholder(value) or _is_expression(text, m, value):
            return
        if kind == "secret_assignment":
            if not _high_entropy(value):
                return
        elif not _bare_password(text, m, name_start, name, value):
            return
    if kind == "secret_assignment":
        kind = _secret_kind(name, value)
    out.append((vs, ve, _P_ASSIGN, kind))


# --- the filter ---------------------------------------------------------------------------------

# Each scan gets the text and its ASCII view (``encode("ascii", "replace")``: one byte per
# character, so offsets match, and fast ``bytes`` operations apply even to non-ASCII text).
_SCANS: tuple[Callable[[str, bytes, list[_Candidate]], None], ...] = (
    _scan_tokens,
    _scan_numbers,
    _scan_ipv6,
    _scan_home_paths,
    _scan_assignments,
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
        ascii_view = text.encode("ascii", "replace")
        for scan in _SCANS:
            scan(text, ascii_view, found)
        if "@" in text:  # a memchr, ~50 ns: e-mails and URL passwords need an "@"
            _scan_emails(text, found)
            if "://" in text:
                _scan_url_passwords(text, found)
        for pattern in self._custom:
            found.extend(
                (m.start(), m.end(), _P_TOKEN, "custom") for m in pattern.finditer(text) if m.end() > m.start()
            )
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
