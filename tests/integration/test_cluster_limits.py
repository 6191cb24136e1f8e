"""Per-user and per-IP connection limits counted across real `herald serve` nodes on one
real Redis (herald.leases): refused on node B for connections held on node A, released
when they leave, lapsing within ``connection_lease_ttl`` of a node killed -9, and failing
open to each node's own count while Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
import websockets

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ServerProcess, async_until, http_get
from ..servers import RedisServer, redis_server_fixture

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SECRET = "cluster-limits-secret-0123456789abcdef"
LEASE_TTL = 1.5  # seconds (the documented bound on how long a dead node's counts last)
PER_USER = 2
PER_IP = 2

DRIVERS = {"native": {}, "asgi": {"HERALD_NATIVE_ROUTES": "false"}}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "HERALD_BROKER": redis_url,
        "HERALD_TOKEN_SECRET": SECRET,
        "HERALD_CONNECTION_LEASE_TTL": str(LEASE_TTL),
        "HERALD_MAX_CONNECTIONS_PER_USER": str(PER_USER),
        "HERALD_LOG_LEVEL": "warning",
        "HERALD_DEMOS": "false",
        **extra,
    }


@contextlib.asynccontextmanager
async def cluster(redis_url: str, **extra: str) -> AsyncIterator[list[ServerProcess]]:
    nodes = [ServerProcess(env=_env(redis_url, **extra)) for _ in range(2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(asyncio.to_thread(node.kill) for node in nodes))


async def lease_keys(redis_url: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [str(key) for key in await client.keys("herald:conns:*")]
    finally:
        await client.aclose()


async def ip_count(redis_url: str) -> int:
    """127.0.0.1's connections counted in Redis, every node's together."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        fields = await client.hgetall("herald:conns:ip:127.0.0.1")
    finally:
        await client.aclose()
    return sum(int(str(value).split(":")[0]) for value in fields.values())


async def all_released(redis_url: str) -> None:
    async def empty() -> bool:
        return not await lease_keys(redis_url)

    await async_until(empty, what="every lease given back")


def token(user: str) -> str:
    return jwt.encode({"sub": user}, SECRET, algorithm="HS256")


async def connect_user(node: ServerProcess, user: str) -> tuple[ProtocolClient, dict[str, Any]]:
    """A /connect client of ``user``, and the reply to its connect command."""
    client = await ProtocolClient.open(node.ws("/connect"), connect=False)
    return client, await client.call("connect", token=token(user))


async def user_refused(node: ServerProcess, user: str) -> bool:
    """Whether ``user``'s connect is refused for the per-user limit (error 115, close 4503)."""
    client, reply = await connect_user(node, user)
    if "result" in reply:
        await client.close()
        return False
    assert reply["error"]["code"] == 115, reply
    await asyncio.wait_for(client.closed.wait(), DEFAULT_TIMEOUT)
    assert client.ws.close_code == 4503, client.ws.close_code
    return True


# ------------------------------------------------------------------ per user


async def test_a_user_at_the_limit_on_node_a_is_refused_on_node_b_until_a_dies(
    redis_server: RedisServer,
) -> None:
    async with cluster(redis_server.url) as (a, b):
        held = [await connect_user(a, "alice") for _ in range(PER_USER)]
        assert all("result" in reply for _, reply in held)
        assert await user_refused(b, "alice")
        assert await user_refused(a, "alice")
        # One leaves node A: node B lets the user in.
        await held.pop()[0].close()

        async def b_admits() -> bool:
            client, reply = await connect_user(b, "alice")
            if "result" in reply:
                held.append((client, reply))
                return True
            await client.close()
            return False

        await async_until(b_admits, what="node B admits alice once one left node A")
        assert await user_refused(b, "alice")  # one on A, one on B: at the limit again
        # Node A is killed -9: its lease lapses within the ttl (by Redis's clock).
        await asyncio.to_thread(a.kill)
        died = time.monotonic()
        while await user_refused(b, "alice"):
            assert time.monotonic() - died < LEASE_TTL + 1.0, "node A's connection still counts"
            await asyncio.sleep(0.05)
        for client, _ in held:
            await client.close()
        await all_released(redis_server.url)


async def test_the_per_user_limit_holds_across_nodes_on_the_http_streams(redis_server: RedisServer) -> None:
    """The per-user count is the connect command's, whatever carries it: a user at the
    limit on node A (WebSockets) is refused on node B's /sse, /stream and
    /emulation/connect with 429 and error 115, and let in once one of A's leaves."""
    async with cluster(redis_server.url) as (a, b):
        held = [await connect_user(a, "bob") for _ in range(PER_USER)]
        assert all("result" in reply for _, reply in held)
        headers = {"Authorization": f"Bearer {token('bob')}"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=None)) as http:
            for route in ("/sse?channel=chat:limits", "/stream?channel=chat:limits", "/emulation/connect"):
                method = "POST" if route.startswith("/emulation") else "GET"
                body = {"commands": [{"id": 1, "type": "connect", "token": token("bob")}]}
                request = http.build_request(
                    method, b.http + route, headers=headers, json=body if method == "POST" else None
                )
                response = await http.send(request, stream=True)
                try:
                    if route.startswith("/emulation"):
                        # The emulated session answers its connect command in the stream.
                        assert response.status_code == 200, route
                        # The emulated session answers its connect in the stream, then ends.
                        text = b""
                        async with asyncio.timeout(DEFAULT_TIMEOUT):
                            async for chunk in response.aiter_bytes():
                                text += chunk
                                if b"4503" in text or b'"code":115' in text.replace(b" ", b""):
                                    break
                        assert b"more than 2 connections for this user" in text, (route, text[:500])
                    else:
                        await response.aread()
                        assert response.status_code == 429, (route, response.status_code, response.text)
                        assert response.json()["error"]["code"] == 4503, route  # as the WebSocket close
                finally:
                    await response.aclose()
            await held.pop()[0].close()

            async def b_streams() -> bool:
                async with http.stream("GET", b.http + "/sse?channel=chat:limits", headers=headers) as reply:
                    return reply.status_code == 200

            await async_until(b_streams, what="node B streams to bob once one left node A")
        for client, _ in held:
            await client.close()
        await all_released(redis_server.url)


# ------------------------------------------------------------------ per IP, every route


async def ws_opened(url: str) -> Any:
    """A WebSocket held open (admitted: it was not closed at once)."""
    ws = await websockets.connect(url, open_timeout=DEFAULT_TIMEOUT)
    return ws


async def ws_refusal(url: str) -> str:
    """How a WebSocket over the per-IP limit is refused: ``403`` at the handshake (this
    node alone is at the limit), else ``4503 <reason>`` right after it."""
    try:
        ws = await websockets.connect(url, open_timeout=DEFAULT_TIMEOUT)
    except websockets.InvalidStatus as exc:
        return str(exc.response.status_code)
    async with ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)
        return f"{ws.close_code} {ws.close_reason}"


class HttpStreams:
    """/sse, /stream and /emulation/connect responses held open."""

    def __init__(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=None))
        self.open: list[httpx.Response] = []

    async def start(self, node: ServerProcess, route: str) -> httpx.Response:
        method = "POST" if route.startswith("/emulation") else "GET"
        response = await self.http.send(self.http.build_request(method, node.http + route), stream=True)
        if response.status_code == 200:
            self.open.append(response)
        else:
            await response.aread()
        return response

    async def close(self) -> None:
        for response in self.open:
            await response.aclose()
        self.open.clear()

    async def aclose(self) -> None:
        await self.close()
        await self.http.aclose()


WS_ROUTES = ["/ws", "/ws_json", "/ws_broadcast", "/connect"]
HTTP_ROUTES = ["/sse?channel=chat:limits", "/stream?channel=chat:limits", "/emulation/connect"]


@pytest.mark.parametrize("driver", list(DRIVERS))
async def test_the_per_ip_limit_holds_across_nodes_on_every_route(
    redis_server: RedisServer, driver: str
) -> None:
    http_routes = HTTP_ROUTES if driver == "native" else []  # the same code under both drivers
    async with cluster(redis_server.url, HERALD_MAX_CONNECTIONS_PER_IP=str(PER_IP), **DRIVERS[driver]) as (
        a,
        b,
    ):
        streams = HttpStreams()
        try:
            for route in WS_ROUTES + http_routes:
                # One connection of the route on each node: 127.0.0.1 is at its limit.
                if route in WS_ROUTES:
                    held = [await ws_opened(a.ws(route)), await ws_opened(b.ws(route))]

                    async def both_counted() -> bool:
                        return await ip_count(redis_server.url) == 2  # a refused one takes no lease

                    await async_until(both_counted, what=f"both {route} connections admitted")
                    assert all(ws.close_code is None for ws in held), route
                else:
                    held = []
                    for node in (a, b):
                        assert (await streams.start(node, route)).status_code == 200, route
                # Node A holds one (under its own limit): the cluster refuses the next.
                assert await ws_refusal(a.ws("/ws_json")) == "4503 too many connections from this address", (
                    route
                )
                response = await streams.start(b, "/sse?channel=chat:limits")
                assert response.status_code == 403, route
                assert "too many connections from this address" in response.text
                for ws in held:
                    await ws.close()
                await streams.close()
                await all_released(redis_server.url)
            # Sockets that leave during the handshake or before the cluster answered give
            # back what they took (nothing, or their lease), exactly once.
            kept = await ws_opened(b.ws("/ws"))
            for route in ("/connect", "/ws"):
                for _ in range(3):
                    ws = await websockets.connect(a.ws(route), open_timeout=DEFAULT_TIMEOUT)
                    ws.transport.abort()

            async def only_kept() -> bool:
                return await ip_count(redis_server.url) == 1

            await async_until(only_kept, what="the aborted sockets' leases given back")
            await kept.close()
            await all_released(redis_server.url)
            # This node alone at the limit: refused at the handshake, no round trip.
            held = [await ws_opened(a.ws("/ws")) for _ in range(PER_IP)]

            async def both_counted() -> bool:
                return await ip_count(redis_server.url) == PER_IP

            await async_until(both_counted, what="node A's two leases written")
            assert await ws_refusal(a.ws("/connect")) == "403"
            for ws in held:
                await ws.close()
            await all_released(redis_server.url)
        finally:
            await streams.aclose()
        # The sockets the cluster refused were accepted first: counted as connections
        # of their route, then as ended with 4503 (docs/operations.md).
        refused_after_accept = [
            float(line.rsplit(" ", 1)[1])
            for line in http_get(a.http + "/metrics")[1].decode().splitlines()
            if line.startswith("herald_disconnects_total{") and 'code="4503"' in line and "ws_json" in line
        ]
        assert refused_after_accept == [len(WS_ROUTES + http_routes)]
        for node in (a, b):
            metrics = http_get(node.http + "/metrics")[1].decode()
            assert 'herald_handshakes_rejected_total{reason="ip_limit"}' in metrics
            assert "released but not held" not in node.log()  # no lease given back twice


# ------------------------------------------------------------------ Redis down


async def test_redis_down_fails_open_to_each_nodes_count_then_catches_up() -> None:
    redis = RedisServer()
    redis.start()
    try:
        async with cluster(redis.url) as (a, b):
            await asyncio.to_thread(redis.kill)
            # Redis is gone: each node applies the limit to its own connections.
            on_a = [await connect_user(a, "bob") for _ in range(PER_USER)]
            assert all("result" in reply for _, reply in on_a), on_a
            assert await user_refused(a, "bob")
            on_b, reply = await connect_user(b, "bob")
            assert "result" in reply, reply
            metrics = http_get(a.http + "/metrics")[1].decode()
            assert 'herald_broker_errors_total{operation="connection_leases"}' in metrics
            # Redis is back (empty): the nodes write their counts again, 3 > 2: B refuses.
            await asyncio.to_thread(redis.start)

            async def b_refuses() -> bool:
                return await user_refused(b, "bob")

            await async_until(b_refuses, timeout=LEASE_TTL * 3, what="the counts written again")
            for client, _ in on_a:
                await client.close()
            await on_b.close()
            await all_released(redis.url)
    finally:
        redis.cleanup()
