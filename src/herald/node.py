"""The node: wires the hub, the broker, presence, namespaces and app hooks.

One node runs per process.  It subscribes the broker to a channel once, when
the first local client subscribes, and forwards every publication the broker
delivers to the hub for local fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter

from .auth import TokenVerifier
from .brokers.base import (
    Broker,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamPosition,
)
from .brokers.memory import MemoryBroker
from .codes import CloseCode, ErrorCode
from .config import NamespaceOptions, Settings
from .connection import Connection
from .exceptions import BrokerError, BrokerUnavailableError, CommandError
from .hub import Hub
from .presence.base import PresenceManager, PresenceStats
from .presence.memory import MemoryPresenceManager
from .protocol.channels import ChannelRules, namespace_of, validate_channel
from .protocol.codec import PING_FRAME

logger = logging.getLogger("herald.node")


@dataclass(slots=True)
class ClientContext:
    """What hooks and RPC handlers know about a client.

    ``on_connect`` hooks may set ``user`` and ``info``.  ``scope`` is the ASGI
    scope of the handshake (headers, cookies, query string, client address).
    """

    client: str
    user: str = ""
    info: Any = None
    token: str | None = None
    scope: MutableMapping[str, Any] = field(default_factory=dict)
    name: str | None = None

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self.scope.get("headers", ()):
            if key == wanted:
                return bytes(value).decode("latin-1")
        return None


Hook = Callable[..., Any]


@dataclass(slots=True)
class RpcMethod:
    name: str
    handler: Callable[..., Any]
    params: TypeAdapter[Any] | None
    params_type: Any
    result_type: Any


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class Node:
    """This process's Herald engine.  Use :class:`herald.Herald` from applications."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        broker: Broker | None = None,
        presence: PresenceManager | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.id = secrets.token_hex(6)
        self.broker = broker or MemoryBroker()
        self.presence = presence or MemoryPresenceManager()
        self.hub = Hub()
        self.channel_rules = ChannelRules(max_length=self.settings.max_channel_length)
        secret = self.settings.token_secret
        self.tokens = TokenVerifier(
            secret=secret.get_secret_value() if secret is not None else None,
            public_key=self.settings.token_public_key,
            audience=self.settings.token_audience,
            issuer=self.settings.token_issuer,
        )
        self.rpc_methods: dict[str, RpcMethod] = {}
        self.hooks: dict[str, list[Hook]] = {
            "connect": [],
            "subscribe": [],
            "publish": [],
            "disconnect": [],
        }
        self._broker_subscriptions: dict[str, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False
        self.closing = False
        self.started_at = time.time()
        self.stats = {"messages_in": 0, "messages_out": 0, "publications": 0, "slow_consumers": 0}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.started:
            return
        await self.broker.start(self._on_broker_message)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeat_loop(), name="herald-heartbeat"))
        self._tasks.append(loop.create_task(self._presence_loop(), name="herald-presence"))
        self.started = True
        self.closing = False

    async def close(
        self, *, code: int = CloseCode.SERVICE_RESTART, reason: str = "server shutting down"
    ) -> None:
        """Disconnect every client (after flushing up to ``drain_timeout``) and stop."""
        if not self.started:
            return
        self.closing = True
        connections = list(self.hub.connections())
        for connection in connections:
            connection.close(code, reason)
        if connections:
            await asyncio.wait(
                [asyncio.ensure_future(c.closed.wait()) for c in connections],
                timeout=self.settings.drain_timeout,
            )
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.broker.close()
        await self.presence.close()
        self.started = False

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
    ) -> StreamPosition:
        """Publish ``data`` (any JSON value) to ``channel`` on every node.

        Returns the publication's position.  Raises ``CommandError`` for an invalid
        channel or unknown namespace, ``BrokerError`` when the broker fails.
        """
        name, options = self.check_channel(channel)
        return await self.publish_json(name, orjson.dumps(data), options, info=info)

    async def publish_json(
        self,
        channel: str,
        data_json: bytes,
        options: NamespaceOptions | None = None,
        *,
        info: ClientInfo | None = None,
    ) -> StreamPosition:
        """Publish pre-encoded JSON; the channel is assumed valid."""
        if options is None:
            options = self.namespace(channel)
        publish_options = PublishOptions(
            history_size=options.history_size, history_ttl=options.history_ttl, info=info
        )
        try:
            position = await self.broker.publish(channel, data_json, publish_options)
        except BrokerError:
            raise
        except Exception as exc:
            raise BrokerUnavailableError(f"broker publish failed: {exc}") from exc
        self.stats["publications"] += 1
        return position

    async def publish_internal(
        self, channel: str, data_json: bytes, info: ClientInfo | None
    ) -> None:
        """Publish on a reserved ``$`` channel (no history, no namespace)."""
        await self.broker.publish(channel, data_json, PublishOptions(info=info))

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

    async def _on_broker_message(self, message: Publication | PresenceEvent) -> None:
        if isinstance(message, Publication):
            self.stats["messages_out"] += self.hub.fan_out(message)
        else:
            self.hub.fan_out_event(message)

    async def ensure_broker_subscription(self, channel: str) -> None:
        """Make sure the broker delivers ``channel`` here (once per node, shared by callers)."""
        pending = self._broker_subscriptions.get(channel)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._broker_subscriptions[channel] = pending
            try:
                await self.broker.subscribe(channel)
            except BaseException as exc:
                del self._broker_subscriptions[channel]
                pending.set_exception(exc)
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
        if not options.presence:
            return
        info = ClientInfo(connection.client_id, connection.user, connection.info)
        await self.presence.add(channel, info, self.settings.presence_ttl)
        if options.join_leave:
            await self.broker.publish_event(PresenceEvent(channel, "join", info))

    async def leave(self, channel: str, connection: Connection) -> None:
        try:
            options = self.namespace(channel)
        except CommandError:
            return
        if not options.presence:
            return
        try:
            await self.presence.remove(channel, connection.client_id)
            if options.join_leave:
                info = ClientInfo(connection.client_id, connection.user, connection.info)
                await self.broker.publish_event(PresenceEvent(channel, "leave", info))
        except Exception as exc:
            logger.warning("presence leave %s failed: %r", channel, exc)

    async def presence_of(self, channel: str) -> dict[str, ClientInfo]:
        return await self.presence.presence(channel)

    async def presence_stats(self, channel: str) -> PresenceStats:
        return await self.presence.stats(channel)

    async def _presence_loop(self) -> None:
        """Refresh this node's presence entries so that they outlive the TTL only while we live."""
        period = max(self.settings.presence_ttl / 3, 0.05)
        while True:
            await asyncio.sleep(period)
            for connection in self.hub.connections():
                for channel in list(connection.channels):
                    if channel.startswith("$"):
                        continue
                    try:
                        if self.namespace(channel).presence:
                            info = ClientInfo(
                                connection.client_id, connection.user, connection.info
                            )
                            await self.presence.add(channel, info, self.settings.presence_ttl)
                    except Exception as exc:
                        logger.debug("presence refresh failed: %r", exc)

    # ------------------------------------------------------------ auth

    async def authenticate(self, ctx: ClientContext) -> None:
        """Set ``ctx.user`` from the connection token, if one was given."""
        if ctx.token:
            claims = self.tokens.verify(ctx.token)
            ctx.user = claims.user
            if claims.info is not None:
                ctx.info = claims.info

    async def authorize_subscribe(
        self, ctx: ClientContext, channel: str, token: str | None
    ) -> None:
        """Check a subscription token when one is given (its ``sub`` must be this user)."""
        if token is None:
            return
        claims = self.tokens.verify(token)
        if claims.user != ctx.user or (
            claims.channels is not None and channel not in claims.channels
        ):
            raise CommandError(
                ErrorCode.PERMISSION_DENIED, "subscription token does not grant this channel"
            )

    async def admit(self, connection: Connection) -> None:
        """Add a connected client to the hub."""
        self.hub.add(connection)

    async def disconnect_user(self, user: str, code: int, reason: str) -> int:
        """Close every local connection of ``user``; returns how many."""
        connections = self.hub.user_connections(user)
        for connection in connections:
            connection.close(code, reason)
        return len(connections)

    # ------------------------------------------------------------ connections

    async def unregister(self, connection: Connection, protocol_channels: bool) -> None:
        """Remove ``connection`` everywhere: hub, broker subscriptions, presence."""
        channels = list(connection.channels)
        emptied = self.hub.remove(connection)
        if protocol_channels:
            for channel in channels:
                await self.leave(channel, connection)
        for channel in emptied:
            await self.release_broker_subscription(channel)

    async def _heartbeat_loop(self) -> None:
        """Ping protocol clients, close dead and idle ones, enforce the handshake timeout."""
        settings = self.settings
        intervals = [
            v
            for v in (settings.ping_interval, settings.handshake_timeout, settings.idle_timeout)
            if v > 0
        ]
        tick = min(max(min(intervals) / 4, 0.05), 1.0) if intervals else 1.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for connection in self.hub.connections():
                self.check_liveness(connection, now)

    def check_liveness(self, connection: Connection, now: float) -> None:
        settings = self.settings
        if connection.is_closing or not connection.events:
            return
        if settings.ping_interval > 0:
            if now - connection.last_seen > settings.ping_interval + settings.pong_timeout:
                connection.abort(CloseCode.NO_PONG, "no pong")
                return
            if now - connection.last_ping >= settings.ping_interval:
                connection.last_ping = now
                connection.send(PING_FRAME)
        if (
            settings.idle_timeout > 0
            and not connection.channels
            and now - connection.last_active > settings.idle_timeout
        ):
            connection.close(CloseCode.IDLE_TIMEOUT, "idle timeout")

    # ------------------------------------------------------------ app extensions

    def add_hook(self, event: str, hook: Hook) -> None:
        if event not in self.hooks:
            raise ValueError(f"unknown hook event {event!r}; one of {sorted(self.hooks)}")
        self.hooks[event].append(hook)

    async def run_hooks(self, event: str, *args: Any) -> list[Any]:
        return [await _maybe_await(hook(*args)) for hook in self.hooks[event]]

    def add_rpc(self, name: str, handler: Callable[..., Any]) -> None:
        """Register ``handler(params, ctx)``; ``params`` is validated against its annotation."""
        hints = inspect.get_annotations(handler, eval_str=True)
        parameters = list(inspect.signature(handler).parameters)
        params_type = hints.get(parameters[0]) if parameters else None
        adapter = TypeAdapter(params_type) if params_type is not None else None
        self.rpc_methods[name] = RpcMethod(name, handler, adapter, params_type, hints.get("return"))

    async def call_rpc(self, name: str, params: Any, ctx: ClientContext) -> Any:
        method = self.rpc_methods.get(name)
        if method is None:
            raise CommandError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {name[:64]}")
        from pydantic import ValidationError

        args: list[Any] = []
        if method.params is not None:
            try:
                args.append(method.params.validate_python(params))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                raise CommandError(
                    ErrorCode.INVALID_PARAMS, f"{where}: {first['msg']}" if where else first["msg"]
                ) from None
        elif len(inspect.signature(method.handler).parameters) >= 1:
            args.append(params)
        if len(inspect.signature(method.handler).parameters) > len(args):
            args.append(ctx)
        result = await _maybe_await(method.handler(*args))
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return result
