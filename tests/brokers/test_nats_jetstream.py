"""NATS with JetStream beyond the shared suite: in-order delivery when fan-outs are lost.

Publications reach nodes over core NATS after JetStream stored them; a node that
misses one (the publisher died between the store and the fan-out, or the node's
link dropped) must still deliver the channel in offset order, reading what it
missed from the stream.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from herald.brokers.base import Publication, PublishOptions, StreamGap, StreamPosition
from herald.brokers.nats import NatsBroker, NatsBrokerConfig
from herald.exceptions import BrokerUnavailableError, ConfigError

from ..helpers import async_until, async_wait_for
from ..servers import NatsServer, nats_server_fixture
from .conformance import HISTORY, Engine, NodeEngines, channel_name

pytestmark = pytest.mark.nats


class _DiesAfterStore(NatsBroker):
    """A publisher whose next fan-out never happens, as if it died right after JetStream's
    ack; or whose next append's ack is lost (JetStream stored it, the reply never came)."""

    drop_next_fan_out = False
    lose_next_ack = False

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Any:
        reply = await super()._request(subject, payload, headers)
        if self.lose_next_ack and not subject.startswith("$JS."):  # an append, not an API call
            self.lose_next_ack = False
            raise BrokerUnavailableError("NATS request failed: the reply was lost")
        return reply

    async def _publish(self, subject: str, payload: bytes) -> None:
        if self.drop_next_fan_out and subject.startswith(f"{self.config.prefix}.c."):
            self.drop_next_fan_out = False
            return
        await super()._publish(subject, payload)


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


@pytest.fixture
async def engine(jetstream_server: NatsServer) -> AsyncIterator[Engine]:
    config = NatsBrokerConfig(
        url=jetstream_server.url, prefix=f"t{secrets.token_hex(4)}", jetstream=True, gap_wait=0.1
    )

    def make() -> tuple[NatsBroker, object]:
        broker = _DiesAfterStore(config)
        return broker, broker.presence_manager()

    engine = Engine(make)  # type: ignore[arg-type]
    yield engine
    await engine.close()


def _offsets(node: NodeEngines, channel: str) -> list[int]:
    return [p.offset for p in node.publications(channel)]


async def test_lost_fan_out_is_read_from_the_stream_in_order(engine: Engine) -> None:
    receiver, publisher = await engine.node(), await engine.node()
    broker = publisher.broker
    assert isinstance(broker, _DiesAfterStore)
    channel = channel_name()
    await receiver.broker.subscribe(channel)
    await broker.publish(channel, b"1", HISTORY)
    broker.drop_next_fan_out = True
    await broker.publish(channel, b"2", HISTORY)  # stored, never fanned out
    await broker.publish(channel, b"3", HISTORY)
    received = await receiver.wait_publications(channel, 3)
    # Offset 3 arrived first, but 2 was read from the stream and delivered before it.
    assert [(p.offset, p.data) for p in received] == [(1, b"1"), (2, b"2"), (3, b"3")]
    assert isinstance(receiver.broker, NatsBroker) and receiver.broker.gaps_filled == 1


async def test_an_append_whose_ack_was_lost_is_not_sent_again(engine: Engine) -> None:
    """JetStream stored the publication and its ack was lost: the publish fails (121),
    nothing sends it again, and it is in the stream once, at its offset; the nodes read
    it from there (its fan-out never happened) and the next publish continues after it."""
    receiver, publisher = await engine.node(), await engine.node()
    broker = publisher.broker
    assert isinstance(broker, _DiesAfterStore)
    channel = channel_name()
    await receiver.broker.subscribe(channel)
    assert (await broker.publish(channel, b"0", HISTORY)).offset == 1
    broker.lose_next_ack = True
    with pytest.raises(BrokerUnavailableError):
        await broker.publish(channel, b"1", HISTORY)
    assert not broker.lose_next_ack  # the append was made, and its reply dropped
    assert (await broker.publish(channel, b"2", HISTORY)).offset == 3
    received = await receiver.wait_publications(channel, 3)
    assert [(p.offset, p.data) for p in received] == [(1, b"0"), (2, b"1"), (3, b"2")]
    assert [p.data for p in (await broker.history(channel)).publications] == [b"0", b"1", b"2"]


async def test_offset_missing_from_history_is_reported_as_a_gap(engine: Engine) -> None:
    """The broker contract: an offset the stream no longer has is reported (StreamGap,
    before anything after it), never skipped silently."""
    receiver, publisher = await engine.node(), await engine.node()
    broker = publisher.broker
    assert isinstance(broker, _DiesAfterStore)
    channel = channel_name()
    no_history = PublishOptions()  # offsets are counted, nothing is kept
    await receiver.broker.subscribe(channel)
    first = await broker.publish(channel, b"1", no_history)
    broker.drop_next_fan_out = True
    await broker.publish(channel, b"2", no_history)
    await broker.publish(channel, b"3", no_history)
    await async_wait_for(lambda: _offsets(receiver, channel) == [1, 3], 5)
    epoch = first.epoch
    assert [m for m in receiver.received if m.channel == channel] == [
        Publication(channel, 1, epoch, b"1"),
        StreamGap(channel, StreamPosition(1, epoch), StreamPosition(2, epoch)),
        Publication(channel, 3, epoch, b"3"),
    ]
    assert isinstance(receiver.broker, NatsBroker) and receiver.broker.gaps_lost == 1


def _local_port(broker: NatsBroker) -> int:
    writer = broker._nc._transport._io_writer
    return int(writer.get_extra_info("sockname")[1])


async def test_node_catches_up_after_its_link_drops(engine: Engine, jetstream_server: NatsServer) -> None:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    receiver, publisher = await engine.node(), await engine.node()
    assert isinstance(receiver.broker, NatsBroker)
    channel = channel_name()
    await receiver.broker.subscribe(channel)
    await publisher.broker.publish(channel, b"0", HISTORY)
    await receiver.wait_publications(channel, 1)
    # Abort only the receiver's socket (its own source port): the publisher stays connected.
    port = _local_port(receiver.broker)
    await asyncio.to_thread(
        subprocess.run,
        ["ss", "-K", "-tn", f"( sport = :{port} and dport = :{jetstream_server.port} )"],
        check=True,
        capture_output=True,
    )
    await async_wait_for(lambda: not receiver.broker._connected.is_set(), 5, what="link down")
    for n in range(1, 6):
        await publisher.broker.publish(channel, b"%d" % n, HISTORY)
    # No publication follows: the reconnect alone makes the node read what it missed.
    received = await receiver.wait_publications(channel, 6)
    assert [p.offset for p in received] == list(range(1, 7))
    assert [p.data for p in received] == [b"%d" % n for n in range(6)]
    assert receiver.broker.gaps_filled == 5
    assert all(isinstance(p, Publication) for p in received)


async def test_concurrent_publishers_reach_each_node_in_offset_order(engine: Engine) -> None:
    nodes = [await engine.node() for _ in range(3)]
    channel = channel_name()
    for node in nodes:
        await node.broker.subscribe(channel)
    # Many concurrent publishes per node: fan-outs overtake each other on the wire.
    await asyncio.gather(
        *(node.broker.publish(channel, b"%d" % i, HISTORY) for node in nodes for i in range(30))
    )
    for node in nodes:
        received = await node.wait_publications(channel, 90)
        assert [p.offset for p in received] == list(range(1, 91))


def test_config_from_url() -> None:
    config = NatsBrokerConfig.from_url("nats://a:4222,nats://b:4222?jetstream=1&prefix=app&max_age=60")
    assert config.url == "nats://a:4222,nats://b:4222"
    assert config.jetstream and config.prefix == "app" and config.max_age == 60
    assert config.stream_name == "HERALD_app"
    assert not NatsBrokerConfig.from_url("nats://a:4222").jetstream
    timeouts = NatsBrokerConfig.from_url(
        "nats://a:4222?request_timeout=2.5&reconnect_wait=0.1&connect_timeout=3"
    )
    assert (timeouts.request_timeout, timeouts.reconnect_wait, timeouts.connect_timeout) == (2.5, 0.1, 3)
    with pytest.raises(ConfigError, match="request_timeout"):
        NatsBrokerConfig.from_url("nats://a:4222?request_timeout=-1")
    with pytest.raises(ConfigError, match="unknown NATS broker URL option 'jetsream'"):
        NatsBrokerConfig.from_url("nats://a:4222?jetsream=1")
    with pytest.raises(ConfigError, match="boolean"):
        NatsBrokerConfig.from_url("nats://a:4222?jetstream=maybe")
    with pytest.raises(ConfigError, match="storage"):
        NatsBrokerConfig.from_url("nats://a:4222?jetstream=1&storage=disk")


async def test_reads_write_nothing_and_the_first_publish_continues_their_epoch(engine: Engine) -> None:
    """Issue 13 item 6: reading a channel with no live stream stores nothing in JetStream."""
    node = await engine.node()
    broker = node.broker
    assert isinstance(broker, NatsBroker)

    async def stored() -> int:
        info = await broker._api(f"STREAM.INFO.{broker.stream_name}", {})
        return int(info["state"]["messages"])

    names = [channel_name() for _ in range(100)]
    positions = [(await broker.history(name, limit=0)).position for name in names]
    positions += [(await broker.history(name)).position for name in names[:20]]
    assert await stored() == 0
    assert all(p.offset == 0 and p.epoch for p in positions)
    told = positions[0]
    first = await broker.publish(names[0], b"1", PublishOptions(history_size=5, history_ttl=0.3))
    assert first == StreamPosition(1, told.epoch)
    assert await stored() == 1

    # Its last message expired: still nothing written by reads, and a new epoch is told,
    # which the next publish continues (and which no earlier stream of the channel had).
    async def expired() -> bool:
        return (await broker.history(names[0], limit=0)).position.epoch != told.epoch

    await async_until(expired, 5, what="the stream to expire")
    after = (await broker.history(names[0], limit=0)).position
    assert after.offset == 0 and await stored() == 1
    assert await broker.publish(names[0], b"2", HISTORY) == StreamPosition(1, after.epoch)
    assert await stored() == 1  # the new stream rolled the expired one up
