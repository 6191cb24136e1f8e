"""Prometheus metrics for ``/metrics``.

The hot path never touches prometheus-client: the node, the routes' sessions and
connections keep plain ints (:class:`herald.stats.NodeStats`, its per-route
:class:`herald.stats.RouteStats`, ``connection.frames_out`` ...) and :class:`Metrics`
copies them into prometheus-client counters and gauges when ``/metrics`` is
scraped (:meth:`Metrics.sync`).  Only two histograms are observed directly: the
broker publish latency, once per publication (not per subscriber), and the proxy
hooks' call duration, once per HTTP call to the backend (milliseconds each).

What WebSockets do (connections, disconnects, messages and bytes each way) carries a
``route`` label from a fixed set (:data:`herald.stats.ROUTE_LABELS`: every route
Herald serves, ``other`` for the rest), so the label stays bounded and a sum over
it is the node's total.  The proxy hooks' metrics (:mod:`herald.proxy`) carry
``event`` and ``outcome`` from fixed sets too (:data:`herald.proxy.PROXY_EVENTS`,
:data:`herald.proxy.PROXY_OUTCOMES`).

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
from .looplag import LAG_BUCKETS, LoopLagMonitor
from .outbox.stats import totals as outbox_totals
from .periodic import every
from .proxy import PROXY_OUTCOMES
from .stats import ROUTE_LABELS

if TYPE_CHECKING:
    from fastapi import APIRouter

    from .node import Node
    from .proxy import HttpProxy

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
        route = ("route",)
        self.connections_open = gauge("herald_connections_open", "WebSockets open now, by route.", route)
        self.connections = counter(
            "herald_connections", "WebSockets admitted and accepted since start, by route.", route
        )
        self.disconnects = counter(
            "herald_disconnects", "WebSockets that ended, by route and close code.", ("route", "code")
        )
        self.subscriptions = gauge("herald_subscriptions", "Channel subscriptions on the node.")
        self.channels = gauge("herald_channels", "Channels with at least one subscriber.")
        self.messages_in = counter("herald_messages_in", "Frames received from clients, by route.", route)
        self.bytes_in = counter(
            "herald_bytes_in",
            "Length of frames received, by route (characters; bytes for ASCII JSON).",
            route,
        )
        self.messages_out = counter("herald_messages_out", "Frames written to clients, by route.", route)
        self.bytes_out = counter(
            "herald_bytes_out",
            "Length of frames written, by route (characters; bytes for ASCII JSON).",
            route,
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
        self.control_events = counter(
            "herald_control_events",
            "Control-channel events by name (gaps, duplicates, expired, incomplete).",
            ("event",),
        )
        self.cluster_nodes = gauge(
            "herald_cluster_nodes",
            "Nodes this node holds alive (heartbeats), itself included.",
            (),
            "livemax",
        )
        self.recoveries = counter(
            "herald_recoveries",
            "Subscriptions with a `since` position, by whether the missed publications were recovered.",
            ("recovered",),
        )
        # The outbox consumer's (herald.outbox): 0 without one.  Every consumer of a table
        # sees the same backlog, so workers report the largest, not the sum.
        self.outbox_consumed = counter("herald_outbox_rows_consumed", "Outbox rows published and deleted.")
        self.outbox_failed = counter("herald_outbox_rows_failed", "Outbox rows that can never be published.")
        self.outbox_pending = gauge(
            "herald_outbox_pending_rows", "Committed outbox rows not yet published.", (), "livemax"
        )
        self.outbox_lag = gauge(
            "herald_outbox_lag_seconds", "Age of the oldest pending outbox row.", (), "livemax"
        )
        # The proxy hooks' (herald.proxy): registered on every node, like the outbox's;
        # without a proxy the labelled ones have no series and in-flight stays 0.
        self.proxy_calls = counter(
            "herald_proxy_calls",
            "Proxy hook calls to the backend, by event and outcome.",
            ("event", "outcome"),
        )
        self.proxy_in_flight = gauge(
            "herald_proxy_in_flight", "Proxy hook calls waiting for the backend now."
        )
        # A backend call takes milliseconds, up to proxy_timeout (1 s by default, 60 s at
        # most): the loop-lag buckets (0.5 ms .. 10 s) fit.
        self.proxy_seconds = Histogram(
            "herald_proxy_call_duration_seconds",
            "Time a proxy hook call to the backend took (answered, failed or timed out), by event.",
            ("event",),
            registry=registry,
            buckets=LAG_BUCKETS,
        )
        if node.proxy is not None:
            self._watch_proxy(node.proxy)
        self.publish_seconds = Histogram(
            "herald_broker_publish_seconds",
            "Time the broker took to accept a publication.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        node.observe_publish_latency = self.publish_seconds.observe
        # Loop lag: measured by herald.looplag while the app runs (see running()).
        self.loop_lag = LoopLagMonitor(
            Histogram(
                "herald_event_loop_lag_seconds",
                "How late the event loop ran a timer that was due (measured twice a second).",
                registry=registry,
                buckets=LAG_BUCKETS,
            ).observe
        )
        self.info.labels(node.id, _broker_kind(node), __version__).set(1)
        # Every route shows from the first scrape, at 0: a dashboard's per-route panels
        # and rates need the series to exist before the first client comes.
        for label in ROUTE_LABELS:
            for per_route in (
                self.connections_open,
                self.connections,
                self.messages_in,
                self.bytes_in,
                self.messages_out,
                self.bytes_out,
            ):
                per_route.labels(label)
        # Last values copied, per (counter, labels): counters only ever grow by the difference.
        self._copied: dict[tuple[int, tuple[str, ...]], int] = {}

    def _watch_proxy(self, proxy: HttpProxy) -> None:
        """Show the proxy's events from the first scrape, at 0 (every outcome: an alert's
        ratio of failures needs the series before the first failure), and have it report
        each call's duration to the histogram."""
        observers: dict[str, Any] = {}
        for event in proxy.events():
            observers[event] = self.proxy_seconds.labels(event).observe
            for outcome in PROXY_OUTCOMES:
                self.proxy_calls.labels(event, outcome)

        def observe(event: str, seconds: float) -> None:
            child = observers.get(event)
            if child is None:
                child = observers[event] = self.proxy_seconds.labels(event).observe
            child(seconds)

        proxy.observe_duration = observe

    # ------------------------------------------------------------ copying

    def _advance(self, counter: Any, value: int, *labels: str) -> None:
        key = (id(counter), labels)
        last = self._copied.get(key, 0)
        if value > last:
            (counter.labels(*labels) if labels else counter).inc(value - last)
            self._copied[key] = value

    def sync(self) -> None:
        """Copy the node's plain counters into the prometheus-client metrics."""
        node = self.node
        stats = node.stats
        hub = node.hub
        channels = {c: n for c, n in hub.channels().items() if not c.startswith("$")}
        self.subscriptions.set(sum(channels.values()))
        self.channels.set(len(channels))
        advance = self._advance
        for label, route in stats.routes.items():
            frames_out, bytes_out = route.output()
            self.connections_open.labels(label).set(route.open)
            advance(self.connections, route.accepted, label)
            advance(self.messages_in, route.frames_in, label)
            advance(self.bytes_in, route.bytes_in, label)
            advance(self.messages_out, frames_out, label)
            advance(self.bytes_out, bytes_out, label)
            codes: dict[str, int] = {}
            for code, count in list(route.close_codes.items()):
                code_label = close_code_label(code)
                codes[code_label] = codes.get(code_label, 0) + count
            for code_label, count in codes.items():
                advance(self.disconnects, count, label, code_label)
        advance(self.deliveries, stats.deliveries)
        advance(self.slow_consumers, stats.slow_consumers)
        advance(self.stream_gaps, stats.stream_gaps)
        advance(self.recoveries, stats.recovered, "true")
        advance(self.recoveries, stats.not_recovered, "false")
        for event, count in node.broker.counters().items():
            advance(self.broker_events, count, event)
        for event, count in node.control.counters().items():
            advance(self.control_events, count, event)
        self.cluster_nodes.set(node.control.members.count())
        for namespace, count in list(node.publications_by_namespace.items()):
            advance(self.publications, count, namespace)
        for reason, count in list(node.rejected_handshakes.items()):
            advance(self.rejected, count, reason)
        for reason, count in list(node.rejected_commands.items()):
            advance(self.rejected_commands, count, reason)
        for operation, count in list(node.broker_errors.items()):
            advance(self.broker_errors, count, operation)
        outbox = outbox_totals(node)
        advance(self.outbox_consumed, outbox.rows_consumed)
        advance(self.outbox_failed, outbox.rows_failed)
        self.outbox_pending.set(outbox.pending_rows)
        self.outbox_lag.set(outbox.lag_seconds)
        proxy = node.proxy
        if proxy is not None:
            for (event, outcome), count in list(proxy.calls.items()):
                advance(self.proxy_calls, count, event, outcome)
            self.proxy_in_flight.set(proxy.in_flight)

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
        """Measure the event loop's lag while the app runs; in multiprocess mode also copy
        the counters every second, and remove this worker's live gauges when it stops."""
        if not self.multiprocess:
            async with self.loop_lag.running():
                yield
            return
        try:
            async with (
                every(MULTIPROCESS_SYNC_INTERVAL, self.sync, name="herald-metrics-sync"),
                self.loop_lag.running(),
            ):
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
