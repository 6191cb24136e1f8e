"""The conformance suite against the Redis broker, on a real redis-server."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.presence.redis import RedisPresenceManager

from ..helpers import async_wait_for
from ..servers import RedisServer, redis_server_fixture
from .conformance import BrokerConformance, Engine, NodeEngines

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


class TestRedisBroker(BrokerConformance):
    @pytest.fixture
    async def engine(self, redis_server: RedisServer) -> AsyncIterator[Engine]:
        # A prefix per test: tests never see each other's keys.
        config = RedisBrokerConfig(url=redis_server.url, prefix=f"t{secrets.token_hex(4)}")

        def make() -> tuple[RedisBroker, RedisPresenceManager]:
            broker = RedisBroker(config)
            return broker, RedisPresenceManager(broker)

        async def lose_data() -> None:
            client = aioredis.Redis.from_url(redis_server.url)
            try:
                await client.flushall()
            finally:
                await client.aclose()

        @contextlib.asynccontextmanager
        async def cut_link(node: NodeEngines) -> AsyncIterator[None]:
            # Redis closes the node's Pub/Sub connection (CLIENT KILL by its address): what is
            # published until the link is back never reaches this node.
            broker = node.broker
            assert isinstance(broker, RedisBroker) and broker._pubsub is not None
            writer = broker._pubsub.connection._writer  # type: ignore[union-attr]
            host, port = writer.get_extra_info("sockname")[:2]
            client = aioredis.Redis.from_url(redis_server.url)
            try:
                assert await client.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
            finally:
                await client.aclose()
            await async_wait_for(lambda: not broker.connected, 5, what="the link to drop")
            yield

        engine = Engine(make, lose_data, miss=cut_link)
        yield engine
        await engine.close()
