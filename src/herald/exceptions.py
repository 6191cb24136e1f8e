"""Herald's exceptions.

::

    HeraldError
    ├── ProtocolError          a frame that breaks protocol v1 (carries an ErrorCode)
    ├── CommandError           a command refused with an ErrorCode (reply, connection stays)
    │   ├── PermissionDeniedError
    │   └── ...                (hooks raise CommandError with any code)
    ├── DisconnectError        ends the connection with a CloseCode
    ├── BrokerError            the broker failed
    │   ├── BrokerUnavailableError   cannot reach the broker right now
    │   └── NotAvailableError        the broker cannot do this at all (e.g. history on plain NATS)
    ├── ConfigError            invalid settings
    └── ClientError            raised by herald.client
        ├── ClientTimeoutError
        ├── ClientConnectionError   cannot connect, or the connection was lost mid-command
        │   └── ClientClosedError   the client stopped for good (closed, or told not to reconnect)
        └── ReplyError         an error reply to a client command
"""

from __future__ import annotations

from .codes import ERROR_MESSAGES, CloseCode, ErrorCode


class HeraldError(Exception):
    """Root of every exception Herald raises on purpose."""


class CommandError(HeraldError):
    """A command is refused; the client gets an error reply with ``code``."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = code
        self.message = message or ERROR_MESSAGES.get(code, "error")
        super().__init__(f"{int(code)}: {self.message}")


class ProtocolError(CommandError):
    """A frame that does not follow protocol v1.

    ``command_id`` and ``command_type`` are the offending command's id and type when
    they could be read, so the error reply can still be matched by the client.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        command_id: int | None = None,
        command_type: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.command_id = command_id
        self.command_type = command_type


class PermissionDeniedError(CommandError):
    """Raise from a hook to refuse a subscribe or publish."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(ErrorCode.PERMISSION_DENIED, message)


class DisconnectError(HeraldError):
    """Ends the connection with ``code`` and ``reason``."""

    def __init__(self, code: CloseCode | int, reason: str) -> None:
        self.code = int(code)
        self.reason = reason
        super().__init__(f"{self.code}: {reason}")


class BrokerError(HeraldError):
    """The broker failed to do what was asked."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached right now; retrying later may work."""


class NotAvailableError(BrokerError):
    """The broker (or the namespace's options) does not support this operation."""


class ConfigError(HeraldError):
    """Settings are invalid."""


class ClientError(HeraldError):
    """Raised by :mod:`herald.client`."""


class ClientTimeoutError(ClientError, TimeoutError):
    """A client wait ran out of time."""


class ClientConnectionError(ClientError):
    """The client could not connect, or lost its connection while a command was in flight."""


class ClientClosedError(ClientConnectionError):
    """The client stopped for good: closed by the app, or by a close code that forbids reconnecting.

    ``code`` and ``reason`` are the WebSocket close code and reason (1000 when the app closed it).
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"client closed ({code}{': ' + reason if reason else ''})")


class ReplyError(ClientError):
    """The server answered a client command with an error reply."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


__all__ = [
    "BrokerError",
    "BrokerUnavailableError",
    "ClientClosedError",
    "ClientConnectionError",
    "ClientError",
    "ClientTimeoutError",
    "CommandError",
    "ConfigError",
    "DisconnectError",
    "HeraldError",
    "NotAvailableError",
    "PermissionDeniedError",
    "ProtocolError",
    "ReplyError",
]
