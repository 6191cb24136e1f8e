"""The command gate of one protocol v1 client: which command is legal when.  No I/O, no awaits."""

from __future__ import annotations

from collections.abc import Set
from enum import Enum

from ..codes import ErrorCode
from ..exceptions import ProtocolError


class Phase(Enum):
    """Where a client is in the protocol."""

    CONNECTING = "connecting"  # waiting for the connect command
    CONNECTED = "connected"
    CLOSED = "closed"


class CommandGate:
    """Tracks one client's phase and in-flight command ids, and checks its subscriptions.

    The transport calls :meth:`begin` before handling a command and
    :meth:`finish` after its reply is queued.

    ``subscriptions`` is read, never written: the server passes the connection's own
    set of channels (``Connection.channels``, kept by the hub), so there is one
    owner of what a connection is subscribed to.
    """

    __slots__ = ("in_flight", "max_subscriptions", "phase", "subscriptions")

    def __init__(self, subscriptions: Set[str] = frozenset(), *, max_subscriptions: int = 128) -> None:
        self.phase = Phase.CONNECTING
        self.subscriptions = subscriptions
        # Ids of the commands being handled; None while there are none (an idle
        # connection's empty set was 216 bytes).
        self.in_flight: set[int] | None = None
        self.max_subscriptions = max_subscriptions

    def begin(self, command_id: int | None, kind: str) -> None:
        """Check that command ``kind`` is legal now and reserve its id."""
        if self.phase is Phase.CLOSED:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "session is closed", command_id)
        if kind == "connect":
            if self.phase is Phase.CONNECTED:
                raise ProtocolError(ErrorCode.ALREADY_CONNECTED, None, command_id)
        elif self.phase is Phase.CONNECTING:
            raise ProtocolError(ErrorCode.NOT_CONNECTED, None, command_id)
        if command_id is not None:
            in_flight = self.in_flight
            if in_flight is None:
                self.in_flight = {command_id}
            elif command_id in in_flight:
                raise ProtocolError(ErrorCode.DUPLICATE_ID, None, command_id)
            else:
                in_flight.add(command_id)

    def finish(self, command_id: int | None) -> None:
        in_flight = self.in_flight
        if command_id is not None and in_flight is not None:
            in_flight.discard(command_id)
            if not in_flight:
                self.in_flight = None

    def connected(self) -> None:
        self.phase = Phase.CONNECTED

    def check_subscribe(self, channel: str) -> None:
        if channel in self.subscriptions:
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED)
        if len(self.subscriptions) >= self.max_subscriptions:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.max_subscriptions} subscriptions per connection",
            )

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self.in_flight = None
