"""The node's plain counters: bumped on the hot path, exported at scrape time.

Ints in slotted dataclasses, not prometheus-client objects: an increment is one
attribute store.  :mod:`herald.metrics` copies them into Prometheus counters when
``/metrics`` is scraped; docs/operations.md names the metric each one feeds.

What a WebSocket does (accepted, ended, frames and bytes each way, close codes) is
counted per route, in the route's :class:`RouteStats`: each session holds its
route's object, so counting costs no lookup.  The ``route`` label of those metrics
takes its values from :data:`ROUTE_LABELS`, a fixed set, so that the label stays
bounded whatever paths an application mounts Herald's routes at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

#: The ``route`` label of every route Herald serves: ``connect`` (``/connect``, protocol
#: v1), the tutorial's ``ws`` (``/ws``), ``ws_json`` and ``ws_broadcast``, ``admin``
#: (``/admin/ws``), ``sse`` (``/sse``), ``http_stream`` (``/stream``), ``emulation``
#: (``/emulation/connect``), and ``other`` for any name not in this list.  A new
#: transport adds its name here (and to docs/operations.md).
ROUTE_LABELS = (
    "connect",
    "ws",
    "ws_json",
    "ws_broadcast",
    "admin",
    "sse",
    "http_stream",
    "emulation",
    "other",
)

#: The label a route name not in :data:`ROUTE_LABELS` is counted under.
OTHER_ROUTE = "other"


class CountsOutput(Protocol):
    """What a route's stats read from an open connection that counts its own output
    (:class:`herald.connection.Connection`)."""

    frames_out: int
    bytes_out: int


@dataclass(slots=True, eq=False)
class RouteStats:
    """One route's WebSockets since the node started (metric names in the comments,
    ``herald_`` prefix and ``_total`` suffix omitted, each with ``route="<label>"``)."""

    #: WebSockets that passed the route's admission (Host, Origin, per-IP limit) and
    #: were accepted (``connections``).
    accepted: int = 0
    #: Those that have ended; ``accepted - ended`` are open (``connections_open``).
    ended: int = 0
    #: Frames received, text or binary, and their length: characters for text, bytes
    #: for binary (``messages_in``, ``bytes_in``).
    frames_in: int = 0
    bytes_in: int = 0
    #: Frames written by the session itself (the tutorial's answers) and by connections
    #: that have ended; open connections count their own (:attr:`live`), and
    #: :meth:`output` adds them up (``messages_out``, ``bytes_out``).
    frames_out: int = 0
    bytes_out: int = 0
    #: How the WebSockets ended: close code -> count (``disconnects``).
    close_codes: dict[int, int] = field(default_factory=dict)
    #: The route's open connections whose output is counted on the connection.
    live: set[CountsOutput] = field(default_factory=set)

    @property
    def open(self) -> int:
        """WebSockets of this route open now."""
        return self.accepted - self.ended

    def output(self) -> tuple[int, int]:
        """Frames and bytes written to this route's clients so far, open connections included."""
        frames, size = self.frames_out, self.bytes_out
        for connection in list(self.live):
            frames += connection.frames_out
            size += connection.bytes_out
        return frames, size

    def record_end(self, code: int, connection: CountsOutput | None = None) -> None:
        """A WebSocket of this route ended with ``code``; ``connection``'s output (if it
        counted its own) becomes part of the route's totals."""
        self.ended += 1
        self.close_codes[code] = self.close_codes.get(code, 0) + 1
        if connection is not None and connection in self.live:
            self.live.discard(connection)
            self.frames_out += connection.frames_out
            self.bytes_out += connection.bytes_out


def _route_table() -> dict[str, RouteStats]:
    return {label: RouteStats() for label in ROUTE_LABELS}


@dataclass(slots=True)
class NodeStats:
    """Counts since the node started.  Each field says what it counts; the metric
    it feeds is in the comment (``herald_`` prefix and ``_total`` suffix omitted)."""

    #: Publications queued to local subscribers by fan-out: one per subscriber
    #: (``deliveries``).  Frames actually written are ``messages_out``, counted per
    #: route (:class:`RouteStats`).
    deliveries: int = 0
    #: Publications the broker accepted (``publications`` counts them by namespace).
    publications: int = 0
    #: Connections closed 4001 because their send queue overflowed (``slow_consumer_disconnects``).
    slow_consumers: int = 0
    #: Subscriptions with ``since`` whose missed publications were (not) recovered
    #: (``recoveries{recovered="true"|"false"}``).
    recovered: int = 0
    not_recovered: int = 0
    #: Gaps the broker reported (publications lost) that closed a channel's local
    #: subscribers with 4005 (``stream_gaps``).
    stream_gaps: int = 0
    #: Route label -> that route's WebSockets; one entry per :data:`ROUTE_LABELS`.
    routes: dict[str, RouteStats] = field(default_factory=_route_table)

    def route(self, label: str) -> RouteStats:
        """The stats of route ``label``; a label not in :data:`ROUTE_LABELS` is ``other``."""
        stats = self.routes.get(label)
        return stats if stats is not None else self.routes[OTHER_ROUTE]

    def as_dict(self) -> dict[str, int]:
        """A snapshot, name -> count (for the admin page and the dashboard demo): the
        fields above, and ``connections``, ``frames_in`` and ``bytes_in`` added up over
        every route.  Cheap: it reads no connection (frames out are in ``/metrics``)."""
        totals = {
            "deliveries": self.deliveries,
            "publications": self.publications,
            "slow_consumers": self.slow_consumers,
            "recovered": self.recovered,
            "not_recovered": self.not_recovered,
            "stream_gaps": self.stream_gaps,
            "connections": 0,
            "frames_in": 0,
            "bytes_in": 0,
        }
        for route in self.routes.values():
            totals["connections"] += route.accepted
            totals["frames_in"] += route.frames_in
            totals["bytes_in"] += route.bytes_in
        return totals


__all__ = ["OTHER_ROUTE", "ROUTE_LABELS", "CountsOutput", "NodeStats", "RouteStats"]
