"""Idempotency keys: what a publisher may name a publication by, so a retry is safe.

A publish that carries an ``idempotency_key`` and is retried with the same key on
the same channel within the node's ``idempotency_window`` returns the original
publication's position and publishes nothing (docs/backends.md).
The key is 1 to :data:`MAX_IDEMPOTENCY_KEY_LENGTH` characters of visible ASCII
(``!`` to ``~``): no spaces or control characters, so it travels unchanged in a
Redis key name and a NATS header, and a log line shows it as it is.
"""

from __future__ import annotations

import re

from ..codes import ErrorCode
from ..exceptions import CommandError

#: Longest idempotency key accepted (characters).
MAX_IDEMPOTENCY_KEY_LENGTH = 128
#: What an idempotency key is made of (the JSON Schema says the same).
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+$"

_KEY = re.compile(r"[!-~]+")


def check_idempotency_key(key: object) -> str:
    """Return ``key`` if it is a valid idempotency key, else raise ``CommandError(BAD_REQUEST)``."""
    if not isinstance(key, str) or not key:
        raise CommandError(ErrorCode.BAD_REQUEST, "idempotency_key must be a non-empty string")
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise CommandError(
            ErrorCode.BAD_REQUEST,
            f"idempotency_key longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
        )
    if not _KEY.fullmatch(key):
        raise CommandError(
            ErrorCode.BAD_REQUEST, "idempotency_key may contain only visible ASCII characters (! to ~)"
        )
    return key


__all__ = ["IDEMPOTENCY_KEY_PATTERN", "MAX_IDEMPOTENCY_KEY_LENGTH", "check_idempotency_key"]
