"""The NATS broker: fan-out across nodes over core NATS subjects.

What it does:

* **Fan-out.**  A node subscribes once per channel to ``PREFIX.c.<hex(channel)>``
  (hex keeps any channel name a single, wildcard-free subject token) and
  publishes the envelope of :mod:`herald.brokers.envelope` there.  NATS keeps
  the order of one connection's messages, so publications *from one node* reach
  every node in the order they were published; publications of different nodes
  to the same channel have no global order.
* **No shared offsets, no history.**  Core NATS keeps nothing, so there is no
  counter all nodes could share: publications carry ``offset`` 0 and epoch
  ``""`` ("not part of a stream"), :meth:`NatsBroker.history` with ``limit=0``
  returns ``StreamPosition(0, "")`` and any other history or recovery request
  raises :class:`~herald.exceptions.NotAvailableError`.  Subscribing with
  ``since`` therefore answers ``recovered: false``.  Use the Redis broker when
  clients must recover missed publications.  (History through JetStream is not
  implemented yet; ``NatsBrokerConfig(jetstream=True)`` is refused with a
  ``ConfigError`` rather than silently ignored.)
* **Presence** (:class:`NatsPresenceManager`): every node keeps a replica of all
  nodes' presence.  ``add``/``remove`` apply locally at once and are broadcast on
  ``PREFIX.presence``; the owning node re-broadcasts its entries every
  ``presence_ttl / 3`` seconds, so a node that starts (or reconnects) sees the
  others' clients within that period, and a dead node's entries expire
  ``presence_ttl`` after its last refresh.
* **Faults.**  nats-py reconnects by itself and re-subscribes every subject.
  While disconnected :meth:`NatsBroker.ready` is False and ``publish`` raises
  :class:`~herald.exceptions.BrokerUnavailableError` (nats-py would otherwise
  buffer the message and report success).  Publications made while a node was
  disconnected are lost for its clients (there is no history to recover from).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..exceptions import BrokerUnavailableError, ConfigError, NotAvailableError
from ..presence.base import PresenceManager
from ..presence.memory import MemoryPresenceManager
from . import envelope
from .base import (
    Broker,
    BrokerHandler,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    PublishOptions,
    StreamPosition,
)

logger = logging.getLogger("herald.brokers.nats")

#: The position every channel has on core NATS: no shared offsets, no epoch.
NO_STREAM = StreamPosition(0, "")

_NO_HISTORY = (
    "the NATS broker keeps no history (core NATS stores nothing), so history and recovery "
    "are not available; use the Redis broker (--broker redis://...) for history and recovery"
)


@dataclass(frozen=True, slots=True)
class NatsBrokerConfig:
    """``url``: ``nats://host:port`` (a comma-separated list for a cluster).

    ``prefix`` starts every subject.  ``jetstream`` (history through JetStream)
    is not implemented yet and is refused.
    """

    url: str = "nats://localhost:4222"
    prefix: str = "herald"
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.5
    jetstream: bool = False

    def __post_init__(self) -> None:
        if self.jetstream:
            raise ConfigError(
                "NatsBrokerConfig(jetstream=True): history through JetStream is not implemented "
                "yet; use the Redis broker for history and recovery"
            )
        if not self.prefix or any(c in self.prefix for c in " .*>"):
            raise ConfigError("NATS prefix must be a single subject token (no '.', '*', '>')")


class NatsBroker(Broker):
    """Broker on core NATS.  See the module docstring for what it can and cannot do."""

    def __init__(self, config: NatsBrokerConfig | None = None) -> None:
        self.config = config or NatsBrokerConfig()
        self.node_id = secrets.token_hex(6)
        self._nc: Any = None
        self._handler: BrokerHandler | None = None
        self._subscriptions: dict[str, Any] = {}
        self._connector: asyncio.Task[None] | None = None
        self._presence: NatsPresenceManager | None = None
        self._presence_sub: Any = None
        self._connected = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------ subjects

    def subject(self, channel: str) -> str:
        return f"{self.config.prefix}.c.{channel.encode().hex()}"

    def _channel_of(self, subject: str) -> str:
        return bytes.fromhex(subject.rsplit(".", 1)[1]).decode()

    @property
    def presence_subject(self) -> str:
        return f"{self.config.prefix}.presence"

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
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = None
        self._connected.clear()
        self._subscriptions.clear()

    async def ready(self) -> bool:
        return self._live_connection() is not None

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

        Like the Redis broker: while disconnected this raises
        :class:`BrokerUnavailableError` but the channel stays registered and is
        subscribed on (re)connection, until :meth:`unsubscribe`.
        """
        if self._subscriptions.get(channel) is not None:
            return
        self._subscriptions[channel] = None
        nc = self._connection()
        try:
            self._subscriptions[channel] = await self._subscribe_subject(channel)
            await nc.flush(timeout=max(int(self.config.connect_timeout), 1))
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS subscribe failed: {exc!r}") from exc

    async def unsubscribe(self, channel: str) -> None:
        subscription = self._subscriptions.pop(channel, None)
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    def channels(self) -> set[str]:
        return set(self._subscriptions)

    async def _on_message(self, msg: Any) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            channel = self._channel_of(msg.subject)
            message = envelope.decode(channel, msg.data)
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            logger.warning("dropping malformed envelope on %s: %r", msg.subject, exc)
            return
        if channel not in self._subscriptions:
            return
        try:
            result = handler(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("broker handler failed for %s", channel)

    # ------------------------------------------------------------ publishing

    async def _publish(self, subject: str, payload: bytes) -> None:
        nc = self._connection()
        try:
            await nc.publish(subject, payload)
        except Exception as exc:
            raise BrokerUnavailableError(f"NATS publish failed: {exc!r}") from exc

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        """Fan out; returns ``StreamPosition(0, "")`` (core NATS has no offsets to share)."""
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
        """Only ``limit=0`` (the position, always ``(0, "")``) works; the rest raises NotAvailableError."""
        if limit == 0:
            return HistoryResult([], NO_STREAM)
        raise NotAvailableError(_NO_HISTORY)

    async def remove_history(self, channel: str) -> None:
        return None  # nothing is stored

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
