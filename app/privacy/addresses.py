"""Personal data and secrets inside addresses: the password of a URL, e-mail addresses and the user
name in a home directory path."""

from __future__ import annotations

import re

from app.privacy.candidates import P_PII, P_TOKEN, Candidate, is_placeholder

__all__ = ["scan_emails", "scan_home_paths", "scan_url_passwords"]

# ``scheme://user:password@host``; the password may hold an unencoded "@", so it runs to the
# last "@" that is followed by a host.
_URL_PASSWORD_RE = re.compile(r"://([^\s:/?#@'\"<>\[\]]*):([^\s/?#'\"<>]+)@(?=[A-Za-z0-9\[.\-])")


def scan_url_passwords(text: str, out: list[Candidate]) -> None:
    """Append the passwords of ``scheme://user:password@host`` URLs (not placeholders) to ``out``."""
    for m in _URL_PASSWORD_RE.finditer(text):
        if not is_placeholder(m.group(2)):
            out.append((m.start(2), m.end(2), P_TOKEN, "url_password"))


# Found from the "@"; the local part is read backwards.
_EMAIL_DOMAIN_RE = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def scan_emails(text: str, out: list[Candidate]) -> None:
    """Append the e-mail addresses in ``text`` to ``out`` (not decorators, SSH remotes or ``x@self.w``)."""
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
        out.append((at - len(local), m.end(), P_PII, "email"))


_USER_NAME = r"([^/\\\s'\"<>:|*?\[\]{}()$%`,;]{1,64})"
_HOME_POSIX_RE = re.compile(r"/(?:home|Users)/" + _USER_NAME)
_HOME_WINDOWS_RE = re.compile(r"\\\\?[Uu]sers\\\\?" + _USER_NAME)
_SHARED_HOMES = frozenset({"Shared", "Public", "Default", "All Users", "Default User", "user", "username"})


def scan_home_paths(text: str, ascii_view: bytes, out: list[Candidate]) -> None:
    """Append the user names of POSIX and Windows home directories (not shared ones) to ``out``."""
    for m in _HOME_POSIX_RE.finditer(text):
        start = m.start()
        # ``example.com/home/x`` or ``/srv/www/home/x`` is not a home directory.
        if start and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
            continue
        if m.group(1) not in _SHARED_HOMES:
            out.append((m.start(1), m.end(1), P_PII, "home_path"))
    if "\\" in text:  # a memchr: Windows paths are rare
        for m in _HOME_WINDOWS_RE.finditer(text):
            if m.group(1) not in _SHARED_HOMES:
                out.append((m.start(1), m.end(1), P_PII, "home_path"))
