"""The Redis broker across Pub/Sub link blips (no gap, or a reported one) and its meta keys.

Real redis-server; the blip is ``CLIENT KILL TYPE pubsub`` on the server while
the subscriber node's ACL user is switched off, so the node stays cut off for
as long as the test publishes (deterministic, no timing luck).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from herald.brokers.base import PresenceEvent, Publication, PublishOptions, StreamGap
from herald.brokers.redis import RedisBroker, RedisBrokerConfig, redact_url

from ..helpers import async_wait_for
from ..servers import RedisServer, redis_server_fixture

pytestmark = pytest.mark.redis

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@dataclass
class Recorder:
    received: list[Publication | PresenceEvent | StreamGap] = field(default_factory=list)

    def __call__(self, message: Publication | PresenceEvent | StreamGap) -> None:
        self.received.append(message)

    def offsets(self, channel: str) -> list[int]:
        return [m.offset for m in self.received if isinstance(m, Publication) and m.channel == channel]

    def gaps(self, channel: str) -> list[StreamGap]:
        return [m for m in self.received if isinstance(m, StreamGap) and m.channel == channel]


class Cluster:
    """A subscriber broker on its own ACL user (so only its link can be cut) and a publisher."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.prefix = f"g{secrets.token_hex(4)}"
        self.user, self.password = f"node-{self.prefix}", secrets.token_hex(8)
        self.admin = aioredis.Redis.from_url(server.url)
        self.recorder = Recorder()
        self.subscriber: RedisBroker | None = None
        self.publisher: RedisBroker | None = None

    async def start(self, **config: Any) -> tuple[RedisBroker, RedisBroker]:
        await self.admin.execute_command(
            "ACL", "SETUSER", self.user, "on", f">{self.password}", "~*", "&*", "+@all"
        )
        url = f"redis://{self.user}:{self.password}@127.0.0.1:{self.server.port}/0"
        config = {"reconnect_min": 0.05, "reconnect_max": 0.2, **config}
        self.subscriber = RedisBroker(RedisBrokerConfig(url=url, prefix=self.prefix, **config))
        self.publisher = RedisBroker(RedisBrokerConfig(url=self.server.url, prefix=self.prefix))
        await self.subscriber.start(self.recorder)
        await self.publisher.start(lambda message: None)
        return self.subscriber, self.publisher

    async def cut(self) -> None:
        """Kill the subscriber's Pub/Sub link and keep it from coming back."""
        assert self.subscriber is not None
        await self.admin.execute_command("ACL", "SETUSER", self.user, "off")
        await self.admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "USER", self.user)
        subscriber = self.subscriber
        await async_wait_for(lambda: not subscriber.connected, TIMEOUT, what="link down")

    async def restore(self) -> None:
        assert self.subscriber is not None
        before = self.subscriber.reconnects
        await self.admin.execute_command("ACL", "SETUSER", self.user, "on")
        subscriber = self.subscriber
        await async_wait_for(
            lambda: subscriber.connected and subscriber.reconnects > before, TIMEOUT, what="link back"
        )

    async def close(self) -> None:
        for broker in (self.subscriber, self.publisher):
            if broker is not None:
                await broker.close()
        await self.admin.execute_command("ACL", "DELUSER", self.user)
        await self.admin.aclose()


@pytest.fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    cluster = Cluster(redis_server)
    yield cluster
    await cluster.close()


HISTORY = PublishOptions(history_size=100, history_ttl=60)


async def test_publications_missed_during_a_blip_arrive_once_in_order(cluster: Cluster) -> None:
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    channel = "chat:blip"
    await subscriber.subscribe(channel)
    published: list[int] = []
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        while not stop.is_set():
            position = await publisher.publish(channel, b'"x"', HISTORY)
            published.append(position.offset)
            await asyncio.sleep(0.002)

    task = asyncio.create_task(keep_publishing())
    try:
        await async_wait_for(lambda: len(recorder.offsets(channel)) >= 5, TIMEOUT, what="live first")
        await cluster.cut()
        during = len(published)
        await async_wait_for(lambda: len(published) >= during + 20, TIMEOUT, what="publish while cut")
        await cluster.restore()
        after = len(published)
        await async_wait_for(lambda: len(published) >= after + 20, TIMEOUT, what="publish after")
    finally:
        stop.set()
        await task
    await async_wait_for(
        lambda: recorder.offsets(channel)[-1:] == published[-1:], TIMEOUT, what="everything delivered"
    )
    # Exactly once, in order, nothing reported lost; the stream really filled the gap.
    assert recorder.offsets(channel) == published == list(range(1, len(published) + 1))
    assert recorder.gaps(channel) == []
    assert subscriber.gaps_filled >= 20 and subscriber.gaps_lost == 0


async def test_a_gap_history_no_longer_covers_is_reported_not_skipped(cluster: Cluster) -> None:
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    short = PublishOptions(history_size=2, history_ttl=60)
    channel, quiet, bare = "chat:short", "chat:quiet", "chat:bare"
    for name in (channel, quiet, bare):
        await subscriber.subscribe(name)
    for _ in range(2):
        await publisher.publish(channel, b"1", short)
        await publisher.publish(bare, b"1", PublishOptions())
    await async_wait_for(lambda: len(recorder.offsets(channel)) == 2, TIMEOUT, what="live")
    await async_wait_for(lambda: len(recorder.offsets(bare)) == 2, TIMEOUT, what="live, no history")

    await cluster.cut()
    for _ in range(5):  # offsets 3..7; the stream keeps only 6 and 7
        await publisher.publish(channel, b"2", short)
    await publisher.publish(bare, b"2", PublishOptions())  # no history at all: offset 3
    await cluster.restore()
    await async_wait_for(lambda: recorder.gaps(bare), TIMEOUT, what="gap on the history-less channel")
    await async_wait_for(lambda: recorder.gaps(channel), TIMEOUT, what="gap reported")

    [gap] = recorder.gaps(channel)
    assert (gap.last.offset, gap.position.offset, gap.epoch_changed) == (2, 7, False)
    [bare_gap] = recorder.gaps(bare)
    assert (bare_gap.last.offset, bare_gap.position.offset) == (2, 3)
    assert recorder.gaps(quiet) == []  # nothing was published there: no gap
    # Nothing of the gap was delivered (6 and 7 would carry a client past it unaware).
    assert recorder.offsets(channel) == [1, 2]
    # Live delivery continues after the reported position.
    await publisher.publish(channel, b"3", short)
    await async_wait_for(lambda: recorder.offsets(channel) == [1, 2, 8], TIMEOUT, what="live again")
    assert subscriber.gaps_lost == 2


async def test_a_stream_lost_during_the_blip_is_reported_with_its_new_epoch(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    channel = "chat:lost"
    await subscriber.subscribe(channel)
    old = await publisher.publish(channel, b"1", HISTORY)
    await async_wait_for(lambda: recorder.offsets(channel) == [1], TIMEOUT, what="live")
    await cluster.cut()
    await publisher.remove_history(channel)  # the stream is gone: a new epoch starts
    new = await publisher.publish(channel, b"2", HISTORY)
    await publisher.publish(channel, b"3", HISTORY)
    assert new.epoch != old.epoch and new.offset == 1
    await cluster.restore()
    await async_wait_for(lambda: recorder.gaps(channel), TIMEOUT, what="gap reported")
    [gap] = recorder.gaps(channel)
    assert gap.epoch_changed and gap.last == old
    assert (gap.position.epoch, gap.position.offset) == (new.epoch, 2)
    assert recorder.offsets(channel) == [1]
    await publisher.publish(channel, b"4", HISTORY)
    await async_wait_for(lambda: recorder.offsets(channel) == [1, 3], TIMEOUT, what="live in the new epoch")


async def test_a_channel_reset_while_connected_is_followed_without_a_gap(cluster: Cluster) -> None:
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    channel = "chat:reset"
    await subscriber.subscribe(channel)
    first = await publisher.publish(channel, b"1", HISTORY)
    await publisher.remove_history(channel)
    second = await publisher.publish(channel, b"2", HISTORY)
    assert second.epoch != first.epoch
    await async_wait_for(lambda: len(recorder.offsets(channel)) == 2, TIMEOUT, what="both delivered")
    assert recorder.gaps(channel) == []


async def test_read_created_meta_keys_expire_and_published_ones_keep_their_rules(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(RedisBrokerConfig(url=redis_server.url, prefix=f"m{secrets.token_hex(4)}"))
    await broker.start(lambda message: None)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        # A read of a channel that never had a publication (what subscribe does).
        await broker.history("chat:random-name", limit=0)
        ttl = await admin.pttl(broker.meta_key("chat:random-name"))
        assert 3_500_000 < ttl <= 3_600_000

        # The first publish without history makes it permanent (stream_meta_ttl=0) ...
        await broker.history("chat:plain", limit=0)
        await broker.publish("chat:plain", b"1", PublishOptions())
        assert await admin.pttl(broker.meta_key("chat:plain")) == -1
        # ... and with history it lives as long as the history.
        await broker.history("chat:kept", limit=0)
        await broker.publish("chat:kept", b"1", PublishOptions(history_size=10, history_ttl=30))
        assert 25_000 < await admin.pttl(broker.meta_key("chat:kept")) <= 30_000
        # A later read does not shorten a published key's life.
        await broker.history("chat:plain", limit=0)
        assert await admin.pttl(broker.meta_key("chat:plain")) == -1
    finally:
        await admin.aclose()
        await broker.close()


async def test_read_meta_ttl_zero_keeps_read_created_keys(redis_server: RedisServer) -> None:
    config = RedisBrokerConfig(url=redis_server.url, prefix=f"m{secrets.token_hex(4)}", read_meta_ttl=0)
    broker = RedisBroker(config)
    await broker.start(lambda message: None)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.history("chat:x", limit=0)
        assert await admin.pttl(broker.meta_key("chat:x")) == -1
    finally:
        await admin.aclose()
        await broker.close()


def test_redact_url_hides_credentials() -> None:
    assert redact_url("redis://:secret@host:6379/0") == "redis://***@host:6379/0"
    assert redact_url("rediss://user:pw@example.com/1") == "rediss://user:***@example.com/1"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert "secret" not in repr(RedisBrokerConfig(url="redis://:secret@host"))


async def test_the_password_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    from ..helpers import free_port

    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    broker = RedisBroker(RedisBrokerConfig(url=url, connect_timeout=0.2))
    with caplog.at_level(logging.DEBUG, logger="herald.brokers.redis"):
        await broker.start(lambda message: None)
        await broker.close()
    assert "not reachable" in caplog.text
    assert "hunter2secret" not in caplog.text
