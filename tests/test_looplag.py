"""herald.looplag: the event loop's lag, measured on a real loop that is really blocked."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from herald.looplag import LoopLagMonitor

from .helpers import async_wait_for


def block_the_loop(seconds: float) -> None:
    """What a blocking call in a hook does: the loop runs nothing else meanwhile."""
    time.sleep(seconds)


async def test_a_blocked_loop_is_measured_as_late() -> None:
    seen: list[float] = []
    stalled = asyncio.Event()
    warmed = asyncio.Event()

    def observe(lag: float) -> None:
        seen.append(lag)
        if len(seen) == 2:
            warmed.set()
        if lag >= 0.3:
            stalled.set()

    monitor = LoopLagMonitor(observe, interval=0.05)
    async with monitor.running():
        await asyncio.wait_for(warmed.wait(), 5)  # a couple of measurements of a free loop first
        block_the_loop(0.4)  # the monitor's timer comes due meanwhile
        await asyncio.wait_for(stalled.wait(), 5)
    assert min(seen) >= 0
    # The stall is measured once, as the excess over the interval, not the whole wait.
    # Blocked 0.4 s, of which up to one interval (0.05 s) before the timer was due.
    assert 0.3 <= monitor.worst < 0.4 + 0.5
    assert monitor.worst == max(seen)
    assert monitor.measurements == len(seen)


async def test_measuring_stops_with_the_block() -> None:
    seen: list[float] = []
    three = asyncio.Event()

    def observe(lag: float) -> None:
        seen.append(lag)
        if len(seen) == 3:
            three.set()

    monitor = LoopLagMonitor(observe, interval=0.01)
    async with monitor.running():
        await asyncio.wait_for(three.wait(), 5)
    count = len(seen)
    await asyncio.sleep(0.05)
    assert len(seen) == count
    assert monitor.last == seen[-1]


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopLagMonitor(lambda lag: None, interval=0)


def test_the_lag_is_the_excess_over_the_interval_and_never_negative() -> None:
    now = [100.0]
    seen: list[float] = []
    monitor = LoopLagMonitor(seen.append, interval=1.0, clock=lambda: now[0])
    monitor.tick()  # the first tick only starts the clock
    assert seen == []
    now[0] += 1.25
    monitor.tick()
    now[0] += 0.999  # a timer run a hair early
    monitor.tick()
    now[0] += 3.0
    monitor.tick()
    assert seen == [0.25, 0.0, 2.0]
    assert (monitor.last, monitor.worst, monitor.measurements) == (2.0, 2.0, 3)


async def test_metrics_export_the_lag_as_a_histogram() -> None:
    """``herald_event_loop_lag_seconds`` counts a stall in its bucket while the app runs."""
    from herald.config import Settings
    from herald.metrics import Metrics
    from herald.node import Node

    node = Node(Settings(ping_interval=0))
    metrics = Metrics(node)
    metrics.loop_lag.interval = 0.05
    async with metrics.running():
        await async_wait_for(lambda: metrics.loop_lag.measurements >= 1, 5, what="a first measurement")
        block_the_loop(0.4)
        await async_wait_for(lambda: metrics.loop_lag.worst >= 0.3, 5, what="the stall measured")
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if family.name == "herald_event_loop_lag_seconds"
    }
    count = samples[("herald_event_loop_lag_seconds_count", None)]
    assert count == metrics.loop_lag.measurements
    # The stall (0.35-0.4 s) is above the 0.25 s bucket and within the 1 s one.
    assert samples[("herald_event_loop_lag_seconds_bucket", "0.25")] <= count - 1
    assert samples[("herald_event_loop_lag_seconds_bucket", "1.0")] == count
    assert samples[("herald_event_loop_lag_seconds_sum", None)] >= 0.3
