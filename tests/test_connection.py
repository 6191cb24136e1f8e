"""Connection: bounded queue, writer task, slow-consumer disconnect, recovery hold."""

from __future__ import annotations

import asyncio

import pytest

from herald.codes import CloseCode
from herald.connection import Connection
from herald.tutorial import render_broadcast

from .helpers import async_wait_for
from .recording import RecordingTransport

pytestmark = pytest.mark.asyncio


def make(transport: RecordingTransport, **kwargs: int) -> Connection:
    connection = Connection(transport, "c1", renderer=render_broadcast, **kwargs)  # type: ignore[arg-type]
    connection.start()
    return connection


async def test_frames_are_written_in_order() -> None:
    transport = RecordingTransport()
    connection = make(transport)
    for i in range(100):
        assert connection.send(f"f{i}")
    await async_wait_for(lambda: len(transport.frames) == 100)
    assert transport.frames == [f"f{i}" for i in range(100)]
    assert connection.frames_out == 100
    await connection.stop()


async def test_slow_consumer_is_disconnected_at_the_message_bound() -> None:
    transport = RecordingTransport()
    transport.block()
    connection = make(transport, max_queue_messages=10)
    accepted = [connection.send(f"f{i}") for i in range(20)]
    # One frame is taken by the blocked writer; ten more fit; the next one overflows.
    assert accepted.count(True) in (10, 11)
    assert accepted[-1] is False
    assert connection.is_closing
    assert connection.close_code == CloseCode.SLOW_CONSUMER
    assert connection.queued == (0, 0)  # the queue was dropped, not kept
    await asyncio.wait_for(connection.closed.wait(), 5)
    assert transport.closed == (CloseCode.SLOW_CONSUMER, "slow consumer")


async def test_slow_consumer_is_disconnected_at_the_byte_bound() -> None:
    transport = RecordingTransport()
    transport.block()
    connection = make(transport, max_queue_bytes=1000)
    connection.send("x")  # taken by the writer, which then blocks
    await asyncio.sleep(0)
    assert connection.send("y" * 600)
    assert not connection.send("z" * 600)
    assert connection.close_code == CloseCode.SLOW_CONSUMER
    await asyncio.wait_for(connection.closed.wait(), 5)


async def test_close_flushes_then_sends_disconnect_push() -> None:
    transport = RecordingTransport()
    connection = make(transport)
    connection.send("a")
    connection.send("b")
    connection.close(CloseCode.SERVICE_RESTART, "server shutting down")
    assert not connection.send("after close")
    await asyncio.wait_for(connection.closed.wait(), 5)
    assert transport.frames[:2] == ["a", "b"]
    assert '"type":"disconnect"' in transport.frames[2] and '"reconnect":true' in transport.frames[2]
    assert transport.closed == (CloseCode.SERVICE_RESTART, "server shutting down")


async def test_hold_and_release_drops_duplicates_and_keeps_order() -> None:
    transport = RecordingTransport()
    connection = make(transport)
    connection.hold("ch")
    for offset in (3, 4, 5, 6):
        connection.deliver("ch", offset, f"pub{offset}")
    connection.deliver("ch", None, "join")
    connection.deliver("other", 1, "other1")  # other channels are not held
    connection.send("reply")
    connection.release("ch", 4)
    connection.deliver("ch", 7, "pub7")
    await async_wait_for(lambda: len(transport.frames) == 6)
    assert transport.frames == ["other1", "reply", "pub5", "pub6", "join", "pub7"]
    await connection.stop()


async def test_write_failure_marks_peer_gone() -> None:
    transport = RecordingTransport()
    connection = make(transport)
    transport.closed = (1006, "")  # sends now raise
    connection.send("x")
    await asyncio.wait_for(connection.closed.wait(), 5)
    assert connection.close_code == 1006
    assert not connection.send("y")


async def test_release_sets_a_floor_for_late_duplicates() -> None:
    transport = RecordingTransport()
    connection = make(transport)
    connection.hold("ch")
    connection.release("ch", 4)  # the reply carried everything up to offset 4
    connection.deliver("ch", 3, "late3")
    connection.deliver("ch", 4, "late4")
    connection.deliver("ch", None, "join")
    connection.deliver("ch", 5, "pub5")
    connection.deliver("other", 1, "other1")
    await async_wait_for(lambda: len(transport.frames) == 3)
    assert transport.frames == ["join", "pub5", "other1"]
    await connection.stop()


async def test_abort_cuts_a_close_stuck_behind_a_silent_peer() -> None:
    transport = RecordingTransport()
    connection = make(transport)
    transport.block()  # the peer stopped reading
    connection.close(CloseCode.FORCE_DISCONNECT, "bye")  # the disconnect push is now stuck
    assert not await connection.wait_closed(0.2)
    connection.abort(CloseCode.FORCE_DISCONNECT, "bye")
    assert await connection.wait_closed(2.0)
    assert transport.closed == (CloseCode.FORCE_DISCONNECT, "bye")


async def test_held_frames_count_against_the_bound() -> None:
    transport = RecordingTransport()
    connection = make(transport, max_queue_messages=5)
    connection.hold("ch")
    for offset in range(1, 6):
        connection.deliver("ch", offset, f"pub{offset}")
    assert not connection.is_closing
    connection.deliver("ch", 6, "pub6")  # a sixth held frame: over the bound
    assert connection.close_code == CloseCode.SLOW_CONSUMER
    await asyncio.wait_for(connection.closed.wait(), 5)
