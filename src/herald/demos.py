"""Server-side support for the demo pages (``/static/chat.html``, ``dashboard.html``, ``game.html``).

``herald serve`` installs it when ``settings.demos`` is true (the default):

* the namespaces the pages use (:data:`DEMO_NAMESPACES`: ``chat``, ``dashboard``,
  ``game``), unless the configuration defines them already;
* a ``connect`` hook that copies the connect command's ``name`` into the client's
  presence info (``{"name": ...}``) when no token or earlier hook set ``info``, so
  that the chat's presence list can show names.  The name is self-declared: it
  identifies nobody, exactly like the name typed in the chat form;
* :class:`DashboardPublisher`, a task that publishes this node's live figures to
  ``dashboard:metrics`` once a second (the ``dashboard`` namespace forbids client
  publishing and keeps 60 publications of history, one minute of chart).

When the configuration leaves the server unable to publish there (the channel name is
over ``max_channel_length``, or the ``dashboard`` namespace was taken out after
:func:`install_demos`), the dashboard demo is off: one warning at start-up says why,
and the other demos work.  A publish that fails later (a broker outage) is logged once
per outage, not once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .config import NamespaceOptions, Settings
from .context import ClientContext
from .exceptions import CommandError
from .node import Node

if TYPE_CHECKING:
    from .app import Herald

logger = logging.getLogger("herald.demos")

#: Where the dashboard demo reads its figures.
DASHBOARD_CHANNEL = "dashboard:metrics"
#: Longest name kept in presence info (the protocol caps ``name`` at 64 characters).
MAX_NAME_LENGTH = 32

#: The namespaces of the demo pages (chat.html, dashboard.html, game.html).
DEMO_NAMESPACES: dict[str, NamespaceOptions] = {
    # Small rooms that show who comes and goes (join/leave is off by default).
    "chat": NamespaceOptions(join_leave=True),
    # Figures published by the server once a second: one minute of chart, no client publishing.
    "dashboard": NamespaceOptions(history_size=60, presence=False, join_leave=False, allow_publish=False),
    "game": NamespaceOptions(history_size=200, join_leave=True),
}


def add_demo_namespaces(settings: Settings) -> None:
    """Add :data:`DEMO_NAMESPACES` to ``settings``, keeping namespaces it configures."""
    for name, options in DEMO_NAMESPACES.items():
        settings.namespaces.setdefault(name, options)


def name_as_info(ctx: ClientContext) -> None:
    """``connect`` hook: ``ctx.info = {"name": ctx.name}`` unless something set ``info``."""
    if ctx.info is None and ctx.name:
        name = " ".join(ctx.name.split())[:MAX_NAME_LENGTH]
        if name:
            ctx.info = {"name": name}


class DashboardPublisher:
    """Publishes this node's figures to :data:`DASHBOARD_CHANNEL` every ``interval`` seconds.

    Each publication is one JSON object::

        {"node": "3f2a...", "pid": 123, "time": 1718000000.0, "interval": 1.0,
         "connections": 2, "subscriptions": 3, "messages_in_per_s": 4.0,
         "messages_out_per_s": 7.0, "publications_per_s": 3.0,
         "publish_latency_ms": 0.1, "loop_lag_ms": 0.4, "cpu_percent": 2.5,
         "uptime_s": 61.2}

    ``publish_latency_ms`` is how long the previous sample's publish took (the broker
    round trip); ``loop_lag_ms`` is how late the event loop woke this task up, a
    direct measure of how busy the node is.  With several workers each node
    publishes its own samples, told apart by ``node``.
    """

    def __init__(self, node: Node, *, channel: str = DASHBOARD_CHANNEL, interval: float = 1.0) -> None:
        self.node = node
        self.channel = channel
        self.interval = interval
        self.samples = 0
        #: Samples that could not be published since the last one that was.
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._last_publish_ms = 0.0

    async def start(self) -> bool:
        """Start publishing; returns whether it runs.

        A channel the server cannot publish to (invalid name, unknown namespace) is
        logged once, as a warning, and the publisher stays off: every sample would fail
        the same way.
        """
        if self._task is None:
            try:
                self.node.check_channel(self.channel)
            except CommandError as exc:
                logger.warning(
                    "dashboard demo off: the server cannot publish its figures to %r (%s); "
                    "configure the namespace and max_channel_length so that this channel is "
                    "valid, or turn the demos off (HERALD_DEMOS=false)",
                    self.channel,
                    exc.message,
                )
                return False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="herald-dashboard")
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        node = self.node
        loop = asyncio.get_running_loop()
        wall, cpu = time.monotonic(), time.process_time()
        stats = node.stats.as_dict()
        while True:
            target = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag_ms = max(0.0, (loop.time() - target) * 1000)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            elapsed = max(now_wall - wall, 1e-6)
            current = node.stats.as_dict()
            sample = self._sample(stats, current, elapsed, (now_cpu - cpu) / elapsed, lag_ms)
            wall, cpu, stats = now_wall, now_cpu, current
            started = time.perf_counter()
            try:
                await node.publish(self.channel, sample)
            except Exception as exc:  # a broker outage must not kill the publisher
                # Once per outage: a line a second would bury the log it is in.
                if not self.failures:
                    logger.warning("dashboard publish failed (logged once until it works again): %r", exc)
                self.failures += 1
                continue
            if self.failures:
                logger.info("dashboard publishing again after %d failed samples", self.failures)
                self.failures = 0
            self._last_publish_ms = (time.perf_counter() - started) * 1000
            self.samples += 1

    def _sample(
        self,
        before: dict[str, int],
        after: dict[str, int],
        elapsed: float,
        cpu_share: float,
        lag_ms: float,
    ) -> dict[str, Any]:
        node = self.node

        def rate(key: str) -> float:
            return round((after.get(key, 0) - before.get(key, 0)) / elapsed, 2)

        subscriptions = sum(
            count for channel, count in node.hub.channels().items() if not channel.startswith("$")
        )
        return {
            "node": node.id,
            "pid": os.getpid(),
            "time": round(time.time(), 3),
            "interval": self.interval,
            "connections": node.hub.connection_count,
            "subscriptions": subscriptions,
            "messages_in_per_s": rate("frames_in"),
            "messages_out_per_s": rate("deliveries"),
            "publications_per_s": rate("publications"),
            "publish_latency_ms": round(self._last_publish_ms, 3),
            "loop_lag_ms": round(lag_ms, 3),
            "cpu_percent": round(cpu_share * 100, 1),
            "uptime_s": round(time.time() - node.started_at, 1),
        }


def install_demos(herald: Herald) -> contextlib.AbstractAsyncContextManager[None]:
    """Add the demo namespaces and hooks to ``herald``; returns the context that runs the
    dashboard publisher.

    Use the returned context manager inside the application's lifespan, after the
    node started.
    """
    add_demo_namespaces(herald.settings)
    herald.node.add_hook("connect", name_as_info)

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[None]:
        publisher = DashboardPublisher(herald.node)
        await publisher.start()
        try:
            yield
        finally:
            await publisher.stop()

    return running()


__all__ = [
    "DASHBOARD_CHANNEL",
    "DEMO_NAMESPACES",
    "DashboardPublisher",
    "add_demo_namespaces",
    "install_demos",
    "name_as_info",
]
