"""A node keeps its clients' presence alive, one refresh call per channel (issue 19).

With a presence TTL of 0.6 s (refresh every 0.2 s), three subscribed clients stay
listed for several TTLs; a client that leaves disappears; memory and Redis alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from ..helpers import ProtocolClient, ServerProcess, async_until
from ..servers import RedisServer, redis_server_fixture

pytestmark = pytest.mark.asyncio

TTL = 0.6


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


async def _check(server: ServerProcess) -> None:
    clients = [await ProtocolClient.open(server.ws("/connect")) for _ in range(3)]
    for client in clients:
        reply = await client.call("subscribe", channels=[{"channel": "chat:refresh"}])
        assert "result" in reply, reply

    async def listed() -> set[str]:
        reply = await clients[0].call("presence", channel="chat:refresh")
        return set(reply["result"]["clients"])

    everyone = {c.client_id for c in clients}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5 * TTL
    while loop.time() < deadline:  # an invariant over several TTLs, not a wait
        assert await listed() == everyone
        await asyncio.sleep(TTL / 4)

    await clients[2].close()

    async def left() -> bool:
        return await listed() == everyone - {clients[2].client_id}

    await async_until(left, 5, what="the leaving client to disappear")
    for client in clients[:2]:
        await client.close()


async def test_presence_outlives_its_ttl_while_subscribed_memory() -> None:
    server = ServerProcess(env={"HERALD_DEMOS": "false", "HERALD_PRESENCE_TTL": str(TTL)}).start()
    try:
        await _check(server)
    finally:
        server.stop()


@pytest.mark.redis
async def test_presence_outlives_its_ttl_while_subscribed_redis(redis_server: RedisServer) -> None:
    env = {"HERALD_DEMOS": "false", "HERALD_PRESENCE_TTL": str(TTL), "HERALD_BROKER": redis_server.url}
    server = ServerProcess(env=env).start()
    try:
        await _check(server)
    finally:
        server.stop()
