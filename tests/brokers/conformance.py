"""One suite of broker behaviour, run against every broker (memory, Redis, NATS).

A test module subclasses :class:`BrokerConformance`, sets the capability flags
the broker has, and provides an ``engine`` fixture: an :class:`Engine` whose
:meth:`Engine.node` starts another broker + presence manager on the same
backend (one per simulated node) with a recording handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from herald.brokers.base import (
    Broker,
    ClientInfo,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamGap,
    StreamPosition,
)
from herald.config import Settings
from herald.connection import Connection
from herald.exceptions import NotAvailableError
from herald.node import Node
from herald.presence.base import PresenceManager

from ..helpers import async_until, async_wait_for

TIMEOUT = 5.0


@dataclass
class NodeEngines:
    """One simulated node: its broker, presence manager and everything delivered to it."""

    broker: Broker
    presence: PresenceManager
    received: list[Publication | PresenceEvent | StreamGap] = field(default_factory=list)
    #: Publications whose data is in here make the handler raise (after recording them).
    fail_on: set[bytes] = field(default_factory=set)

    def handler(self, message: Publication | PresenceEvent | StreamGap) -> None:
        self.received.append(message)
        if isinstance(message, Publication) and message.data in self.fail_on:
            raise RuntimeError(f"handler failed on {message.data!r}")

    def publications(self, channel: str) -> list[Publication]:
        return [m for m in self.received if isinstance(m, Publication) and m.channel == channel]

    def events(self, channel: str) -> list[PresenceEvent]:
        return [m for m in self.received if isinstance(m, PresenceEvent) and m.channel == channel]

    async def wait_publications(self, channel: str, count: int) -> list[Publication]:
        await async_wait_for(
            lambda: len(self.publications(channel)) >= count,
            TIMEOUT,
            what=f"{count} publications on {channel}",
        )
        return self.publications(channel)


#: A fault on one node's link: inside it, the node misses what is published (until it
#: is left, or until the node reconnects by itself, whichever comes first).
MissHook = Callable[["NodeEngines"], contextlib.AbstractAsyncContextManager[None]]


class Engine:
    """Makes nodes that share one backend.  Subclasses set ``make`` and ``lose_data``.

    ``miss``: the backend's way of making one node miss publications (a dropped
    message, a cut link), for the gap case every broker must pass.
    """

    def __init__(
        self,
        make: Callable[[], tuple[Broker, PresenceManager]],
        lose_data: Callable[[], Awaitable[None]] | None = None,
        *,
        miss: MissHook | None = None,
    ) -> None:
        self._make = make
        self.lose_data = lose_data
        self.miss = miss
        self.nodes: list[NodeEngines] = []

    async def node(self) -> NodeEngines:
        broker, presence = self._make()
        node = NodeEngines(broker, presence)
        await broker.start(node.handler)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.broker.close()
            with contextlib.suppress(Exception):
                await node.presence.close()


class _Transport:
    """A transport that records frames (for the ref-counting test)."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    async def send(self, frame: str) -> None:
        self.frames.append(frame)

    async def close(self, code: int, reason: str) -> None:
        return None


def channel_name(prefix: str = "chat") -> str:
    return f"{prefix}:{secrets.token_hex(4)}"


def info(n: int = 1) -> ClientInfo:
    return ClientInfo(f"client-{n}", f"user-{n}", {"n": n})


HISTORY = PublishOptions(history_size=10, history_ttl=60, info=info())


class BrokerConformance:
    """The behaviour every broker shares; flags switch off what a broker cannot do."""

    #: Keeps history and answers ``history()`` (else raises NotAvailableError).
    has_history = True
    #: Offsets are shared by all nodes: 1, 2, 3... in one order everyone sees.
    shared_offsets = True
    #: Several independent broker instances share one backend.
    multi_node = True
    #: Publishes once per idempotency key across nodes (else refuses the key).
    idempotent = True

    @pytest.fixture
    def engine(self) -> Engine:  # pragma: no cover - overridden
        raise NotImplementedError

    def need(self, flag: bool, why: str) -> None:
        if not flag:
            pytest.skip(why)

    # ------------------------------------------------------------ delivery

    async def test_subscriber_receives_publications_in_order(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        await node.broker.subscribe(channel)
        positions = [await node.broker.publish(channel, b'{"n":%d}' % i, HISTORY) for i in range(30)]
        received = await node.wait_publications(channel, 30)
        assert [p.data for p in received] == [b'{"n":%d}' % i for i in range(30)]
        assert all(p.info == info() for p in received)
        if self.shared_offsets:
            assert [p.offset for p in positions] == list(range(1, 31))
            assert [p.offset for p in received] == list(range(1, 31))
            assert len({p.epoch for p in positions}) == 1
            assert {p.epoch for p in received} == {positions[0].epoch}

    async def test_data_bytes_are_carried_unchanged(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        await node.broker.subscribe(channel)
        data = '{"text":"héllo : 1:2:3 \\u0000 ☃","list":[1,2.5,null]}'.encode()
        await node.broker.publish(channel, data, PublishOptions(history_size=5, history_ttl=60))
        [publication] = await node.wait_publications(channel, 1)
        assert publication.data == data
        assert publication.info is None

    async def test_unsubscribed_channel_is_not_delivered(self, engine: Engine) -> None:
        node = await engine.node()
        other = await engine.node() if self.multi_node else node
        gone, marker = channel_name(), channel_name()
        await node.broker.subscribe(gone)
        await node.broker.subscribe(gone)  # idempotent
        await node.broker.unsubscribe(gone)
        await node.broker.unsubscribe(gone)  # idempotent
        await node.broker.subscribe(marker)
        assert gone not in node.broker.channels()
        if other is not node:
            # Wait until `other`'s publications reach `node` at all (core NATS may drop the
            # first messages after a subscribe is confirmed), so that the check below means
            # "not delivered because unsubscribed", not "not delivered yet".
            for _ in range(100):
                await other.broker.publish(marker, b"probe", HISTORY)
                await asyncio.sleep(0.02)
                if node.publications(marker):
                    break
            node.received.clear()
        await other.broker.publish(gone, b"1", HISTORY)
        await other.broker.publish(marker, b"2", HISTORY)
        await node.wait_publications(marker, 1)
        assert node.publications(gone) == []

    async def test_subscribe_and_unsubscribe_are_idempotent(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        await node.broker.unsubscribe(channel)  # never subscribed: nothing happens
        await node.broker.subscribe(channel)
        await node.broker.subscribe(channel)  # twice: still one subscription
        assert channel in node.broker.channels()
        await node.broker.publish(channel, b"1", HISTORY)
        await node.broker.publish(channel, b"2", HISTORY)
        await node.wait_publications(channel, 2)
        await node.broker.publish(channel, b"3", HISTORY)
        received = await node.wait_publications(channel, 3)
        assert [p.data for p in received] == [b"1", b"2", b"3"]  # each exactly once
        await node.broker.unsubscribe(channel)
        await node.broker.unsubscribe(channel)
        assert channel not in node.broker.channels()
        await node.broker.subscribe(channel)  # a channel left can be subscribed again
        await node.broker.publish(channel, b"4", HISTORY)
        await async_wait_for(lambda: b"4" in {p.data for p in node.publications(channel)}, TIMEOUT)

    async def test_handler_errors_are_logged_counted_and_delivery_goes_on(
        self, engine: Engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        node = await engine.node()
        publisher = await engine.node() if self.multi_node else node
        channel = channel_name()
        await node.broker.subscribe(channel)
        node.fail_on = {b"boom"}
        assert node.broker.handler_errors == 0
        with caplog.at_level("ERROR", logger="herald.broker"):
            # The publisher never sees the subscriber's failure...
            await publisher.broker.publish(channel, b"boom", HISTORY)
            await publisher.broker.publish(channel, b"after", HISTORY)
            # ...and the broker's reader survives it: the next publication arrives.
            await async_wait_for(lambda: b"after" in {p.data for p in node.publications(channel)}, TIMEOUT)
        assert [p.data for p in node.publications(channel)][-2:] == [b"boom", b"after"]
        assert node.broker.handler_errors == 1
        assert node.broker.counters()["handler_errors"] == 1
        assert any("broker handler failed" in r.getMessage() for r in caplog.records)

    async def test_nothing_is_delivered_after_close(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        await node.broker.subscribe(channel)
        await node.broker.publish(channel, b"before", HISTORY)
        await node.wait_publications(channel, 1)
        await node.broker.close()
        await node.broker.close()  # idempotent
        assert node.broker.channels() == set()
        # A witness subscribed to the same channel: once it has the publication, a broker
        # still delivering to the closed node would have delivered it too.
        witness = await engine.node()
        await witness.broker.subscribe(channel)
        await witness.broker.publish(channel, b"after", HISTORY)
        await async_wait_for(lambda: b"after" in {p.data for p in witness.publications(channel)}, TIMEOUT)
        assert [p.data for p in node.publications(channel)] == [b"before"]

    async def test_events_fan_out_and_are_not_stored(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        await node.broker.subscribe(channel)
        await node.broker.publish_event(PresenceEvent(channel, "join", info(2)))
        await node.broker.publish_event(PresenceEvent(channel, "leave", info(2)))
        await async_wait_for(lambda: len(node.events(channel)) == 2, TIMEOUT)
        assert [(e.kind, e.info) for e in node.events(channel)] == [
            ("join", info(2)),
            ("leave", info(2)),
        ]
        if self.has_history:
            history = await node.broker.history(channel)
            assert history.publications == []
            assert history.position.offset == 0

    # ------------------------------------------------------------ history

    async def test_history_keeps_the_last_history_size(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        options = PublishOptions(history_size=3, history_ttl=60, info=info())
        for i in range(1, 6):
            top = await node.broker.publish(channel, b"%d" % i, options)
        history = await node.broker.history(channel)
        assert [p.offset for p in history.publications] == [3, 4, 5]
        assert [p.data for p in history.publications] == [b"3", b"4", b"5"]
        assert history.publications[0].info == info()
        assert history.position == top == StreamPosition(5, top.epoch)

    async def test_history_since_limit_reverse(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        for i in range(1, 8):
            top = await node.broker.publish(channel, b"%d" % i, HISTORY)
        broker = node.broker

        async def offsets(**kwargs: Any) -> list[int]:
            return [p.offset for p in (await broker.history(channel, **kwargs)).publications]

        since = StreamPosition(4, top.epoch)
        assert await offsets(since=since) == [5, 6, 7]
        assert await offsets(since=since, limit=2) == [5, 6]
        assert await offsets(since=since, reverse=True) == [7, 6, 5]
        assert await offsets(since=since, reverse=True, limit=2) == [7, 6]
        assert await offsets(limit=2) == [1, 2]
        assert await offsets(reverse=True, limit=3) == [7, 6, 5]
        assert await offsets(since=StreamPosition(7, top.epoch)) == []
        # Another epoch: the current stream's publications; the caller compares epochs.
        assert await offsets(since=StreamPosition(4, "other")) == [1, 2, 3, 4, 5, 6, 7]
        position_only = await broker.history(channel, limit=0)
        assert position_only.publications == [] and position_only.position == top

    async def test_empty_channel_has_a_stable_epoch(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        first = (await node.broker.history(channel, limit=0)).position
        assert first.offset == 0 and first.epoch
        published = await node.broker.publish(channel, b"1", HISTORY)
        # A subscriber that read the empty position can recover from it.
        assert published == StreamPosition(1, first.epoch)

    async def test_no_history_still_counts_offsets(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        for _ in range(3):
            top = await node.broker.publish(channel, b"x", PublishOptions())
        history = await node.broker.history(channel)
        assert history.publications == []
        assert history.position == top and top.offset == 3

    async def test_history_entries_expire_after_ttl(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        options = PublishOptions(history_size=10, history_ttl=0.6)
        await node.broker.publish(channel, b"old", options)
        await asyncio.sleep(0.35)
        top = await node.broker.publish(channel, b"new", options)

        async def only_new() -> bool:
            history = await node.broker.history(channel)
            return [p.data for p in history.publications] == [b"new"]

        await async_until(only_new, TIMEOUT, what="the first publication to expire")
        history = await node.broker.history(channel)
        assert history.position == top  # the stream lives on with the newer entry

    async def test_stream_lost_after_ttl_starts_a_new_epoch(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        options = PublishOptions(history_size=10, history_ttl=0.3)
        old = await node.broker.publish(channel, b"1", options)
        old = await node.broker.publish(channel, b"2", options)

        async def expired() -> bool:
            history = await node.broker.history(channel, since=old)
            return history.position.epoch != old.epoch

        await async_until(expired, TIMEOUT, what="the stream to expire")
        history = await node.broker.history(channel, since=old)
        assert history.publications == [] and history.position.offset == 0
        new = await node.broker.publish(channel, b"3", options)
        assert new.offset == 1 and new.epoch != old.epoch

    async def test_remove_history_changes_the_epoch(self, engine: Engine) -> None:
        self.need(self.has_history, "no history")
        node = await engine.node()
        channel = channel_name()
        old = await node.broker.publish(channel, b"1", HISTORY)
        await node.broker.remove_history(channel)
        new = await node.broker.publish(channel, b"2", HISTORY)
        assert new.offset == 1 and new.epoch != old.epoch

    async def test_backend_losing_data_changes_the_epoch(self, engine: Engine) -> None:
        self.need(self.has_history and engine.lose_data is not None, "cannot lose data")
        assert engine.lose_data is not None
        node = await engine.node()
        channel = channel_name()
        old = await node.broker.publish(channel, b"1", HISTORY)
        await engine.lose_data()
        history = await node.broker.history(channel, since=old)
        assert history.position.epoch != old.epoch and history.publications == []
        new = await node.broker.publish(channel, b"2", HISTORY)
        assert new == StreamPosition(1, history.position.epoch)

    # ------------------------------------------------------------ a stream restarts under a listener

    async def test_listener_gets_a_stream_restarted_by_ttl_whole_or_a_gap(self, engine: Engine) -> None:
        """Issue 13: a node kept subscribed while the channel's history expires entirely
        gets the new stream from offset 1, or a StreamGap first; never its middle alone."""
        self.need(self.has_history, "no history")
        node = await engine.node()
        other = await engine.node() if self.multi_node else node
        channel = channel_name()
        await node.broker.subscribe(channel)
        options = PublishOptions(history_size=10, history_ttl=0.3)
        old = [await other.broker.publish(channel, b"%d" % n, options) for n in range(5)]
        await node.wait_publications(channel, 5)

        async def expired() -> bool:
            return (await other.broker.history(channel, limit=0)).position.epoch != old[-1].epoch

        await async_until(expired, TIMEOUT, what="the stream to expire")
        new = [await other.broker.publish(channel, b"%d" % n, options) for n in range(8)]
        assert [p.offset for p in new] == list(range(1, 9)) and {p.epoch for p in new} == {new[0].epoch}
        await _whole_or_told(node, channel, old, new)

    async def test_listener_gets_a_stream_the_backend_lost_whole_or_a_gap(self, engine: Engine) -> None:
        """Issue 12/13: the backend loses its data (FLUSHALL, stream deleted) while a node
        listens: the new stream reaches it from offset 1, or a StreamGap comes first."""
        self.need(self.has_history and engine.lose_data is not None, "cannot lose data")
        assert engine.lose_data is not None
        node = await engine.node()
        other = await engine.node() if self.multi_node else node
        channel = channel_name()
        await node.broker.subscribe(channel)
        old = [await other.broker.publish(channel, b"%d" % n, HISTORY) for n in range(5)]
        await node.wait_publications(channel, 5)
        await engine.lose_data()
        new = [await other.broker.publish(channel, b"%d" % n, HISTORY) for n in range(8)]
        assert new[0].offset == 1 and new[0].epoch != old[-1].epoch
        await _whole_or_told(node, channel, old, new)

    # ------------------------------------------------------------ a node misses a publication

    async def test_a_missed_publication_is_reported_never_skipped(self, engine: Engine) -> None:
        """Issue 13 item 14: a node that misses a publication it cannot read back (no
        history) hands its handler a StreamGap before anything published after it, or
        still delivers it; it never skips it silently."""
        assert engine.miss is not None, "every broker's engine must provide a fault hook"
        node = await engine.node()
        publisher = await engine.node() if self.multi_node else node
        channel = channel_name()
        await node.broker.subscribe(channel)
        no_history = PublishOptions()  # what a node misses cannot be read back
        await publisher.broker.publish(channel, b'"before"', no_history)
        await node.wait_publications(channel, 1)
        async with engine.miss(node):
            await publisher.broker.publish(channel, b'"missed"', no_history)
        await publisher.broker.publish(channel, b'"after"', no_history)

        def seen() -> list[Publication | StreamGap]:
            return [
                m for m in node.received if isinstance(m, (Publication, StreamGap)) and m.channel == channel
            ]

        def told() -> bool:
            return any(isinstance(m, StreamGap) or m.data == b'"missed"' for m in seen())

        await async_wait_for(told, TIMEOUT, what="the missed publication or a StreamGap")
        items = seen()
        labels = [m.data if isinstance(m, Publication) else b"gap" for m in items]
        assert labels[0] == b'"before"', labels
        if b'"missed"' not in labels:
            # Nothing published after the missed one came before the handler was told.
            assert labels[1] == b"gap", labels
            gap, first = items[1], items[0]
            assert isinstance(gap, StreamGap) and isinstance(first, Publication)
            if self.shared_offsets:
                assert gap.last == StreamPosition(first.offset, first.epoch)
                assert gap.position.offset >= first.offset + 1
        if self.shared_offsets:
            # Between reported gaps offsets are consecutive: nothing was skipped silently.
            previous: int | None = None
            for item in items:
                if isinstance(item, StreamGap):
                    previous = None
                elif previous is None or item.offset == previous + 1:
                    previous = item.offset
                else:
                    raise AssertionError(f"offset {item.offset} after {previous} with no gap: {labels}")

    # ------------------------------------------------------------ several nodes

    async def test_concurrent_publishers_on_several_nodes(self, engine: Engine) -> None:
        self.need(self.multi_node, "one node only")
        nodes = [await engine.node() for _ in range(3)]
        channel = channel_name()
        for node in nodes:
            await node.broker.subscribe(channel)
        per_node = 40

        async def publish_all(index: int, node: NodeEngines) -> list[StreamPosition]:
            options = PublishOptions(history_size=1000, history_ttl=60, info=info(index))
            return [
                await node.broker.publish(channel, b"[%d,%d]" % (index, i), options) for i in range(per_node)
            ]

        results = await asyncio.gather(*(publish_all(i, n) for i, n in enumerate(nodes)))
        total = per_node * len(nodes)
        for node in nodes:
            received = await node.wait_publications(channel, total)
            assert len(received) == total
            # Each publisher's own publications arrive in the order it made them.
            for index in range(len(nodes)):
                mine = [p.data for p in received if p.info == info(index)]
                assert mine == [b"[%d,%d]" % (index, i) for i in range(per_node)]
            if self.shared_offsets:
                assert [p.offset for p in received] == list(range(1, total + 1))
        if self.shared_offsets:
            offsets = sorted(p.offset for positions in results for p in positions)
            assert offsets == list(range(1, total + 1))
            # Every node saw the same sequence.
            sequences = {tuple((p.offset, p.data) for p in n.publications(channel)) for n in nodes}
            assert len(sequences) == 1
        if self.has_history:
            history = await nodes[0].broker.history(channel)
            assert [p.offset for p in history.publications] == list(range(1, total + 1))

    async def test_presence_across_nodes(self, engine: Engine) -> None:
        self.need(self.multi_node, "one node only")
        a, b = await engine.node(), await engine.node()
        channel = channel_name()
        await a.presence.add(channel, info(1), 30)
        await b.presence.add(channel, info(2), 30)
        expected = {"client-1": info(1), "client-2": info(2)}
        for node in (a, b):
            await async_until(lambda n=node: _presence_is(n, channel, expected), TIMEOUT, "presence to agree")
        stats = await b.presence.stats(channel)
        assert (stats.num_clients, stats.num_users) == (2, 2)
        await a.presence.remove(channel, "client-1")
        for node in (a, b):
            await async_until(
                lambda n=node: _presence_is(n, channel, {"client-2": info(2)}), TIMEOUT, "removal"
            )

    # ------------------------------------------------------------ presence

    async def test_presence_add_refresh_remove(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        presence = node.presence
        assert await presence.presence(channel) == {}
        await presence.add(channel, info(1), 30)
        await presence.add(channel, info(1), 30)  # a refresh, not a second entry
        await presence.add(channel, ClientInfo("client-2", "user-1", None), 30)
        assert set(await presence.presence(channel)) == {"client-1", "client-2"}
        stats = await presence.stats(channel)
        assert (stats.num_clients, stats.num_users) == (2, 1)
        await presence.remove(channel, "client-1")
        await presence.remove(channel, "client-1")  # idempotent
        assert set(await presence.presence(channel)) == {"client-2"}

    async def test_presence_stats_count_anonymous_clients_as_no_user(self, engine: Engine) -> None:
        """num_users is the number of distinct non-empty user ids (docs/protocol.md)."""
        node = await engine.node()
        channel = channel_name()
        presence = node.presence
        for n in range(3):
            await presence.add(channel, ClientInfo(f"anon-{n}", "", None), 30)
        stats = await presence.stats(channel)
        assert (stats.num_clients, stats.num_users) == (3, 0)
        await presence.add(channel, ClientInfo("alice-1", "alice", None), 30)
        await presence.add(channel, ClientInfo("alice-2", "alice", None), 30)
        stats = await presence.stats(channel)
        assert (stats.num_clients, stats.num_users) == (5, 1)

    async def test_presence_entries_expire_unless_refreshed(self, engine: Engine) -> None:
        node = await engine.node()
        channel = channel_name()
        presence = node.presence
        await presence.add(channel, info(1), 0.4)
        await presence.add(channel, info(2), 30)
        assert set(await presence.presence(channel)) == {"client-1", "client-2"}
        # Refreshing keeps an entry alive past its first TTL...
        for _ in range(4):
            await asyncio.sleep(0.15)
            await presence.add(channel, info(1), 0.4)
        assert set(await presence.presence(channel)) == {"client-1", "client-2"}

        # ...and without refreshes it disappears within the TTL.
        async def expired() -> bool:
            return set(await presence.presence(channel)) == {"client-2"}

        await async_until(expired, TIMEOUT, what="the entry to expire")

    async def test_presence_refresh_of_many_entries_in_one_call(self, engine: Engine) -> None:
        """refresh() (one node's periodic refresh of a channel) adds new entries, updates
        info, keeps refreshed entries alive past their TTL, and leaves the others to expire."""
        node = await engine.node()
        channel = channel_name()
        presence = node.presence
        await presence.add(channel, info(0), 0.5)  # not refreshed below: must expire
        many = [ClientInfo(f"client-{n}", f"user-{n % 7}", {"n": n}) for n in range(1, 1201)]
        await presence.refresh(channel, many, 0.5)
        entries = await presence.presence(channel)
        assert len(entries) == 1201
        assert entries["client-1200"].info == {"n": 1200}
        for _ in range(4):
            await asyncio.sleep(0.2)
            await presence.refresh(channel, many, 0.5)

        async def only_refreshed() -> bool:
            return set(await presence.presence(channel)) == {i.client for i in many}

        await async_until(only_refreshed, TIMEOUT, what="the unrefreshed entry to expire")
        stats = await presence.stats(channel)
        assert (stats.num_clients, stats.num_users) == (1200, 7)

    # ------------------------------------------------------------ idempotent publish

    async def test_same_key_twice_publishes_once_and_answers_the_original_position(
        self, engine: Engine
    ) -> None:
        self.need(self.idempotent, "no idempotent publish")
        node = await engine.node()
        channel = channel_name()
        await node.broker.subscribe(channel)
        first = await node.broker.publish_idempotent(channel, b"1", HISTORY, "order-42", 60)
        retry = await node.broker.publish_idempotent(channel, b"1-again", HISTORY, "order-42", 60)
        assert first == (StreamPosition(1, first[0].epoch), False)
        assert retry == (first[0], True)
        # The retry took no offset and reached nobody: the next publication is offset 2.
        after = await node.broker.publish(channel, b"2", HISTORY)
        assert after == StreamPosition(2, first[0].epoch)
        received = await node.wait_publications(channel, 2)
        assert [(p.offset, p.data) for p in received] == [(1, b"1"), (2, b"2")]
        history = await node.broker.history(channel)
        assert [p.data for p in history.publications] == [b"1", b"2"]
        # A retry after other publications still answers the original position.
        assert await node.broker.publish_idempotent(channel, b"x", HISTORY, "order-42", 60) == (
            first[0],
            True,
        )

    async def test_the_original_position_outlives_the_original_message(self, engine: Engine) -> None:
        """Without history each publication replaces the last stored one (JetStream rolls the
        subject up): the retry still gets the original position, not the stream's top."""
        self.need(self.idempotent, "no idempotent publish")
        node = await engine.node()
        channel = channel_name()
        no_history = PublishOptions()
        first, duplicate = await node.broker.publish_idempotent(channel, b"1", no_history, "k", 60)
        assert not duplicate and first.offset == 1
        for n in range(3):
            await node.broker.publish(channel, b"%d" % (n + 2), no_history)
        assert await node.broker.publish_idempotent(channel, b"1", no_history, "k", 60) == (first, True)
        assert (await node.broker.history(channel, limit=0)).position.offset == 4

    async def test_a_key_is_per_channel(self, engine: Engine) -> None:
        self.need(self.idempotent, "no idempotent publish")
        node = await engine.node()
        base = channel_name()
        # base + "x:k" and base:x + "k" would name one key if channel and key were just joined.
        pairs = [(base, "k"), (f"{base}:other", "k"), (base, "x:k"), (f"{base}:x", "k")]
        results = [await node.broker.publish_idempotent(c, b"1", HISTORY, k, 60) for c, k in pairs]
        assert [duplicate for _, duplicate in results] == [False, False, False, False]
        assert [position.offset for position, _ in results] == [1, 1, 2, 1]
        assert await node.broker.publish_idempotent(f"{base}:x", b"1", HISTORY, "k", 60) == (
            results[3][0],
            True,
        )

    async def test_a_key_is_forgotten_after_the_window(self, engine: Engine) -> None:
        self.need(self.idempotent, "no idempotent publish")
        node = await engine.node()
        channel = channel_name()
        window = 0.5
        first = await node.broker.publish_idempotent(channel, b"1", HISTORY, "k", window)
        assert first[1] is False
        assert await node.broker.publish_idempotent(channel, b"1", HISTORY, "k", window) == (first[0], True)
        # Within the window every retry is a duplicate (and publishes nothing); after it the
        # same key publishes again, as a new publication.
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while True:
            position, duplicate = await node.broker.publish_idempotent(channel, b"2", HISTORY, "k", window)
            if not duplicate:
                break
            assert position == first[0]
            assert asyncio.get_running_loop().time() < deadline, "the key was never forgotten"
            await asyncio.sleep(0.1)
        assert position == StreamPosition(2, first[0].epoch)
        history = await node.broker.history(channel)
        assert [p.data for p in history.publications] == [b"1", b"2"]

    async def test_same_key_racing_from_several_nodes_publishes_once(self, engine: Engine) -> None:
        self.need(self.idempotent, "no idempotent publish")
        nodes = [await engine.node() for _ in range(3)] if self.multi_node else [await engine.node()]
        listener = nodes[0]
        channel = channel_name()
        await listener.broker.subscribe(channel)
        racers = [node for node in nodes for _ in range(4)]
        results = await asyncio.gather(
            *(
                node.broker.publish_idempotent(channel, b'{"n":%d}' % i, HISTORY, "outbox:17", 60)
                for i, node in enumerate(racers)
            )
        )
        originals = [position for position, duplicate in results if not duplicate]
        assert len(originals) == 1, results
        assert {position for position, _ in results} == {originals[0]}
        assert originals[0].offset == 1
        marker = await nodes[-1].broker.publish(channel, b"marker", HISTORY)
        assert marker.offset == 2
        received = await listener.wait_publications(channel, 2)
        assert [p.offset for p in received] == [1, 2]
        assert received[1].data == b"marker"
        history = await listener.broker.history(channel)
        assert [p.offset for p in history.publications] == [1, 2]

    async def test_a_broker_without_idempotency_refuses_the_key(self, engine: Engine) -> None:
        self.need(not self.idempotent, "publishes idempotently")
        node = await engine.node()
        with pytest.raises(NotAvailableError, match="idempotency_key"):
            await node.broker.publish_idempotent(channel_name(), b"1", HISTORY, "k", 60)

    # ------------------------------------------------------------ node-level ref counting

    async def test_node_subscribes_once_per_channel(self, engine: Engine) -> None:
        made = await engine.node()
        await made.broker.close()
        broker, presence = made.broker, made.presence
        node = Node(Settings(), broker=broker, presence=presence)
        await node.start()
        try:
            channel = channel_name()
            connections = [Connection(_Transport(), f"c{i}", renderer=lambda p: "x") for i in range(3)]
            for connection in connections:
                node.hub.subscribe(channel, connection)
            await asyncio.gather(*(node.ensure_broker_subscription(channel) for _ in connections))
            assert channel in broker.channels()
            for connection in connections[:2]:
                node.hub.unsubscribe(channel, connection)
                await node.release_broker_subscription(channel)
            assert channel in broker.channels()  # one local subscriber is left
            node.hub.unsubscribe(channel, connections[2])
            await node.release_broker_subscription(channel)
            assert channel not in broker.channels()
        finally:
            await node.close()


async def _presence_is(node: NodeEngines, channel: str, expected: dict[str, ClientInfo]) -> bool:
    return await node.presence.presence(channel) == expected


async def _whole_or_told(
    node: NodeEngines, channel: str, old: list[StreamPosition], new: list[StreamPosition]
) -> None:
    """``node`` received the old stream, then the new one whole, or a StreamGap before any
    publication of the new stream it does not cover (delivery resumes after the gap)."""
    last = new[-1]

    def messages() -> list[Publication | StreamGap]:
        return [m for m in node.received if isinstance(m, Publication | StreamGap) and m.channel == channel]

    def reached() -> bool:
        for m in messages():
            position = m.position if isinstance(m, StreamGap) else StreamPosition(m.offset, m.epoch)
            if position.epoch == last.epoch and position.offset >= last.offset:
                return True
        return False

    await async_wait_for(reached, TIMEOUT, what=f"{channel} to reach {last}")
    received = messages()
    assert [(m.epoch, m.offset) for m in received[: len(old)] if isinstance(m, Publication)] == [
        (p.epoch, p.offset) for p in old
    ]
    rest = received[len(old) :]
    gaps = [m for m in rest if isinstance(m, StreamGap)]
    if not gaps:
        assert [(m.epoch, m.offset) for m in rest if isinstance(m, Publication)] == [
            (p.epoch, p.offset) for p in new
        ]
        return
    first_gap = gaps[0]
    before = rest[: rest.index(first_gap)]
    after = [m for m in rest[rest.index(first_gap) + 1 :] if isinstance(m, Publication)]
    # Before the gap only a gap-free prefix of the new stream; after it, what follows it.
    assert [(m.epoch, m.offset) for m in before if isinstance(m, Publication)] == [
        (p.epoch, p.offset) for p in new[: len(before)]
    ]
    assert first_gap.position.epoch == last.epoch
    assert [m.offset for m in after] == list(range(first_gap.position.offset + 1, last.offset + 1))
