"""Runs protocol v1 commands for one connection against the node.

The transport's read loop calls :meth:`ProtocolHandler.handle_text` for each
text frame.  Every command with an id gets exactly one reply, queued on the
connection; errors never close the connection unless the close is documented
(handshake timeout, forced disconnects).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, MutableMapping
from typing import Any

import orjson

from . import __version__
from .brokers.base import ClientInfo, Publication, StreamPosition
from .codes import CloseCode, ErrorCode
from .connection import Connection
from .exceptions import (
    BrokerError,
    CommandError,
    DisconnectError,
    NotAvailableError,
    ProtocolError,
)
from .limits import CommandRateLimiter, RateVerdict
from .node import ClientContext, Node
from .protocol import messages as m
from .protocol.channels import allowed_users
from .protocol.codec import (
    decode_command,
    dumps,
    encode_error,
    encode_publication,
    encode_reply,
    publication_dicts,
)
from .protocol.session import Session, SessionState

logger = logging.getLogger("herald.protocol")

#: The error code of the reply sent with a DisconnectError's close, by close code.
_DISCONNECT_ERRORS: dict[int, ErrorCode] = {
    CloseCode.CONNECTION_LIMIT: ErrorCode.LIMIT_EXCEEDED,
    CloseCode.RATE_LIMIT: ErrorCode.RATE_LIMITED,
    CloseCode.TOKEN_EXPIRED: ErrorCode.TOKEN_EXPIRED,
    CloseCode.SERVICE_RESTART: ErrorCode.NOT_AVAILABLE,
}


def _reason(code: int) -> str:
    """A counter label for an error code (hooks may raise codes Herald does not define)."""
    name = getattr(code, "name", None)
    return name.lower() if isinstance(name, str) else f"code_{int(code)}"


def render_publication(publication: Publication) -> str:
    """The protocol's publication push (the renderer for protocol connections)."""
    info = publication.info.as_dict() if publication.info is not None else None
    return encode_publication(
        publication.channel, publication.offset, publication.epoch, publication.data, info
    )


def _publication_items(publications: list[Publication]) -> list[dict[str, Any]]:
    return publication_dicts(
        (p.offset, p.data, p.info.as_dict() if p.info is not None else None) for p in publications
    )


class ProtocolHandler:
    """Protocol v1 for one client."""

    # One per open connection: no per-instance dict.
    __slots__ = ("_expiry", "_rpc_tasks", "connection", "context", "node", "rate", "session")

    def __init__(self, node: Node, connection: Connection, scope: MutableMapping[str, Any]) -> None:
        self.node = node
        self.connection = connection
        settings = node.settings
        self.session = Session(max_subscriptions=settings.max_subscriptions)
        self.context = ClientContext(client=connection.client_id, scope=scope)
        self._rpc_tasks: set[asyncio.Task[None]] = set()
        self.rate = CommandRateLimiter(
            settings.rate_limit, settings.rate_limit_burst, settings.rate_limit_strikes
        )
        self._expiry: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ entry points

    async def handle_text(self, text: str) -> None:
        """Handle one text frame from the client (the ASGI read loop awaits each in turn)."""
        pending = self.receive(text)
        if pending is not None:
            await pending

    def receive(self, text: str) -> Awaitable[None] | None:
        """Handle one text frame as far as it goes without awaiting.

        Returns None when the frame was handled completely (pongs, pings, malformed
        frames, refusals: no task needed), else an awaitable that finishes it; the
        caller must await it before handing over the connection's next frame.
        """
        connection = self.connection
        now = time.monotonic()
        connection.last_seen = now
        stats = self.node.stats
        stats["messages_in"] += 1
        stats["bytes_in"] += len(text)
        if connection.is_closing:
            return None
        settings = self.node.settings
        # Every frame costs a token, garbage included, so that a flood of anything is metered.
        verdict = self.rate.check()
        try:
            command = decode_command(text, max_depth=settings.max_json_depth, max_keys=settings.max_json_keys)
        except ProtocolError as exc:
            if verdict is not RateVerdict.OK:
                self._rate_limited(verdict, exc.command_id, None)
                return None
            self.node.record_rejected_command(_reason(exc.code))
            connection.send(encode_error(exc.command_id, None, int(exc.code), exc.message))
            return None
        if isinstance(command, m.PongCommand):
            # Pongs get no reply, over the limit or not; a flood of them still ends in 4504.
            if verdict is RateVerdict.ABUSE:
                self._rate_limited(verdict, None, None)
            return None
        if verdict is not RateVerdict.OK:
            self._rate_limited(verdict, command.id, command.type)
            return None
        connection.last_active = now
        try:
            self.session.begin(command.id, command.type)
        except ProtocolError as exc:
            connection.send(encode_error(command.id, command.type, int(exc.code), exc.message))
            return None
        if isinstance(command, m.RpcRequest):
            self._start_rpc(command)
            return None
        if isinstance(command, m.PingRequest):
            # The one command with nothing to wait for: answered here, without a task.
            connection.send(encode_reply(command.id, "ping", {}))
            self.session.finish(command.id)
            return None
        return self._finish(command)

    async def _finish(self, command: Any) -> None:
        try:
            await self._dispatch(command)
        finally:
            self.session.finish(command.id)

    def _rate_limited(self, verdict: RateVerdict, command_id: int | None, kind: str | None) -> None:
        """Answer a command over the rate limit; close 4504 once the strikes are used up."""
        connection = self.connection
        if verdict is RateVerdict.ABUSE:
            self.node.record_rejected_command("rate_limit_disconnect")
            logger.warning(
                "client %s (%s) closed: sustained flood over the rate limit",
                connection.client_id,
                connection.remote,
            )
            connection.close(CloseCode.RATE_LIMIT, "rate limit exceeded")
            return
        self.node.record_rejected_command("rate_limited")
        connection.send(encode_error(command_id, kind, int(ErrorCode.RATE_LIMITED), "rate limit exceeded"))

    # ------------------------------------------------------------ token expiry

    def _schedule_expiry(self) -> None:
        """Arm the timer that asks for a refresh when the connection token expires."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        claims = self.context.claims
        if claims is None or claims.expires_at is None:
            return
        delay = max(claims.expires_at - time.time(), 0.0)
        self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        grace = self.node.settings.token_refresh_grace
        self.connection.send(dumps({"type": "refresh", "grace": grace}))
        self._expiry = asyncio.get_running_loop().call_later(grace, self._refresh_missed)

    def _refresh_missed(self) -> None:
        self._expiry = None
        self.node.record_rejected_command("token_expired")
        self.connection.close(CloseCode.TOKEN_EXPIRED, "token expired")

    async def close(self) -> None:
        """The connection ended: cancel RPCs, unsubscribe everything, run disconnect hooks."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        # Disconnect hooks are for clients that got through connect (and its hooks).
        connected = self.session.state is SessionState.CONNECTED
        self.session.close()
        for task in list(self._rpc_tasks):
            task.cancel()
        await self.node.unregister(self.connection, protocol_channels=True)
        if connected:
            try:
                await self.node.run_hooks(
                    "disconnect",
                    self.context,
                    self.connection.close_code or 1005,
                    self.connection.close_reason,
                )
            except Exception:
                logger.exception("disconnect hook failed")

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, command: Any) -> None:
        handler = getattr(self, f"_cmd_{command.type}")
        connection = self.connection
        try:
            frame = await handler(command)
        except DisconnectError as exc:
            error = _DISCONNECT_ERRORS.get(exc.code, ErrorCode.UNAUTHORIZED)
            connection.send(encode_error(command.id, command.type, int(error), exc.reason))
            connection.close(exc.code, exc.reason)
            return
        except CommandError as exc:
            self.node.record_rejected_command(_reason(exc.code))
            frame = encode_error(command.id, command.type, int(exc.code), exc.message)
        except BrokerError as exc:
            logger.warning(
                "broker error on %s: %s",
                command.type,
                exc,
                extra={"conn": connection.client_id, "channel": getattr(command, "channel", None)},
            )
            frame = encode_error(
                command.id, command.type, int(ErrorCode.BROKER_UNAVAILABLE), "broker unavailable"
            )
        except Exception:
            logger.exception(
                "command %s failed",
                command.type,
                extra={"conn": connection.client_id, "user": connection.user},
            )
            frame = encode_error(command.id, command.type, int(ErrorCode.INTERNAL), "internal error")
        if frame is not None:
            connection.send(frame)

    def _start_rpc(self, command: m.RpcRequest) -> None:
        if len(self._rpc_tasks) >= self.node.settings.max_rpc_in_flight:
            self.session.finish(command.id)
            self.connection.send(
                encode_error(command.id, "rpc", int(ErrorCode.LIMIT_EXCEEDED), "too many rpc calls in flight")
            )
            return

        async def run() -> None:
            try:
                await self._dispatch(command)
            finally:
                self.session.finish(command.id)

        task = asyncio.get_running_loop().create_task(run())
        self._rpc_tasks.add(task)
        task.add_done_callback(self._rpc_tasks.discard)

    # ------------------------------------------------------------ commands

    async def _cmd_connect(self, command: m.ConnectRequest) -> str:
        node, connection, ctx = self.node, self.connection, self.context
        # Browsers cannot set headers on a WebSocket handshake: the token may also come
        # as /connect?token=... (redacted from logs, see auth.RedactTokensFilter).
        ctx.token = command.token or ctx.query("token")
        ctx.name = command.name
        await node.authenticate(ctx)
        await node.run_hooks("connect", ctx)
        connection.user = ctx.user
        connection.info = ctx.info
        node.admit(connection)
        self.session.connected()
        logger.info(
            "client connected",
            extra={"conn": connection.client_id, "user": ctx.user, "remote": connection.remote},
        )
        self._schedule_expiry()
        settings = node.settings
        result = m.ConnectResult(
            client=connection.client_id,
            user=ctx.user,
            version=__version__,
            ping_interval=settings.ping_interval,
            pong_timeout=settings.pong_timeout,
        )
        return encode_reply(command.id, "connect", result)

    async def _cmd_refresh(self, command: m.RefreshRequest) -> str:
        """Replace the connection token; the new one must name the same user."""
        ctx = self.context
        claims = self.node.tokens.verify(command.token)
        if claims.user != self.connection.user:
            self.node.record_rejection("auth")
            raise CommandError(ErrorCode.UNAUTHORIZED, "token is for another user")
        ctx.token, ctx.claims = command.token, claims
        self._schedule_expiry()
        return encode_reply(command.id, "refresh", m.RefreshResult(expires_at=claims.expires_at))

    def _check_user_limited(self, channel: str) -> None:
        users = allowed_users(channel)
        if users is not None and self.connection.user not in users:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "channel is limited to other users")

    async def _cmd_subscribe(self, command: m.SubscribeRequest) -> None:
        """Sends its own reply: held live publications must follow it, not precede it."""
        node, connection = self.node, self.connection
        results: list[dict[str, Any]] = []
        held: list[tuple[str, int]] = []
        try:
            for item in command.channels:
                try:
                    result, top = await self._subscribe_one(item)
                except CommandError as exc:
                    results.append(_channel_error(item.channel, exc.code, exc.message))
                    continue
                except BrokerError as exc:
                    logger.warning("subscribe %s: %s", item.channel, exc)
                    results.append(
                        _channel_error(item.channel, ErrorCode.BROKER_UNAVAILABLE, "broker unavailable")
                    )
                    continue
                except Exception:
                    # A failing hook must not leave the channels before it half-subscribed
                    # under an error reply for the whole command.
                    logger.exception(
                        "subscribe %s failed", item.channel, extra={"conn": connection.client_id}
                    )
                    results.append(_channel_error(item.channel, ErrorCode.INTERNAL, "internal error"))
                    continue
                results.append(result)
                held.append((item.channel, top))
            connection.send(encode_reply(command.id, "subscribe", {"channels": results}))
        finally:
            # Live publications that raced the history read are sent after the reply,
            # skipping those the reply already carried.
            for channel, after in held:
                connection.release(channel, after)
        for channel, _ in held:
            if channel in connection.channels:
                await node.join(channel, node.namespace(channel), connection)

    async def _subscribe_one(self, item: m.ChannelSubscription) -> tuple[dict[str, Any], int]:
        node, connection, session = self.node, self.connection, self.session
        channel, options = node.check_channel(item.channel)
        if not options.allow_subscribe:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "subscribing is not allowed in this namespace")
        if not options.allow_anonymous and not connection.user:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "anonymous clients may not subscribe here")
        self._check_user_limited(channel)
        session.check_subscribe(channel)
        await node.authorize_subscribe(self.context, channel, item.token, private=options.private)
        await node.run_hooks("subscribe", self.context, channel)

        connection.hold(channel)
        node.hub.subscribe(channel, connection)
        session.subscribed(channel)
        try:
            await node.ensure_broker_subscription(channel)
            recovered: bool | None = None
            publications: list[Publication] = []
            since = item.since
            if since is not None:
                try:
                    history = await node.history(
                        channel, since=StreamPosition(since.offset, since.epoch), limit=None
                    )
                    recovered = _covers(since, history.publications, history.position)
                except NotAvailableError:
                    # The broker keeps no history (core NATS): say so instead of failing.
                    history = await node.history(channel, limit=0)
                    recovered = False
                position = history.position
                node.stats["recovered" if recovered else "not_recovered"] += 1
                if recovered:
                    publications = history.publications
            else:
                position = (await node.history(channel, limit=0)).position
        except BaseException:
            session.subscriptions.discard(channel)
            if node.hub.unsubscribe(channel, connection):
                await node.release_broker_subscription(channel)
            raise
        top = publications[-1].offset if publications else position.offset
        result = {
            "channel": channel,
            "epoch": position.epoch,
            "offset": max(top, position.offset),
            "recoverable": options.history_size > 0,
            "recovered": recovered,
            "publications": _publication_items(publications),
        }
        return result, top

    async def _cmd_unsubscribe(self, command: m.UnsubscribeRequest) -> str:
        node, connection = self.node, self.connection
        removed: list[str] = []
        for channel in command.channels:
            if channel not in self.session.subscriptions:
                continue
            self.session.unsubscribed(channel)
            if node.hub.unsubscribe(channel, connection):
                await node.release_broker_subscription(channel)
            await node.leave(channel, connection)
            removed.append(channel)
        if not removed:
            raise CommandError(ErrorCode.NOT_SUBSCRIBED)
        return encode_reply(command.id, "unsubscribe", {"channels": removed})

    async def _cmd_publish(self, command: m.PublishRequest) -> str:
        node, connection = self.node, self.connection
        channel, options = node.check_channel(command.channel)
        if not options.allow_publish:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "clients may not publish in this namespace")
        if not options.allow_anonymous and not connection.user:
            raise CommandError(ErrorCode.PERMISSION_DENIED, "anonymous clients may not publish here")
        self._check_user_limited(channel)
        data = command.data
        for replaced in await node.run_hooks("publish", self.context, channel, data):
            if replaced is not None:
                data = replaced
        info = ClientInfo(connection.client_id, connection.user, connection.info)
        position = await node.publish_json(channel, orjson.dumps(data), options, info=info)
        return encode_reply(command.id, "publish", {"offset": position.offset, "epoch": position.epoch})

    async def _cmd_rpc(self, command: m.RpcRequest) -> str:
        data = await self.node.call_rpc(command.method, command.params, self.context)
        return encode_reply(command.id, "rpc", {"data": data})

    def _readable(self, channel: str, allowed: bool, what: str) -> None:
        if not allowed:
            raise CommandError(ErrorCode.PERMISSION_DENIED, f"{what} is not allowed in this namespace")
        self._check_user_limited(channel)

    def _presence_channel(self, name: str) -> str:
        channel, options = self.node.check_channel(name)
        self._readable(channel, options.allow_presence, "presence")
        if not options.presence:
            raise CommandError(ErrorCode.NOT_AVAILABLE, "presence is off in this namespace")
        return channel

    async def _cmd_presence(self, command: m.PresenceRequest) -> str:
        clients = await self.node.presence_of(self._presence_channel(command.channel))
        return encode_reply(command.id, "presence", {"clients": {c: i.as_dict() for c, i in clients.items()}})

    async def _cmd_presence_stats(self, command: m.PresenceStatsRequest) -> str:
        stats = await self.node.presence_stats(self._presence_channel(command.channel))
        return encode_reply(
            command.id,
            "presence_stats",
            {"num_clients": stats.num_clients, "num_users": stats.num_users},
        )

    async def _cmd_history(self, command: m.HistoryRequest) -> str:
        node = self.node
        channel, options = node.check_channel(command.channel)
        self._readable(channel, options.allow_history, "history")
        if options.history_size == 0:
            raise CommandError(ErrorCode.NOT_AVAILABLE, "history is off in this namespace")
        max_limit = node.settings.max_history_limit
        limit = max_limit if command.limit is None else min(command.limit, max_limit)
        since = command.since
        position_since = StreamPosition(since.offset, since.epoch) if since is not None else None
        history = await node.history(channel, since=position_since, limit=limit, reverse=command.reverse)
        if since is not None and since.epoch != history.position.epoch:
            raise CommandError(ErrorCode.UNRECOVERABLE_POSITION, "epoch changed: the stream was reset")
        return encode_reply(
            command.id,
            "history",
            {
                "publications": _publication_items(history.publications),
                "offset": history.position.offset,
                "epoch": history.position.epoch,
            },
        )


def _channel_error(channel: str, code: int, message: str) -> dict[str, Any]:
    """A subscribe result item for a channel that was not subscribed."""
    return {"channel": channel[:255], "error": {"code": int(code), "message": message}}


def _covers(since: m.StreamPositionModel, publications: list[Publication], top: StreamPosition) -> bool:
    """Whether ``publications`` are exactly everything after ``since`` up to ``top``."""
    if since.epoch != top.epoch or since.offset > top.offset:
        return False
    if since.offset == top.offset:
        return True
    return (
        bool(publications)
        and publications[0].offset == since.offset + 1
        and publications[-1].offset == top.offset
    )


__all__ = ["ProtocolHandler", "render_publication"]
