"""NATS JetStream's idempotent publish beyond the shared suite, on a real nats-server -js:
the stream's de-duplication window follows the setting, and a retry finds the original
position when its publisher died before recording it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from herald.brokers.base import PublishOptions
from herald.brokers.nats import NatsBroker, NatsBrokerConfig
from herald.exceptions import BrokerError

from ..servers import NatsServer, nats_server_fixture
from .conformance import HISTORY, channel_name

pytestmark = pytest.mark.nats


class _DiesBeforeRecord(NatsBroker):
    """A publisher that dies between JetStream's ack and writing the idempotency record."""

    async def _send(self, subject: str, payload: bytes) -> None:
        if subject.startswith(f"{self.config.prefix}.i."):
            return  # died before the record
        await super()._send(subject, payload)


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


@pytest.fixture
async def config(jetstream_server: NatsServer) -> NatsBrokerConfig:
    return NatsBrokerConfig(url=jetstream_server.url, prefix=f"t{secrets.token_hex(4)}", jetstream=True)


@pytest.fixture
async def brokers(config: NatsBrokerConfig) -> AsyncIterator[tuple[NatsBroker, NatsBroker]]:
    crashing, healthy = _DiesBeforeRecord(config), NatsBroker(config)
    for broker in (crashing, healthy):
        await broker.start(lambda message: None)
    yield crashing, healthy
    for broker in (crashing, healthy):
        await broker.close()


async def _stream_windows(config: NatsBrokerConfig) -> tuple[int, int]:
    nc = await nats.connect(config.url)
    try:
        js = nc.jetstream()
        main = await js.stream_info(config.stream_name)
        records = await js.stream_info(f"{config.stream_name}_IDEM")
        assert main.config.duplicate_window is not None and records.config.max_age is not None
        return int(main.config.duplicate_window * 1000), int(records.config.max_age * 1000)
    finally:
        await nc.close()


async def test_the_streams_window_follows_the_setting(
    brokers: tuple[NatsBroker, NatsBroker], config: NatsBrokerConfig
) -> None:
    _, broker = brokers
    assert await _stream_windows(config) == (300_000, 300_000)
    await broker.publish_idempotent(channel_name(), b"1", HISTORY, "k", 42)
    assert await _stream_windows(config) == (42_000, 42_000)


async def test_a_retry_finds_the_original_whose_publisher_died_before_recording_it(
    brokers: tuple[NatsBroker, NatsBroker],
) -> None:
    crashing, healthy = brokers
    channel = channel_name()
    first, duplicate = await crashing.publish_idempotent(channel, b"1", HISTORY, "k", 300)
    assert not duplicate and first.offset == 1
    # No record: the original message itself answers the retry, on any node.
    assert await healthy.publish_idempotent(channel, b"1", HISTORY, "k", 300) == (first, True)
    assert (await healthy.history(channel, limit=0)).position.offset == 1


async def test_a_lost_original_is_an_error_never_a_second_publication(
    brokers: tuple[NatsBroker, NatsBroker],
) -> None:
    """No record, and the original replaced (no history: the next publication rolls it up)."""
    crashing, healthy = brokers
    channel = channel_name()
    no_history = PublishOptions()
    await crashing.publish_idempotent(channel, b"1", no_history, "k", 300)
    await healthy.publish(channel, b"2", no_history)
    with pytest.raises(BrokerError, match="position was lost"):
        await healthy.publish_idempotent(channel, b"1", no_history, "k", 300)
    assert (await healthy.history(channel, limit=0)).position.offset == 2
