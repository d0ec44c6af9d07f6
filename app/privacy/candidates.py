"""What every scanner of the privacy filter shares: the kinds it reports, the candidate replacement
it appends (with its priority for overlaps), and the checks on a found value that decide whether it
leaks anything (a placeholder leaks nothing; a high-entropy value looks generated).
"""

from __future__ import annotations

import math
import re

from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString

__all__ = [
    "KINDS",
    "P_ASSIGN",
    "P_BLOCK",
    "P_PII",
    "P_TOKEN",
    "Candidate",
    "high_entropy",
    "is_placeholder",
    "letters_and_digits",
]

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
    "discord_token",
    "telegram_token",
    "teams_webhook",
    "npm_token",
    "docker_token",
    "circleci_token",
    "atlassian_token",
)

# Overlapping matches are resolved by priority: a private key block swallows whatever its base64
# happens to look like, a shaped token beats the assignment around it (the kind is more precise),
# and an assignment beats the e-mail or number inside its value.
P_BLOCK, P_TOKEN, P_ASSIGN, P_PII = 4, 3, 2, 1

# (start, end, priority, kind) of one replacement.
Candidate = tuple[int, int, int, str]


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

_B64 = Base64HighEntropyString()  # detect-secrets' entropy over the base64 alphabet (limit 4.5)
_HEX = HexHighEntropyString()  # ... and over hex digits, with its penalty for all-digit strings


def is_placeholder(value: str) -> bool:
    """True for an empty, filler or template-only value, which leaks nothing."""
    v = value.strip()
    if _FILLER.fullmatch(v):
        return True
    if "$" in v or "{" in v or "%" in v or "<" in v:
        rest = _TEMPLATE_REF.sub("", v)
        return rest != v and not rest.strip(" \t:/@.-_,;")
    return False


def high_entropy(value: str) -> bool:
    """True for a value that looks generated (a key or token) rather than written by a person."""
    v = value
    if v[:7].lower() in ("bearer ", "digest ") or v[:6].lower() in ("basic ", "token "):
        v = v.split(None, 1)[1] if len(v.split(None, 1)) == 2 else v
    n = len(v)
    if n < 16 or n > 4096 or is_placeholder(v):
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


def letters_and_digits(value: str) -> bool:
    """True for a value with at least one digit and one letter."""
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
