"""This node's connections and the channel -> subscribers index; local fan-out.

Fan-out is synchronous: a publication is rendered once per kind of subscriber
(normally once) and the same frame is handed to every subscriber's queue
without awaiting, so a slow client can neither block nor reorder anybody else.
"""

from __future__ import annotations

from collections.abc import Iterator

from .brokers.base import PresenceEvent, Publication
from .connection import Connection, Renderer
from .protocol.encoders import encode_presence_event


class Hub:
    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._users: dict[str, set[str]] = {}
        # channel -> client id -> connection (dicts keep subscription order and remove in O(1))
        self._channels: dict[str, dict[str, Connection]] = {}

    # ------------------------------------------------------------ connections

    def add(self, connection: Connection) -> None:
        self._connections[connection.client_id] = connection
        if connection.user:
            self._users.setdefault(connection.user, set()).add(connection.client_id)

    def remove(self, connection: Connection) -> list[str]:
        """Forget ``connection``; returns the channels that lost their last local subscriber."""
        self._connections.pop(connection.client_id, None)
        clients = self._users.get(connection.user)
        if clients is not None:
            clients.discard(connection.client_id)
            if not clients:
                del self._users[connection.user]
        emptied = [ch for ch in list(connection.channels) if self.unsubscribe(ch, connection)]
        return emptied

    def get(self, client_id: str) -> Connection | None:
        return self._connections.get(client_id)

    def connections(self) -> Iterator[Connection]:
        return iter(list(self._connections.values()))

    def user_connections(self, user: str) -> list[Connection]:
        return [self._connections[c] for c in self._users.get(user, ()) if c in self._connections]

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def user_count(self) -> int:
        return len(self._users)

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, channel: str, connection: Connection) -> bool:
        """Add a subscriber; returns True when it is the channel's first on this node."""
        subscribers = self._channels.get(channel)
        first = subscribers is None
        if subscribers is None:
            subscribers = self._channels[channel] = {}
        subscribers[connection.client_id] = connection
        connection.channels.add(channel)
        return first

    def unsubscribe(self, channel: str, connection: Connection) -> bool:
        """Remove a subscriber; returns True when the channel has no local subscriber left."""
        connection.channels.discard(channel)
        connection.drop_hold(channel)
        subscribers = self._channels.get(channel)
        if subscribers is None:
            return False
        subscribers.pop(connection.client_id, None)
        if not subscribers:
            del self._channels[channel]
            return True
        return False

    def subscribers(self, channel: str) -> list[Connection]:
        return list(self._channels.get(channel, {}).values())

    def subscriber_count(self, channel: str) -> int:
        return len(self._channels.get(channel, ()))

    def channels(self) -> dict[str, int]:
        """Channels with local subscribers and their counts."""
        return {channel: len(subs) for channel, subs in self._channels.items()}

    # ------------------------------------------------------------ fan-out

    def fan_out(self, publication: Publication) -> int:
        """Queue ``publication`` on every local subscriber; returns how many got it."""
        subscribers = self._channels.get(publication.channel)
        if not subscribers:
            return 0
        frames: dict[Renderer, str] = {}
        publisher = publication.info.client if publication.info is not None else None
        channel, offset, epoch = publication.channel, publication.offset, publication.epoch
        # A channel's subscribers mostly share one renderer: the last one is kept at hand.
        last: Renderer | None = None
        frame = ""
        skipped = 0
        # Copy: a send may disconnect a slow consumer, which unsubscribes it.
        members = list(subscribers.values())
        for connection in members:
            if not connection.echo_own and connection.client_id == publisher:
                skipped += 1
                continue
            renderer = connection.renderer
            if renderer is not last:
                if renderer not in frames:
                    frames[renderer] = renderer(publication)
                last, frame = renderer, frames[renderer]
            connection.deliver(channel, offset, frame, epoch)
        return len(members) - skipped

    def fan_out_event(self, event: PresenceEvent, max_subscribers: int = 0) -> int:
        """Push a join/leave event to the channel's subscribers; none while the channel has
        more than ``max_subscribers`` here (0: no bound), where the pushes would cost the
        square of its size."""
        subscribers = self._channels.get(event.channel)
        if not subscribers or 0 < max_subscribers < len(subscribers):
            return 0
        frame = encode_presence_event(event.kind, event.channel, event.info)
        count = 0
        for connection in list(subscribers.values()):
            if connection.events:
                connection.deliver(event.channel, None, frame)
                count += 1
        return count
