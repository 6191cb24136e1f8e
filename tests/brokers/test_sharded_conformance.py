"""The conformance suite against the sharded Redis broker, on three real redis-servers."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.redis import RedisBroker
from herald.brokers.sharded import ShardedRedisBroker, ShardedRedisConfig
from herald.presence.sharded import ShardedPresenceManager

from ..helpers import async_wait_for
from ..servers import RedisServer
from .conformance import BrokerConformance, Engine, NodeEngines
from .sharding import redis_shards_fixture, shards_url

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def redis_shards() -> Iterator[list[RedisServer]]:
    yield from redis_shards_fixture()


async def cut_shard_link(shard: RedisBroker) -> None:
    """Redis closes ``shard``'s Pub/Sub connection (CLIENT KILL by its address): what is
    published until the link is back never reaches it."""
    [pubsub] = shard.pubsub_connections()
    writer = pubsub.connection._writer  # type: ignore[attr-defined]
    host, port = writer.get_extra_info("sockname")[:2]
    client = aioredis.Redis.from_url(shard.config.url)
    try:
        assert await client.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
    finally:
        await client.aclose()
    await async_wait_for(lambda: not shard.connected, 5, what="the link to drop")


class TestShardedRedisBroker(BrokerConformance):
    @pytest.fixture
    async def engine(self, redis_shards: list[RedisServer]) -> AsyncIterator[Engine]:
        # A prefix per test: tests never see each other's keys.
        # The shared prefix is given once, on the last URL.
        config = ShardedRedisConfig.from_url(shards_url(redis_shards, f"prefix=t{secrets.token_hex(4)}"))

        def make() -> tuple[ShardedRedisBroker, ShardedPresenceManager]:
            broker = ShardedRedisBroker(config)
            return broker, ShardedPresenceManager(broker)

        async def lose_data() -> None:
            for server in redis_shards:
                client = aioredis.Redis.from_url(server.url)
                try:
                    await client.flushall()
                finally:
                    await client.aclose()

        @contextlib.asynccontextmanager
        async def cut_links(node: NodeEngines) -> AsyncIterator[None]:
            # Every shard's link at once: the hook is not told the channel, and whichever
            # shard owns it must make the node miss.
            broker = node.broker
            assert isinstance(broker, ShardedRedisBroker)
            await asyncio.gather(*(cut_shard_link(shard) for shard in broker.shards))
            yield

        engine = Engine(make, lose_data, miss=cut_links)
        yield engine
        await engine.close()
