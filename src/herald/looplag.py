"""Event-loop lag: how late the asyncio loop runs a timer that is due.

Every frame a client sends, every ping and every publication a node fans out waits
for the loop to come round to it.  When a callback runs long (a blocking call in a
hook, a large JSON document, a garbage collection) or the process has less CPU than
it needs, everything waits, and no counter shows it: the loop is late, not failing.

:class:`LoopLagMonitor` measures it directly: a task sleeps ``interval`` seconds and
records how much later than that it woke up.  The excess is time the loop spent on
other work while the timer was due.  A loop
that is blocked outright records nothing until it is free again, then records the
whole stall at once (and a blocked loop does not answer ``/metrics`` either: the
scrape fails, which ``up == 0`` shows).

:mod:`herald.metrics` feeds the measurements to the
``herald_event_loop_lag_seconds`` histogram; the monitor itself knows nothing of
Prometheus.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from .periodic import every

#: How often the loop is measured (seconds): two cheap timer callbacks a second.
DEFAULT_INTERVAL = 0.5

#: Histogram buckets (seconds): a healthy loop is late by well under a millisecond;
#: 100 ms is felt by every client of the process; seconds mean it stalls.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLagMonitor:
    """Measures the running loop's scheduling delay while :meth:`running` lasts.

    ``observe`` is called with each measurement (seconds, never negative), from
    the loop itself; ``last`` and ``worst`` keep the latest and the largest.
    ``clock`` is :func:`time.monotonic`, the clock asyncio's timers use.
    """

    def __init__(
        self,
        observe: Callable[[float], object],
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("the loop lag interval must be positive")
        self.observe = observe
        self.interval = interval
        self.clock = clock
        self.last = 0.0
        self.worst = 0.0
        self.measurements = 0
        # When the current sleep began; None until the monitor runs.
        self._sleep_started: float | None = None

    def tick(self) -> None:
        """Record how late this wake-up is, then start timing the next sleep.

        Called by :func:`herald.periodic.every` as soon as its sleep returns; nothing
        else runs between the end of one tick and the start of the next sleep.
        """
        now = self.clock()
        started = self._sleep_started
        self._sleep_started = now
        if started is None:
            return
        # asyncio may run a timer up to its clock resolution early: never report < 0.
        lag = max(0.0, now - started - self.interval)
        self.last = lag
        self.worst = max(self.worst, lag)
        self.measurements += 1
        self.observe(lag)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Measure the current loop for as long as the block lasts (an app's lifespan)."""
        self._sleep_started = self.clock()
        try:
            async with every(self.interval, self.tick, name="herald-loop-lag"):
                yield
        finally:
            self._sleep_started = None


__all__ = ["DEFAULT_INTERVAL", "LAG_BUCKETS", "LoopLagMonitor"]
