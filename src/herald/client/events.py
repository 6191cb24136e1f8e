"""The client's state and the events it emits (``Client.on`` / ``Client.wait_for``)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ..exceptions import ReplyError
from ..protocol.values import ClientPublication, JoinEvent, LeaveEvent, StreamPosition


class ClientState(enum.Enum):
    """Where a :class:`Client` is in its life."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectedEvent:
    """``connected``: a connection was established (``reconnect`` is True after the first)."""

    client: str
    user: str
    version: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class DisconnectedEvent:
    """``disconnected``: the connection ended with ``code``; ``reconnect`` says whether it retries."""

    code: int
    reason: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class RecoveredEvent:
    """``recovered``: a subscription resumed with no gap; ``missed`` publications were replayed."""

    channel: str
    missed: int
    position: StreamPosition


@dataclass(frozen=True, slots=True)
class RecoveryFailedEvent:
    """``recovery_failed``: publications after ``previous`` may be lost; re-sync the channel.

    ``position`` is the stream's current top; ``epoch_changed`` tells a reset
    stream (server or broker restarted) from history that no longer reaches back.
    """

    channel: str
    previous: StreamPosition
    position: StreamPosition

    @property
    def epoch_changed(self) -> bool:
        return self.previous.epoch != self.position.epoch


@dataclass(frozen=True, slots=True)
class SubscribeErrorEvent:
    """``subscribe_error``: a resubscribe after reconnect was refused, or the server ended
    the subscription (an ``unsubscribe`` push, e.g. code 112 when its subscription token
    expired and could not be refreshed); the subscription ended."""

    channel: str
    error: ReplyError


Event: TypeAlias = (
    ConnectedEvent
    | DisconnectedEvent
    | RecoveredEvent
    | RecoveryFailedEvent
    | JoinEvent
    | LeaveEvent
    | SubscribeErrorEvent
    | ClientPublication
)

EventName = Literal[
    "connected",
    "disconnected",
    "recovered",
    "recovery_failed",
    "join",
    "leave",
    "subscribe_error",
    "publication",
]

EVENT_TYPES: dict[str, type[Any]] = {
    "connected": ConnectedEvent,
    "disconnected": DisconnectedEvent,
    "recovered": RecoveredEvent,
    "recovery_failed": RecoveryFailedEvent,
    "join": JoinEvent,
    "leave": LeaveEvent,
    "subscribe_error": SubscribeErrorEvent,
    "publication": ClientPublication,
}
EVENT_NAMES: dict[type[Any], str] = {kind: name for name, kind in EVENT_TYPES.items()}

Handler: TypeAlias = Callable[[Any], Any]
