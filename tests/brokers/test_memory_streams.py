"""The memory broker holds state only for published channels, forgets it when it expires,
and finds what expired without walking every stream (issue 13, items 6 and 10)."""

from __future__ import annotations

from typing import Any

import pytest

from herald.brokers.base import PublishOptions, StreamPosition
from herald.brokers.memory import SWEEP_BATCH, MemoryBroker

pytestmark = pytest.mark.asyncio

NO_HISTORY = PublishOptions()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingDict(dict[str, Any]):
    """A dict that counts every look-up and walk (what a sweep touches)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.touched = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.touched += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.touched += 1
        return super().__getitem__(key)

    def __iter__(self) -> Any:
        self.touched += len(self)
        return super().__iter__()

    def items(self) -> Any:
        self.touched += len(self)
        return super().items()

    def values(self) -> Any:
        self.touched += len(self)
        return super().values()


async def test_reads_store_nothing_and_the_first_publish_continues_their_epoch() -> None:
    broker = MemoryBroker(clock=Clock())
    positions = [(await broker.history(f"random-{i}", limit=0)).position for i in range(2000)]
    positions += [(await broker.history(f"other-{i}")).position for i in range(2000)]
    assert broker.stream_count() == 0
    assert all(p.offset == 0 and p.epoch for p in positions)
    # The empty position is stable while nothing is published...
    told = (await broker.history("chat:a", limit=0)).position
    assert (await broker.history("chat:a", limit=0)).position == told
    # ...and the first publication continues it: (0, e) -> (1, e), nothing to special-case.
    assert await broker.publish("chat:a", b"1", PublishOptions(history_size=10)) == StreamPosition(
        1, told.epoch
    )
    recovered = await broker.history("chat:a", since=told)
    assert [p.data for p in recovered.publications] == [b"1"] and recovered.position.epoch == told.epoch
    assert broker.stream_count() == 1


async def test_a_lost_stream_never_reads_as_an_earlier_empty_epoch() -> None:
    """A client told (0, e) before a stream was created and lost must not be told
    (0, e) again: it would resume with ``recovered: true`` having missed that stream."""
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    told = (await broker.history("chat:b", limit=0)).position
    first = await broker.publish("chat:b", b"1", PublishOptions(history_size=10, history_ttl=5))
    assert first == StreamPosition(1, told.epoch)
    clock.now += 6  # the stream expires entirely
    after_expiry = (await broker.history("chat:b", limit=0)).position
    assert after_expiry.offset == 0 and after_expiry.epoch not in (told.epoch, first.epoch)
    second = await broker.publish("chat:b", b"2", PublishOptions(history_size=10, history_ttl=5))
    assert second == StreamPosition(1, after_expiry.epoch)
    await broker.remove_history("chat:b")
    after_removal = (await broker.history("chat:b", limit=0)).position
    assert after_removal.epoch not in (told.epoch, second.epoch)
    assert broker.stream_count() == 0
    # Another broker (a restarted process) never reads as this one's empty epoch.
    assert (await MemoryBroker().history("chat:b", limit=0)).position.epoch != after_removal.epoch


async def test_history_less_publish_records_expire_after_stream_meta_ttl() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock, stream_meta_ttl=100)
    for i in range(300):
        await broker.publish(f"new-{i}", b"x", NO_HISTORY)
    await broker.publish("kept", b"1", PublishOptions(history_size=10))  # history, no TTL: kept
    await broker.publish("short", b"1", PublishOptions(history_size=10, history_ttl=50))
    assert broker.stream_count() == 302
    clock.now += 60
    await broker.publish("new-7", b"y", NO_HISTORY)  # a publication renews the record
    assert broker.stream_count() == 301  # "short" is gone
    clock.now += 50
    # Within stream_meta_ttl of its last publication the offset counts on.
    assert (await broker.history("new-7", limit=0)).position.offset == 2
    assert broker.stream_count() == 2  # "kept" and the renewed "new-7"
    assert (await broker.history("new-3", limit=0)).position.offset == 0
    clock.now += 60
    await broker.history("anything", limit=0)
    assert broker.stream_count() == 1
    assert [p.data for p in (await broker.history("kept")).publications] == [b"1"]
    assert broker.expired == 301  # 300 history-less records and "short"


async def test_stream_meta_ttl_zero_keeps_history_less_offsets() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock, stream_meta_ttl=0)
    await broker.publish("forever", b"x", NO_HISTORY)
    clock.now += 10**7
    assert (await broker.history("forever", limit=0)).position.offset == 1
    with pytest.raises(ValueError):
        MemoryBroker(stream_meta_ttl=-1)


async def test_a_sweep_touches_only_expired_streams_a_batch_at_a_time() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock, stream_meta_ttl=1000)
    for i in range(5000):
        await broker.publish(f"long-{i}", b"x", PublishOptions(history_size=1, history_ttl=3600))
    for i in range(SWEEP_BATCH + 100):
        await broker.publish(f"short-{i}", b"x", PublishOptions(history_size=1, history_ttl=10))
    for i in range(3000):
        await broker.publish(f"meta-{i}", b"x", NO_HISTORY)  # stream_meta_ttl: 1000 s
    clock.now += 20
    counting = CountingDict(broker._streams)
    broker._streams = counting
    # One sweep removes a bounded batch and touches only what it removes.
    assert broker.sweep(clock.now) == SWEEP_BATCH
    assert counting.touched == SWEEP_BATCH
    assert broker.stream_count() == 8000 + 100
    counting.touched = 0
    # The next operation goes on with the rest (and its own look-up).
    await broker.history("long-1", limit=0)
    assert broker.stream_count() == 8000
    assert counting.touched <= 100 + 2
    counting.touched = 0
    assert broker.sweep(clock.now) == 0 and counting.touched == 0
    clock.now += 1000  # the history-less records expire, the long histories stay
    assert broker.sweep(clock.now, limit=10**6) == 3000
    assert counting.touched == 3000
    assert broker.stream_count() == 5000
