"""Secrets with a recognisable shape: cloud and service API keys, tokens, JWTs and PEM private keys.

A new token form is a branch of the regex of its anchor character (or a new anchored regex) and a
line in :func:`scan_tokens` that names its kind; add the kind to ``KINDS`` in
:mod:`app.privacy.candidates`.
"""

from __future__ import annotations

import base64
import re

from app.privacy.candidates import P_BLOCK, P_TOKEN, Candidate, letters_and_digits

__all__ = ["scan_tokens"]

# Why these regexes look odd: ``re`` finds where a match can start fast (~0.3 ns/char) only when the
# pattern starts with one literal character; a first-character *class* or a lookbehind makes it
# test every position (~6 ns/char, 15 µs per 2 KB per regex). So each family of tokens shares a
# literal anchor (often a rare character inside the prefix) and checks the characters before it
# with a fixed-width lookbehind; the kind and the real start are read back in Python.
_DASH_TOKENS_RE = re.compile(
    rb"-(?:----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    rb"|(?<=glpat-)[A-Za-z0-9_\-]{20,50}(?![A-Za-z0-9_\-])"
    # GitLab's other token prefixes (each lookbehind one width): CI job, trigger, runner, deploy...
    rb"|(?:(?<=gl(?:rt|dt|ft)-)|(?<=gl(?:cbt|ptt)-)|(?<=gl(?:soat|ffct)-)|(?<=glagent-))"
    rb"[A-Za-z0-9_\-]{20,64}(?![A-Za-z0-9_\-])"
    rb"|(?<=xapp-)[0-9]-[A-Z0-9]{8,}-[0-9]{8,}-[a-z0-9]{32,}"
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
# Chat platforms: Discord bot tokens (the base64 of the bot's numeric id, a time stamp, an HMAC;
# one regex per first letter keeps each anchored on a literal) and webhooks, Telegram bot tokens
# (the bot id, ":AA", 33 characters), Microsoft Teams incoming webhooks.
_DISCORD_RES = tuple(
    re.compile(first + rb"[A-Za-z0-9_\-]{23,27}\.[A-Za-z0-9_\-]{6}\.[A-Za-z0-9_\-]{27,40}(?![A-Za-z0-9_\-])")
    for first in (b"M", b"N", b"O")
)
_DISCORD_HOOK_RE = re.compile(rb"https://(?:\w+\.)?discord(?:app)?\.com/api/webhooks/\d+/[A-Za-z0-9_\-]+")
_TELEGRAM_RE = re.compile(rb":AA[A-Za-z0-9_\-]{33}(?![A-Za-z0-9_\-])")
_TEAMS_HOOK_RE = re.compile(rb"https://[\w\-]+\.webhook\.office\.com/webhookb2/[\w\-@/]+")
# Package registries and CI: npm and Docker Hub access tokens, CircleCI personal tokens, Atlassian
# (Bitbucket, Jira) API tokens.
_REGISTRY_RE = re.compile(
    rb"(?:npm_[A-Za-z0-9]{36}|dckr_pat_[A-Za-z0-9_\-]{27,}|CCIPAT_[A-Za-z0-9_]{20,}|ATATT3[A-Za-z0-9_\-=]{60,})"
    rb"(?![A-Za-z0-9_\-=])"
)
_REGISTRY_KINDS = {b"n": "npm_token", b"d": "docker_token", b"C": "circleci_token", b"A": "atlassian_token"}
# The body of a PEM block with no END line (a truncated paste): base64, whitespace and the
# ``\n`` escapes of a key embedded in JSON (a GCP service-account file).
_PEM_BODY_RE = re.compile(r"(?:[A-Za-z0-9+/=\s]|\\[nr])*")
# After "-", the token's prefix (read backwards) and its kind.
_DASH_PREFIXES = (
    ("glpat", "gitlab_token"),
    *((p, "gitlab_token") for p in ("glcbt", "glptt", "glsoat", "glffct", "glrt", "gldt", "glft", "glagent")),
    ("xapp", "slack_token"),
    ("sk", "openai_key"),
    ("pypi", "pypi_token"),
    ("sq0csp", "square_secret"),
)


def _add_token(text: str, start: int, end: int, kind: str, out: list[Candidate]) -> None:
    """Add a token found at ``start``, unless it is the tail of a longer word."""
    if not (start and text[start - 1].isalnum()):  # not the middle of a longer word or blob
        out.append((start, end, P_TOKEN, kind))


def scan_tokens(text: str, ascii_view: bytes, out: list[Candidate]) -> None:
    """Append the shaped tokens and private key blocks found in ``text`` to ``out``."""
    # The regexes run on the ASCII view (bytes: faster on non-ASCII text, same offsets).
    for m in _DASH_TOKENS_RE.finditer(ascii_view):
        dash, end = m.span()
        if text.startswith("-----", dash):
            label = text[dash + len("-----BEGIN") : end - len("-----")]
            close = text.find(f"-----END{label}-----", end)
            end = close + len(label) + len("-----END-----") if close >= 0 else _PEM_BODY_RE.match(text, end).end()
            out.append((dash, end, P_BLOCK, "private_key"))
            continue
        for prefix, kind in _DASH_PREFIXES:
            if text.endswith(prefix, 0, dash):
                if kind != "openai_key" or letters_and_digits(text[dash + 1 : end]):
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
            out.append((start + len("AccountKey="), end, P_TOKEN, "azure_key"))
        else:
            _add_token(text, start, end, {"I": "gcp_key", "C": "twilio_key"}.get(c, "aws_key"), out)
    for m in _S_TOKENS_RE.finditer(ascii_view):
        start, end = m.span()
        c = text[start + 1]
        if c == "h":
            out.append((start + len("SharedAccessKey="), end, P_TOKEN, "azure_key"))
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
            out.append((m.start(1), m.end(1), P_TOKEN, "azure_key"))
    if b"hooks.slack.com" in ascii_view:
        for m in _SLACK_HOOK_RE.finditer(ascii_view):
            out.append((m.start(), m.end(), P_TOKEN, "slack_token"))
    _scan_chat_and_ci(text, ascii_view, out)


def _snowflake(part: bytes) -> bool:
    """A Discord token's first part: the base64 of the bot's numeric id (17 to 20 digits), which an
    identifier such as ``MyVeryLongClassName`` is not."""
    try:
        decoded = base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except ValueError:
        return False
    return 17 <= len(decoded) <= 20 and decoded.isdigit()


def _scan_chat_and_ci(text: str, ascii_view: bytes, out: list[Candidate]) -> None:
    """Discord, Telegram and Teams tokens and webhooks; npm, Docker Hub, CircleCI, Atlassian tokens."""
    for regex in _DISCORD_RES:
        for m in regex.finditer(ascii_view):
            if _snowflake(m.group().split(b".", 1)[0]):
                _add_token(text, m.start(), m.end(), "discord_token", out)
    if b"/api/webhooks/" in ascii_view:
        for m in _DISCORD_HOOK_RE.finditer(ascii_view):
            out.append((m.start(), m.end(), P_TOKEN, "discord_token"))
    for m in _TELEGRAM_RE.finditer(ascii_view):
        start = m.start()
        while start > 0 and text[start - 1].isdigit() and m.start() - start < 12:
            start -= 1
        if 8 <= m.start() - start <= 12 and not (start and text[start - 1].isalnum()):
            out.append((start, m.end(), P_TOKEN, "telegram_token"))
    if b"webhook.office.com" in ascii_view:
        for m in _TEAMS_HOOK_RE.finditer(ascii_view):
            out.append((m.start(), m.end(), P_TOKEN, "teams_webhook"))
    for m in _REGISTRY_RE.finditer(ascii_view):
        _add_token(text, m.start(), m.end(), _REGISTRY_KINDS[ascii_view[m.start() : m.start() + 1]], out)
