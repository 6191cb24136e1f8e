"""Every numeric code Herald puts on the wire, in one table.

Two families:

* **Close codes** end a WebSocket connection (RFC 6455 section 7.4).
  1000-1015 are the standard ones Herald uses with their RFC meaning.
  Herald's own codes live in the application range 4000-4999 and split in two:

  - 4000-4499: the client *should reconnect* (with backoff) and may resume by offset.
  - 4500-4999: the client *should not reconnect* without changing something
    (token, permissions, its code).

* **Error codes** are carried in an error reply to one command.  The connection
  stays open after an error reply.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes used by Herald."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # binary frame on a text-only endpoint
    INVALID_PAYLOAD = 1007  # malformed JSON or invalid UTF-8
    POLICY_VIOLATION = 1008  # refused by policy (e.g. Origin) after accept
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # graceful shutdown; reconnect to another node

    # 4000-4499: reconnect allowed.
    SERVER_CLOSED = 4000
    SLOW_CONSUMER = 4001
    NO_PONG = 4002
    IDLE_TIMEOUT = 4003
    TOKEN_EXPIRED = 4004
    INSUFFICIENT_STATE = 4005

    # 4500-4999: do not reconnect.
    PROTOCOL_VIOLATION = 4500
    UNAUTHORIZED = 4501
    FORCE_DISCONNECT = 4502
    CONNECTION_LIMIT = 4503
    RATE_LIMIT = 4504
    HANDSHAKE_TIMEOUT = 4505
    BAD_REQUEST = 4506

    @property
    def reconnect(self) -> bool:
        """Whether a client should reconnect after this close code."""
        return should_reconnect(int(self))


def should_reconnect(code: int) -> bool:
    """Return whether a client should reconnect after a close with ``code``."""
    if 4000 <= code < 4500:
        return True
    if 4500 <= code < 5000:
        return False
    return code in (1001, 1006, 1011, 1012, 1013, 1014)


class ErrorCode(IntEnum):
    """Codes carried in an error reply to a command (the connection stays open)."""

    INTERNAL = 100
    BAD_REQUEST = 101  # malformed frame: not JSON, wrong types, missing fields
    UNKNOWN_COMMAND = 102
    NOT_CONNECTED = 103  # a command other than connect before connect
    ALREADY_CONNECTED = 104
    DUPLICATE_ID = 105  # the id of a command that is still in flight
    INVALID_CHANNEL = 106
    UNKNOWN_NAMESPACE = 107
    ALREADY_SUBSCRIBED = 108
    NOT_SUBSCRIBED = 109
    PERMISSION_DENIED = 110
    UNAUTHORIZED = 111
    TOKEN_EXPIRED = 112
    METHOD_NOT_FOUND = 113
    INVALID_PARAMS = 114
    LIMIT_EXCEEDED = 115
    RATE_LIMITED = 116
    TOO_LARGE = 117
    NOT_AVAILABLE = 118  # feature off for this namespace, or the broker cannot do it
    UNRECOVERABLE_POSITION = 119
    TOO_DEEP = 120
    BROKER_UNAVAILABLE = 121


#: Human-readable default messages, used when no more specific message is given.
ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INTERNAL: "internal error",
    ErrorCode.BAD_REQUEST: "bad request",
    ErrorCode.UNKNOWN_COMMAND: "unknown command type",
    ErrorCode.NOT_CONNECTED: "send a connect command first",
    ErrorCode.ALREADY_CONNECTED: "already connected",
    ErrorCode.DUPLICATE_ID: "a command with this id is still in flight",
    ErrorCode.INVALID_CHANNEL: "invalid channel name",
    ErrorCode.UNKNOWN_NAMESPACE: "unknown namespace",
    ErrorCode.ALREADY_SUBSCRIBED: "already subscribed",
    ErrorCode.NOT_SUBSCRIBED: "not subscribed",
    ErrorCode.PERMISSION_DENIED: "permission denied",
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.TOKEN_EXPIRED: "token expired",
    ErrorCode.METHOD_NOT_FOUND: "method not found",
    ErrorCode.INVALID_PARAMS: "invalid params",
    ErrorCode.LIMIT_EXCEEDED: "limit exceeded",
    ErrorCode.RATE_LIMITED: "rate limited",
    ErrorCode.TOO_LARGE: "too large",
    ErrorCode.NOT_AVAILABLE: "not available",
    ErrorCode.UNRECOVERABLE_POSITION: "position is no longer in history",
    ErrorCode.TOO_DEEP: "JSON nested too deeply",
    ErrorCode.BROKER_UNAVAILABLE: "broker unavailable",
}

#: The close reason sent with 1003 by Herald's text-only routes, on either transport.
BINARY_REFUSED = "binary frames are not supported"

#: The close reason (with 1009) for a message sent in more frames than
#: ``max_message_fragments`` allows, on every WebSocket implementation Herald serves.
TOO_MANY_FRAGMENTS = "message in more than {limit} fragments"

__all__ = [
    "BINARY_REFUSED",
    "ERROR_MESSAGES",
    "TOO_MANY_FRAGMENTS",
    "CloseCode",
    "ErrorCode",
    "should_reconnect",
]
