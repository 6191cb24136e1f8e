"""Prometheus metrics for ``/metrics``.

The hot path never touches prometheus-client: the node, hub and connections keep
plain ints (:class:`herald.stats.NodeStats`, ``connection.frames_out`` ...) and :class:`Metrics`
copies them into prometheus-client counters and gauges when ``/metrics`` is
scraped (:meth:`Metrics.sync`).  Only the broker publish latency histogram is
observed directly, once per publication (not per subscriber).

With several worker processes (``herald serve --workers N``) prometheus-client's
multiprocess mode is used: ``PROMETHEUS_MULTIPROC_DIR`` names a directory where
every worker writes its values; a scrape answered by any worker sums them.  Each
worker copies its counters into that directory every second, so a scrape shows
the other workers' values at most a second late.  ``herald serve`` creates (and
removes) a temporary directory when the variable is not set.

Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from . import __version__
from .codes import CloseCode
from .periodic import every

if TYPE_CHECKING:
    from fastapi import APIRouter

    from .node import Node

#: Broker publish latency buckets (seconds): memory is ~10 µs, Redis on a LAN ~0.1-1 ms.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

_KNOWN_CLOSE_CODES = frozenset(int(code) for code in CloseCode) | frozenset(range(1000, 1016))

#: How often a worker copies its counters to the multiprocess directory (seconds).
MULTIPROCESS_SYNC_INTERVAL = 1.0


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory, when multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def close_code_label(code: int) -> str:
    """Label value for a close code; codes Herald does not know are folded into ``other``
    (a peer chooses its own close code, and label values must stay few)."""
    return str(code) if code in _KNOWN_CLOSE_CODES else "other"


class Metrics:
    """Exports one node's counters in the Prometheus text format.

    One instance per node.  Without multiprocess mode each instance has its own
    registry, so several nodes in one process (tests) do not collide.
    """

    def __init__(self, node: Node) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.node = node
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        registry: Any = None if self.multiprocess else self.registry
        if not self.multiprocess:
            ProcessCollector(registry=self.registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = (), mode: Any = "livesum") -> Any:
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

        self.info = gauge(
            "herald_node_info", "This node (value 1).", ("node", "broker", "version"), "liveall"
        )
        self.connections_open = gauge(
            "herald_connections_open", "Connections currently registered with the node."
        )
        self.connections = counter("herald_connections", "Connections admitted since start.")
        self.disconnects = counter(
            "herald_disconnects", "Connections that ended, by WebSocket close code.", ("code",)
        )
        self.subscriptions = gauge("herald_subscriptions", "Channel subscriptions on the node.")
        self.channels = gauge("herald_channels", "Channels with at least one subscriber.")
        self.messages_in = counter("herald_messages_in", "Frames received from clients.")
        self.bytes_in = counter(
            "herald_bytes_in", "Length of frames received (characters; bytes for ASCII JSON)."
        )
        self.messages_out = counter("herald_messages_out", "Frames written to clients.")
        self.bytes_out = counter(
            "herald_bytes_out", "Length of frames written (characters; bytes for ASCII JSON)."
        )
        self.deliveries = counter("herald_deliveries", "Publications queued to local subscribers (fan-out).")
        self.publications = counter(
            "herald_publications", "Publications accepted by the broker, by namespace.", ("namespace",)
        )
        self.slow_consumers = counter(
            "herald_slow_consumer_disconnects",
            "Clients disconnected because their send queue overflowed (close 4001).",
        )
        self.rejected = counter(
            "herald_handshakes_rejected", "Refused handshakes and connects, by reason.", ("reason",)
        )
        self.rejected_commands = counter(
            "herald_commands_rejected",
            "Commands and frames refused for bad input or policy, by reason.",
            ("reason",),
        )
        self.broker_errors = counter(
            "herald_broker_errors", "Failed broker operations, by operation.", ("operation",)
        )
        self.stream_gaps = counter(
            "herald_stream_gaps",
            "Publications lost by the broker (gaps) that closed a channel's local subscribers with 4005.",
        )
        self.broker_events = counter(
            "herald_broker_events",
            "Broker-internal events by name (handler_errors, reconnects, gaps_filled, gaps_lost, ...).",
            ("event",),
        )
        self.recoveries = counter(
            "herald_recoveries",
            "Subscriptions with a `since` position, by whether the missed publications were recovered.",
            ("recovered",),
        )
        self.publish_seconds = Histogram(
            "herald_broker_publish_seconds",
            "Time the broker took to accept a publication.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        node.observe_publish_latency = self.publish_seconds.observe
        self.info.labels(node.id, _broker_kind(node), __version__).set(1)
        # Last values copied, per (counter, label): counters only ever grow by the difference.
        self._copied: dict[tuple[int, str], int] = {}

    # ------------------------------------------------------------ copying

    def _advance(self, counter: Any, value: int, label: str | None = None) -> None:
        key = (id(counter), label or "")
        last = self._copied.get(key, 0)
        if value > last:
            (counter.labels(label) if label is not None else counter).inc(value - last)
            self._copied[key] = value

    def sync(self) -> None:
        """Copy the node's plain counters into the prometheus-client metrics."""
        node = self.node
        stats = node.stats
        hub = node.hub
        frames_out = stats.frames_out_closed
        bytes_out = stats.bytes_out_closed
        for connection in hub.connections():
            frames_out += connection.frames_out
            bytes_out += connection.bytes_out
        channels = {c: n for c, n in hub.channels().items() if not c.startswith("$")}
        self.connections_open.set(hub.connection_count)
        self.subscriptions.set(sum(channels.values()))
        self.channels.set(len(channels))
        advance = self._advance
        advance(self.connections, stats.connections)
        advance(self.messages_in, stats.frames_in)
        advance(self.bytes_in, stats.bytes_in)
        advance(self.messages_out, frames_out)
        advance(self.bytes_out, bytes_out)
        advance(self.deliveries, stats.deliveries)
        advance(self.slow_consumers, stats.slow_consumers)
        advance(self.stream_gaps, stats.stream_gaps)
        advance(self.recoveries, stats.recovered, "true")
        advance(self.recoveries, stats.not_recovered, "false")
        for event, count in node.broker.counters().items():
            advance(self.broker_events, count, event)
        codes: dict[str, int] = {}
        for code, count in list(node.close_codes.items()):
            label = close_code_label(code)
            codes[label] = codes.get(label, 0) + count
        for label, count in codes.items():
            advance(self.disconnects, count, label)
        for namespace, count in list(node.publications_by_namespace.items()):
            advance(self.publications, count, namespace)
        for reason, count in list(node.rejected_handshakes.items()):
            advance(self.rejected, count, reason)
        for reason, count in list(node.rejected_commands.items()):
            advance(self.rejected_commands, count, reason)
        for operation, count in list(node.broker_errors.items()):
            advance(self.broker_errors, count, operation)

    def render(self) -> bytes:
        """The Prometheus text exposition of this node (or of every worker, in multiprocess mode)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.sync()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """In multiprocess mode, copy the counters every second while the app runs, and
        remove this worker's live gauges when it stops."""
        if not self.multiprocess:
            yield
            return
        try:
            async with every(MULTIPROCESS_SYNC_INTERVAL, self.sync, name="herald-metrics-sync"):
                yield
        finally:
            self.sync()
            from prometheus_client import multiprocess

            with contextlib.suppress(Exception):
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _broker_kind(node: Node) -> str:
    name = type(node.broker).__name__
    return name.removesuffix("Broker").lower() or name


def build_metrics_router(metrics: Metrics) -> APIRouter:
    """``GET /metrics`` in the Prometheus text format (no key: scrape it from inside your network)."""
    from fastapi import APIRouter
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    router = APIRouter(tags=["operations"])

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, response_model=None)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


__all__ = ["Metrics", "build_metrics_router", "close_code_label", "multiprocess_dir"]
