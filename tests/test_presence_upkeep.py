"""The periodic presence refresh: every entry of this node's clients rewritten, with
bounded work per event-loop turn (a refresh of 50,000 entries in one turn stalled
every delivery of a 10,000-client node)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from herald.brokers.base import ClientInfo
from herald.config import NamespaceOptions, Settings
from herald.connection import Connection
from herald.node import Node
from herald.presence.memory import MemoryPresenceManager
from herald.presence_upkeep import REFRESH_ENTRIES, REFRESH_GROUP, REFRESH_TURN


class _Transport:
    async def send(self, frame: str) -> None:
        return None

    async def close(self, code: int, reason: str) -> None:
        return None


class _CountingPresence(MemoryPresenceManager):
    """Records how many entries each event-loop turn refreshed (a ticker task counts turns)."""

    def __init__(self) -> None:
        super().__init__()
        self.turn = 0
        self.per_turn: dict[int, int] = {}
        self.channels_per_turn: dict[int, set[str]] = {}

    async def refresh(self, channel: str, infos: Sequence[ClientInfo], ttl: float) -> None:
        self.per_turn[self.turn] = self.per_turn.get(self.turn, 0) + len(infos)
        self.channels_per_turn.setdefault(self.turn, set()).add(channel)
        await super().refresh(channel, infos, ttl)


async def test_a_refresh_rewrites_every_entry_in_bounded_turns() -> None:
    presence = _CountingPresence()
    node = Node(Settings(ping_interval=0), presence=presence)
    await node.start()
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            presence.turn += 1
            await asyncio.sleep(0)

    try:
        # 1,500 clients, each in 3 of 300 channels, plus one channel with all of them.
        for i in range(1500):
            connection = Connection(_Transport(), f"c{i}", renderer=lambda p: "x")
            node.hub.add(connection)
            for channel in (f"room{i % 300}", f"room{(i + 7) % 300}", f"room{(i + 13) % 300}", "big"):
                node.hub.subscribe(channel, connection)
        ticking = asyncio.create_task(ticker())
        await node.presence_upkeep.refresh_all()
        stop.set()
        await ticking
        # Every entry was written: 4 per client.
        assert sum(presence.per_turn.values()) == 1500 * 4
        assert len(await presence.presence("room0")) == 15
        assert len(await presence.presence("big")) == 1500
        # ... spread over turns, none with more than the bound (the big channel in slices).
        assert max(presence.per_turn.values()) <= REFRESH_ENTRIES
        assert max(len(c) for c in presence.channels_per_turn.values()) <= REFRESH_GROUP
        assert len(presence.per_turn) >= 1500 * 4 // REFRESH_ENTRIES
    finally:
        stop.set()
        for connection in list(node.hub.connections()):
            node.hub.remove(connection)
        await node.close()


async def test_a_refresh_skips_the_channels_of_namespaces_without_presence() -> None:
    presence = _CountingPresence()
    namespaces = {"": NamespaceOptions(presence=True), "feed": NamespaceOptions(presence=False)}
    node = Node(Settings(ping_interval=0, namespaces=namespaces), presence=presence)
    await node.start()
    turns = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    try:
        clients = REFRESH_TURN + 200
        for i in range(clients):
            connection = Connection(_Transport(), f"c{i}", renderer=lambda p: "x")
            node.hub.add(connection)
            for channel in ("lobby", f"feed:{i % 300}", "feed:all"):
                node.hub.subscribe(channel, connection)
        await node.presence_upkeep.refresh_all()
        assert set().union(*presence.channels_per_turn.values()) == {"lobby"}
        assert sum(presence.per_turn.values()) == clients
        # No namespace keeps presence: the refresh returns at once, without walking
        # (the walk lets the loop turn every REFRESH_TURN connections).
        node.settings.namespaces[""] = NamespaceOptions(presence=False)
        presence.per_turn.clear()
        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = turns
        await node.presence_upkeep.refresh_all()
        assert turns == before
        assert presence.per_turn == {}
        stop.set()
        await ticking
    finally:
        stop.set()
        for connection in list(node.hub.connections()):
            node.hub.remove(connection)
        await node.close()
