"""Connection leases (herald.leases): the per-process counter, and the Redis one against a
real redis-server (two lease objects on one Redis are two nodes)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.config import Settings
from herald.engines import leases_for
from herald.leases import IP, USER, ConnectionLeases, RedisConnectionLeases

from .helpers import async_wait_for, free_port
from .servers import RedisServer, redis_server_fixture

# ------------------------------------------------------------------ per process


async def test_memory_leases_count_per_kind_and_key_and_refuse_at_the_limit() -> None:
    leases = ConnectionLeases()
    assert not leases.distributed
    assert leases.try_acquire(USER, "alice", 2) is True
    assert await leases.acquire(USER, "alice", 2) is True
    assert leases.try_acquire(USER, "alice", 2) is False
    assert await leases.acquire(USER, "alice", 2) is False
    # Another key, and the same key under another kind, are counted apart.
    assert await leases.acquire(USER, "bob", 2) is True
    assert await leases.acquire(IP, "alice", 1) is True
    assert leases.held(USER, "alice") == 2 and len(leases) == 3
    leases.release(USER, "alice")
    assert await leases.acquire(USER, "alice", 2) is True
    for kind, key in [(USER, "alice"), (USER, "alice"), (USER, "bob"), (IP, "alice")]:
        leases.release(kind, key)
    assert len(leases) == 0 and leases.held(USER, "alice") == 0


async def test_no_limit_counts_nothing() -> None:
    leases = ConnectionLeases()
    assert leases.try_acquire(IP, "10.0.0.1", 0) is True
    assert await leases.acquire(IP, "10.0.0.1", 0) is True
    assert len(leases) == 0


def test_the_engines_pick_cluster_counting_for_redis_only() -> None:
    redis_broker = RedisBroker(RedisBrokerConfig.from_url("redis://127.0.0.1:1/0"))
    leases = leases_for(Settings(), redis_broker)
    assert isinstance(leases, RedisConnectionLeases) and leases.ttl == 15.0
    assert leases.broker_for("conns:user:x") is redis_broker
    assert type(leases_for(Settings(connection_lease_ttl=0), redis_broker)) is ConnectionLeases
    from herald.brokers.memory import MemoryBroker

    assert type(leases_for(Settings(), MemoryBroker())) is ConnectionLeases

    class Sharded:  # what leases_for asks of a sharded Redis broker
        def shard_for(self, name: str) -> RedisBroker:
            return redis_broker

    sharded = leases_for(Settings(), Sharded())  # type: ignore[arg-type]
    assert isinstance(sharded, RedisConnectionLeases)
    assert sharded.broker_for("conns:ip:1.2.3.4") is redis_broker


# ------------------------------------------------------------------ across nodes, on Redis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


def _broker(url: str) -> RedisBroker:
    return RedisBroker(RedisBrokerConfig.from_url(url + "?connect_timeout=0.5&command_timeout=0.5"))


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[list[RedisConnectionLeases]]:
    """Two nodes' leases on one Redis (each its own broker), not refreshing."""
    brokers = [_broker(redis_server.url) for _ in range(2)]
    made = [RedisConnectionLeases(lambda _n, b=b: b, ttl=5.0) for b in brokers]  # type: ignore[misc]
    yield made
    for leases in made:
        await leases.close()
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    for broker in brokers:
        await broker.close()


async def _fields(redis_server: RedisServer, key: str) -> dict[str, int]:
    """node -> count in the lease hash ``key``."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        raw = await client.hgetall(f"herald:conns:{key}")
    finally:
        await client.aclose()
    return {str(node): int(str(value).split(":")[0]) for node, value in raw.items()}


@pytest.mark.redis
async def test_a_limit_holds_across_nodes(
    redis_server: RedisServer, nodes: list[RedisConnectionLeases]
) -> None:
    a, b = nodes
    assert a.distributed and a.node != b.node
    assert a.try_acquire(USER, "alice", 2) is None  # this node's count allows it: ask Redis
    assert await a.acquire(USER, "alice", 2)
    assert await b.acquire(USER, "alice", 2)
    assert await _fields(redis_server, "user:alice") == {a.node: 1, b.node: 1}
    # At the limit, across the two: refused on both, by Redis.
    assert not await a.acquire(USER, "alice", 2)
    assert not await b.acquire(USER, "alice", 2)
    # A local refusal needs no round trip.
    assert await a.acquire(IP, "10.0.0.1", 1)
    assert a.try_acquire(IP, "10.0.0.1", 1) is False
    # A release is written at once (in the background): the other node gets in.
    a.release(USER, "alice")
    await async_wait_for(lambda: a.held(USER, "alice") == 0 and not a._held.get("conns:user:alice"))
    assert await _fields(redis_server, "user:alice") == {b.node: 1}
    assert await b.acquire(USER, "alice", 2)
    # Everybody leaves: the key is gone.
    b.release(USER, "alice")
    b.release(USER, "alice")
    a.release(IP, "10.0.0.1")
    await async_wait_for(lambda: not a._held and not b._held, what="releases written")
    client = aioredis.Redis.from_url(redis_server.url)
    assert await client.keys("herald:conns:*") == []
    await client.aclose()


@pytest.mark.redis
async def test_concurrent_acquires_of_one_node_stop_exactly_at_the_limit(
    redis_server: RedisServer, nodes: list[RedisConnectionLeases]
) -> None:
    a, b = nodes
    assert await b.acquire(USER, "crowd", 5)
    results = await asyncio.gather(*(a.acquire(USER, "crowd", 5) for _ in range(20)))
    assert sum(results) == 4 and a.held(USER, "crowd") == 4
    assert await _fields(redis_server, "user:crowd") == {a.node: 4, b.node: 1}


@pytest.mark.redis
async def test_a_dead_nodes_counts_lapse_within_the_ttl_and_a_live_ones_do_not(
    redis_server: RedisServer,
) -> None:
    ttl = 0.6
    brokers = [_broker(redis_server.url) for _ in range(3)]
    dead, live, other = (RedisConnectionLeases(lambda _n, b=b: b, ttl=ttl) for b in brokers)  # type: ignore[misc]
    try:
        await live.start()  # refreshes every ttl/3; ``dead`` never writes again, as if killed -9
        assert await dead.acquire(USER, "carol", 1)
        died = time.monotonic()
        assert await live.acquire(USER, "dave", 1)
        assert not await other.acquire(USER, "carol", 1)
        while not await other.acquire(USER, "carol", 1):
            assert time.monotonic() - died < ttl + 0.5, "the dead node still counts after its ttl"
            await asyncio.sleep(0.02)
        assert time.monotonic() - died >= ttl - 0.1  # (Redis's clock and ours may differ a little)
        # Three ttls later the refreshed lease still counts.
        await asyncio.sleep(3 * ttl)
        assert not await other.acquire(USER, "dave", 1)
    finally:
        for leases in (dead, live, other):
            await leases.close()
        for broker in brokers:
            await broker.close()


@pytest.mark.redis
async def test_redis_down_fails_open_to_this_nodes_count_and_catches_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer()
    server.start()
    broker = _broker(server.url)
    errors: list[int] = []
    leases = RedisConnectionLeases(lambda _n: broker, ttl=5.0, on_error=lambda: errors.append(1))
    try:
        assert await leases.acquire(USER, "erin", 2)
        server.kill()
        with caplog.at_level(logging.WARNING, logger="herald.leases"):
            # Redis is gone: this node's own count decides (fail open, logged once, counted).
            assert await leases.acquire(USER, "erin", 2)
            assert not await leases.acquire(USER, "erin", 2)  # this node alone is at the limit
            # Right after a failure, acquires do not wait on Redis (nor count an error).
            before = leases.errors
            assert await leases.acquire(USER, "frank", 1)
            assert leases.errors == before and leases.held(USER, "frank") == 1
            leases.release(USER, "erin")
            await async_wait_for(lambda: len(errors) >= 2, what="the failed release write")
        assert leases.errors == len(errors) >= 2
        warnings = [r for r in caplog.records if "counted on this node only" in r.message]
        assert len(warnings) == 1  # not once per failed call
        assert leases.held(USER, "erin") == 1
        # Redis comes back (empty): the next refresh writes this node's count again.
        server.start()
        await leases.refresh()
        assert await _fields(server, "user:erin") == {leases.node: 1}
        assert await _fields(server, "user:frank") == {leases.node: 1}
        leases.release(USER, "frank")
        leases.release(USER, "erin")
        await async_wait_for(lambda: not leases._held, what="release written")
        assert await _fields(server, "user:erin") == {}
    finally:
        await leases.close()
        await broker.close()
        server.cleanup()


async def test_a_release_of_a_lease_not_held_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    broker = _broker(f"redis://127.0.0.1:{free_port()}/0")
    leases = RedisConnectionLeases(lambda _n: broker, ttl=5.0)
    with caplog.at_level(logging.ERROR, logger="herald.leases"):
        leases.release(IP, "10.9.9.9")
    assert "released but not held" in caplog.text and leases.held(IP, "10.9.9.9") == 0
    await broker.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_leases_on_a_redis_cluster_touch_one_key_per_script() -> None:
    """Every script names one key, so a Redis Cluster runs it on the key's master."""
    from .servers import redis_cluster_fixture

    cluster = redis_cluster_fixture()
    servers = next(cluster)
    brokers = [RedisBroker(RedisBrokerConfig.from_url(servers.url)) for _ in range(2)]
    a, b = (RedisConnectionLeases(lambda _n, br=br: br, ttl=5.0) for br in brokers)  # type: ignore[misc]
    users = [f"user-{n}" for n in range(12)]  # spread over the three masters' slots
    try:
        for user in users:
            assert await a.acquire(USER, user, 1)
            assert not await b.acquire(USER, user, 1)
        await a.refresh()  # several keys at once: one call per key
        assert a.errors == b.errors == 0
        for user in users:
            a.release(USER, user)
        await async_wait_for(lambda: not a._held, what="releases written")
        for user in users:
            assert await b.acquire(USER, user, 1)
    finally:
        for leases in (a, b):
            await leases.close()
        for broker in brokers:
            await broker.close()
        cluster.close()  # stops the servers
