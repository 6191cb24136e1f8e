"""A subscriber kept connected while its channel's stream restarts (issue 13, items 12-13).

A stream restarts when its history expires entirely (``history_ttl``) or the broker
loses it (FLUSHALL, Redis restarted empty).  Its offsets start again at 1 in a new
epoch.  A client that subscribed at offset N and received nothing since must get the
new stream whole (offsets 1, 2, ...), or be told (close 4005, then ``recovered:
false`` on resume); never offsets N+1, ... alone.  Real ``herald serve`` processes on
real brokers, real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from herald.codes import CloseCode

from ..helpers import ProtocolClient, ServerProcess, async_until, async_wait_for
from ..servers import NatsServer, RedisServer, nats_server_fixture, redis_server_fixture
from .test_multinode import subscribe

API_KEY = "stream-restart-key"
TTL = 1.0
NAMESPACES = json.dumps(
    {
        "short": {"history_size": 20, "history_ttl": TTL},
        "kept": {"history_size": 100, "history_ttl": 300},
        "bare": {"history_size": 0},
    }
)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


class Node:
    """One ``herald serve`` with the HTTP API (publishing) and protocol clients."""

    def __init__(self, broker: str) -> None:
        env = {
            "HERALD_BROKER": broker,
            "HERALD_API_KEY": API_KEY,
            "HERALD_NAMESPACES": NAMESPACES,
            "HERALD_LOG_LEVEL": "warning",
            "HERALD_DEMOS": "false",
        }
        self.server = ServerProcess(env=env)
        self.http = httpx.AsyncClient(base_url=self.server.http, headers={"X-API-Key": API_KEY}, timeout=10)

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        response = await self.http.post("/api/publish", json={"channel": channel, "data": data})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def publish_when_ready(self, channel: str, data: Any) -> dict[str, Any]:
        """Publish once the broker answers again (it was just restarted)."""
        done: list[dict[str, Any]] = []

        async def attempt() -> bool:
            response = await self.http.post("/api/publish", json={"channel": channel, "data": data})
            if response.status_code == 200:
                done.append(response.json())
            return bool(done)

        await async_until(attempt, 10, what="the broker to accept publications again")
        return done[0]

    async def top(self, channel: str) -> dict[str, Any]:
        response = await self.http.get("/api/history", params={"channel": channel, "limit": 0})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def client(self) -> ProtocolClient:
        return await ProtocolClient.open(self.server.ws("/connect"))

    async def close(self) -> None:
        await self.http.aclose()
        await asyncio.to_thread(self.server.kill)


@pytest.fixture
async def node_on(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    nodes: list[Node] = []

    async def start(broker: str) -> Node:
        node = Node(broker)
        await asyncio.to_thread(node.server.start)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        await node.close()


async def whole_or_told(client: ProtocolClient, channel: str, new: list[dict[str, Any]]) -> str:
    """Read ``client``'s pushes until it has the last of ``new`` (publish replies of the
    new stream) or is closed.  Returns "whole" when it got every one of them, in order,
    or "told" when it got a gap-free prefix and then a close 4005 (resume and re-sync)."""
    epoch = new[0]["epoch"]
    got: list[tuple[str, int]] = []
    while True:
        frame = await client.push(timeout=10)
        if frame["type"] == "publication" and frame["channel"] == channel:
            got.append((frame["epoch"], frame["offset"]))
            if got[-1] == (epoch, new[-1]["offset"]):
                assert got == [(epoch, p["offset"]) for p in new], got
                return "whole"
        elif frame["type"] == "disconnect":
            assert frame["code"] == CloseCode.INSUFFICIENT_STATE and frame["reconnect"] is True, frame
            # What came before the close is the start of the new stream, with no hole.
            assert got == [(epoch, p["offset"]) for p in new[: len(got)]], got
            await asyncio.wait_for(client.closed.wait(), 5)
            return "told"


BROKERS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("nats-jetstream", marks=pytest.mark.nats),
]


@pytest.mark.parametrize("broker", BROKERS)
async def test_subscriber_gets_the_whole_new_stream_after_history_expired(
    broker: str, node_on: Any, request: pytest.FixtureRequest
) -> None:
    """The issue's reproduction: publish 5, subscribe (offset 5), the history expires,
    publish 8 (offsets 1..8 of a new epoch): the subscriber gets all 8, not only 6..8."""
    if broker == "redis":
        url = request.getfixturevalue("redis_server").url
    elif broker == "nats-jetstream":
        url = request.getfixturevalue("jetstream_server").url + "?jetstream=1"
    else:
        url = "memory"
    node: Node = await node_on(url)
    channel = "short:restart"
    old = [await node.publish(channel, n) for n in range(5)]
    assert [p["offset"] for p in old] == [1, 2, 3, 4, 5]
    client = await node.client()
    try:
        start = await subscribe(client, channel)
        assert (start["offset"], start["epoch"]) == (5, old[-1]["epoch"])

        async def expired() -> bool:
            return (await node.top(channel))["epoch"] != start["epoch"]

        await async_until(expired, 10 * TTL, what="the history to expire")
        new = [await node.publish(channel, {"n": n}) for n in range(8)]
        assert [p["offset"] for p in new] == list(range(1, 9)) and new[0]["epoch"] != start["epoch"]
        # Nothing was lost while the client listened: it must get the new stream whole.
        assert await whole_or_told(client, channel, new) == "whole"
        assert not client.closed.is_set()

        # A client resuming from the old position is told it cannot recover.
        late = await node.client()
        try:
            result = await subscribe(late, channel, since={"offset": 5, "epoch": start["epoch"]})
            assert result["recovered"] is False and result["epoch"] == new[0]["epoch"]
        finally:
            await late.close()
    finally:
        await client.close()


@pytest.mark.redis
async def test_a_live_flushall_reaches_subscribers(redis_server: RedisServer, node_on: Any) -> None:
    """Issue 12: Redis loses everything (FLUSHALL) while the link stays up.  The new
    epoch's first publications reach the subscriber (they used to be dropped as
    duplicates of the old epoch's offsets)."""
    node: Node = await node_on(redis_server.url)
    channel = "kept:flush"
    old = [await node.publish(channel, n) for n in range(5)]
    client = await node.client()
    try:
        start = await subscribe(client, channel)
        assert start["offset"] == 5
        admin = aioredis.Redis.from_url(redis_server.url)
        try:
            await admin.flushall()
        finally:
            await admin.aclose()
        new = [await node.publish(channel, {"n": n}) for n in range(8)]
        assert new[0]["offset"] == 1 and new[0]["epoch"] != old[-1]["epoch"]
        # The node's link stayed up: it saw the old stream to its end, nothing to excuse.
        assert await whole_or_told(client, channel, new) == "whole"
        assert not client.closed.is_set()
    finally:
        await client.close()


@pytest.mark.redis
async def test_redis_restarted_empty_under_subscribers(node_on: Any) -> None:
    """Redis killed and restarted empty while clients listen.  A channel without history
    gets the new stream whole or is told; a channel with history is told (4005), and its
    client resuming from its old position gets ``recovered: false``."""
    server = RedisServer()
    server.start()
    try:
        node: Node = await node_on(server.url)
        bare, kept = "bare:restart", "kept:restart"
        for _ in range(5):
            await node.publish(bare, "old")
            last_kept = await node.publish(kept, "old")
        bare_client, kept_client = await node.client(), await node.client()
        try:
            assert (await subscribe(bare_client, bare))["offset"] == 5
            assert (await subscribe(kept_client, kept))["offset"] == 5

            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)  # empty: no persistence
            first = await node.publish_when_ready(bare, {"n": 0})
            new = [first] + [await node.publish(bare, {"n": n}) for n in range(1, 6)]
            assert [p["offset"] for p in new] == list(range(1, 7))
            assert await whole_or_told(bare_client, bare, new) in ("whole", "told")

            # History was lost: the subscriber must be told, then resume without a false claim.
            disconnect = await kept_client.push("disconnect", 10)
            assert disconnect["code"] == CloseCode.INSUFFICIENT_STATE
            assert not [
                f
                for f in kept_client.frames
                if f.get("type") == "publication" and f["epoch"] != last_kept["epoch"]
            ]
            again = await node.client()
            try:
                since = {"offset": last_kept["offset"], "epoch": last_kept["epoch"]}
                result = await subscribe(again, kept, since=since)
                assert result["recovered"] is False and result["epoch"] != last_kept["epoch"]
                live = await node.publish(kept, "live")
                [publication] = await again.publications(1)
                assert (publication["epoch"], publication["offset"]) == (live["epoch"], live["offset"])
            finally:
                await again.close()
        finally:
            await bare_client.close()
            await kept_client.close()
    finally:
        await asyncio.to_thread(server.cleanup)


async def test_duplicate_floor_after_subscribe_compares_epochs() -> None:
    """Unit level: the floor a connection keeps after its subscribe reply drops a late
    live copy of a publication the reply carried (same epoch, offset at or below it), and
    nothing of another epoch, which is a restarted stream's start."""
    from herald.connection import Connection

    class Frames:
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def send(self, frame: str) -> None:
            self.sent.append(frame)

        async def close(self, code: int, reason: str) -> None:
            return None

    transport = Frames()
    connection = Connection(transport, "c1", renderer=lambda p: "")
    connection.start()
    connection.hold("ch")
    connection.deliver("ch", 4, "held-old-4", "old")  # carried by the reply: dropped
    connection.deliver("ch", 2, "held-new-2", "new")  # a new stream: never a duplicate
    connection.release("ch", 5, "old")
    connection.hold("other")
    connection.release("other", 5, "e")
    connection.deliver("other", 5, "late-e-5", "e")  # a late live copy of what the reply carried
    connection.deliver("other", 1, "other-f-1", "f")  # another epoch: passes (and ends) the floor
    connection.deliver("other", 2, "other-f-2", "f")
    await async_wait_for(lambda: len(transport.sent) == 3, 5, what="frames written")
    assert transport.sent == ["held-new-2", "other-f-1", "other-f-2"]
    connection.close(1000, "bye", push=False)
    await connection.wait_closed(5)
