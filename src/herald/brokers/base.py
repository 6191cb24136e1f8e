"""The broker interface: how nodes exchange publications and keep history.

A broker carries opaque bytes (``data`` is the JSON the publisher sent) in a
small envelope and never imports the wire models; only the node converts.

Contract every broker keeps (checked by ``tests/brokers/conformance.py``):

* **Node-level subscriptions.**  :meth:`Broker.subscribe` is called once per
  channel by a node that has local subscribers (the hub ref-counts), and
  :meth:`Broker.unsubscribe` when the last one leaves.  Both are idempotent.
* **Offsets.**  :meth:`Broker.publish` assigns the channel's next offset
  (1, 2, 3, ... with no gap) and returns the new :class:`StreamPosition`.
  Publications of one channel reach every subscribed node in offset order.
* **Epoch.**  A channel's epoch is fixed for the life of its stream.  When the
  stream is lost (history expired entirely, broker restarted empty), offsets
  restart and the epoch changes, so a client holding an old position learns
  that recovery is impossible.
* **History.**  With ``history_size > 0`` the broker keeps the last
  ``history_size`` publications for ``history_ttl`` seconds.
* **Idempotent publish.**  :meth:`Broker.publish_idempotent` publishes once per
  channel and key within a window, across nodes, and returns the original
  position to every retry.
* **Events.**  Join/leave events are fanned out like publications but carry no
  offset and are never stored.
* **Gaps.**  A broker that learns it missed publications of a subscribed channel
  it cannot deliver any more (its link to the backend dropped and the history no
  longer covers them, or the stream was lost) hands the handler a
  :class:`StreamGap` instead of skipping them silently.
* **Delivery.**  Messages reach the node through one synchronous
  :data:`BrokerHandler` (the node fans out without awaiting), always through
  :meth:`Broker._deliver`, and only for channels this node subscribed to and
  only between :meth:`Broker.start` and :meth:`Broker.close`.
* **Handler errors.**  An exception raised by the handler is logged and counted
  (:attr:`Broker.handler_errors`) and goes no further: it never reaches the
  publisher, never stops the broker's reader, and the next message is delivered
  as usual.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import secrets
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

# The value types live in the protocol (the client shares them); re-exported here.
from ..protocol.values import ClientInfo as ClientInfo
from ..protocol.values import StreamPosition as StreamPosition
from ..tasks import stop_tasks


def new_epoch() -> str:
    """A fresh random epoch for a stream that starts (again) at offset 1."""
    return secrets.token_hex(4)


#: Generation counters a broker keeps for the empty epochs of its channels (memory,
#: Redis): every stream creation in a channel's bucket increments that bucket's.
EPOCH_BUCKETS = 16384


def epoch_bucket(channel: str) -> int:
    """The generation counter ``channel``'s streams share (``crc32(channel) % EPOCH_BUCKETS``)."""
    return zlib.crc32(channel.encode()) % EPOCH_BUCKETS


class BackgroundTasks:
    """Tasks a broker starts on its own (readers, catch-ups) and must stop on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A task that dies of an error must say so now, not at garbage collection (if ever).
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("broker task %s failed: %r", task.get_name(), exc, exc_info=exc)

    async def cancel_all(self) -> None:
        await stop_tasks(list(self._tasks))


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication in a channel's stream."""

    channel: str
    offset: int
    epoch: str
    data: bytes  # JSON-encoded value
    info: ClientInfo | None = None


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A join or leave, fanned out to every node; never stored."""

    channel: str
    kind: str  # "join" | "leave"
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class StreamGap:
    """Publications of ``channel`` after ``last`` were missed by this node and are lost.

    Delivery continues after ``position`` (the stream's top when the gap was found).
    ``epoch_changed``: the stream itself was lost (``position`` is in a new epoch),
    so whether anything after ``last`` existed cannot be known.  The node closes the
    channel's local subscribers with close code 4005 so they resume with ``since``
    and learn ``recovered: false``.
    """

    channel: str
    last: StreamPosition
    position: StreamPosition
    epoch_changed: bool = False


@dataclass(frozen=True, slots=True)
class PublishOptions:
    """Per-publication options, taken from the channel's namespace."""

    history_size: int = 0
    history_ttl: float = 0.0
    info: ClientInfo | None = None


@dataclass(frozen=True, slots=True)
class HistoryResult:
    publications: list[Publication] = field(default_factory=list)
    position: StreamPosition = StreamPosition(0, "")  # noqa: RUF009 - frozen value


#: Called by the broker for every publication or event on a channel this node subscribed to
#: (and with a :class:`StreamGap` when it lost publications it cannot deliver).
BrokerMessage = Publication | PresenceEvent | StreamGap
#: Synchronous: the node queues frames without awaiting, so a broker never awaits its handler.
BrokerHandler = Callable[[BrokerMessage], None]

logger = logging.getLogger("herald.broker")


class Broker(abc.ABC):
    """Moves publications between nodes and keeps per-channel history."""

    #: The node's handler, set by :meth:`start` and cleared by :meth:`close`.
    _handler: BrokerHandler | None = None
    #: Messages whose handler raised (logged, then dropped; see the module docstring).
    handler_errors: int = 0
    #: True when :meth:`publish` and :meth:`publish_idempotent` suspend on a round trip
    #: *and* keep call order: calls whose coroutines first run in some order reach the
    #: backend in that order (their publications of one channel get increasing offsets).
    #: A node then keeps several of one client's publish commands in flight, so that
    #: they share round trips (replies still go out in command order).
    pipelines_publishes: bool = False
    #: True when :meth:`publish_now` publishes without awaiting (the memory broker).
    publishes_now: bool = False

    def _deliver(self, message: BrokerMessage) -> None:
        """Hand ``message`` to the node: the one way every broker delivers.

        A handler error is logged and counted here, so it can neither reach a
        publisher nor stop a reader loop (the contract's "handler errors" clause).
        """
        handler = self._handler
        if handler is None:
            return
        try:
            handler(message)
        except Exception:
            self.handler_errors += 1
            logger.exception("broker handler failed for %s", message.channel)

    def counters(self) -> dict[str, int]:
        """This broker's event counts since start, by name (exported as
        ``herald_broker_events{event=...}``); brokers add their own."""
        return {"handler_errors": self.handler_errors}

    @abc.abstractmethod
    async def start(self, handler: BrokerHandler) -> None:
        """Connect and start delivering subscribed channels' messages to ``handler``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections.  Idempotent."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel`` on this node.  Idempotent."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel`` on this node.  Idempotent."""

    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        """Append to history (if enabled) and fan out; return the new stream top."""

    def publish_now(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        """:meth:`publish` without awaiting, for a broker with :attr:`publishes_now` (a
        node then answers a client's publish without a task)."""
        raise NotImplementedError(f"{type(self).__name__} cannot publish without awaiting")

    @abc.abstractmethod
    async def publish_idempotent(
        self, channel: str, data: bytes, options: PublishOptions, key: str, window: float
    ) -> tuple[StreamPosition, bool]:
        """:meth:`publish` once per ``(channel, key)`` within ``window`` seconds.

        Returns ``(position, duplicate)``.  The first call publishes and remembers the
        position under the key for ``window`` seconds; a call with the same channel
        and key within that time publishes nothing and returns the remembered
        position with ``duplicate`` True.  This holds across every node of the
        broker: of two calls racing with the same key, exactly one publishes.  A
        broker that cannot keep that promise raises
        :class:`~herald.exceptions.NotAvailableError`.
        """

    @abc.abstractmethod
    async def publish_event(self, event: PresenceEvent) -> None:
        """Fan out a join or leave to every node subscribed to its channel."""

    @abc.abstractmethod
    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """Publications after ``since.offset`` (or all kept ones), at most ``limit``.

        ``limit=0`` returns only the current position.  With ``reverse`` the newest
        come first.  When ``since.epoch`` differs from the stream's epoch the
        publications of the current stream are returned; the caller compares epochs.
        """

    async def remove_history(self, channel: str) -> None:
        """Drop a channel's history (its epoch changes on the next publish)."""
        raise NotImplementedError

    async def ready(self) -> bool:
        """True when the broker is reachable and accepting publications."""
        return True

    def channels(self) -> set[str]:
        """Channels this node is subscribed to."""
        return set()
