"""The node: lifecycle, publishing and the broker side of one Herald process.

One node runs per process.  It subscribes the broker to a channel once, when
the first local client subscribes (ref-counted with the hub), and forwards every
message the broker delivers to the hub for local fan-out, synchronously: the
broker's handler never awaits.  It admits and unregisters connections, keeps
their liveness (pings, idle and handshake timeouts) and owns the counters
(:class:`~herald.stats.NodeStats`).

The rest lives beside it, one concept per module: the access policy
(:mod:`herald.policy`), RPC methods (:mod:`herald.rpc`), app hooks
(:mod:`herald.hooks`), presence entries and their refresh
(:mod:`herald.presence_upkeep`), node-to-node commands (:mod:`herald.control`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .auth import SUBSCRIPTION_TOKEN, TokenClaims, TokenVerifier
from .brokers.base import (
    Broker,
    BrokerMessage,
    ClientInfo,
    HistoryResult,
    Publication,
    PublishOptions,
    StreamGap,
    StreamPosition,
)
from .brokers.memory import MemoryBroker
from .codes import CloseCode, ErrorCode
from .config import NamespaceOptions, Settings
from .connection import Connection
from .context import ClientContext
from .control import CONTROL_CHANNEL, ControlChannel, DisconnectResult
from .engines import leases_for
from .exceptions import BrokerError, BrokerUnavailableError, CommandError, DisconnectError
from .hooks import AppHooks, Hook
from .hub import Hub
from .leases import USER, ConnectionLeases
from .policy import ChannelPolicy
from .presence.base import PresenceManager, PresenceStats
from .presence.memory import MemoryPresenceManager
from .presence_upkeep import PresenceUpkeep
from .protocol.channels import ChannelRules, namespace_of, validate_channel
from .protocol.encoders import PING_FRAME
from .protocol.idempotency import check_idempotency_key
from .proxy import install_proxy
from .rpc import RpcMethod, call_rpc, rpc_method
from .stats import NodeStats
from .tasks import stop_tasks

logger = logging.getLogger("herald.node")


#: Connections checked by the heartbeat loop before it lets the event loop turn.
HEARTBEATS_PER_TURN = 1000
#: Pings (or closes) the heartbeat loop writes before it lets the event loop turn: each
#: is a ``write()`` system call, and the thousand due together after a connect storm
#: held the loop 30-60 ms per turn, every walk (bench S5's p99 spikes).
PINGS_PER_TURN = 64


def heartbeat_tick(settings: Settings) -> float:
    """Seconds between two walks of the liveness checks over every connection.

    A quarter of the shortest of ``ping_interval``, ``handshake_timeout`` and
    ``idle_timeout``, and with pings on at most half of ``pong_timeout``, between 50 ms
    and 5 s: a ping goes out, and a dead or idle client is closed, at most that much
    later than its period says.  (The walk does not enforce ``handshake_timeout``: each
    session has its own deadline.  It still bounds the period, as it always did, which
    keeps pings within 2.5 s of due as shipped.)  Clients treat ``ping_interval + pong_timeout`` of
    silence as a dead link, so a ping must never be later than ``pong_timeout``.
    With the shipped settings that is 2.5 s: the walk was a fifth of an idle node's
    CPU with 10,000 clients when it ran every second (issue 19).
    """
    periods = [
        v / 4 for v in (settings.ping_interval, settings.handshake_timeout, settings.idle_timeout) if v > 0
    ]
    if settings.ping_interval > 0:
        periods.append(settings.pong_timeout / 2)
    return min(max(min(periods), 0.05), 5.0) if periods else 5.0


def _publish_options(options: NamespaceOptions, info: ClientInfo | None) -> PublishOptions:
    """What a broker needs of a channel's namespace to publish in it."""
    return PublishOptions(history_size=options.history_size, history_ttl=options.history_ttl, info=info)


class Node:
    """This process's Herald engine.  Use :class:`herald.Herald` from applications."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        broker: Broker | None = None,
        presence: PresenceManager | None = None,
        leases: ConnectionLeases | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.id = secrets.token_hex(6)
        self.broker = broker or MemoryBroker()
        self.presence = presence or MemoryPresenceManager()
        self.hub = Hub()
        self.channel_rules = ChannelRules(max_length=self.settings.max_channel_length)
        #: The one access-policy point: every command and API route asks it (herald.policy).
        self.policy = ChannelPolicy(self)
        secret = self.settings.token_secret
        self.tokens = TokenVerifier(
            secret=secret.get_secret_value() if secret is not None else None,
            public_key=self.settings.token_public_key,
            audience=self.settings.token_audience,
            issuer=self.settings.token_issuer,
            jwks_file=self.settings.token_jwks_file,
            leeway=self.settings.token_leeway,
        )
        #: Open connections per user and per client IP, across the cluster when the broker
        #: allows (herald.leases; engines.leases_for picks how).
        self.leases = leases or leases_for(
            self.settings, self.broker, on_error=lambda: self._broker_error("connection_leases")
        )
        self.rpc_methods: dict[str, RpcMethod] = {}
        self.hooks = AppHooks()
        #: The backend's HTTP hooks the settings name, registered before any app hook.
        self.proxy = install_proxy(self)
        self.control = ControlChannel(self.id, self.broker, self.hub)
        self.presence_upkeep = PresenceUpkeep(self)
        self._broker_subscriptions: dict[str, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False
        self.closing = False
        self.started_at = time.time()
        # Plain counters on the hot path; herald.metrics exports them at scrape time.
        self.stats = NodeStats()
        self.publications_by_namespace: dict[str, int] = {}
        self.broker_errors: dict[str, int] = {}
        #: Refused handshakes and connects by reason (origin, auth, limits, ...).
        self.rejected_handshakes: dict[str, int] = {}
        #: Refused commands and frames by reason (rate_limited, too_deep, permission_denied, ...).
        self.rejected_commands: dict[str, int] = {}
        #: Called with the seconds each broker publish took (set by herald.metrics).
        self.observe_publish_latency: Callable[[float], None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.started:
            return
        await self.broker.start(self._on_broker_message)
        await self.leases.start()
        # The shared control channel, and this node's own (cross-node emulation deliveries).
        for control_channel in (CONTROL_CHANNEL, self.control.node_channel):
            try:
                await self.broker.subscribe(control_channel)
            except BrokerError as exc:
                # Brokers keep a channel whose subscribe failed registered and subscribe it on
                # reconnection, so the control channel comes back with the broker.
                logger.warning("control channel not subscribed yet: %s", exc)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeat_loop(), name="herald-heartbeat"))
        # Node heartbeats on the control channel: the membership view (herald.membership).
        self._tasks.append(loop.create_task(self.control.run(), name="herald-membership"))
        self._tasks.append(loop.create_task(self.presence_upkeep.refresh_forever(), name="herald-presence"))
        self.started = True
        self.closing = False

    async def close(
        self, *, code: int = CloseCode.SERVICE_RESTART, reason: str = "server shutting down"
    ) -> None:
        """Disconnect every client (after flushing up to ``drain_timeout``) and stop."""
        if not self.started:
            return
        await self.drain(code=code, reason=reason)
        await stop_tasks(self._tasks)
        self._tasks.clear()
        # After the heartbeats stopped: the other nodes stop counting on this one at once.
        await self.control.leave()
        await self.leases.close()  # after the drain: this node's counts go back to zero
        await self.broker.close()
        await self.presence.close()
        if self.proxy is not None:
            await self.proxy.close()
        self.started = False

    async def drain(
        self, *, code: int = CloseCode.SERVICE_RESTART, reason: str = "server shutting down"
    ) -> None:
        """Send every client a disconnect push (with its reconnect hint) and close it
        with ``code`` once its queued frames are written; wait up to ``drain_timeout``.

        The broker stays open: publications accepted before (and during) the drain
        reach history.  ``/readyz`` reports unavailable from here on.
        """
        self.closing = True
        connections = list(self.hub.connections())
        for connection in connections:
            connection.close(code, reason)
        if connections:
            waiters = [asyncio.ensure_future(c.closed.wait()) for c in connections]
            await asyncio.wait(waiters, timeout=self.settings.drain_timeout)
            for waiter in waiters:
                waiter.cancel()
            # Whoever did not take its queue and close frame in time (a peer that stopped
            # reading) is cut off now.
            for connection in connections:
                if not connection.closed.is_set():
                    connection.abort(code, reason)

    def record_rejection(self, reason: str) -> None:
        """Count a refused handshake or connect (``origin``, ``auth``, ``limits``, ...)."""
        self.rejected_handshakes[reason] = self.rejected_handshakes.get(reason, 0) + 1

    def record_rejected_command(self, reason: str) -> None:
        """Count a command or frame refused for bad input or policy (see ``rejected_commands``)."""
        self.rejected_commands[reason] = self.rejected_commands.get(reason, 0) + 1

    def _broker_error(self, operation: str) -> None:
        self.broker_errors[operation] = self.broker_errors.get(operation, 0) + 1

    # ------------------------------------------------------------ namespaces

    def namespace(self, channel: str) -> NamespaceOptions:
        """Options of ``channel``'s namespace; raises UNKNOWN_NAMESPACE if not configured."""
        name = namespace_of(channel)
        options = self.settings.namespaces.get(name)
        if options is None:
            raise CommandError(ErrorCode.UNKNOWN_NAMESPACE, f"unknown namespace: {name}")
        return options

    def check_channel(self, channel: object) -> tuple[str, NamespaceOptions]:
        name = validate_channel(channel, self.channel_rules)
        return name, self.namespace(name)

    # ------------------------------------------------------------ publishing

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        info: ClientInfo | None = None,
        idempotency_key: str | None = None,
    ) -> StreamPosition:
        """Publish ``data`` (any JSON value) to ``channel`` on every node.

        Returns the publication's position.  With ``idempotency_key`` a retry with
        the same key on the same channel within ``settings.idempotency_window``
        seconds publishes nothing and returns the original position, on every node
        (docs/backends.md).  Raises ``CommandError`` for an invalid
        channel, unknown namespace or invalid key (``BAD_REQUEST``), ``BrokerError``
        when the broker fails (``NotAvailableError`` for a key on core NATS).
        """
        name, options = self.check_channel(channel)
        return await self.publish_json(
            name, orjson.dumps(data), options, info=info, idempotency_key=idempotency_key
        )

    async def publish_json(
        self,
        channel: str,
        data_json: bytes,
        options: NamespaceOptions | None = None,
        *,
        info: ClientInfo | None = None,
        idempotency_key: str | None = None,
    ) -> StreamPosition:
        """Publish pre-encoded JSON; the channel is assumed valid.

        ``idempotency_key``: as in :meth:`publish` (the key is checked here).
        """
        if options is None:
            options = self.namespace(channel)
        publish_options = _publish_options(options, info)
        duplicate = False
        if idempotency_key is not None:
            idempotency_key = check_idempotency_key(idempotency_key)
        started = time.perf_counter()
        try:
            if idempotency_key is None:
                position = await self.broker.publish(channel, data_json, publish_options)
            else:
                position, duplicate = await self.broker.publish_idempotent(
                    channel, data_json, publish_options, idempotency_key, self.settings.idempotency_window
                )
        except BrokerError:
            self._broker_error("publish")
            raise
        except Exception as exc:
            self._broker_error("publish")
            raise BrokerUnavailableError(f"broker publish failed: {exc}") from exc
        if not duplicate:  # a retry is not a publication
            self._count_publication(channel, started)
        return position

    def publish_json_now(
        self, channel: str, data_json: bytes, options: NamespaceOptions, *, info: ClientInfo | None = None
    ) -> StreamPosition:
        """:meth:`publish_json` without an idempotency key and without awaiting, on a
        broker that can (``broker.publishes_now``: the memory broker)."""
        started = time.perf_counter()
        try:
            position = self.broker.publish_now(channel, data_json, _publish_options(options, info))
        except Exception as exc:
            self._broker_error("publish")
            raise BrokerUnavailableError(f"broker publish failed: {exc}") from exc
        self._count_publication(channel, started)
        return position

    def _count_publication(self, channel: str, started: float) -> None:
        if self.observe_publish_latency is not None:
            self.observe_publish_latency(time.perf_counter() - started)
        self.stats.publications += 1
        namespace = namespace_of(channel)
        by_namespace = self.publications_by_namespace
        by_namespace[namespace] = by_namespace.get(namespace, 0) + 1

    async def publish_internal(
        self,
        channel: str,
        data_json: bytes,
        info: ClientInfo | None,
        *,
        idempotency_key: str | None = None,
    ) -> StreamPosition:
        """Publish on a reserved ``$`` channel (no history, no namespace).

        With ``idempotency_key``, once per key within ``settings.idempotency_window``
        (as :meth:`publish`); returns the (original) position.  For a channel of a
        namespace use :meth:`publish_json`, which applies the namespace's history.
        """
        if idempotency_key is None:
            return await self.broker.publish(channel, data_json, PublishOptions(info=info))
        position, _ = await self.broker.publish_idempotent(
            channel,
            data_json,
            PublishOptions(info=info),
            check_idempotency_key(idempotency_key),
            self.settings.idempotency_window,
        )
        return position

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        return await self.broker.history(channel, since=since, limit=limit, reverse=reverse)

    # ------------------------------------------------------------ broker side

    def _on_broker_message(self, message: BrokerMessage) -> None:
        """The broker's handler (synchronous: fan-out queues frames without awaiting)."""
        if message.channel == CONTROL_CHANNEL or message.channel == self.control.node_channel:
            if isinstance(message, Publication):
                self.control.on_message(message.data)
            elif isinstance(message, StreamGap):
                self.control.on_gap(message)  # logged at ERROR and counted, never ignored
            return
        if isinstance(message, Publication):
            self.stats.deliveries += self.hub.fan_out(message)
        elif isinstance(message, StreamGap):
            self._on_stream_gap(message)
        else:
            try:
                bound = self.namespace(message.channel).join_leave_max_subscribers
            except CommandError:
                return  # the namespace went away (an event from a node configured otherwise)
            self.hub.fan_out_event(message, bound)

    def _on_stream_gap(self, gap: StreamGap) -> None:
        """The broker lost publications of ``gap.channel``: close its local subscribers
        with 4005 (reconnect allowed) so they resume with ``since`` and learn
        ``recovered: false`` instead of silently missing messages.

        A history-less channel whose stream was merely reset (new epoch, nothing
        published in it yet) lost nothing its clients could have recovered: no close.
        """
        try:
            history_size = self.namespace(gap.channel).history_size
        except CommandError:
            history_size = 0
        if gap.epoch_changed and gap.position.offset == 0 and history_size == 0:
            return
        subscribers = self.hub.subscribers(gap.channel)
        logger.warning(
            "channel %s: publications after offset %d lost by the broker; closing %d subscribers (4005)",
            gap.channel,
            gap.last.offset,
            len(subscribers),
        )
        self.stats.stream_gaps += 1
        for connection in subscribers:
            connection.close(CloseCode.INSUFFICIENT_STATE, "publications lost; resume with since")

    def broker_subscribed(self, channel: str) -> bool:
        """Whether the broker already delivers ``channel`` here (no need to wait)."""
        pending = self._broker_subscriptions.get(channel)
        return (
            pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None
        )

    async def ensure_broker_subscription(self, channel: str) -> None:
        """Make sure the broker delivers ``channel`` here (once per node, shared by callers)."""
        pending = self._broker_subscriptions.get(channel)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._broker_subscriptions[channel] = pending
            try:
                await self.broker.subscribe(channel)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    self._broker_error("subscribe")
                    shared: BaseException = exc
                else:
                    # This caller was cancelled (its client left): the others waiting on the
                    # same subscribe must get an error they answer, not a cancellation.
                    shared = BrokerUnavailableError("broker subscribe was interrupted; retry")
                del self._broker_subscriptions[channel]
                pending.set_exception(shared)
                pending.exception()  # mark retrieved; callers get their own raise
                raise
            pending.set_result(None)
            return
        await asyncio.shield(pending)

    async def release_broker_subscription(self, channel: str) -> None:
        """Called when the last local subscriber left ``channel``."""
        if self.hub.subscriber_count(channel):
            return
        self._broker_subscriptions.pop(channel, None)
        try:
            await self.broker.unsubscribe(channel)
        except Exception as exc:  # a failed unsubscribe only costs traffic
            logger.warning("broker unsubscribe %s failed: %r", channel, exc)

    # ------------------------------------------------------------ presence

    async def join(self, channel: str, options: NamespaceOptions, connection: Connection) -> None:
        """Write ``connection``'s presence entry in ``channel`` (and announce the join)."""
        await self.presence_upkeep.join(channel, options, connection)

    async def leave(self, channel: str, connection: Connection) -> None:
        """Remove ``connection``'s presence entry from ``channel`` (and announce the leave)."""
        await self.presence_upkeep.leave(channel, connection)

    async def presence_of(self, channel: str) -> dict[str, ClientInfo]:
        return await self.presence.presence(channel)

    async def presence_stats(self, channel: str) -> PresenceStats:
        return await self.presence.stats(channel)

    # ------------------------------------------------------------ auth

    async def authenticate(self, ctx: ClientContext) -> None:
        """Set ``ctx.user`` from the connection token, if one was given."""
        if ctx.token:
            try:
                claims = self.tokens.verify(ctx.token)
            except CommandError:
                self.record_rejection("auth")
                raise
            ctx.user = claims.user
            ctx.claims = claims
            if claims.info is not None:
                ctx.info = claims.info

    async def authorize_subscribe(
        self, ctx: ClientContext, channel: str, token: str | None, *, private: bool = False
    ) -> TokenClaims | None:
        """Check the right to subscribe to ``channel`` beyond namespace rules; returns the
        subscription token's claims (None without a token).

        A subscription ``token`` must be valid, of the subscription kind (``typ:
        "subscription"``, else 111), name this user in ``sub`` and grant the channel
        in its ``channel`` (or ``channels``) claim (else 110).  A ``private``
        namespace needs such a token, or a connection token whose ``channels``
        claim grants the channel.  Called by :class:`herald.policy.ChannelPolicy`.
        """
        if token is not None:
            try:
                claims = self.tokens.verify(token, SUBSCRIPTION_TOKEN)
            except CommandError:
                self.record_rejection("subscription_token")
                raise
            if claims.user != ctx.user or not claims.grants(channel):
                self.record_rejection("subscription_token")
                raise CommandError(
                    ErrorCode.PERMISSION_DENIED, "subscription token does not grant this channel"
                )
            return claims
        if private and not (ctx.claims is not None and ctx.claims.grants(channel)):
            self.record_rejection("private_channel")
            raise CommandError(
                ErrorCode.PERMISSION_DENIED, "private channel: a subscription token is required"
            )
        return None

    def admit(self, connection: Connection) -> Awaitable[None] | None:
        """Add a connected client to the hub; returns an awaitable when its user must first
        be counted across the cluster (the client is added once it returns).

        Raises ``DisconnectError(4503)`` when the user already has
        ``max_connections_per_user`` connections (on this node, or on every node when
        ``leases`` are distributed: the user's lease is held while the connection is in
        the hub and given back by :meth:`unregister`).
        """
        if self.closing:
            raise DisconnectError(CloseCode.SERVICE_RESTART, "server shutting down")
        user, limit = connection.user, self.settings.max_connections_per_user
        if limit > 0 and user:
            # This node's own count first: free, and enough to refuse.
            if len(self.hub.user_connections(user)) >= limit:
                raise self._user_limit_reached(limit)
            if self.leases.distributed:
                return self._admit_counted(connection, user, limit)
        self.hub.add(connection)
        return None

    async def _admit_counted(self, connection: Connection, user: str, limit: int) -> None:
        if not await self.leases.acquire(USER, user, limit):
            raise self._user_limit_reached(limit)
        if self.closing:
            self.leases.release(USER, user)
            raise DisconnectError(CloseCode.SERVICE_RESTART, "server shutting down")
        self.hub.add(connection)  # no await since the acquire: the lease is the hub entry's

    def _user_limit_reached(self, limit: int) -> DisconnectError:
        self.record_rejection("user_limit")
        return DisconnectError(CloseCode.CONNECTION_LIMIT, f"more than {limit} connections for this user")

    def _release_user_lease(self, connection: Connection) -> None:
        """Give back the user lease of an admitted ``connection`` (see :meth:`admit`)."""
        if connection.user and self.settings.max_connections_per_user > 0 and self.leases.distributed:
            self.leases.release(USER, connection.user)

    async def disconnect_user(self, user: str, code: int, reason: str) -> DisconnectResult:
        """Close every connection of ``user`` on every node; returns how many were closed
        cluster-wide and which nodes answered (see :class:`herald.control.ControlChannel`)."""
        return await self.control.disconnect_user(user, code, reason)

    # ------------------------------------------------------------ connections

    async def unregister(self, connection: Connection, protocol_channels: bool) -> None:
        """Remove ``connection`` everywhere: hub, broker subscriptions, presence."""
        channels = list(connection.channels)
        # How a connection ended, and what it wrote, is counted per route by its session
        # (sessions.RouteSession.finish); slow consumers among admitted clients here.
        admitted = self.hub.get(connection.client_id) is connection
        if admitted and connection.close_code == CloseCode.SLOW_CONSUMER:
            self.stats.slow_consumers += 1
        emptied = self.hub.remove(connection)
        if admitted:
            self._release_user_lease(connection)
        if protocol_channels:
            for channel in channels:
                await self.leave(channel, connection)
        for channel in emptied:
            await self.release_broker_subscription(channel)

    async def _heartbeat_loop(self) -> None:
        """Ping protocol clients, close dead and idle ones (every :func:`heartbeat_tick`)."""
        tick = heartbeat_tick(self.settings)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            checked = written = 0
            for connection in list(self.hub.connections()):
                try:
                    written += self.check_liveness(connection, now)
                except Exception:  # one bad connection must not stop the heartbeats of all
                    logger.exception("liveness check failed", extra={"conn": connection.client_id})
                checked += 1
                if checked >= HEARTBEATS_PER_TURN or written >= PINGS_PER_TURN:
                    checked = written = 0
                    await asyncio.sleep(0)  # the walk must not hold the loop for long

    def check_liveness(self, connection: Connection, now: float) -> bool:
        """Ping ``connection`` when due, close it when dead or idle; True when that wrote
        to it (a ping or a close)."""
        settings = self.settings
        if connection.is_closing or not connection.events:
            return False
        written = False
        if settings.ping_interval > 0:
            if now - connection.last_seen > settings.ping_interval + settings.pong_timeout:
                connection.abort(CloseCode.NO_PONG, "no pong")
                return True
            if now - connection.last_ping >= settings.ping_interval:
                connection.last_ping = now
                connection.send(PING_FRAME)
                written = True
        if (
            settings.idle_timeout > 0
            and not connection.channels
            and now - connection.last_active > settings.idle_timeout
        ):
            connection.close(CloseCode.IDLE_TIMEOUT, "idle timeout")
            return True
        return written

    # ------------------------------------------------------------ app extensions

    def add_hook(self, event: str, hook: Hook) -> None:
        """Register an app hook (``connect``, ``subscribe``, ``publish``, ``disconnect``)."""
        self.hooks.add(event, hook)

    async def run_hooks(self, event: str, *args: Any) -> list[Any]:
        return await self.hooks.run(event, *args)

    def add_rpc(self, name: str, handler: Callable[..., Any]) -> None:
        """Register an RPC handler (see :func:`herald.rpc.rpc_method` for its arguments)."""
        self.rpc_methods[name] = rpc_method(name, handler)

    async def call_rpc(self, name: str, params: Any, ctx: ClientContext) -> Any:
        return await call_rpc(self.rpc_methods, name, params, ctx)
