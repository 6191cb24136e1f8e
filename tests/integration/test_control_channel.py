"""The control channel across real `herald serve` nodes: ``/api/disconnect`` counts the
connections closed on every node, a command published while one node's Redis link is cut
reaches it when the link is back, and a node killed with ``kill -9`` leaves the membership
view within PEER_TIMEOUT (docs/scaling.md, "The control channel")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis

from herald.brokers import envelope
from herald.brokers.base import Publication
from herald.control import DISCONNECT_TIMEOUT
from herald.membership import PEER_TIMEOUT

from ..helpers import ProtocolClient, ServerProcess, async_until, async_wait_for, http_get
from ..servers import NatsServer, RedisServer, nats_server_fixture, redis_server_fixture

API_KEY = "control-key"
SECRET = "control-secret-0123456789abcdef01234"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


def _node(broker: str) -> ServerProcess:
    return ServerProcess(
        env={
            "HERALD_BROKER": broker,
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": SECRET,
            "HERALD_LOG_LEVEL": "warning",
            "HERALD_DEMOS": "false",
        }
    )


@contextlib.asynccontextmanager
async def _running(nodes: list[ServerProcess]) -> AsyncIterator[list[ServerProcess]]:
    try:
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(asyncio.to_thread(node.kill) for node in nodes))


def _post(node: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        node.http + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


async def disconnect(node: ServerProcess, user: str) -> dict[str, Any]:
    status, body = await asyncio.to_thread(_post, node, "/api/disconnect", {"user": user})
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def connect(node: ServerProcess, user: str) -> ProtocolClient:
    client = await ProtocolClient.open(node.ws("/connect"), connect=False)
    reply = await client.call("connect", token=jwt.encode({"sub": user}, SECRET, algorithm="HS256"))
    assert "result" in reply, reply
    return client


async def all_know_each_other(nodes: list[ServerProcess]) -> None:
    """Wait until every node's membership view holds every node (a disconnect of nobody
    answers complete with every node)."""

    async def check() -> bool:
        for node in nodes:
            body = await disconnect(node, "nobody")
            if not (body["complete"] and body["nodes"] == len(nodes)):
                return False
        return True

    await async_until(check, 10, what="every node sees every node")


async def closed_with(client: ProtocolClient, code: int, timeout: float = 10) -> bool:
    await asyncio.wait_for(client.closed.wait(), timeout)
    return client.ws.close_code == code


async def _redis(url: str, *command: str) -> Any:
    client = aioredis.Redis.from_url(url)
    try:
        return await client.execute_command(*command)
    finally:
        await client.aclose()


async def _status(node: ServerProcess, path: str) -> int:
    return (await asyncio.to_thread(http_get, node.http + path))[0]


@pytest.mark.redis
@pytest.mark.slow
async def test_disconnect_counts_every_node_and_survives_a_redis_link_cut(redis_server: RedisServer) -> None:
    """Three nodes; node B reaches Redis as its own ACL user, so its Pub/Sub link can be
    cut (user off, ``CLIENT KILL TYPE pubsub USER``) and kept down.  A disconnect issued
    on A meanwhile closes C's connections at once; B's close once its link is back: B
    re-read the command from the control channel's history."""
    user, password = "herald-control-b", "control-b-secret"
    await _redis(redis_server.url, "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    url_b = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    clients: list[ProtocolClient] = []
    try:
        async with _running([_node(redis_server.url), _node(url_b), _node(redis_server.url)]) as nodes:
            a, b, c = nodes
            await all_know_each_other(nodes)

            # Cluster-wide count: 2 connections on A, 1 on B, 2 on C.
            clients = [await connect(node, "ann") for node in (a, a, b, c, c)]
            bob = await connect(b, "bob")
            clients.append(bob)
            body = await disconnect(a, "ann")
            assert body == {"disconnected": 5, "nodes": 3, "complete": True, "missing": []}
            for client in clients[:5]:
                assert await closed_with(client, 4502)
            assert not bob.closed.is_set()

            # B's link is cut; a disconnect issued on A cannot reach B now.
            on_b = [await connect(b, "ann"), await connect(b, "ann")]
            on_c = await connect(c, "ann")
            clients += [*on_b, on_c]
            await _redis(redis_server.url, "ACL", "SETUSER", user, "off")
            await _redis(redis_server.url, "CLIENT", "KILL", "TYPE", "pubsub", "USER", user)
            await async_until(lambda: _is(_status(b, "/readyz"), 503), 5, what="B's link down")
            body = await disconnect(a, "ann")
            assert body["disconnected"] == 1  # C's; B cannot have answered
            assert await closed_with(on_c, 4502)
            await bob.call("ping")  # a round trip through B: anything B had queued is out
            assert not any(client.closed.is_set() for client in on_b)

            # The link is back: B reads the command it missed and closes ann's connections.
            await _redis(redis_server.url, "ACL", "SETUSER", user, "on")
            for client in on_b:
                assert await closed_with(client, 4502)
            assert not bob.closed.is_set()
            assert "lost by the broker" not in b.log()  # no gap: the history covered the cut
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        with contextlib.suppress(Exception):
            await _redis(redis_server.url, "ACL", "DELUSER", user)


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


@pytest.mark.slow
@pytest.mark.parametrize("broker", [pytest.param("redis", marks=pytest.mark.redis), "nats"])
async def test_a_node_killed_leaves_the_membership_in_peer_timeout(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """Killed with -9 (no leave announcement), node B is still awaited (and reported
    missing) right after, and no longer awaited once PEER_TIMEOUT has passed."""
    server: RedisServer | NatsServer = request.getfixturevalue(f"{broker}_server")
    async with _running([_node(server.url), _node(server.url)]) as nodes:
        a, b = nodes
        await all_know_each_other(nodes)
        clients = [await connect(a, "ann"), await connect(b, "ann")]
        try:
            assert await disconnect(a, "ann") == {
                "disconnected": 2,
                "nodes": 2,
                "complete": True,
                "missing": [],
            }
            await asyncio.to_thread(b.kill)
            killed = time.monotonic()
            body = await disconnect(a, "nobody")
            assert body["complete"] is False and len(body["missing"]) == 1 and body["nodes"] == 1

            async def b_is_gone() -> bool:
                return bool((await disconnect(a, "nobody"))["complete"])

            await async_until(b_is_gone, PEER_TIMEOUT + DISCONNECT_TIMEOUT + 2, what="B dropped")
            assert time.monotonic() - killed <= PEER_TIMEOUT + DISCONNECT_TIMEOUT + 1
            started = time.monotonic()
            assert await disconnect(a, "nobody") == {
                "disconnected": 0,
                "nodes": 1,
                "complete": True,
                "missing": [],
            }
            assert time.monotonic() - started < 1  # no wait for the dead node
        finally:
            await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


@pytest.mark.redis
@pytest.mark.slow
async def test_admin_snapshots_are_published_only_while_a_page_is_open_somewhere(
    redis_server: RedisServer,
) -> None:
    """No admin page open: no node publishes its snapshot (it cost a third of an idle
    Redis node's CPU).  A page opens on A: B hears A's heartbeat say so and publishes
    too, so the page lists both.  The page closes: both stop."""
    import websockets

    listener = aioredis.Redis.from_url(redis_server.url)
    pubsub = listener.pubsub()
    await pubsub.psubscribe("*:$admin", "*:$herald:control")
    published: list[tuple[float, str]] = []  # (when, node id) of each snapshot
    heartbeats: list[tuple[float, str]] = []  # (when, node id) of each heartbeat

    async def follow() -> None:
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            admin = bytes(message["channel"]).endswith(b"$admin")
            publication = envelope.decode("$admin" if admin else "$herald:control", message["data"])
            assert isinstance(publication, Publication)
            body = json.loads(publication.data)
            if admin:
                published.append((time.monotonic(), body["node"]))
            elif body.get("op") == "alive":
                heartbeats.append((time.monotonic(), body["node"]))

    follower = asyncio.create_task(follow())
    try:
        async with _running([_node(redis_server.url), _node(redis_server.url)]) as nodes:
            a = nodes[0]
            await all_know_each_other(nodes)
            quiet_from = time.monotonic()

            def beats_since_quiet() -> dict[str, int]:
                counts: dict[str, int] = {}
                for when, node in heartbeats:
                    if when >= quiet_from:
                        counts[node] = counts.get(node, 0) + 1
                return counts

            # Three heartbeats of each node (1 s apart) span two of its snapshot checks
            # (SNAPSHOT_INTERVAL is 1 s); the first snapshot of a node always differs from
            # none, so a node that published without a page would show here.
            await async_wait_for(
                lambda: len(beats_since_quiet()) == 2 and min(beats_since_quiet().values()) >= 3,
                10,
                what="three heartbeats of each node",
            )
            assert [node for when, node in published if when >= quiet_from] == []

            async with websockets.connect(a.ws("/admin/ws")) as page:
                await page.send(json.dumps({"api_key": API_KEY}))
                seen: set[str] = set()
                async with asyncio.timeout(10):
                    while len(seen) < 2:
                        frame = json.loads(await page.recv())
                        if frame.get("channel") == "$admin":
                            seen.add(frame["data"]["node"])
                assert len(seen) == 2  # A's own and B's, through Redis

            closed = time.monotonic()

            async def quiet_for_two_seconds() -> bool:
                last = max((when for when, _ in published), default=0.0)
                return time.monotonic() - max(last, closed) >= 2.0

            # Within B's next heartbeat (1 s) both stop: a 2 s window with nothing published.
            await async_until(quiet_for_two_seconds, 8, what="snapshots stop after the page closed")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
        await pubsub.aclose()
        await listener.aclose()
