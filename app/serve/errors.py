"""What an error answer may say: the reason a component gave, never Ray's wrapper around it.

An exception raised in a Serve replica or an actor reaches the caller wrapped (``RayTaskError``),
and the wrapper's text carries the remote traceback: process id, address, actor id, file paths.
:func:`public_reason` is the original exception's own message, first line, bounded.
"""

from __future__ import annotations

__all__ = ["json_problem", "public_reason", "remote_cause", "unavailable"]

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


def unavailable(exc: BaseException) -> bool:
    """Whether an exception that no route expected means a dependency is down (the store's
    connection, an actor that died or does not answer: 503, retry) rather than a bug (500)."""
    import sqlite3

    cause = remote_cause(exc)
    if isinstance(cause, sqlite3.OperationalError | ConnectionError | TimeoutError):
        return True
    kinds = {c.__name__ for c in type(cause).__mro__}
    # psycopg's OperationalError (a lost or refused connection), Ray's dead or unreachable actors.
    down = {"OperationalError", "RayActorError", "ActorDiedError", "ActorUnavailableError", "GetTimeoutError"}
    return bool(kinds & down)


def json_problem(exc: ValueError) -> str:
    """Why a body is not JSON, said of the client's bytes (where), not in the parser's words."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    line, column = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    return f"not valid JSON (line {line}, column {column})" if line is not None else "not valid JSON"
