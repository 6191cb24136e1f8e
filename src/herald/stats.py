"""The node's plain counters: bumped on the hot path, exported at scrape time.

Ints in a slotted dataclass, not prometheus-client objects: an increment is one
attribute store.  :mod:`herald.metrics` copies them into Prometheus counters when
``/metrics`` is scraped; docs/operations.md names the metric each one feeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(slots=True)
class NodeStats:
    """Counts since the node started.  Each field says what it counts; the metric
    it feeds is in the comment (``herald_`` prefix and ``_total`` suffix omitted)."""

    #: WebSocket frames received from clients, every route (``messages_in``).
    frames_in: int = 0
    #: Length of those frames, in characters (``bytes_in``).
    bytes_in: int = 0
    #: Publications queued to local subscribers by fan-out: one per subscriber
    #: (``deliveries``).  Frames actually written are ``messages_out``, counted per
    #: connection and summed at scrape time with :attr:`frames_out_closed`.
    deliveries: int = 0
    #: Publications the broker accepted (``publications`` counts them by namespace).
    publications: int = 0
    #: Connections admitted since start (``connections``).
    connections: int = 0
    #: Connections closed 4001 because their send queue overflowed (``slow_consumer_disconnects``).
    slow_consumers: int = 0
    #: Frames and bytes written to connections that have ended (their part of
    #: ``messages_out`` and ``bytes_out``; open connections count their own).
    frames_out_closed: int = 0
    bytes_out_closed: int = 0
    #: Subscriptions with ``since`` whose missed publications were (not) recovered
    #: (``recoveries{recovered="true"|"false"}``).
    recovered: int = 0
    not_recovered: int = 0
    #: Gaps the broker reported (publications lost) that closed a channel's local
    #: subscribers with 4005 (``stream_gaps``).
    stream_gaps: int = 0

    def as_dict(self) -> dict[str, int]:
        """A snapshot, field name -> count (for the admin page and the dashboard demo)."""
        return dataclasses.asdict(self)
