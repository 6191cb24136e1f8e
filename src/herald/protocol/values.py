"""Plain value types of the wire, shared by the server, the brokers and the client.

Pure: no I/O, no server imports.  The brokers re-export them from
``herald.brokers.base``; the client takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """``offset`` of the newest publication in stream ``epoch`` (0 when empty)."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who published, joined or left: client id, user id and optional app info."""

    client: str
    user: str
    info: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client, "user": self.user, "info": self.info}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ClientInfo:
        return cls(str(value["client"]), str(value["user"]), value.get("info"))


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many clients (connections) and distinct users are in a channel."""

    num_clients: int
    num_users: int


@dataclass(frozen=True, slots=True)
class ClientPublication:
    """A publication received by the client (live, recovered, or from history)."""

    channel: str
    offset: int
    epoch: str
    data: Any
    info: ClientInfo | None = None

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)


@dataclass(frozen=True, slots=True)
class JoinEvent:
    """``join``: someone subscribed to ``channel`` (a push, and a client event)."""

    channel: str
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class LeaveEvent:
    """``leave``: someone left ``channel`` (a push, and a client event)."""

    channel: str
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Result of :meth:`Client.history`: publications and the stream's top position."""

    publications: list[ClientPublication]
    position: StreamPosition
