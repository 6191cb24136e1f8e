"""ReplyPipeline: replies of commands in flight leave in command order (pure logic; the
behaviour over real sockets and Redis is in tests/integration/test_publish_pipeline.py)."""

from __future__ import annotations

import asyncio

import pytest

from herald.pipeline import ReplyPipeline

pytestmark = pytest.mark.asyncio


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.finished: list[int | None] = []

    def pipeline(self) -> ReplyPipeline:
        return ReplyPipeline(self.sent.append, self.finished.append)


def pending(pipeline: ReplyPipeline, count: int) -> list[asyncio.Future[str | None]]:
    """``count`` replies in flight, added in order with ids 0, 1, ..."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[str | None]] = [loop.create_future() for _ in range(count)]
    for i, future in enumerate(futures):
        pipeline.add(i, future)
    return futures


async def test_replies_leave_in_the_order_they_were_added_whatever_finishes_first() -> None:
    r = Recorder()
    pipeline = r.pipeline()
    futures = pending(pipeline, 3)
    futures[2].set_result("c")
    futures[1].set_result("b")
    await asyncio.sleep(0)  # done callbacks run on the loop
    assert r.sent == [] and len(pipeline) == 3  # the first is still pending
    futures[0].set_result("a")
    await asyncio.sleep(0)
    assert r.sent == ["a", "b", "c"]
    assert r.finished == [0, 1, 2]
    assert len(pipeline) == 0


async def test_a_ready_reply_waits_behind_pending_ones_and_goes_at_once_when_none_are() -> None:
    r = Recorder()
    pipeline = r.pipeline()
    pipeline.add_ready(7, "now")
    assert r.sent == ["now"] and r.finished == [7]
    future = asyncio.get_running_loop().create_future()
    pipeline.add(8, future)
    pipeline.add_ready(None, "error")  # an error for a command whose id was not reserved
    assert r.sent == ["now"]
    future.set_result("published")
    await asyncio.sleep(0)
    assert r.sent == ["now", "published", "error"]
    assert r.finished == [7, 8, None]


async def test_a_cancelled_or_silent_reply_sends_nothing_and_frees_its_id() -> None:
    r = Recorder()
    pipeline = r.pipeline()
    loop = asyncio.get_running_loop()
    cancelled, silent, last = loop.create_future(), loop.create_future(), loop.create_future()
    pipeline.add(1, cancelled)
    pipeline.add(2, silent)
    pipeline.add(3, last)
    cancelled.cancel()
    silent.set_result(None)
    last.set_result("x")
    await asyncio.sleep(0)
    assert r.sent == ["x"]
    assert r.finished == [1, 2, 3]


async def test_wait_until_returns_once_few_enough_replies_are_pending() -> None:
    r = Recorder()
    pipeline = r.pipeline()
    futures = pending(pipeline, 3)
    waiter = asyncio.ensure_future(pipeline.wait_until(1))
    await asyncio.sleep(0)
    futures[0].set_result("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waiter.done()  # two still pending
    futures[1].set_result("b")
    await asyncio.wait_for(waiter, 1)
    assert len(pipeline) == 1
    emptied = asyncio.ensure_future(pipeline.wait_until(0))
    futures[2].set_result("c")
    await asyncio.wait_for(emptied, 1)
    assert r.sent == ["a", "b", "c"]
    await asyncio.wait_for(pipeline.wait_until(0), 1)  # nothing pending: at once
