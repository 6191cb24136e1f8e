"""Helpers for the sharded Redis broker's tests: several real redis-servers, and channels
placed on a chosen shard."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from herald.brokers.sharded import ShardedRedisBroker, ShardedRedisConfig

from ..servers import RedisServer, redis_server_fixture


def redis_shards_fixture(count: int = 3) -> Iterator[list[RedisServer]]:
    """``count`` redis-servers on free ports (for a fixture: ``yield from``)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(contextlib.contextmanager(redis_server_fixture)()) for _ in range(count)]


def shards_url(servers: list[RedisServer], query: str = "") -> str:
    """The servers as one ``broker`` setting; ``query`` (shared options) on the last URL."""
    return ",".join(s.url for s in servers) + (f"?{query}" if query else "")


def channel_on(url: str, shard: int, prefix: str = "chat:s") -> str:
    """A channel the broker setting ``url`` places on shard number ``shard``."""
    broker = ShardedRedisBroker(ShardedRedisConfig.from_url(url))
    return next(
        channel for n in range(10_000) if broker.shard_for(channel := f"{prefix}{n}") is broker.shards[shard]
    )
