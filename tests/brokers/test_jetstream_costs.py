"""What NATS JetStream costs per operation, counted on a real nats-server -js (issue 16 item 3).

* A publish is one round trip when the node publishes on top of what it knows
  (its tip); nodes taking turns on a channel read first (two), and a node that
  finds itself alone again goes back to one.
* A history read of N publications is 2 + ceil(N / BATCH) round trips (last
  message, reader, fetches), not N; a short one (recovery) walks back instead.
* Expiry follows the server's clock: a node whose own clock is an hour off
  neither keeps publications longer nor drops them early.

Round trips are counted at the connection: every awaited ``request`` and every
fetch sent to a JetStream consumer (its answer is awaited on an inbox).  Requests
sent without waiting for their answer (trims, consumer deletes) are counted apart.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nats
import pytest

from herald.brokers.base import PublishOptions, StreamPosition
from herald.brokers.nats import NatsBroker, NatsBrokerConfig
from herald.brokers.nats_jetstream import BATCH, ServerClock

from ..helpers import async_until, async_wait_for
from ..servers import NatsServer, nats_server_fixture
from .conformance import channel_name

pytestmark = pytest.mark.nats

KEPT = PublishOptions(history_size=1000, history_ttl=60)


class _Counter:
    """The broker's NATS connection, counting round trips and unanswered requests."""

    def __init__(self, nc: Any, broker: CountingBroker) -> None:
        self._nc = nc
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def request(self, subject: str, *args: Any, **kwargs: Any) -> Any:
        self._broker.round_trips.append(subject)
        return await self._nc.request(subject, *args, **kwargs)

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", **kwargs: Any) -> None:
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            self._broker.round_trips.append(subject)  # a fetch: its answer is awaited
        elif reply:
            self._broker.unanswered.append(subject)
        await self._nc.publish(subject, payload, reply=reply, **kwargs)


class CountingBroker(NatsBroker):
    def __init__(self, config: NatsBrokerConfig, *, clock: Callable[[], float] | None = None) -> None:
        super().__init__(config, clock=clock)
        self.round_trips: list[str] = []
        self.unanswered: list[str] = []

    def _connection(self) -> Any:
        return _Counter(super()._connection(), self)

    def reset(self) -> None:
        self.round_trips.clear()
        self.unanswered.clear()


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


@pytest.fixture
def config(jetstream_server: NatsServer) -> NatsBrokerConfig:
    return NatsBrokerConfig(url=jetstream_server.url, prefix=f"t{secrets.token_hex(4)}", jetstream=True)


@pytest.fixture
async def make(config: NatsBrokerConfig) -> AsyncIterator[Callable[..., Any]]:
    brokers: list[NatsBroker] = []

    async def make(clock: Callable[[], float] | None = None) -> CountingBroker:
        broker = CountingBroker(config, clock=clock)
        await broker.start(lambda message: None)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()


async def test_a_publish_is_one_round_trip(make: Callable[..., Any]) -> None:
    broker = await make()
    channel = channel_name()
    await broker.publish(channel, b"0", KEPT)  # the first one reads (and learns the server clock)
    broker.reset()
    positions = [await broker.publish(channel, b"%d" % n, KEPT) for n in range(1, 41)]
    assert [p.offset for p in positions] == list(range(2, 42))
    assert broker.round_trips == [broker.history_subject(channel)] * 40
    assert broker.unanswered == []  # 41 publications < history_size: nothing to trim
    history = await broker.history(channel)
    assert [p.data for p in history.publications] == [b"%d" % n for n in range(41)]


async def test_trims_do_not_wait_for_their_answer(make: Callable[..., Any], config: NatsBrokerConfig) -> None:
    broker = await make()
    channel = channel_name()
    small = PublishOptions(history_size=5, history_ttl=60)
    await broker.publish(channel, b"0", small)
    broker.reset()
    for n in range(64):
        await broker.publish(channel, b"%d" % n, small)
    assert len(broker.round_trips) == 64
    assert broker.unanswered == [f"$JS.API.STREAM.PURGE.{broker.stream_name}"] * 4  # every trim_every

    async def trimmed() -> bool:
        nc = await nats.connect(config.url)
        try:
            info = await nc.jetstream().stream_info(config.stream_name)
            return info.state.messages <= small.history_size + config.trim_every
        finally:
            await nc.close()

    await async_until(trimmed, 5, what="the unanswered trims to take effect")


async def test_nodes_taking_turns_read_first_then_one_alone_goes_back_to_one_round_trip(
    make: Callable[..., Any],
) -> None:
    a, b = await make(), await make()
    channel = channel_name()
    await a.publish(channel, b"a", KEPT)
    await b.publish(channel, b"b", KEPT)
    a.reset()
    b.reset()
    turns = 10
    positions = []
    for _ in range(turns):
        positions.append(await a.publish(channel, b"a", KEPT))
        positions.append(await b.publish(channel, b"b", KEPT))
    assert [p.offset for p in positions] == list(range(3, 3 + 2 * turns))
    # One refused append per node (its tip was stale), then read + append each time.
    assert len(a.round_trips) + len(b.round_trips) == 2 * (2 * turns) + 2
    # a publishes alone again: one read finds its tip right, then one round trip each.
    a.reset()
    counts = []
    for _ in range(4):
        before = len(a.round_trips)
        await a.publish(channel, b"a", KEPT)
        counts.append(len(a.round_trips) - before)
    assert counts == [2, 2, 1, 1]  # b's last append is read once, then a's own tip
    history = await a.history(channel)
    assert [p.offset for p in history.publications] == list(range(1, 3 + 2 * turns + 4))


async def test_a_keyed_publish_is_one_round_trip(make: Callable[..., Any]) -> None:
    broker = await make()
    channel = channel_name()
    await broker.publish_idempotent(channel, b"0", KEPT, "k0", 300)
    broker.reset()
    for n in range(1, 11):
        assert await broker.publish_idempotent(channel, b"x", KEPT, f"k{n}", 300) == (
            StreamPosition(n + 1, (await broker.history(channel, limit=0)).position.epoch),
            False,
        )
    appends = [s for s in broker.round_trips if s == broker.history_subject(channel)]
    assert len(appends) == 10
    assert len(broker.round_trips) == 10 + 10  # the appends and the history(limit=0) reads
    # The idempotency records are written without waiting; a retry finds them.
    assert broker.unanswered == [broker.idempotency_subject(channel, f"k{n}") for n in range(1, 11)]
    assert await broker.publish_idempotent(channel, b"x", KEPT, "k3", 300) == (
        StreamPosition(4, (await broker.history(channel, limit=0)).position.epoch),
        True,
    )


async def test_a_subscribed_node_reads_first_after_seeing_another_nodes_publication(
    make: Callable[..., Any],
) -> None:
    a, b = await make(), await make()
    channel = channel_name()
    await a.subscribe(channel)
    await a.publish(channel, b"a", KEPT)
    await b.publish(channel, b"b", KEPT)
    # a's fan-out reader saw offset 2 go by: its tip (offset 1) is known to be stale.
    await async_wait_for(lambda: not a._tips[channel].trusted, 5, what="b's fan-out to reach a")
    a.reset()
    assert (await a.publish(channel, b"a", KEPT)).offset == 3
    assert a.round_trips == [f"$JS.API.STREAM.MSG.GET.{a.stream_name}", a.history_subject(channel)]


async def test_history_is_read_in_batches(make: Callable[..., Any], config: NatsBrokerConfig) -> None:
    broker = await make()
    channel = channel_name()
    count = 2 * BATCH + 50
    for n in range(count):
        await broker.publish(channel, b"%d" % n, KEPT)
    broker.reset()
    history = await broker.history(channel)
    assert [p.offset for p in history.publications] == list(range(1, count + 1))
    assert [p.data for p in history.publications] == [b"%d" % n for n in range(count)]
    # The last message, the reader, and ceil(count / BATCH) fetches.
    assert len(broker.round_trips) == 2 + math.ceil(count / BATCH), broker.round_trips
    deletes = [s for s in broker.unanswered if s.startswith(f"$JS.API.CONSUMER.DELETE.{broker.stream_name}.")]
    assert len(deletes) == len(broker.unanswered) == 1

    # Reverse and limited reads return the same publications.
    broker.reset()
    newest = await broker.history(channel, limit=100, reverse=True)
    assert [p.offset for p in newest.publications] == list(range(count, count - 100, -1))
    since = await broker.history(channel, since=StreamPosition(count - 300, history.position.epoch), limit=7)
    assert [p.offset for p in since.publications] == list(range(count - 299, count - 292))
    assert len(broker.round_trips) == 2 * (2 + math.ceil(count / BATCH))

    # A short read (recovery of a few) walks back: the last message, then one per older one.
    broker.reset()
    recent = await broker.history(channel, since=StreamPosition(count - 3, history.position.epoch))
    assert [p.offset for p in recent.publications] == [count - 2, count - 1, count]
    assert len(broker.round_trips) == 3

    async def readers_gone() -> bool:
        nc = await nats.connect(config.url)
        try:
            info = await nc.jetstream().stream_info(config.stream_name)
            return info.state.consumer_count == 0
        finally:
            await nc.close()

    await async_until(readers_gone, 5, what="the history readers to be deleted")


def test_the_server_clock_is_the_node_clock_plus_the_learnt_offset() -> None:
    now = [100.0]
    clock = ServerClock(lambda: now[0])
    assert not clock.known()
    # Sent at 99.9, answered at 100.1 (node clock): the server said 5000 ms in between.
    clock.learn(5_000, 99.9, 100.1)
    assert clock.now_ms() == 5_000
    now[0] = 102.5
    assert clock.now_ms() == 7_500
    # A much slower sample (less precise) does not replace it; a better one does.
    clock.learn(9_000, 102.0, 103.0)
    assert clock.now_ms() == 7_500
    clock.learn(6_000, 102.0, 102.1)
    assert clock.now_ms() == 6_000 + 450


def _skewed(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


async def test_expiry_follows_the_server_clock_not_the_nodes(make: Callable[..., Any]) -> None:
    """Nodes whose clocks are an hour fast, right, and an hour slow agree on what expires,
    and nothing expires before its TTL by real time."""
    fast, right, slow = await make(_skewed(3600)), await make(_skewed(0)), await make(_skewed(-3600))
    nodes = [fast, right, slow]
    ttl = 1.0
    options = PublishOptions(history_size=10, history_ttl=ttl)
    channels = [channel_name() for _ in nodes]
    started = time.monotonic()
    for publisher, channel in zip(nodes, channels, strict=True):
        await publisher.publish(channel, b"1", options)
    for node in nodes:
        # Each node knows the server's time (this machine's), whatever its own clock says.
        assert abs(node._server_clock.now_ms() - time.time() * 1000) < 500
        for channel in channels:
            assert [p.data for p in (await node.history(channel)).publications] == [b"1"]
    for channel in channels:

        async def gone(channel: str = channel) -> bool:
            return not (await right.history(channel)).publications

        await async_until(gone, 5 + ttl, what=f"{channel} to expire")
        assert time.monotonic() - started >= ttl - 0.1  # not early
        for node in nodes:  # and every node agrees
            await async_until(lambda node=node, channel=channel: _empty(node, channel), 1, what="agreement")


async def _empty(node: NatsBroker, channel: str) -> bool:
    return not (await node.history(channel)).publications


async def test_a_tip_never_outlives_its_stream(make: Callable[..., Any], config: NatsBrokerConfig) -> None:
    """The stream is deleted and re-created by another node, whose appends reach the very
    sequence this node's tip holds: this node must not append on top of its old tip."""
    a, b = await make(), await make()
    channel = channel_name()
    await a.publish(channel, b"1", KEPT)
    old = await a.publish(channel, b"2", KEPT)  # a's tip: stream sequence 2, offset 2
    generation = a._tips_generation
    nc = await nats.connect(config.url)
    try:
        await nc.jetstream().delete_stream(config.stream_name)
    finally:
        await nc.close()
    await async_wait_for(lambda: a._tips_generation > generation, 5, what="the advisory")
    first = await b.publish(channel, b"1", KEPT)  # re-creates the stream: sequence 1
    await b.publish(channel, b"2", KEPT)  # sequence 2, as a's tip
    assert first.epoch != old.epoch
    assert await a.publish(channel, b"3", KEPT) == StreamPosition(3, first.epoch)
