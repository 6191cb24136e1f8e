"""Presence upkeep: this node's entries in the presence manager, and join/leave events.

A client subscribed to a channel whose namespace has ``presence`` gets an entry
(written on subscribe, removed on unsubscribe or disconnect) that expires after
``presence_ttl`` unless refreshed; :meth:`PresenceUpkeep.refresh_forever` rewrites
this node's entries every ``presence_ttl / 3`` seconds, so they outlive the TTL only
while the node lives.  Presence failures are logged, never raised: the subscribe
they follow already succeeded, and the next refresh repairs the entry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .brokers.base import ClientInfo, PresenceEvent
from .exceptions import CommandError

if TYPE_CHECKING:
    from .config import NamespaceOptions
    from .connection import Connection
    from .node import Node

logger = logging.getLogger("herald.node")

#: Channels refreshed concurrently (their Redis scripts share a pipeline) ...
REFRESH_GROUP = 100
#: ... and presence entries refreshed in one loop turn at most (a big channel is split).
REFRESH_ENTRIES = 500
#: Connections whose channels are gathered in one loop turn at most.
REFRESH_TURN = 1000


class PresenceUpkeep:
    """Writes, refreshes and removes the presence entries of ``node``'s clients."""

    __slots__ = ("_node",)

    def __init__(self, node: Node) -> None:
        self._node = node

    async def join(self, channel: str, options: NamespaceOptions, connection: Connection) -> None:
        if not options.presence:
            return
        node = self._node
        info = ClientInfo(connection.client_id, connection.user, connection.info)
        try:
            await node.presence.add(channel, info, node.settings.presence_ttl)
            if options.join_leave:
                await node.broker.publish_event(PresenceEvent(channel, "join", info))
        except Exception as exc:
            # The subscribe already succeeded (and was answered); the refresh loop retries.
            logger.warning("presence join %s failed: %r", channel, exc)

    async def leave(self, channel: str, connection: Connection) -> None:
        node = self._node
        try:
            options = node.namespace(channel)
        except CommandError:
            return
        if not options.presence:
            return
        try:
            await node.presence.remove(channel, connection.client_id)
            if options.join_leave:
                info = ClientInfo(connection.client_id, connection.user, connection.info)
                await node.broker.publish_event(PresenceEvent(channel, "leave", info))
        except Exception as exc:
            logger.warning("presence leave %s failed: %r", channel, exc)

    async def refresh_forever(self) -> None:
        """Refresh this node's presence entries so that they outlive the TTL only while we live."""
        period = max(self._node.settings.presence_ttl / 3, 0.05)
        while True:
            await asyncio.sleep(period)
            await self.refresh_all()

    async def refresh_all(self) -> None:
        """One refresh: the entries of this node's clients, one call per channel (or per
        slice of a big channel).

        Bounded work per loop turn: the (connection, channel) pairs are gathered
        :data:`REFRESH_TURN` connections at a time, and refreshed in groups of at most
        :data:`REFRESH_GROUP` channels and :data:`REFRESH_ENTRIES` entries, concurrently
        within a group (on Redis their scripts share one pipeline), yielding between
        groups.  A node's 10,000 clients in 2,000 channels (50,000 entries) must not
        stall deliveries for one long turn: unbounded, that took tens of milliseconds.
        """
        node = self._node
        if not any(options.presence for options in node.settings.namespaces.values()):
            return  # nothing to refresh: no walk over every (connection, channel) pair
        members: dict[str, list[Connection]] = {}
        # Whether a channel's namespace keeps presence, looked up once per channel: the
        # channels of namespaces without it are not gathered (nor given a coroutine).
        keeps: dict[str, bool] = {}
        for index, connection in enumerate(list(node.hub.connections())):
            if index and index % REFRESH_TURN == 0:
                await asyncio.sleep(0)
            for channel in connection.channels:
                wanted = keeps.get(channel)
                if wanted is None:
                    wanted = keeps[channel] = self._keeps_presence(channel)
                if wanted:
                    members.setdefault(channel, []).append(connection)
        group: list[tuple[str, list[Connection]]] = []
        entries = 0
        for channel, connections in members.items():
            for start in range(0, len(connections), REFRESH_ENTRIES):
                piece = connections[start : start + REFRESH_ENTRIES]
                if group and (len(group) >= REFRESH_GROUP or entries + len(piece) > REFRESH_ENTRIES):
                    await self._refresh_group(group)
                    group, entries = [], 0
                group.append((channel, piece))
                entries += len(piece)
        if group:
            await self._refresh_group(group)

    def _keeps_presence(self, channel: str) -> bool:
        if channel.startswith("$"):
            return False  # private channels of the server (a user's own, control)
        try:
            return self._node.namespace(channel).presence
        except CommandError:
            return False  # its namespace was removed: nothing of it is refreshed

    async def _refresh_group(self, group: list[tuple[str, list[Connection]]]) -> None:
        await asyncio.sleep(0)
        await asyncio.gather(*(self._refresh(channel, connections) for channel, connections in group))

    async def _refresh(self, channel: str, connections: list[Connection]) -> None:
        node = self._node
        try:
            infos = [ClientInfo(c.client_id, c.user, c.info) for c in connections]
            await node.presence.refresh(channel, infos, node.settings.presence_ttl)
            # A client may have left while we awaited: its leave already removed the
            # entry, so remove the one we just wrote instead of leaving a ghost.
            for connection in connections:
                if channel not in connection.channels or node.hub.get(connection.client_id) is not connection:
                    await node.presence.remove(channel, connection.client_id)
        except Exception as exc:
            logger.debug("presence refresh of %s failed: %r", channel, exc)
