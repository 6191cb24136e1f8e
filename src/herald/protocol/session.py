"""Per-client protocol state: which command is legal when.  No I/O, no awaits."""

from __future__ import annotations

from enum import Enum

from ..codes import ErrorCode
from ..exceptions import ProtocolError


class SessionState(Enum):
    CONNECTING = "connecting"  # waiting for the connect command
    CONNECTED = "connected"
    CLOSED = "closed"


class Session:
    """Tracks one client's state, subscriptions and in-flight command ids.

    The transport calls :meth:`begin` before handling a command and
    :meth:`finish` after its reply is queued.
    """

    __slots__ = ("in_flight", "max_subscriptions", "state", "subscriptions")

    def __init__(self, *, max_subscriptions: int = 128) -> None:
        self.state = SessionState.CONNECTING
        self.subscriptions: set[str] = set()
        self.in_flight: set[int] = set()
        self.max_subscriptions = max_subscriptions

    def begin(self, command_id: int | None, kind: str) -> None:
        """Check that command ``kind`` is legal now and reserve its id."""
        if self.state is SessionState.CLOSED:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "session is closed", command_id)
        if kind == "connect":
            if self.state is SessionState.CONNECTED:
                raise ProtocolError(ErrorCode.ALREADY_CONNECTED, None, command_id)
        elif self.state is SessionState.CONNECTING:
            raise ProtocolError(ErrorCode.NOT_CONNECTED, None, command_id)
        if command_id is not None:
            if command_id in self.in_flight:
                raise ProtocolError(ErrorCode.DUPLICATE_ID, None, command_id)
            self.in_flight.add(command_id)

    def finish(self, command_id: int | None) -> None:
        if command_id is not None:
            self.in_flight.discard(command_id)

    def connected(self) -> None:
        self.state = SessionState.CONNECTED

    def check_subscribe(self, channel: str) -> None:
        if channel in self.subscriptions:
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED)
        if len(self.subscriptions) >= self.max_subscriptions:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.max_subscriptions} subscriptions per connection",
            )

    def subscribed(self, channel: str) -> None:
        self.subscriptions.add(channel)

    def unsubscribed(self, channel: str) -> None:
        if channel not in self.subscriptions:
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED)
        self.subscriptions.discard(channel)

    def close(self) -> None:
        self.state = SessionState.CLOSED
        self.in_flight.clear()
