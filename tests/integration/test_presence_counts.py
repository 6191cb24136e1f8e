"""One definition of ``num_users``, everywhere a user count is shown.

``num_users`` is the number of distinct non-empty user ids; an anonymous client is a
client but no user (docs/protocol.md, presence_stats).  A real ``herald serve`` on the
memory broker and on a real Redis: the protocol's ``presence_stats``, the HTTP API's
``/api/presence_stats`` and the admin page's node snapshot must give the same counts,
with anonymous clients, with one user on two connections, and after clients leave.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from ..helpers import ProtocolClient, ServerProcess, async_until
from ..servers import RedisServer, redis_server_fixture

API_KEY = "presence-count-key"
SECRET = "presence-count-secret-0123456789abcdef"
CHANNEL = "chat:who-is-here"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A fresh server per test: the admin snapshot counts every client of the node."""
    env = {"HERALD_API_KEY": API_KEY, "HERALD_TOKEN_SECRET": SECRET, "HERALD_DEMOS": "false"}
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        env["HERALD_BROKER"] = redis.url
    process = ServerProcess(env=env).start()
    yield process
    process.stop()


def get(server: ServerProcess, path: str) -> Any:
    request = urllib.request.Request(server.http + path, headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


async def join(server: ServerProcess, user: str | None = None) -> ProtocolClient:
    client = await ProtocolClient.open(server.ws("/connect"), connect=False)
    fields = {"token": jwt.encode({"sub": user}, SECRET, algorithm="HS256")} if user else {}
    reply = await client.call("connect", **fields)
    assert reply["result"]["user"] == (user or ""), reply
    reply = await client.call("subscribe", channels=[{"channel": CHANNEL}])
    assert "error" not in reply["result"]["channels"][0], reply
    return client


async def counts(server: ServerProcess, asker: ProtocolClient) -> dict[str, tuple[int, int]]:
    """(clients, users) as the protocol, the HTTP API and the admin page say them."""
    reply = await asker.call("presence_stats", channel=CHANNEL)
    protocol = reply["result"]
    api = await asyncio.to_thread(get, server, f"/api/presence_stats?channel={CHANNEL}")
    node = await asyncio.to_thread(get, server, "/admin/snapshot")
    return {
        "protocol": (protocol["num_clients"], protocol["num_users"]),
        "api": (api["num_clients"], api["num_users"]),
        "admin": (node["num_connections"], node["num_users"]),
    }


async def settle(server: ServerProcess, asker: ProtocolClient, expected: tuple[int, int]) -> None:
    """Wait until every view says ``expected`` (leaving clients are removed asynchronously)."""
    seen: dict[str, tuple[int, int]] = {}

    async def agree() -> bool:
        seen.update(await counts(server, asker))
        return set(seen.values()) == {expected}

    try:
        await async_until(agree, 5, f"every view to say {expected}")
    except TimeoutError:
        raise AssertionError(f"expected {expected} everywhere, got {seen}") from None


async def test_every_view_counts_users_alike(server: ServerProcess) -> None:
    anonymous = [await join(server) for _ in range(3)]
    clients = list(anonymous)
    try:
        # Three anonymous clients: three clients, no user.
        await settle(server, anonymous[0], (3, 0))
        # Alice twice and Bob: six clients, two users.
        alice = [await join(server, "alice"), await join(server, "alice")]
        bob = await join(server, "bob")
        clients += [*alice, bob]
        await settle(server, anonymous[0], (6, 2))
        # Alice leaves on both connections: one user left.
        for client in alice:
            await client.close()
            clients.remove(client)
        await settle(server, anonymous[0], (4, 1))
    finally:
        for client in clients:
            await client.close()
