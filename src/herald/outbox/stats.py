"""The outbox consumers' plain counters, found by node (read by :mod:`herald.metrics`).

Imports no driver and no node: the metrics module reads these without loading the
consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

if TYPE_CHECKING:
    from ..node import Node


@dataclass(slots=True, eq=False)
class OutboxStats:
    """One consumer's counters: plain numbers, copied to Prometheus at scrape time."""

    #: Rows published (or found already published) and deleted since start.
    rows_consumed: int = 0
    #: Rows that can never be published (bad channel, unknown namespace), kept and marked.
    rows_failed: int = 0
    #: Committed rows not yet published, at the last check (about once a second).
    pending_rows: int = 0
    #: Age in seconds of the oldest of them (0 when none), at the last check.
    lag_seconds: float = 0.0


_BY_NODE: WeakKeyDictionary[Node, list[OutboxStats]] = WeakKeyDictionary()


def register(node: Node, stats: OutboxStats) -> None:
    _BY_NODE.setdefault(node, []).append(stats)


def unregister(node: Node, stats: OutboxStats) -> None:
    registered = _BY_NODE.get(node, [])
    if stats in registered:
        registered.remove(stats)


def totals(node: Node) -> OutboxStats:
    """The node's consumers together: counts summed, lag the largest."""
    total = OutboxStats()
    for stats in _BY_NODE.get(node, []):
        total.rows_consumed += stats.rows_consumed
        total.rows_failed += stats.rows_failed
        total.pending_rows += stats.pending_rows
        total.lag_seconds = max(total.lag_seconds, stats.lag_seconds)
    return total
