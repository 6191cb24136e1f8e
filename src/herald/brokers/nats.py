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
* *No shared offsets, no history.*  Core NATS keeps nothing: publications carry
  ``offset`` 0 and epoch ``""``, :meth:`NatsBroker.history` with ``limit=0``
  returns ``StreamPosition(0, "")`` and any other history or recovery request
  raises :class:`~herald.exceptions.NotAvailableError` (subscribing with
  ``since`` answers ``recovered: false``).

**With JetStream** (``jetstream=True``): the same guarantees as the Redis broker.

* *One stream per deployment*, ``HERALD_<prefix>`` (or ``stream=``), capturing
  ``PREFIX.h.>``; a channel's history is the subject ``PREFIX.h.<hex(channel)>``.
  The stream is created (or updated) on connection and re-created when it is
  found missing (deleted, or the server restarted without storage).
* *Gap-free offsets across nodes.*  Every stored message carries the channel's
  offset and epoch in its envelope.  To publish, a node reads the subject's last
  message (offset ``n``, epoch ``e``, stream sequence ``s``) and appends offset
  ``n + 1`` with the header ``Nats-Expected-Last-Subject-Sequence: s``: JetStream
  rejects the append if anything was appended to the subject since, and the node
  retries with the new last message (optimistic concurrency).  Offsets are thus
  1, 2, 3... in the subject's stream order, however many nodes publish.
* *Epochs.*  Reads never write.  A channel with no live stream (the subject is
  empty: never used, stream deleted, server restarted without storage; or its
  last message expired, ``history_ttl``) reads as offset 0 in its *empty epoch*,
  computed by every node alike: a hash of the JetStream stream's creation time
  and the channel name (empty subject), or of the expired last message's epoch
  and sequence.  The next publish starts the stream at offset 1 in that epoch
  and atomically removes the old messages (``Nats-Rollup: sub``), so a
  subscriber told ``(0, epoch)`` continues, and a later stream of the channel
  never gets an earlier epoch (a re-created stream has another creation time; an
  expired last message another sequence).  :meth:`remove_history` replaces the
  channel's messages with an *epoch marker* (offset 0, a random epoch).  Purge a
  single channel only that way: a subject emptied by hand would read as its
  first epoch again.
* *Per-namespace history size and TTL* travel in headers of each message
  (``Herald-Keep``, ``Herald-Expires``) because stream limits are per stream:
  history reads return only the last ``Herald-Keep`` offsets that have not
  expired; namespaces without history publish with ``Nats-Rollup: sub`` (only
  the last message, which holds the offset, is kept); other subjects are trimmed
  to their history size every ``trim_every`` publications (``STREAM.PURGE`` with
  ``keep``).  ``max_age`` caps every message's age stream-wide (0: no cap);
  make it longer than the longest ``history_ttl``.
* *History reads* walk back from the last message through ``Herald-Prev`` (the
  stream sequence of the subject's previous message) with ``STREAM.MSG.GET``:
  one request per publication returned.
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
import base64
import contextlib
import hashlib
import inspect
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from ..config import non_negative
from ..exceptions import BrokerError, BrokerUnavailableError, ConfigError, NotAvailableError
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
    new_epoch,
)

logger = logging.getLogger("herald.brokers.nats")

#: The position every channel has on core NATS: no shared offsets, no epoch.
NO_STREAM = StreamPosition(0, "")

_NO_HISTORY = (
    "the NATS broker without JetStream keeps no history (core NATS stores nothing), so "
    "history and recovery are not available; use nats://host:port?jetstream=1 (a server "
    "started with -js) or the Redis broker for history and recovery"
)

# JetStream headers and API error codes used below.
_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_ROLLUP = "Nats-Rollup"
_KEEP = "Herald-Keep"
_EXPIRES = "Herald-Expires"
_PREV = "Herald-Prev"
_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_STREAM_NOT_FOUND = 10059
_ERR_NO_MESSAGE = 10037
_ERR_STREAM_NAME_IN_USE = 10058
#: Give up a publish after this many lost optimistic-concurrency races in a row.
_MAX_CONFLICTS = 200
_BAD_NAME_CHARS = " .*>/\\\t\r\n"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"NATS broker URL: expected a boolean, got {value!r}")


@dataclass(frozen=True, slots=True)
class NatsBrokerConfig:
    """How to reach NATS and what to keep.

    ``url``: ``nats://host:port`` (a comma-separated list for a cluster).
    ``prefix`` starts every subject (a single subject token).
    ``jetstream``: keep history and shared offsets in a JetStream stream (the
    server must run with JetStream, ``nats-server -js``).  The JetStream options:
    ``stream`` (name; default ``HERALD_<prefix>``), ``storage`` (``file`` or
    ``memory``), ``replicas``, ``max_age`` (seconds any message is kept at most,
    0: no cap), ``gap_wait`` (seconds a node waits for a missing offset before
    reading it from the stream), ``trim_every`` (publications between trims of a
    channel to its history size), ``request_timeout`` (seconds per JetStream request).

    :meth:`from_url` reads the same options from the broker URL's query string.
    """

    url: str = "nats://localhost:4222"
    prefix: str = "herald"
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.5
    jetstream: bool = False
    stream: str = ""
    storage: str = "file"
    replicas: int = 1
    max_age: float = 0.0
    gap_wait: float = 0.25
    trim_every: int = 16
    request_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in _BAD_NAME_CHARS):
            raise ConfigError("NATS prefix must be a single subject token (no '.', '*', '>')")
        if self.stream and any(c in self.stream for c in _BAD_NAME_CHARS):
            raise ConfigError(f"invalid JetStream stream name {self.stream!r}")
        if self.storage not in ("file", "memory"):
            raise ConfigError("NATS storage must be 'file' or 'memory'")
        if self.replicas < 1 or self.max_age < 0 or self.gap_wait <= 0 or self.trim_every < 1:
            raise ConfigError("NATS broker: replicas and trim_every must be >= 1, max_age >= 0, gap_wait > 0")

    @property
    def stream_name(self) -> str:
        return self.stream or f"HERALD_{self.prefix}"

    @classmethod
    def from_url(cls, url: str) -> NatsBrokerConfig:
        """``nats://host:4222?jetstream=1&prefix=app&max_age=86400`` -> config.

        Query options: ``jetstream``, ``prefix``, ``stream``, ``storage``,
        ``replicas``, ``max_age``, ``gap_wait``, ``trim_every``, ``connect_timeout``,
        ``reconnect_wait``, ``request_timeout``.  An unknown or malformed option
        raises :class:`ConfigError`.
        """
        base, _, query = url.partition("?")
        values: dict[str, Any] = {}
        converters: dict[str, Callable[[str], Any]] = {
            "jetstream": _flag,
            "prefix": str,
            "stream": str,
            "storage": str,
            "replicas": int,
            "max_age": float,
            "gap_wait": float,
            "trim_every": int,
            "connect_timeout": non_negative,
            "reconnect_wait": non_negative,
            "request_timeout": non_negative,
        }
        for key, value in parse_qsl(query, keep_blank_values=True):
            convert = converters.get(key)
            if convert is None:
                raise ConfigError(f"unknown NATS broker URL option {key!r} (known: {', '.join(converters)})")
            try:
                values[key] = convert(value)
            except ValueError as exc:
                raise ConfigError(f"NATS broker URL option {key}={value!r}: {exc}") from exc
        return cls(url=base, **values)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One stored message of a channel's subject (offset 0: an epoch marker)."""

    seq: int
    publication: Publication
    keep: int
    expires: int  # ms since the Unix epoch; 0: never
    prev: int  # stream sequence of the subject's previous message (0: none)

    def expired(self, now_ms: int) -> bool:
        return 0 < self.expires <= now_ms


@dataclass(slots=True)
class _Order:
    """A subscribed channel's delivery state on this node (JetStream mode)."""

    epoch: str | None = None  # None: the starting position is not known yet
    next: int = 1  # the offset to deliver next
    pending: dict[int, Publication] = field(default_factory=dict)
    early: list[Publication] = field(default_factory=list)  # before the start was known
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    filler: asyncio.Task[None] | None = None


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return headers


class NatsBroker(Broker):
    """Broker on NATS, with history through JetStream when configured.

    See the module docstring for what each mode can and cannot do.
    """

    def __init__(self, config: NatsBrokerConfig | None = None) -> None:
        self.config = config or NatsBrokerConfig()
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

        async def on_reconnected() -> None:
            logger.warning("NATS connection re-established")
            self._connected.set()
            if cfg.jetstream:
                self._tasks.spawn(self._after_reconnect())
            else:
                # Core NATS kept nothing of what was published meanwhile: say so.
                for channel in list(self._subscriptions):
                    self.gaps_lost += 1
                    await self._deliver(StreamGap(channel, NO_STREAM, NO_STREAM))

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
            for channel in list(self._subscriptions):
                self._subscriptions[channel] = await self._subscribe_subject(channel)
            await self._nc.flush()
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
            await nc.flush(timeout=max(int(self.config.connect_timeout), 1))
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
            await self._deliver(message)
            return
        async with order.lock:
            await self._accept(channel, order, message)

    async def _deliver(self, message: Publication | PresenceEvent | StreamGap) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            result = handler(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("broker handler failed for %s", message.channel)

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
        await self._drain(order)
        if order.pending and (order.filler is None or order.filler.done()):
            order.filler = self._tasks.spawn(self._fill_later(channel, order))

    async def _drain(self, order: _Order) -> None:
        while order.next in order.pending:
            publication = order.pending.pop(order.next)
            order.next += 1
            await self._deliver(publication)

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
                    await self._deliver(StreamGap(channel, last, history.position, epoch_changed=True))
                    return
                for publication in history.publications:
                    if publication.offset >= order.next and publication.offset not in order.pending:
                        order.pending[publication.offset] = publication
                        self.gaps_filled += 1
            await self._drain(order)
            if history is not None and (order.pending or history.position.offset >= order.next):
                # The stream no longer has the missing offsets (not kept, expired): report
                # them lost before anything after them, then go on after them.
                first = min(order.pending) if order.pending else history.position.offset + 1
                logger.warning("channel %s: offsets %d..%d are lost", channel, order.next, first - 1)
                last = StreamPosition(order.next - 1, order.epoch)
                self.gaps_lost += 1
                order.next = first
                await self._deliver(StreamGap(channel, last, StreamPosition(first - 1, order.epoch)))
                await self._drain(order)
            if order.pending and (order.filler is None or order.filler.done()):
                order.filler = self._tasks.spawn(self._fill_later(channel, order))

    # ------------------------------------------------------------ JetStream requests

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> Any:
        import nats.errors

        nc = self._connection()
        try:
            return await nc.request(subject, payload, timeout=self.config.request_timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS request failed: {exc!r}") from exc

    async def _api(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call ``$JS.API.<operation>``; re-creates the stream once when it is missing."""
        import nats.errors

        for attempt in range(2):
            try:
                msg = await self._request(f"$JS.API.{operation}", orjson.dumps(body))
            except nats.errors.NoRespondersError as exc:
                raise BrokerError("JetStream is not enabled on the NATS server (start it with -js)") from exc
            reply: dict[str, Any] = orjson.loads(msg.data)
            error = reply.get("error")
            if error and error.get("err_code") == _ERR_STREAM_NOT_FOUND and attempt == 0:
                self._stream_ready = False
                await self._ensure_stream()
                continue
            return reply
        raise BrokerError(f"JetStream stream {self.stream_name} could not be created")

    async def _ensure_stream(self) -> None:
        import nats.errors

        cfg = self.config
        body = {
            "name": self.stream_name,
            "subjects": [f"{cfg.prefix}.h.>"],
            "retention": "limits",
            "storage": cfg.storage,
            "num_replicas": cfg.replicas,
            "max_age": int(cfg.max_age * 1e9),
            "max_msgs_per_subject": -1,
            "discard": "old",
            "allow_rollup_hdrs": True,
            "deny_delete": False,
            "deny_purge": False,
        }
        for operation in ("CREATE", "UPDATE"):
            try:
                msg = await self._request(
                    f"$JS.API.STREAM.{operation}.{self.stream_name}", orjson.dumps(body)
                )
            except nats.errors.NoRespondersError as exc:
                raise BrokerError("JetStream is not enabled on the NATS server (start it with -js)") from exc
            error = orjson.loads(msg.data).get("error")
            if error is None:
                self._stream_ready = True
                return
            if error.get("err_code") != _ERR_STREAM_NAME_IN_USE:
                raise BrokerError(f"JetStream stream {self.stream_name}: {error.get('description')}")
        raise BrokerError(f"JetStream stream {self.stream_name} could not be updated")

    async def _store(self, subject: str, payload: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """Append to the stream; returns the ack or the error reply."""
        import nats.errors

        for attempt in range(2):
            try:
                msg = await self._request(subject, payload, headers)
            except nats.errors.NoRespondersError as exc:
                if attempt:
                    raise BrokerError(f"no JetStream stream captures {subject}") from exc
                self._stream_ready = False
                await self._ensure_stream()
                continue
            reply: dict[str, Any] = orjson.loads(msg.data)
            return reply
        raise AssertionError("unreachable")

    def _entry(self, channel: str, message: dict[str, Any]) -> _Entry:
        headers = _parse_headers(base64.b64decode(message.get("hdrs") or b""))
        data = base64.b64decode(message.get("data") or b"")
        publication = envelope.decode(channel, data)
        if not isinstance(publication, Publication):
            raise BrokerError(f"unexpected message in the history of {channel}")
        return _Entry(
            seq=int(message["seq"]),
            publication=publication,
            keep=int(headers.get(_KEEP, "0")),
            expires=int(headers.get(_EXPIRES, "0")),
            prev=int(headers.get(_PREV, "0")),
        )

    async def _get(self, channel: str, request: dict[str, Any]) -> _Entry | None:
        reply = await self._api(f"STREAM.MSG.GET.{self.stream_name}", request)
        error = reply.get("error")
        if error is not None:
            if error.get("err_code") == _ERR_NO_MESSAGE:
                return None
            raise BrokerError(f"JetStream read failed: {error.get('description')}")
        return self._entry(channel, reply["message"])

    async def _last(self, channel: str) -> _Entry | None:
        return await self._get(channel, {"last_by_subj": self.history_subject(channel)})

    async def _mark(self, channel: str, last: _Entry | None) -> _Entry | None:
        """Replace everything of the channel with an epoch marker (offset 0, a random epoch);
        None if another node appended first."""
        epoch = new_epoch()
        headers = {
            _EXPECTED: str(last.seq if last is not None else 0),
            _ROLLUP: "sub",
            _KEEP: "0",
            _EXPIRES: "0",
            _PREV: "0",
        }
        reply = await self._store(
            self.history_subject(channel), envelope.encode_publication(0, epoch, None, b""), headers
        )
        error = reply.get("error")
        if error is None:
            return _Entry(int(reply["seq"]), Publication(channel, 0, epoch, b""), 0, 0, 0)
        if error.get("err_code") == _ERR_WRONG_LAST_SEQUENCE:
            return None
        raise BrokerError(f"JetStream append failed: {error.get('description')}")

    async def _empty_epoch(self, channel: str, last: _Entry | None) -> str:
        """The epoch ``channel`` reads as while it has no live stream (``last`` is None or
        expired), and its next stream starts in: computed, never stored (module docstring)."""
        if last is not None:
            seed = f"expired:{last.publication.epoch}:{last.seq}"
        else:
            reply = await self._api(f"STREAM.INFO.{self.stream_name}", {})
            error = reply.get("error")
            if error is not None:
                raise BrokerError(f"JetStream stream info failed: {error.get('description')}")
            seed = f"new:{reply.get('created', '')}:{channel}"
        return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()[:8]

    async def _js_publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        subject = self.history_subject(channel)
        keep = max(options.history_size, 0)
        ttl_ms = int(options.history_ttl * 1000) if options.history_ttl > 0 else 0
        conflicts = 0
        while True:
            last = await self._last(channel)
            now = _now_ms()
            if last is None or last.expired(now):
                # First publication of a new stream, in the epoch readers were told: the old
                # messages go (rollup).
                offset, epoch, prev, rollup = 1, await self._empty_epoch(channel, last), 0, True
            else:
                offset, epoch = last.publication.offset + 1, last.publication.epoch
                prev, rollup = last.seq, keep == 0
            payload = envelope.encode_publication(offset, epoch, options.info, data)
            headers = {
                _EXPECTED: str(last.seq if last is not None else 0),
                _KEEP: str(keep),
                _EXPIRES: str(now + ttl_ms if ttl_ms else 0),
                _PREV: str(prev),
            }
            if rollup:
                headers[_ROLLUP] = "sub"
            reply = await self._store(subject, payload, headers)
            error = reply.get("error")
            if error is None:
                break
            if error.get("err_code") != _ERR_WRONG_LAST_SEQUENCE:
                raise BrokerError(f"JetStream append failed: {error.get('description')}")
            # Another node appended first: retry on top of its publication.
            conflicts += 1
            if conflicts >= _MAX_CONFLICTS:
                raise BrokerUnavailableError(f"JetStream publish to {channel}: too much contention")
            if conflicts > 2:
                await asyncio.sleep(random.uniform(0, 0.001 * conflicts))
        if keep and offset > keep and offset % self.config.trim_every == 0:
            with contextlib.suppress(BrokerError):
                await self._api(f"STREAM.PURGE.{self.stream_name}", {"filter": subject, "keep": keep})
        try:
            await self._publish(self.subject(channel), payload)
        except BrokerError as exc:
            # Stored but not fanned out: nodes fill the gap from the stream.
            logger.warning("fan-out of %s offset %d failed: %s", channel, offset, exc)
        return StreamPosition(offset, epoch)

    async def _js_history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        last = await self._last(channel)
        if last is None or last.expired(_now_ms()):
            # No live stream: nothing is written for a read (module docstring).
            return HistoryResult([], StreamPosition(0, await self._empty_epoch(channel, last)))
        now = _now_ms()
        top = last.publication
        position = StreamPosition(top.offset, top.epoch)
        if limit == 0 or top.offset == 0:
            return HistoryResult([], position)
        lowest = max(top.offset - last.keep, 0)
        if since is not None and since.epoch == top.epoch:
            lowest = max(lowest, since.offset)
        enough = limit if reverse and limit is not None else None
        items: list[Publication] = []
        entry: _Entry | None = last
        while (
            entry is not None
            and entry.publication.offset > lowest
            and entry.publication.epoch == top.epoch
            and not entry.expired(now)
        ):
            items.append(entry.publication)
            if entry.prev == 0 or (enough is not None and len(items) >= enough):
                break
            entry = await self._get(channel, {"seq": entry.prev})
        if not reverse:
            items.reverse()
        if limit is not None:
            items = items[:limit]
        return HistoryResult(items, position)

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
        for _ in range(_MAX_CONFLICTS):
            if await self._mark(channel, await self._last(channel)) is not None:
                return None
        raise BrokerUnavailableError(f"JetStream remove_history of {channel}: too much contention")

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
