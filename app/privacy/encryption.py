"""Encryption at rest (``privacy.encryption: true``): every stored text field of what users sent
(prompt, response, system prompt, stop sequences, tool parameters, output and errors, feedback
comments and corrections, project context, reviewers' comments) is encrypted by the store before
it is written and decrypted when it is read, so every job that reads through the store reads
plain text and the database files hold none.

The cipher is Fernet (``cryptography``: AES-128-CBC with an HMAC-SHA256 tag, authenticated, each
value with its own IV and timestamp). Keys come from an environment variable
(``privacy.encryption_key_env``, default ``KAIZEN_DATA_KEYS``) or a file
(``privacy.encryption_key_file``): Fernet keys, newest first, separated by commas or lines. The
newest encrypts; every listed key decrypts (``MultiFernet``), so rotating is: put a new key first,
run ``kaizen keys rotate-data`` (every encrypted value re-encrypted with the newest key, in batches,
while the API keeps serving), then drop the old key. ``kaizen keys new-data-key`` prints a key.

A text value is stored as ``enc:v1:<token>``; a JSON value as ``{"enc:v1": "<token>"}`` (valid
JSON for PostgreSQL's jsonb columns). Empty strings and nulls are stored as they are (they say
nothing, and the store's SQL compares corrections with ``''``). A value without the marker is read
as it is: a database that held plain text before encryption was turned on stays readable, and
``rotate-data`` encrypts those values too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ENCRYPTED_COLUMNS", "DataCipher", "EncryptionSettings", "new_key"]

PREFIX = "enc:v1:"
JSON_MARKER = "enc:v1"

ENCRYPTED_COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": ("input_raw", "input_processed", "output_content", "system_prompt", "stop_sequences"),
    "context_snapshots": ("project_context",),
    "tool_usage": ("parameters_raw", "parameters_processed", "output", "error"),
    "feedback": ("comment", "correction"),
    "human_ratings": ("comment",),
}
"""The columns encrypted at rest, by table (the store's JSON columns among them stay JSON)."""
_ALL = {c for cols in ENCRYPTED_COLUMNS.values() for c in cols}


def new_key() -> str:
    """A new Fernet key (urlsafe base64 of 32 random bytes)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@dataclass(frozen=True)
class EncryptionSettings:
    """Where the keys come from; what :class:`DataCipher` is built from."""

    key_env: str = "KAIZEN_DATA_KEYS"
    key_file: str | None = None

    def keys(self) -> list[str]:
        """The keys, newest first.

        Raises:
            ValueError: no key found, naming where it was looked for.
        """
        text = Path(self.key_file).read_text() if self.key_file else os.environ.get(self.key_env, "")
        keys = [k.strip() for k in text.replace(",", "\n").splitlines() if k.strip()]
        if not keys:
            where = f"the file {self.key_file}" if self.key_file else f"${self.key_env}"
            raise ValueError(
                f"privacy.encryption is on but {where} holds no key (make one with kaizen keys new-data-key)"
            )
        return keys


class DataCipher:
    """Encrypts and decrypts the store's values (see the module docstring)."""

    def __init__(self, keys: list[str]):
        from cryptography.fernet import Fernet, MultiFernet

        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except ValueError as exc:
            raise ValueError(f"privacy.encryption: a key is not a Fernet key ({exc})") from None

    @classmethod
    def from_settings(cls, settings: EncryptionSettings) -> DataCipher:
        return cls(settings.keys())

    # --- values ----------------------------------------------------------------------------------

    def seal(self, column: str, value: Any) -> Any:
        """``value`` as stored: encrypted when ``column`` is encrypted and it says something."""
        if column not in _ALL or value is None or value == "" or self.sealed(value):
            return value
        if isinstance(value, str):
            return PREFIX + self._fernet.encrypt(value.encode()).decode()
        text = json.dumps(value, separators=(",", ":"), default=str)
        return {JSON_MARKER: self._fernet.encrypt(text.encode()).decode()}

    def open(self, value: Any) -> Any:
        """A stored value as written by the user: decrypted when it is sealed, else as it is.

        Raises:
            cryptography.fernet.InvalidToken: sealed with a key this cipher does not hold, or
                altered since.
        """
        if isinstance(value, str) and value.startswith(PREFIX):
            return self._fernet.decrypt(value[len(PREFIX) :].encode()).decode()
        if isinstance(value, dict) and len(value) == 1 and JSON_MARKER in value:
            return json.loads(self._fernet.decrypt(value[JSON_MARKER].encode()))
        return value

    def rotate(self, value: Any, column: str) -> Any:
        """A stored value sealed with the newest key (a plain one sealed for the first time)."""
        if isinstance(value, str) and value.startswith(PREFIX):
            return PREFIX + self._fernet.rotate(value[len(PREFIX) :].encode()).decode()
        if isinstance(value, dict) and len(value) == 1 and JSON_MARKER in value:
            return {JSON_MARKER: self._fernet.rotate(value[JSON_MARKER].encode()).decode()}
        return self.seal(column, value)

    @staticmethod
    def sealed(value: Any) -> bool:
        return (isinstance(value, str) and value.startswith(PREFIX)) or (
            isinstance(value, dict) and len(value) == 1 and JSON_MARKER in value
        )
