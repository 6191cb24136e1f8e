"""The Redis broker across Pub/Sub link blips (no gap, or a reported one) and across
Redis restarts that roll its data back (a new epoch, reported).

Real redis-server; the blip is ``CLIENT KILL TYPE pubsub`` on the server while
the subscriber node's ACL user is switched off, so the node stays cut off for
as long as the test publishes (deterministic, no timing luck).  Restarts are a
``kill -9`` of a redis-server the test owns, restarted on the same directory.
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

from herald.brokers.base import PresenceEvent, Publication, PublishOptions, StreamGap, StreamPosition
from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.brokers.redis_catchup import _DELIVER, _DROP, _JUMP, _Track
from herald.exceptions import BrokerError
from herald.urls import redact_url

from ..helpers import async_until, async_wait_for
from ..servers import RedisServer, redis_server_fixture, require

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


# ---------------------------------------------------------------- rollbacks (issue 13, item 11)


def test_the_catch_up_track_compares_positions_not_offsets() -> None:
    """``_Track.step``: a publication is delivered only as the next position of the stream
    this node follows, or as offset 1 of a new stream; anything else is a jump to read."""
    track = _Track(epoch="a", offset=5)

    def pub(epoch: str, offset: int) -> Publication:
        return Publication("chat:t", offset, epoch, b"x")

    assert track.step(pub("a", 4)) == _DROP
    assert track.step(pub("a", 5)) == _DROP
    assert (track.epoch, track.offset) == ("a", 5)
    assert track.step(pub("a", 7)) == _JUMP  # offset 6 is missing
    assert (track.epoch, track.offset) == ("a", 5)
    assert track.step(pub("a", 6)) == _DELIVER
    assert (track.epoch, track.offset) == ("a", 6)
    # A new stream at offset > 1: its start was missed; never delivered as is.
    assert track.step(pub("b", 3)) == _JUMP
    assert (track.epoch, track.offset) == ("a", 6)
    # Offset 1 of a new stream: the stream restarted while we listened; nothing missed.
    assert track.step(pub("b", 1)) == _DELIVER
    assert (track.epoch, track.offset) == ("b", 1)
    assert track.step(pub("b", 1)) == _DROP
    fresh = _Track()
    assert fresh.step(pub("c", 9)) == _DELIVER and (fresh.epoch, fresh.offset) == ("c", 9)


async def _publish_when_back(broker: RedisBroker, channel: str, data: bytes) -> StreamPosition:
    """Publish once Redis answers again (it was just restarted)."""
    result: list[StreamPosition] = []

    async def attempt() -> bool:
        try:
            result.append(await broker.publish(channel, data, HISTORY))
        except BrokerError:
            return False
        return True

    await async_until(attempt, TIMEOUT, what="redis back")
    return result[0]


@pytest.mark.parametrize("persistence", ["rdb", "aof"])
async def test_redis_restarted_from_its_files(persistence: str) -> None:
    """Publish 1..10, SAVE, publish 11..15, kill -9, restart on the same directory.

    From the RDB snapshot (offsets 11..15 rolled back) the stream must start a new epoch,
    even for a publisher that never saw the old stream, and the listening node is told
    (StreamGap, epoch changed) before anything of the new stream.  From an append-only
    file fsynced on every write nothing was lost: same epoch, next offset, no gap.
    """
    require("redis-server")
    server = RedisServer(persistent=persistence == "aof")
    server.start()
    recorder = Recorder()
    config = RedisBrokerConfig(url=server.url, prefix="rb", reconnect_min=0.05, reconnect_max=0.2)
    subscriber, publisher = RedisBroker(config), RedisBroker(config)
    newcomer: RedisBroker | None = None
    admin = aioredis.Redis.from_url(server.url)
    channel = "chat:rollback"
    try:
        await subscriber.start(recorder)
        await publisher.start(lambda message: None)
        await subscriber.subscribe(channel)
        old = [await publisher.publish(channel, b"%d" % n, HISTORY) for n in range(1, 11)]
        await admin.save()
        old += [await publisher.publish(channel, b"%d" % n, HISTORY) for n in range(11, 16)]
        assert [p.offset for p in old] == list(range(1, 16)) and len({p.epoch for p in old}) == 1
        await async_wait_for(lambda: len(recorder.offsets(channel)) == 15, TIMEOUT, what="live")
        last = old[-1]

        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        newcomer = RedisBroker(config)  # a node that never saw the old stream
        await newcomer.start(lambda message: None)
        after = await _publish_when_back(newcomer, channel, b"16")
        after_more = [await publisher.publish(channel, b"%d" % n, HISTORY) for n in range(17, 22)]
        offsets = [after.offset] + [p.offset for p in after_more]
        resumed = await newcomer.history(channel, since=last)

        if persistence == "aof":
            assert after == StreamPosition(16, last.epoch)
            assert offsets == list(range(16, 22))
            assert [p.offset for p in resumed.publications] == list(range(16, 22))
            await async_wait_for(
                lambda: recorder.offsets(channel) == list(range(1, 22)), TIMEOUT, what="no gap"
            )
            assert recorder.gaps(channel) == []
            return
        # Offsets 11..15 of the old epoch are never handed out again.
        assert after.epoch != last.epoch and offsets == list(range(1, 7))
        assert {p.epoch for p in after_more} == {after.epoch}
        assert resumed.position.epoch != last.epoch  # a resuming client: recovered false
        await async_wait_for(lambda: recorder.gaps(channel), TIMEOUT, what="the node to be told")
        [gap] = recorder.gaps(channel)
        assert gap.epoch_changed and gap.last == last and gap.position.epoch == after.epoch
        # The gap comes before any publication of the new stream it does not cover.
        index = recorder.received.index(gap)
        delivered_before = [
            m for m in recorder.received[:index] if isinstance(m, Publication) and m.channel == channel
        ]
        assert [p.offset for p in delivered_before] == list(range(1, 16))
        news = [m for m in recorder.received[index:] if isinstance(m, Publication) and m.channel == channel]
        assert all(p.epoch == after.epoch and p.offset > gap.position.offset for p in news)
        assert subscriber.gaps_lost == 1
    finally:
        await admin.aclose()
        for broker in (subscriber, publisher, newcomer):
            if broker is not None:
                await broker.close()
        server.cleanup()


async def test_redis_without_config_access_is_not_trusted_across_a_restart() -> None:
    """A node that may not read ``CONFIG`` cannot know the append-only file is fsynced
    on every write: a restart, even from that file, starts the stream again."""
    require("redis-server")
    server = RedisServer(persistent=True)
    server.start()
    admin = aioredis.Redis.from_url(server.url)
    broker: RedisBroker | None = None
    user = ("ACL", "SETUSER", "node", "on", ">pw", "~*", "&*", "+@all", "-config")
    try:
        await admin.execute_command(*user)
        url = f"redis://node:pw@127.0.0.1:{server.port}/0"
        broker = RedisBroker(RedisBrokerConfig(url=url, reconnect_min=0.05, reconnect_max=0.2))
        await broker.start(lambda message: None)
        first = await broker.publish("chat:c", b"1", HISTORY)
        assert first.offset == 1
        await admin.aclose()
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        admin = aioredis.Redis.from_url(server.url)
        await admin.execute_command(*user)  # ACL users are not in the data files
        after = await _publish_when_back(broker, "chat:c", b"2")
        assert after.offset == 1 and after.epoch != first.epoch
    finally:
        await admin.aclose()
        if broker is not None:
            await broker.close()
        server.cleanup()


async def test_a_stream_below_what_the_node_delivered_starts_a_new_epoch(cluster: Cluster) -> None:
    """The node-side high-water mark: after a blip the stream's top is below the last
    offset this node delivered in the same epoch (a rollback nothing else saw).  The
    epoch is dropped (offsets would repeat) and the node is told."""
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    channel = "chat:behind"
    await subscriber.subscribe(channel)
    old = [await publisher.publish(channel, b"1", HISTORY) for _ in range(5)]
    await async_wait_for(lambda: recorder.offsets(channel) == [1, 2, 3, 4, 5], TIMEOUT, what="live")
    await cluster.cut()
    await cluster.admin.hset(subscriber.meta_key(channel), "o", 3)  # as if 4 and 5 never were
    await cluster.restore()
    await async_wait_for(lambda: recorder.gaps(channel), TIMEOUT, what="the rollback to be reported")
    [gap] = recorder.gaps(channel)
    assert gap.epoch_changed and gap.last == old[-1] and gap.position.epoch != old[-1].epoch
    assert subscriber.rollbacks == 1
    new = await publisher.publish(channel, b"2", HISTORY)
    assert new == StreamPosition(1, gap.position.epoch)
    await async_wait_for(lambda: recorder.offsets(channel) == [1, 2, 3, 4, 5, 1], TIMEOUT, what="live")


async def test_a_held_publication_of_an_epoch_the_stream_left_does_not_stall_the_catch_up(
    cluster: Cluster,
) -> None:
    """A live publication held during a catch-up whose epoch the stream had already left
    when it was read (it arrived just before a rollback was found) can never be placed:
    it is dropped, instead of the catch-up reading the stream again forever."""
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    channel = "chat:stale"
    await subscriber.subscribe(channel)
    await publisher.publish(channel, b"1", HISTORY)
    await async_wait_for(lambda: recorder.offsets(channel) == [1], TIMEOUT, what="live")
    track = subscriber._tracks[channel]
    track.held = [Publication(channel, 7, "gone", b"stale")]
    subscriber._start_catch_up(channel, track)
    await async_wait_for(lambda: track.held is None, TIMEOUT, what="the catch-up to finish")
    await publisher.publish(channel, b"2", HISTORY)
    await async_wait_for(lambda: recorder.offsets(channel) == [1, 2], TIMEOUT, what="live after it")
    assert recorder.gaps(channel) == []


async def test_a_catch_up_survives_an_error_of_the_client_library(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py can fail from its own insides while a restarted master rejoins a cluster
    (``'NoneType' object has no attribute 'writelines'``): the catch-up after a blip must
    retry, not die silently and leave the channel's subscribers waiting forever."""
    subscriber, publisher = await cluster.start()
    recorder = cluster.recorder
    channel = "chat:client-error"
    await subscriber.subscribe(channel)
    await publisher.publish(channel, b'"before"', HISTORY)
    await async_wait_for(lambda: recorder.offsets(channel) == [1], TIMEOUT, what="live first")
    await cluster.cut()
    await publisher.publish(channel, b'"missed"', HISTORY)

    failures = 0
    real_history = subscriber.history

    async def flaky_history(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return await real_history(*args, **kwargs)

    monkeypatch.setattr(subscriber, "history", flaky_history)
    await cluster.restore()
    await async_wait_for(lambda: recorder.offsets(channel) == [1, 2], TIMEOUT, what="the gap filled")
    assert failures == 2 and recorder.gaps(channel) == []


async def test_a_client_library_error_is_reported_as_unavailable() -> None:
    from herald.exceptions import BrokerUnavailableError

    broker = RedisBroker(RedisBrokerConfig(url="redis://127.0.0.1:1/0"))

    async def broken() -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    with pytest.raises(BrokerUnavailableError, match="client error"):
        await broker._call(broken)
