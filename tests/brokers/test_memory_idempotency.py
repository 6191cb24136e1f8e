"""The memory broker's idempotency keys: bounded, expiring, oldest forgotten first; and the
node's keyed publish paths (publish, publish_json, publish_internal) on it."""

from __future__ import annotations

import pytest

from herald.brokers.base import PublishOptions, StreamPosition
from herald.brokers.memory import MAX_IDEMPOTENCY_KEYS, MemoryBroker
from herald.codes import ErrorCode
from herald.config import Settings
from herald.engines import engines_for
from herald.exceptions import CommandError
from herald.node import Node
from herald.protocol.idempotency import MAX_IDEMPOTENCY_KEY_LENGTH, check_idempotency_key

OPTIONS = PublishOptions(history_size=10)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_is_remembered_for_exactly_the_window() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    first, duplicate = await broker.publish_idempotent("chat:a", b"1", OPTIONS, "k", 10)
    assert not duplicate
    clock.now += 9.999
    assert await broker.publish_idempotent("chat:a", b"1", OPTIONS, "k", 10) == (first, True)
    clock.now += 0.001
    assert await broker.publish_idempotent("chat:a", b"1", OPTIONS, "k", 10) == (
        StreamPosition(2, first.epoch),
        False,
    )
    assert broker.idempotency_key_count() == 1


async def test_expired_keys_are_dropped_when_the_next_key_comes() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    for n in range(5):
        await broker.publish_idempotent("chat:a", b"1", OPTIONS, f"k{n}", 10)
    assert broker.idempotency_key_count() == 5
    clock.now += 10
    await broker.publish_idempotent("chat:a", b"1", OPTIONS, "fresh", 10)
    assert broker.idempotency_key_count() == 1
    assert broker.idempotency_evicted == 0  # expired, not evicted


async def test_the_bound_forgets_the_oldest_key_first() -> None:
    broker = MemoryBroker(max_idempotency_keys=3)
    positions = [(await broker.publish_idempotent("chat:a", b"x", OPTIONS, f"k{n}", 60))[0] for n in range(4)]
    assert broker.idempotency_key_count() == 3
    assert broker.idempotency_evicted == 1
    assert broker.counters()["idempotency_evicted"] == 1
    # k1..k3 are still known; k0 was forgotten early and publishes again.
    for n in (1, 2, 3):
        assert await broker.publish_idempotent("chat:a", b"x", OPTIONS, f"k{n}", 60) == (positions[n], True)
    again, duplicate = await broker.publish_idempotent("chat:a", b"x", OPTIONS, "k0", 60)
    assert not duplicate and again.offset == 5


def test_the_bound_is_configurable_from_the_broker_url_and_checked() -> None:
    assert MAX_IDEMPOTENCY_KEYS == 100_000
    broker, _ = engines_for(Settings(broker="memory?max_idempotency_keys=7"))
    assert isinstance(broker, MemoryBroker) and broker.max_idempotency_keys == 7
    with pytest.raises(ValueError, match="max_idempotency_keys"):
        Settings(broker="memory?max_idempotency_keys=0")
    with pytest.raises(ValueError):
        MemoryBroker(max_idempotency_keys=0)


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("a", True),
        ("outbox:17", True),
        ("!~" * 64, True),
        ("", False),
        ("x" * (MAX_IDEMPOTENCY_KEY_LENGTH + 1), False),
        ("two words", False),
        ("line\nbreak", False),
        ("\u00e9", False),
        (17, False),
    ],
)
def test_key_rules(key: object, valid: bool) -> None:
    if valid:
        assert check_idempotency_key(key) == key
    else:
        with pytest.raises(CommandError) as caught:
            check_idempotency_key(key)
        assert caught.value.code == ErrorCode.BAD_REQUEST
        assert "idempotency_key" in caught.value.message


async def test_node_publish_paths_take_the_key_and_count_one_publication() -> None:
    node = Node(Settings(idempotency_window=60))
    await node.start()
    try:
        first = await node.publish("news-n", {"n": 1}, idempotency_key="order-1")
        assert await node.publish("news-n", {"n": 1}, idempotency_key="order-1") == first
        assert await node.publish_json("news-n", b"1", idempotency_key="order-1") == first
        assert node.stats.publications == 1
        assert node.publications_by_namespace == {"": 1}
        # The outbox's path: a reserved channel, the same key twice.
        internal = await node.publish_internal("$outbox", b"1", None, idempotency_key="outbox:1")
        assert await node.publish_internal("$outbox", b"2", None, idempotency_key="outbox:1") == internal
        assert await node.publish_internal("$outbox", b"3", None) == StreamPosition(2, internal.epoch)
        with pytest.raises(CommandError) as caught:
            await node.publish("news-n", 1, idempotency_key="has space")
        assert caught.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(CommandError):
            await node.publish_internal("$outbox", b"1", None, idempotency_key="")
        assert (await node.history("news-n", limit=0)).position.offset == 1
    finally:
        await node.close()


async def test_the_window_is_the_nodes_setting() -> None:
    clock = Clock()
    node = Node(Settings(idempotency_window=5), broker=MemoryBroker(clock=clock))
    await node.start()
    try:
        first = await node.publish("news-w", 1, idempotency_key="k")
        clock.now += 4.9
        assert await node.publish("news-w", 1, idempotency_key="k") == first
        clock.now += 0.1
        assert (await node.publish("news-w", 1, idempotency_key="k")).offset == 2
    finally:
        await node.close()


def test_the_window_setting_is_bounded() -> None:
    assert Settings().idempotency_window == 300
    for bad in (0, -1, 86401):
        with pytest.raises(ValueError):
            Settings(idempotency_window=bad)


async def test_the_app_publish_takes_the_key() -> None:
    from herald import Herald

    herald = Herald(Settings())
    await herald.node.start()
    try:
        first = await herald.publish("news-app", {"n": 1}, idempotency_key="app-1")
        assert await herald.publish("news-app", {"n": 2}, idempotency_key="app-1") == first
        assert (await herald.publish("news-app", {"n": 3})).offset == 2
    finally:
        await herald.node.close()
