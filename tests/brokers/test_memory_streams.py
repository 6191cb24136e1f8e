"""The memory broker forgets streams that nobody published to, and expired ones."""

from __future__ import annotations

import pytest

from herald.brokers.base import PublishOptions
from herald.brokers.memory import MemoryBroker

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_streams_created_by_reads_expire_and_are_swept() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock, read_stream_ttl=100)
    await broker.publish("kept", b"1", PublishOptions(history_size=10))  # no TTL: kept
    await broker.publish("no-history", b"1", PublishOptions())
    await broker.publish("short", b"1", PublishOptions(history_size=10, history_ttl=50))
    epochs = {}
    for i in range(1000):
        epochs[i] = (await broker.history(f"random-{i}", limit=0)).position.epoch
    assert broker.stream_count() == 1003
    # Within the TTL a read-created stream keeps its epoch, so a client told (0, epoch)
    # on subscribe can recover the first publications.
    clock.now += 50
    assert (await broker.history("random-7", limit=0)).position.epoch == epochs[7]
    position = await broker.publish("random-7", b"x", PublishOptions(history_size=10))
    assert position.epoch == epochs[7] and position.offset == 1
    clock.now += broker.SWEEP_INTERVAL + 100
    await broker.history("trigger-sweep", limit=0)
    # Left: the published ones without TTL, the one published after its read, the new read.
    assert broker.stream_count() == 4
    assert (await broker.history("kept")).publications[0].data == b"1"
    assert (await broker.history("no-history", limit=0)).position.offset == 1
