"""The HTTP headers Kaizen reads besides authentication."""

from __future__ import annotations

__all__ = ["RECORD_HEADER", "SESSION_HEADER"]

SESSION_HEADER = "x-kaizen-session"
"""Groups a caller's chat completions into one session (else the body's ``user``); the canary's
share is drawn by session."""
RECORD_HEADER = "x-kaizen-record"
"""``false``: the completion is answered but not recorded as an interaction (the deployer's smoke
tests; a caller's own probes)."""
