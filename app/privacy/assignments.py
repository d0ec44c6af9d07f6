"""Secrets found by their name: a literal assigned to a name ending in password/passwd/pwd/pass
(``password_assignment``) or, when it looks generated, in key/token/secret/credential/auth
(``secret_assignment``, or ``aws_key``/``azure_key`` where the name and shape tell). Expressions
(``os.environ[...]``, ``settings.KEY``, ``None``, type annotations) are code and stay.
"""

from __future__ import annotations

import re

from app.privacy.candidates import P_ASSIGN, Candidate, high_entropy, is_placeholder, letters_and_digits

__all__ = ["name_kind", "scan_assignments"]

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

# One regex per keyword, each starting with its keyword as a literal (see "Why these regexes look
# odd" in app/privacy/tokens.py), run on the lower-cased text: ``password = "x"``, ``"token": "x"``,
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


def name_kind(name: str) -> str | None:
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
    return letters_and_digits(value) and len(value) >= 6


def scan_assignments(text: str, ascii_view: bytes, out: list[Candidate]) -> None:
    """Append the secret literals assigned to password, key, token... names in ``text`` to ``out``."""
    lower = ascii_view.lower()  # ASCII letters only, so offsets are the text's
    for regex in _ASSIGN_RES:
        for m in regex.finditer(lower):
            _assignment(text, m, out)


def _assignment(text: str, m: re.Match[bytes], out: list[Candidate]) -> None:
    name_start = m.start()
    stop = max(0, name_start - 64)
    while name_start > stop and text[name_start - 1] in _NAME_CHARS:
        name_start -= 1
    name = text[name_start : m.start("close")]
    kind = name_kind(name)
    if kind is None:
        return
    vs, ve = m.span("val")
    raw = text[vs:ve]
    quote = raw[-1]
    if quote in "\"'" and len(raw) >= 2 and raw.lstrip("bruBRU")[:1] == quote:
        vs, ve = vs + raw.index(quote) + 1, ve - 1
        value = text[vs:ve]
        if is_placeholder(value):
            return
        if kind == "password_assignment":
            # A prompt or message ("Enter your password: "), not a password.
            if " " in value.strip() and ("pass" in value.lower() or value.rstrip().endswith((":", "?"))):
                return
        elif not high_entropy(value):
            return
    else:
        value = raw
        if is_placeholder(value) or _is_expression(text, m, value):
            return
        if kind == "secret_assignment":
            if not high_entropy(value):
                return
        elif not _bare_password(text, m, name_start, name, value):
            return
    if kind == "secret_assignment":
        kind = _secret_kind(name, value)
    out.append((vs, ve, P_ASSIGN, kind))
