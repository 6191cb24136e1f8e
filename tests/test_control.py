"""The control channel and the membership view, in process: several ControlChannels on a
small in-memory bus (each publication reaches every other node on a later loop turn)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from herald.brokers.base import PublishOptions, StreamGap, StreamPosition
from herald.control import (
    CONTROL_CHANNEL,
    CONTROL_HISTORY,
    DELIVERY_TIMEOUT,
    NODE_HISTORY,
    ControlChannel,
    DeliveryStatus,
    node_channel,
)
from herald.membership import Membership


class _Connection:
    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class _Hub:
    """What the control channel reads of the hub: a user's open connections."""

    def __init__(self) -> None:
        self.users: dict[str, list[_Connection]] = {}

    def connect(self, user: str) -> _Connection:
        connection = _Connection()
        self.users.setdefault(user, []).append(connection)
        return connection

    def user_connections(self, user: str) -> list[_Connection]:
        open_ = [c for c in self.users.get(user, []) if c.closed is None]
        self.users[user] = open_
        return list(open_)


class _Bus:
    """Every node's broker: a publication reaches the nodes subscribed to its channel
    (the control channel: all; a node channel: its node) on a later loop turn."""

    def __init__(self) -> None:
        self.nodes: dict[str, ControlChannel] = {}
        self.cut: set[str] = set()  # nodes whose link is down: they miss what is published
        self.published: list[tuple[str, dict[str, Any], PublishOptions]] = []

    def node(self, node_id: str) -> tuple[ControlChannel, _Hub]:
        hub = _Hub()
        control = ControlChannel(node_id, self, hub)  # type: ignore[arg-type]
        self.nodes[node_id] = control
        return control, hub

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        self.published.append((channel, orjson.loads(data), options))
        loop = asyncio.get_running_loop()
        for node_id, control in self.nodes.items():
            if node_id in self.cut:
                continue
            if channel == CONTROL_CHANNEL or channel == control.node_channel:
                loop.call_soon(control.on_message, data)
        return StreamPosition(len(self.published), "e")


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _meet(bus: _Bus) -> None:
    """Every node heartbeats once: each knows the others."""
    for control in bus.nodes.values():
        await control.members.beat()
    await _turns()


async def test_disconnect_sums_every_live_node_and_closes_everywhere() -> None:
    bus = _Bus()
    (a, hub_a), (_, hub_b), (_, hub_c) = bus.node("a"), bus.node("b"), bus.node("c")
    await _meet(bus)
    conns = [hub_a.connect("ann"), hub_b.connect("ann"), hub_b.connect("ann"), hub_c.connect("ann")]
    other = hub_c.connect("bob")
    result = await a.disconnect_user("ann", 4502, "bye", timeout=5)
    assert (result.disconnected, result.nodes, result.complete, result.missing) == (4, 3, True, [])
    assert all(c.closed == (4502, "bye") for c in conns) and other.closed is None
    # Commands keep history (re-read after a blip); answers go to the asking node's channel.
    [(channel, command, options)] = [p for p in bus.published if p[1]["op"] == "disconnect"]
    assert channel == CONTROL_CHANNEL and options == CONTROL_HISTORY and command["id"]
    answers = [p for p in bus.published if p[1]["op"] == "disconnected"]
    assert {p[0] for p in answers} == {node_channel("a")} and {p[2] for p in answers} == {NODE_HISTORY}


async def test_disconnect_answers_after_the_timeout_without_a_silent_node() -> None:
    bus = _Bus()
    (a, _), (_, hub_b) = bus.node("a"), bus.node("b")
    await _meet(bus)
    hub_b.connect("ann")
    bus.cut.add("b")  # b is alive for a but hears nothing
    result = await a.disconnect_user("ann", 4502, "bye", timeout=0.2)
    assert (result.disconnected, result.nodes, result.complete, result.missing) == (0, 1, False, ["b"])
    assert a.counters()["incomplete"] == 1


async def test_a_node_that_leaves_is_not_waited_for() -> None:
    bus = _Bus()
    (a, _), (b, _) = bus.node("a"), bus.node("b")
    await _meet(bus)
    assert a.members.live() == ["b"]
    bus.cut.add("b")
    waiting = asyncio.ensure_future(a.disconnect_user("ann", 4502, "bye", timeout=30))
    await _turns()
    await b.leave()
    result = await asyncio.wait_for(waiting, 2)
    assert result.complete and result.nodes == 1 and a.members.live() == []


async def test_a_command_read_twice_runs_once() -> None:
    """A command re-read (a blip, a redelivery) must not close the user's newer connections."""
    bus = _Bus()
    bus.node("a")
    b, hub_b = bus.node("b")
    first = hub_b.connect("ann")
    command = orjson.dumps(
        {"op": "disconnect", "id": "c1", "node": "a", "user": "ann", "code": 4502, "reason": "x"}
    )
    b.on_message(command)
    assert first.closed is not None
    newer = hub_b.connect("ann")
    b.on_message(command)
    assert newer.closed is None and b.counters()["duplicates"] == 1


def _delivery(sent: float, request: str = "r1") -> bytes:
    return orjson.dumps(
        {
            "op": "deliver",
            "id": request,
            "node": "a",
            "request": request,
            "sent": sent,
            "session": "s1",
            "secret": "k",
            "commands": ["{}"],
        }
    )


class _Session:
    secret = "k"

    def __init__(self) -> None:
        self.got: list[list[str]] = []

    def accept(self, commands: Any) -> DeliveryStatus:
        self.got.append(list(commands))
        return DeliveryStatus.DELIVERED


async def test_a_delivery_read_after_its_sender_gave_up_is_dropped() -> None:
    bus = _Bus()
    bus.node("a")
    b, _ = bus.node("b")
    session = _Session()
    b.register("s1", session)
    now = b.members.wall()
    b.on_message(_delivery(now - DELIVERY_TIMEOUT, "old"))  # re-read after a long blip
    assert session.got == [] and b.counters()["expired"] == 1
    b.on_message(_delivery(now, "fresh"))
    assert session.got == [["{}"]]
    await _turns()
    [answer] = [p[1] for p in bus.published if p[1]["op"] == "delivered"]
    assert answer["request"] == "fresh" and answer["status"] == "delivered"


async def test_a_delivery_is_timed_on_the_senders_clock_not_ours() -> None:
    """Node a's clock is 100 s ahead: a fresh request from it is not 'from the future',
    and an old one is not fresh; the offset comes from a's heartbeats."""
    bus = _Bus()
    (a, _), (b, _) = bus.node("a"), bus.node("b")
    skew = 100.0
    a.members._wall = lambda: b.members.wall() + skew
    await a.members.beat()
    await _turns()
    session = _Session()
    b.register("s1", session)
    b.on_message(_delivery(a.members.wall(), "fresh"))
    assert session.got == [["{}"]]
    b.on_message(_delivery(a.members.wall() - DELIVERY_TIMEOUT, "old"))
    assert len(session.got) == 1 and b.counters()["expired"] == 1


async def test_cross_node_delivery_round_trip() -> None:
    bus = _Bus()
    (a, _), (b, _) = bus.node("a"), bus.node("b")
    session = _Session()
    b.register("s1", session)
    assert await a.deliver("b", "s1", "k", ["x"]) is DeliveryStatus.DELIVERED
    assert await a.deliver("b", "s1", "wrong", ["x"]) is DeliveryStatus.FORBIDDEN


def test_a_gap_on_a_control_channel_is_logged_at_error_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    control = ControlChannel("a", None, _Hub())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="herald.node"):
        control.on_gap(StreamGap(CONTROL_CHANNEL, StreamPosition(4, "e"), StreamPosition(9, "e")))
        control.on_gap(StreamGap(control.node_channel, StreamPosition(1, "e"), StreamPosition(3, "e")))
    assert control.counters()["gaps"] == 2
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(messages) == 2
    assert "after offset 4" in messages[0] and "disconnect commands" in messages[0]
    assert "deliveries" in messages[1]


# ---------------------------------------------------------------- membership


class _Clocks:
    def __init__(self) -> None:
        self.mono, self.wall = 1000.0, 5000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def _membership(clocks: _Clocks, gone: list[str] | None = None) -> Membership:
    async def publish(data: bytes) -> None:
        return None

    return Membership(
        "me",
        publish,
        interval=1.0,
        timeout=3.0,
        on_gone=gone.append if gone is not None else None,
        clock=lambda: clocks.mono,
        wall=lambda: clocks.wall,
    )


async def test_a_peer_is_alive_until_three_intervals_without_heartbeat() -> None:
    clocks = _Clocks()
    members = _membership(clocks)
    members.on_alive("p", clocks.wall, hello=False)
    clocks.advance(2.9)
    assert members.live() == ["p"] and members.count() == 2
    clocks.advance(0.2)
    assert members.live() == [] and members.count() == 1


async def test_a_stale_heartbeat_read_after_a_blip_does_not_revive_a_peer() -> None:
    clocks = _Clocks()
    members = _membership(clocks)
    members.on_alive("p", clocks.wall, hello=False)  # the offset is learnt here (0)
    sent = clocks.wall
    clocks.advance(10)  # p died; we re-read its last heartbeat now
    members.on_alive("p", sent, hello=False)
    assert members.live() == []


async def test_a_leaving_peer_is_dropped_at_once() -> None:
    clocks, gone = _Clocks(), []
    members = _membership(clocks, gone)
    members.on_alive("p", clocks.wall, hello=False)
    members.on_leave("p")
    assert members.live() == [] and gone == ["p"]


async def test_a_hello_from_a_new_node_is_answered_at_once() -> None:
    bus = _Bus()
    (a, _), (b, _) = bus.node("a"), bus.node("b")
    await b.members.beat(hello=True)
    await _turns()
    assert a.members.live() == ["b"] and b.members.live() == ["a"]  # a answered without waiting


async def test_watching_is_announced_at_once_and_read_from_the_newest_heartbeat() -> None:
    sent: list[dict[str, Any]] = []

    async def publish(data: bytes) -> None:
        sent.append(orjson.loads(data))

    clocks = _Clocks()
    members = Membership("me", publish, clock=lambda: clocks.mono, wall=lambda: clocks.wall)
    members.watch("admin", True)
    await _turns()
    assert sent and sent[-1]["watching"] == ["admin"]  # beat at once, not at the interval
    count = len(sent)
    members.watch("admin", True)  # no change: no extra heartbeat
    await _turns()
    assert len(sent) == count
    members.watch("admin", False)
    await _turns()
    assert "watching" not in sent[-1]

    old = clocks.wall
    clocks.advance(0.5)
    members.on_alive("p", clocks.wall, hello=False, watching=["admin"])
    assert members.watched("admin") and not members.watched("other")
    members.on_alive("p", old, hello=False)  # an older heartbeat re-read after a blip
    assert members.watched("admin")
    members.on_alive("p", clocks.wall, hello=False)  # the newest says it stopped
    assert not members.watched("admin")
    members.on_alive("p", clocks.wall, hello=False, watching=["admin"])
    clocks.advance(3.1)  # the peer died: what it watched no longer counts
    assert not members.watched("admin")


async def _cancel_within(task: asyncio.Task[None], seconds: float) -> None:
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=seconds)
    assert done, "the heartbeat loop ignored its cancellation"


@pytest.mark.parametrize(
    "on_cancel",
    [
        # nats-py's request answers a cancel with its own error.
        pytest.param(RuntimeError("request cancelled"), id="turned-into-an-error"),
        # asyncio.wait_for on Python 3.11 may return a result that raced its cancel.
        pytest.param(None, id="swallowed"),
    ],
)
async def test_heartbeats_stop_even_when_the_publisher_loses_the_cancel(on_cancel: Exception | None) -> None:
    started = asyncio.Event()

    async def publish(data: bytes) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if on_cancel is not None:
                raise on_cancel from None

    task = asyncio.create_task(Membership("me", publish, interval=0.01).run())
    await asyncio.wait_for(started.wait(), 5)
    await _cancel_within(task, 2)
    assert task.cancelled()


async def test_node_close_cancels_again_a_task_that_swallowed_its_cancel() -> None:
    from herald.tasks import stop_tasks

    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels >= 2:
                    raise

    task = asyncio.create_task(stubborn())
    await _turns()
    await asyncio.wait_for(stop_tasks([task], every=0.2), 5)
    assert task.cancelled() and cancels == 2


class _Transport:
    async def send(self, frame: str) -> None:
        return None

    async def close(self, code: int, reason: str) -> None:
        return None


async def test_one_node_on_the_memory_broker_answers_at_once() -> None:
    """A node alone (memory broker) is the whole cluster: no node to wait for, its own
    heartbeats do not count it twice."""
    from herald.config import Settings
    from herald.connection import Connection
    from herald.node import Node

    node = Node(Settings(ping_interval=0))
    await node.start()
    try:
        await node.control.members.beat()
        connection = Connection(_Transport(), "c1", renderer=lambda p: "x")
        connection.user = "ann"
        node.hub.add(connection)
        result = await asyncio.wait_for(node.disconnect_user("ann", 4502, "bye"), 0.5)
        assert (result.disconnected, result.nodes, result.complete) == (1, 1, True)
        assert connection.is_closing and node.control.members.count() == 1
        node.hub.remove(connection)  # no writer runs here: the close would wait drain_timeout
    finally:
        await node.close()
