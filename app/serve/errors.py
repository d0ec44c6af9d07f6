"""What an error answer may say: the reason a component gave, never Ray's wrapper around it.

An exception raised in a Serve replica or an actor reaches the caller wrapped (``RayTaskError``),
and the wrapper's text carries the remote traceback: process id, address, actor id, file paths.
:func:`public_reason` is the original exception's own message, first line, bounded.
"""

from __future__ import annotations

__all__ = ["public_reason", "remote_cause"]

MAX_REASON_CHARS = 500


def remote_cause(exc: BaseException) -> BaseException:
    """The exception a replica or an actor raised, without Ray's wrapper (``exc`` itself otherwise)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def public_reason(exc: BaseException) -> str:
    """The first line of the original exception's message, at most :data:`MAX_REASON_CHARS`."""
    lines = str(remote_cause(exc)).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return text[:MAX_REASON_CHARS] or "the request could not be processed"
