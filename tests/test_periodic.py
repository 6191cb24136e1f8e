"""herald.periodic.every: the loop behind the admin snapshots and the metrics copy."""

from __future__ import annotations

import asyncio

from herald.periodic import every

from .helpers import async_wait_for


async def test_ticks_repeat_survive_a_failing_tick_and_stop_with_the_block() -> None:
    calls: list[int] = []

    async def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("the broker is down")

    async with every(0.01, tick, name="test-tick"):
        await async_wait_for(lambda: len(calls) >= 4, what="ticks after a failing one")
    stopped_at = len(calls)
    await asyncio.sleep(0.05)  # several intervals: a loop still running would have ticked
    assert len(calls) == stopped_at


async def test_a_sync_tick_is_called_too() -> None:
    seen = asyncio.Event()
    async with every(0.01, seen.set, name="test-sync-tick"):
        await asyncio.wait_for(seen.wait(), 5)
