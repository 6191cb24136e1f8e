"""The NATS broker: fan-out over core NATS, history and shared offsets through JetStream.

Two modes, chosen by :attr:`NatsBrokerConfig.jetstream` (or ``?jetstream=1`` on the
broker URL):

**Core NATS only** (the default).

* *Fan-out.*  A node subscribes once per channel to ``PREFIX.c.<hex(channel)>``
  (hex keeps any channel name a single, wildcard-free subject token) and
  publishes the envelope of :mod:`herald.brokers.envelope` there.  NATS keeps
  the order of one connection's messages, so publications *from one node* reach
  every node in the order they were published; publications of different nodes
  to the same channel have no global order.
* *No idempotent publish.*  A publish with an ``idempotency_key`` raises
  :class:`~herald.exceptions.NotAvailableError`: nothing is stored that nodes
  could check a key against.
* *No shared offsets, no history.*  Core NATS keeps nothing: publications carry
  ``offset`` 0 and epoch ``""``, :meth:`NatsBroker.history` with ``limit=0``
  returns ``StreamPosition(0, "")`` and any other history or recovery request
  raises :class:`~herald.exceptions.NotAvailableError` (subscribing with
  ``since`` answers ``recovered: false``).

**With JetStream** (``jetstream=True``): the same guarantees as the Redis broker.

* *History, offsets and epochs* live in one JetStream stream per deployment,
  written with optimistic concurrency so offsets are 1, 2, 3... however many
  nodes publish; see :mod:`herald.brokers.nats_jetstream`.
* *Delivery in offset order.*  After JetStream acknowledged the append, the
  publisher fans the envelope out on the core subject as in core mode.  Several
  publishers' fan-outs can overtake each other, so each node re-orders per
  channel: it knows the next offset it must deliver (read when it subscribed),
  delivers in order, drops duplicates, holds early ones, and when an offset is
  still missing after ``gap_wait`` seconds (a fan-out lost while a node or the
  publisher was disconnected) reads it from the stream.  After a reconnection
  every subscribed channel is re-synchronised from the stream the same way, so
  clients of a node that lost its link get what they missed, in order, without
  resubscribing.  When the history no longer has a missing offset (not kept by
  the namespace, or expired), or the stream was lost meanwhile (new epoch), the
  handler gets a :class:`~herald.brokers.base.StreamGap` before anything after
  it (the node closes the channel's subscribers with 4005, so they resume with
  ``since`` and learn ``recovered: false``); nothing is skipped silently.

**Presence** (both modes, :class:`NatsPresenceManager`): every node keeps a
replica of all nodes' presence.  ``add``/``remove`` apply locally at once and are
broadcast on ``PREFIX.presence``; the owning node re-broadcasts its entries every
``presence_ttl / 3`` seconds, so a node that starts (or reconnects) sees the
others' clients within that period, and a dead node's entries expire
``presence_ttl`` after its last refresh.

**Faults.**  nats-py reconnects by itself and re-subscribes every subject.  While
disconnected :meth:`NatsBroker.ready` is False and ``publish`` raises
:class:`~herald.exceptions.BrokerUnavailableError` (nats-py would otherwise
buffer the message and report success).  Without JetStream, publications made
while a node was disconnected are lost for its clients: after the reconnection
the broker hands a :class:`~herald.brokers.base.StreamGap` for every subscribed
channel, so those clients are told (4005, then ``recovered: false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..exceptions import BrokerError, BrokerUnavailableError, NotAvailableError
from ..presence.base import PresenceManager
from ..presence.memory import MemoryPresenceManager
from . import envelope
from .base import (
    BackgroundTasks,
    Broker,
    BrokerHandler,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamGap,
    StreamPosition,
)
from .nats_config import NatsBrokerConfig
from .nats_jetstream import JetStreamHistory

logger = logging.getLogger("herald.brokers.nats")

#: The position every channel has on core NATS: no shared offsets, no epoch.
NO_STREAM = StreamPosition(0, "")

_NO_IDEMPOTENCY = (
    "the NATS broker without JetStream cannot publish idempotently (core NATS stores "
    "nothing the nodes could agree on), so idempotency_key is refused; use "
    "nats://host:port?jetstream=1 (a server started with -js) or the Redis broker"
)

_NO_HISTORY = (
    "the NATS broker without JetStream keeps no history (core NATS stores nothing), so "
    "history and recovery are not available; use nats://host:port?jetstream=1 (a server "
    "started with -js) or the Redis broker for history and recovery"
)


async def _round_trip(nc: Any, timeout: int) -> None:
    """Return once the server has processed every command this connection sent so far
    (so a SUB sent before is registered: other connections' messages reach it).

    ``nc.flush()`` alone does not promise that with nats-py: SUB, UNSUB and PUB wait
    in nats-py's pending buffer until its flusher task writes them, but ``flush()``
    writes its PING straight to the socket, ahead of them.  The PONG can then come
    back before the server saw a SUB made just before, and a message another node
    publishes meanwhile misses this node.  So hand the pending buffer to the socket
    first (nats-py's own flusher, in order), then make the PING round trip.
    """
    # Bounded: the forced flush waits for the flusher task, which stops while disconnected.
    await asyncio.wait_for(nc._flush_pending(force_flush=True), timeout)
    await nc.flush(timeout=timeout)


@dataclass(slots=True)
class _Order:
    """A subscribed channel's delivery state on this node (JetStream mode)."""

    epoch: str | None = None  # None: the starting position is not known yet
    next: int = 1  # the offset to deliver next
    pending: dict[int, Publication] = field(default_factory=dict)
    early: list[Publication] = field(default_factory=list)  # before the start was known
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    filler: asyncio.Task[None] | None = None


class NatsBroker(JetStreamHistory, Broker):
    """Broker on NATS, with history through JetStream when configured.

    See the module docstring for what each mode can and cannot do.
    """

    def __init__(
        self, config: NatsBrokerConfig | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        """``clock``: the node's clock (default ``time.monotonic``), only ever compared with
        itself; history expiry follows the NATS server's clock (:mod:`.nats_jetstream`)."""
        self.config = config or NatsBrokerConfig()
        self._init_jetstream(clock or time.monotonic)
        self.node_id = secrets.token_hex(6)
        self._nc: Any = None
        self._handler: BrokerHandler | None = None
        self._subscriptions: dict[str, Any] = {}
        self._orders: dict[str, _Order] = {}
        self._connector: asyncio.Task[None] | None = None
        self._presence: NatsPresenceManager | None = None
        self._presence_sub: Any = None
        self._connected = asyncio.Event()
        self._closed = False
        self._stream_ready = False
        self._tasks = BackgroundTasks()
        #: Offsets read from the stream to fill a gap, and gaps reported lost (StreamGap)
        #: (for tests/metrics).
        self.gaps_filled = 0
        self.gaps_lost = 0

    # ------------------------------------------------------------ subjects

    def subject(self, channel: str) -> str:
        """The core subject carrying ``channel``'s envelopes (fan-out)."""
        return f"{self.config.prefix}.c.{channel.encode().hex()}"

    def history_subject(self, channel: str) -> str:
        """The JetStream subject keeping ``channel``'s history."""
        return f"{self.config.prefix}.h.{channel.encode().hex()}"

    def _channel_of(self, subject: str) -> str:
        return bytes.fromhex(subject.rsplit(".", 1)[1]).decode()

    @property
    def presence_subject(self) -> str:
        return f"{self.config.prefix}.presence"

    @property
    def stream_name(self) -> str:
        return self.config.stream_name

    def presence_manager(self) -> NatsPresenceManager:
        """The presence manager that shares this broker's connection (one per broker)."""
        if self._presence is None:
            self._presence = NatsPresenceManager(self)
        return self._presence

    # ------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        """Connect (waiting up to ``connect_timeout``; never fails: retries in the background)."""
        import nats

        self._handler = handler
        self._closed = False
        cfg = self.config

        async def on_disconnected() -> None:
            if self._connected.is_set() and not self._closed:
                logger.warning("NATS connection lost; reconnecting")
            self._connected.clear()
            # The server may restart without its streams, or be another one.
            self._forget_server_state(clock=True)

        async def on_reconnected() -> None:
            logger.warning("NATS connection re-established")
            self._connected.set()
            if cfg.jetstream:
                self._tasks.spawn(self._after_reconnect())
            else:
                # Core NATS kept nothing of what was published meanwhile: say so.
                for channel in list(self._subscriptions):
                    self.gaps_lost += 1
                    self._deliver(StreamGap(channel, NO_STREAM, NO_STREAM))

        async def on_error(exc: Exception) -> None:
            logger.debug("NATS error: %r", exc)

        async def connect() -> None:
            self._nc = await nats.connect(
                cfg.url.split(","),
                name=f"herald-{self.node_id}",
                connect_timeout=max(int(cfg.connect_timeout), 1),
                reconnect_time_wait=cfg.reconnect_wait,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                error_cb=on_error,
            )
            self._presence_sub = await self._nc.subscribe(self.presence_subject, cb=self._on_presence_message)
            if cfg.jetstream:
                # A stream deleted or created by anyone restarts its sequences: tips go.
                await self._nc.subscribe(
                    f"$JS.EVENT.ADVISORY.STREAM.*.{self.stream_name}", cb=self._on_advisory
                )
            for channel in list(self._subscriptions):
                self._subscriptions[channel] = await self._subscribe_subject(channel)
            await _round_trip(self._nc, max(int(cfg.connect_timeout), 1))
            self._connected.set()
            if cfg.jetstream:
                try:
                    await self._ensure_stream()
                except BrokerError as exc:
                    logger.error("JetStream stream %s: %s", self.stream_name, exc)
                # Channels registered while the connection was not up yet get their start.
                for channel in list(self._orders):
                    self._tasks.spawn(self._catch_up(channel))

        self._connector = asyncio.get_running_loop().create_task(connect(), name="herald-nats")
        try:
            await asyncio.wait_for(asyncio.shield(self._connector), cfg.connect_timeout)
        except TimeoutError:
            logger.warning("NATS %s not reachable yet; retrying in the background", cfg.url)

    async def close(self) -> None:
        self._closed = True
        self._handler = None
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connector
        self._connector = None
        for order in self._orders.values():
            if order.filler is not None:
                order.filler.cancel()
        await self._tasks.cancel_all()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = None
        self._connected.clear()
        self._subscriptions.clear()
        self._orders.clear()

    async def ready(self) -> bool:
        if self._live_connection() is None:
            return False
        if self.config.jetstream and not self._stream_ready:
            try:
                await self._ensure_stream()
            except BrokerError:
                return False
        return True

    def _live_connection(self) -> Any:
        nc = self._nc
        if nc is None or self._closed or not self._connected.is_set() or not nc.is_connected:
            return None
        return nc

    def _connection(self) -> Any:
        nc = self._live_connection()
        if nc is None:
            raise BrokerUnavailableError("NATS unavailable: not connected")
        return nc

    # ------------------------------------------------------------ subscriptions

    async def _subscribe_subject(self, channel: str) -> Any:
        return await self._nc.subscribe(self.subject(channel), cb=self._on_message)

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait until the server registered the interest (a flush round trip).

        With JetStream it also reads the channel's current position, the point from
        which this node delivers every publication in offset order.  Like the Redis
        broker: while disconnected this raises :class:`BrokerUnavailableError` but
        the channel stays registered and is subscribed on (re)connection, until
        :meth:`unsubscribe`.
        """
        if self._subscriptions.get(channel) is not None:
            return
        self._subscriptions[channel] = None
        if self.config.jetstream:
            self._orders.setdefault(channel, _Order())
        nc = self._connection()
        try:
            self._subscriptions[channel] = await self._subscribe_subject(channel)
            await _round_trip(nc, max(int(self.config.connect_timeout), 1))
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS subscribe failed: {exc!r}") from exc
        if self.config.jetstream:
            await self._catch_up(channel, raise_errors=True)

    async def unsubscribe(self, channel: str) -> None:
        order = self._orders.pop(channel, None)
        if order is not None and order.filler is not None:
            order.filler.cancel()
        subscription = self._subscriptions.pop(channel, None)
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "gaps_filled": self.gaps_filled,
            "gaps_lost": self.gaps_lost,
        }

    def channels(self) -> set[str]:
        return set(self._subscriptions)

    async def _on_message(self, msg: Any) -> None:
        if self._handler is None:
            return
        try:
            channel = self._channel_of(msg.subject)
            message = envelope.decode(channel, msg.data)
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            logger.warning("dropping malformed envelope on %s: %r", msg.subject, exc)
            return
        if channel not in self._subscriptions:
            return
        order = self._orders.get(channel)
        if order is None or not isinstance(message, Publication):
            self._deliver(message)
            return
        self._js_seen(message)
        async with order.lock:
            await self._accept(channel, order, message)

    # ------------------------------------------------------------ in-order delivery (JetStream)

    async def _accept(self, channel: str, order: _Order, publication: Publication) -> None:
        """Deliver ``publication`` in offset order (``order.lock`` is held)."""
        if order.epoch is None:
            order.early.append(publication)
            if len(order.early) > 10_000:  # the start never came: start from what we have
                early, order.early = order.early, []
                first = min(early, key=lambda p: p.offset)
                order.epoch, order.next = first.epoch, first.offset
                for item in early:
                    await self._accept(channel, order, item)
            return
        if publication.epoch != order.epoch:
            # The stream restarted (history lost): follow the new epoch from its start.
            order.epoch, order.next = publication.epoch, 1
            order.pending.clear()
        if publication.offset < order.next:
            return  # already delivered (or read from the stream)
        order.pending[publication.offset] = publication
        self._drain(order)
        if order.pending and (order.filler is None or order.filler.done()):
            order.filler = self._tasks.spawn(self._fill_later(channel, order))

    def _drain(self, order: _Order) -> None:
        while order.next in order.pending:
            publication = order.pending.pop(order.next)
            order.next += 1
            self._deliver(publication)

    async def _fill_later(self, channel: str, order: _Order) -> None:
        await asyncio.sleep(self.config.gap_wait)
        if self._orders.get(channel) is order and order.pending:
            await self._catch_up(channel)

    async def _after_reconnect(self) -> None:
        try:
            await self._ensure_stream()
        except BrokerError as exc:
            logger.warning("JetStream stream %s after reconnect: %s", self.stream_name, exc)
        for channel in list(self._orders):
            await self._catch_up(channel)

    async def _catch_up(self, channel: str, *, raise_errors: bool = False) -> None:
        """Read the stream and deliver everything after this node's position, in order.

        Sets the starting position of a new subscription; fills gaps a lost fan-out
        left; re-synchronises after a reconnection.  Raises only with ``raise_errors``
        (the subscribe path), else logs.
        """
        order = self._orders.get(channel)
        if order is None:
            return
        async with order.lock:
            if self._orders.get(channel) is not order:
                return
            since = StreamPosition(order.next - 1, order.epoch) if order.epoch is not None else None
            try:
                history = await self._js_history(channel, since=since, limit=None if since else 0)
            except BrokerError as exc:
                if raise_errors:
                    raise
                logger.warning("catching up %s failed: %s", channel, exc)
                if since is None:
                    return
                history = None
            if order.epoch is None:
                assert history is not None
                position = history.position
                order.epoch, order.next = position.epoch, position.offset + 1
                early, order.early = order.early, []
                for item in early:
                    await self._accept(channel, order, item)
                return
            if history is not None:
                if history.position.epoch != order.epoch:
                    # The stream was lost while we were not looking: what came after our
                    # position in it cannot be delivered any more.  Report, then follow
                    # the new stream from its current top.
                    logger.warning("channel %s: stream reset (new epoch)", channel)
                    last = StreamPosition(order.next - 1, order.epoch)
                    order.epoch = history.position.epoch
                    order.next = history.position.offset + 1
                    order.pending.clear()
                    self.gaps_lost += 1
                    self._deliver(StreamGap(channel, last, history.position, epoch_changed=True))
                    return
                for publication in history.publications:
                    if publication.offset >= order.next and publication.offset not in order.pending:
                        order.pending[publication.offset] = publication
                        self.gaps_filled += 1
            self._drain(order)
            if history is not None and (order.pending or history.position.offset >= order.next):
                # The stream no longer has the missing offsets (not kept, expired): report
                # them lost before anything after them, then go on after them.
                first = min(order.pending) if order.pending else history.position.offset + 1
                logger.warning("channel %s: offsets %d..%d are lost", channel, order.next, first - 1)
                last = StreamPosition(order.next - 1, order.epoch)
                self.gaps_lost += 1
                order.next = first
                self._deliver(StreamGap(channel, last, StreamPosition(first - 1, order.epoch)))
                self._drain(order)
            if order.pending and (order.filler is None or order.filler.done()):
                order.filler = self._tasks.spawn(self._fill_later(channel, order))

    # ------------------------------------------------------------ publishing

    async def _publish(self, subject: str, payload: bytes) -> None:
        nc = self._connection()
        try:
            await nc.publish(subject, payload)
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS publish failed: {exc!r}") from exc

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        """Append to the channel's stream (JetStream) and fan out.

        Without JetStream returns ``StreamPosition(0, "")``: core NATS has no offsets to share.
        """
        if self.config.jetstream:
            return await self._js_publish(channel, data, options)
        await self._publish(self.subject(channel), envelope.encode_publication(0, "", options.info, data))
        return NO_STREAM

    async def publish_idempotent(
        self, channel: str, data: bytes, options: PublishOptions, key: str, window: float
    ) -> tuple[StreamPosition, bool]:
        """With JetStream: once per key across nodes (its ``Nats-Msg-Id`` de-duplication,
        see :mod:`.nats_jetstream`).  Core NATS stores nothing that nodes could agree
        on, so it refuses the key rather than promise what it cannot keep."""
        if self.config.jetstream:
            return await self._js_publish_once(channel, data, options, key, window)
        raise NotAvailableError(_NO_IDEMPOTENCY)

    async def publish_event(self, event: PresenceEvent) -> None:
        await self._publish(self.subject(event.channel), envelope.encode_event(event))

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """With JetStream: see :meth:`Broker.history`.  Without it only ``limit=0`` works
        (the position, always ``(0, "")``); the rest raises NotAvailableError."""
        if self.config.jetstream:
            return await self._js_history(channel, since=since, limit=limit, reverse=reverse)
        if limit == 0:
            return HistoryResult([], NO_STREAM)
        raise NotAvailableError(_NO_HISTORY)

    async def remove_history(self, channel: str) -> None:
        """Replace the channel's messages with an epoch marker (rollup), so its next stream
        starts in a new epoch that no earlier stream had."""
        if not self.config.jetstream:
            return None  # nothing is stored
        await self._js_remove_history(channel)

    async def _on_advisory(self, msg: Any) -> None:
        if msg.subject.split(".")[4] in ("CREATED", "DELETED"):
            self._forget_server_state()

    # ------------------------------------------------------------ presence replication

    async def _broadcast_presence(self, message: dict[str, Any]) -> None:
        message["node"] = self.node_id
        await self._publish(self.presence_subject, orjson.dumps(message))

    async def _on_presence_message(self, msg: Any) -> None:
        manager = self._presence
        if manager is None:
            return
        try:
            message = orjson.loads(msg.data)
            if message.get("node") == self.node_id:
                return  # already applied locally
            await manager.apply(message)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("dropping malformed presence message: %r", exc)


class NatsPresenceManager(PresenceManager):
    """Presence replicated to every node over NATS (see the module docstring).

    Reads are local (no round trip); writes apply locally, then are broadcast.
    Raises :class:`BrokerUnavailableError` from ``add``/``remove`` while NATS is
    unreachable (the local replica is still updated).
    """

    def __init__(self, broker: NatsBroker, *, clock: Callable[[], float] | None = None) -> None:
        self.broker = broker
        self._local = MemoryPresenceManager(clock=clock or time.monotonic)

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        await self._local.add(channel, info, ttl)
        await self.broker._broadcast_presence(
            {"op": "add", "channel": channel, "info": info.as_dict(), "ttl": ttl}
        )

    async def remove(self, channel: str, client: str) -> None:
        await self._local.remove(channel, client)
        await self.broker._broadcast_presence({"op": "remove", "channel": channel, "client": client})

    async def apply(self, message: dict[str, Any]) -> None:
        """Apply another node's broadcast add/remove to the local replica."""
        channel = str(message["channel"])
        if message["op"] == "add":
            await self._local.add(channel, ClientInfo.from_dict(message["info"]), float(message["ttl"]))
        elif message["op"] == "remove":
            await self._local.remove(channel, str(message["client"]))
        else:
            raise ValueError(f"unknown presence op {message['op']!r}")

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return await self._local.presence(channel)


__all__ = ["NatsBroker", "NatsBrokerConfig", "NatsPresenceManager"]
