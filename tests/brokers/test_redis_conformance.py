"""The conformance suite against the Redis broker, on a real redis-server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.presence.redis import RedisPresenceManager

from ..servers import RedisServer, redis_server_fixture
from .conformance import BrokerConformance, Engine

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

        engine = Engine(make, lose_data)
        yield engine
        await engine.close()
