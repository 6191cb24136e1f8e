"""The Redis broker's Pub/Sub link is reconnected as soon as Redis answers one of the
node's commands, rather than after the rest of its reconnect backoff.

A publish that Redis accepts while the node's link is down is missed live and must be
read from the stream when the link is back; a backoff of seconds could outlast what the
stream keeps (``history_size``).  Real redis-server; the link is cut with ``CLIENT KILL
TYPE pubsub`` (Redis stays up, the node's pooled command connections too).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.base import BrokerMessage, Publication, PublishOptions, StreamGap
from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.urls import redact_url

from ..helpers import async_wait_for
from ..servers import RedisServer, redis_server_fixture

pytestmark = pytest.mark.redis

TIMEOUT = 5.0
#: A backoff far longer than any wait of these tests: only a wake-up brings the link back.
LONG = 30.0
SHORT_HISTORY = PublishOptions(history_size=5, history_ttl=60)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


class Node:
    """A broker on its own ACL user (so its link alone can be cut and kept out)."""

    def __init__(self, server: RedisServer) -> None:
        self.prefix = f"w{secrets.token_hex(4)}"
        self.user, self.password = f"node-{self.prefix}", secrets.token_hex(8)
        self.admin = aioredis.Redis.from_url(server.url)
        self.url = f"redis://{self.user}:{self.password}@127.0.0.1:{server.port}/0"
        self.received: list[BrokerMessage] = []
        self.broker = RedisBroker(
            RedisBrokerConfig(url=self.url, prefix=self.prefix, reconnect_min=LONG, reconnect_max=LONG)
        )

    async def start(self) -> RedisBroker:
        await self.admin.execute_command(
            "ACL", "SETUSER", self.user, "on", f">{self.password}", "~*", "&*", "+@all"
        )
        await self.broker.start(self.received.append)
        return self.broker

    async def cut(self, *, keep_out: bool = False) -> None:
        if keep_out:  # new connections of the user are refused; open ones keep working
            await self.admin.execute_command("ACL", "SETUSER", self.user, "off")
        await self.admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "USER", self.user)
        broker = self.broker
        await async_wait_for(lambda: not broker.connected, TIMEOUT, what="link down")

    def offsets(self, channel: str) -> list[int]:
        return [m.offset for m in self.received if isinstance(m, Publication) and m.channel == channel]

    async def close(self) -> None:
        await self.broker.close()
        await self.admin.execute_command("ACL", "DELUSER", self.user)
        await self.admin.aclose()


@pytest.fixture
async def node(redis_server: RedisServer) -> AsyncIterator[Node]:
    node = Node(redis_server)
    yield node
    await node.close()


async def test_a_publish_redis_accepts_wakes_the_link_out_of_its_backoff(node: Node) -> None:
    broker = await node.start()
    channel = "chat:wake"
    await broker.subscribe(channel)
    await broker.publish(channel, b"1", SHORT_HISTORY)
    await async_wait_for(lambda: node.offsets(channel) == [1], TIMEOUT, what="live")
    await node.cut()
    before = broker.reconnects
    started = time.monotonic()
    # Redis answers this publish: the link, 15-30 s into its backoff, reconnects now.
    await broker.publish(channel, b"2", SHORT_HISTORY)
    await async_wait_for(
        lambda: broker.connected and broker.reconnects > before, TIMEOUT, what="link woken and back"
    )
    assert time.monotonic() - started < 2.0
    # More than history keeps, right after: none is lost (the link is back).
    for n in range(3, 3 + 3 * SHORT_HISTORY.history_size):
        await broker.publish(channel, str(n).encode(), SHORT_HISTORY)
    last = 2 + 3 * SHORT_HISTORY.history_size
    await async_wait_for(lambda: node.offsets(channel)[-1:] == [last], TIMEOUT, what="all delivered")
    assert node.offsets(channel) == list(range(1, last + 1))
    assert broker.gaps_lost == 0


async def test_wake_ups_are_bounded_when_commands_work_but_the_link_cannot_connect(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Commands on open connections succeed while every new connection is refused: the
    link tries again at most every ``_WAKE_AFTER`` (50 ms), not once per command."""
    broker = await node.start()
    channel = "chat:refused"
    await broker.subscribe(channel)
    with caplog.at_level(logging.DEBUG, logger="herald.brokers.redis"):
        await node.cut(keep_out=True)
        started = time.monotonic()
        published = 0
        while time.monotonic() - started < 0.5:
            await broker.publish(channel, b"x", SHORT_HISTORY)
            published += 1
        attempts = caplog.text.count("attempt failed")
    assert published > 50, published  # many commands answered...
    assert 1 <= attempts <= 15, attempts  # ...woke the link at most every 50 ms
    # Let back in: the next answered command brings it back at once, and the node reports
    # what it could not fill (more than history was published while it was out).
    await node.admin.execute_command("ACL", "SETUSER", node.user, "on")
    await broker.publish(channel, b"y", SHORT_HISTORY)
    await async_wait_for(lambda: broker.connected, TIMEOUT, what="link back")
    await async_wait_for(
        lambda: any(isinstance(m, StreamGap) for m in node.received), TIMEOUT, what="gap reported"
    )
    # The lost link is named by its (redacted) URL, as its re-establishment is.
    assert f"redis link {redact_url(node.url)} lost" in caplog.text, caplog.text
    assert node.password not in caplog.text


async def test_a_node_that_sends_redis_nothing_retries_its_link_at_least_every_reconnect_max(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing to wake it, a link learns that Redis is back from its own next attempt:
    the default ``reconnect_max`` keeps that within what a channel's history covers at
    the rates docs/scaling.md names (``history_size`` 100 / 0.25 s: 400 publications/s)."""
    assert RedisBrokerConfig().reconnect_max <= 0.25
    node = Node(redis_server)
    node.broker = RedisBroker(RedisBrokerConfig(url=node.url, prefix=node.prefix))  # default backoff
    try:
        await node.start()
        with caplog.at_level(logging.DEBUG, logger="herald.brokers.redis"):
            await node.cut(keep_out=True)
            cut = time.monotonic()
            # Long enough for a backoff doubling past 0.25 s to show a longer pause.
            await async_wait_for(lambda: time.monotonic() - cut > 1.5, TIMEOUT, what="1.5 s cut off")
            failed = [r.created for r in caplog.records if "attempt failed" in r.getMessage()]
        pauses = [b - a for a, b in itertools.pairwise(failed)]
        assert len(pauses) >= 4 and max(pauses) < 0.25 + 0.1, pauses
    finally:
        await node.close()
