"""Runs protocol v1 commands for one connection against the node.

The transport's read loop calls :meth:`CommandHandler.handle_text` for each
text frame.  Every command with an id gets exactly one reply, queued on the
connection; errors never close the connection unless the close is documented
(handshake timeout, forced disconnects).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, assert_never

import orjson

from . import __version__
from .brokers.base import ClientInfo, Publication, StreamPosition
from .codes import CloseCode, ErrorCode
from .connection import Connection
from .context import ClientContext, Handshake
from .exceptions import (
    BrokerError,
    CommandError,
    DisconnectError,
    NotAvailableError,
    ProtocolError,
)
from .hooks import earliest_expiry, first_answer
from .limits import CommandRateLimiter, RateVerdict
from .node import Node
from .pipeline import PIPELINE_DEPTH, ReplyPipeline
from .policy import Grant, Operation, check_epoch, clamp_history_limit, read_history, reply_byte_budget
from .protocol import messages as m
from .protocol.codec import decode_command
from .protocol.encoders import (
    encode_connect_reply,
    encode_error,
    encode_history_reply,
    encode_ping_reply,
    encode_presence_reply,
    encode_presence_stats_reply,
    encode_publication,
    encode_publish_reply,
    encode_refresh_reply,
    encode_rpc_reply,
    encode_sub_refresh_reply,
    encode_subscribe_reply,
    encode_unsubscribe,
    encode_unsubscribe_reply,
    publication_items,
    subscribe_error_item,
    subscribed_item,
)
from .protocol.gate import CommandGate, Phase
from .token_expiry import TokenExpiry

logger = logging.getLogger("herald.protocol")

#: The error code of the reply sent with a DisconnectError's close, by close code.
_DISCONNECT_ERRORS: dict[int, ErrorCode] = {
    CloseCode.CONNECTION_LIMIT: ErrorCode.LIMIT_EXCEEDED,
    CloseCode.RATE_LIMIT: ErrorCode.RATE_LIMITED,
    CloseCode.TOKEN_EXPIRED: ErrorCode.TOKEN_EXPIRED,
    CloseCode.SERVICE_RESTART: ErrorCode.NOT_AVAILABLE,
}


#: Commands that may be handled while pipelined publishes await their replies: another
#: publish (it joins the pipeline), a pong (no reply) and an rpc (answered out of order).
_OVERTAKING = frozenset({"publish", "pong", "rpc"})


def _reason(code: int) -> str:
    """A counter label for an error code (hooks may raise codes Herald does not define)."""
    name = getattr(code, "name", None)
    return name.lower() if isinstance(name, str) else f"code_{int(code)}"


def render_publication(publication: Publication) -> str:
    """The protocol's publication push (the renderer for protocol connections)."""
    return encode_publication(
        publication.channel, publication.offset, publication.epoch, publication.data, publication.info
    )


class CommandHandler:
    """Protocol v1 for one client."""

    # One per open connection: no per-instance dict.
    __slots__ = (
        "_expiry",
        "_pipeline",
        "_rpc_tasks",
        "connection",
        "context",
        "gate",
        "node",
        "rate",
    )

    def __init__(self, node: Node, connection: Connection, handshake: Handshake) -> None:
        self.node = node
        self.connection = connection
        settings = node.settings
        # The gate reads the connection's channels (kept by the hub): one owner of subscriptions.
        self.gate = CommandGate(connection.channels, max_subscriptions=settings.max_subscriptions)
        self.context = ClientContext(client=connection.client_id, handshake=handshake)
        # RPC and renewal tasks, and the token timers: created on first use.  Most
        # connections never need them, and an idle connection's every object is memory
        # and a walk of each full collection (issue 19's 10,000-connection runs).
        self._rpc_tasks: set[asyncio.Task[None]] | None = None
        self.rate = CommandRateLimiter(
            settings.rate_limit, settings.rate_limit_burst, settings.rate_limit_strikes
        )
        self._expiry: TokenExpiry | None = None
        # Replies of publishes in flight (made by the first pipelined publish).
        self._pipeline: ReplyPipeline | None = None

    @property
    def expiry(self) -> TokenExpiry:
        """The timers of this connection's tokens (:class:`TokenExpiry`)."""
        expiry = self._expiry
        if expiry is None:
            expiry = self._expiry = TokenExpiry(
                self.node, self.connection, self._end_subscription, self._renew
            )
        return expiry

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
        # Frames in are counted by the route's session (sessions.RouteSession.message).
        if connection.is_closing:
            return None
        settings = self.node.settings
        try:
            command: m.Request | m.PongCommand | None = decode_command(
                text, max_depth=settings.max_json_depth, max_keys=settings.max_json_keys
            )
        except ProtocolError as exc:
            # What the reply needs, not the error itself: its traceback (and its context's)
            # holds this frame, so keeping it here made a cycle that held the connection
            # for the cyclic collector.
            command, malformed = None, (exc.command_id, exc.command_type, exc.code, exc.message)
        pipeline = self._pipeline
        if pipeline and (command is None or command.type not in _OVERTAKING):
            # Publishes are in flight: this frame's reply must follow theirs.
            return self._after_replies(pipeline, text)
        # Every frame costs a token, garbage included, so that a flood of anything is metered.
        verdict = self.rate.check()
        if command is None:
            command_id, command_type, code, message = malformed
            if verdict is not RateVerdict.OK:
                self._rate_limited(verdict, command_id, command_type)
                return None
            self.node.record_rejected_command(_reason(code))
            connection.send(encode_error(command_id, command_type, int(code), message))
            return None
        # The tag narrows the union as isinstance would, for a fraction of the cost (pydantic
        # models' isinstance goes through ABCMeta): this runs for every frame.
        if command.type == "pong":
            # Pongs get no reply, over the limit or not; a flood of them still ends in 4504.
            if verdict is RateVerdict.ABUSE:
                self._rate_limited(verdict, None, None)
            return None
        if verdict is not RateVerdict.OK:
            self._rate_limited(verdict, command.id, command.type)
            return None
        connection.last_active = now
        try:
            self.gate.begin(command.id, command.type)
        except ProtocolError as exc:
            self._reply(None, encode_error(command.id, command.type, int(exc.code), exc.message))
            return None
        if command.type == "rpc":
            self._start_rpc(command)
            return None
        if command.type == "ping":
            # Nothing to wait for: answered here, without a task.
            connection.send(encode_ping_reply(command.id))
            self.gate.finish(command.id)
            return None
        if command.type == "publish":
            broker = self.node.broker
            if broker.pipelines_publishes:
                return self._start_publish(command)
            if broker.publishes_now and self._publish_now(command):
                return None
        return self._finish(command)

    def _publish_now(self, command: m.PublishRequest) -> bool:
        """Answer ``command`` without a task when nothing in it awaits: the broker
        publishes at once (memory), no hook is asked, no idempotency key.  False when it
        needs the awaiting path (nothing was done then)."""
        node = self.node
        if command.idempotency_key is not None or node.hooks.has("publish"):
            return False
        try:
            grant = node.policy.check_now(
                self.context, Operation.PUBLISH, command.channel, subscriptions=self.connection.channels
            )
            if grant is None:
                return False
            position = node.publish_json_now(
                grant.channel, orjson.dumps(command.data), grant.options, info=self._client_info()
            )
            frame: str | None = encode_publish_reply(command.id, position)
        except Exception as exc:
            frame = self._error_reply(command, exc)
        if frame is not None:
            self.connection.send(frame)
        self.gate.finish(command.id)
        return True

    def _reply(self, command_id: int | None, frame: str) -> None:
        """Send ``frame`` (the reply to command ``command_id``, whose id is then released;
        None: no id was reserved) after the pipelined replies still pending."""
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.add_ready(command_id, frame)
            return
        self.connection.send(frame)
        self.gate.finish(command_id)

    async def _after_replies(self, pipeline: ReplyPipeline, text: str) -> None:
        """Handle ``text`` once every pipelined reply before it is sent."""
        await pipeline.wait_until(0)
        pending = self.receive(text)
        if pending is not None:
            await pending

    async def _finish(self, command: m.Request) -> None:
        try:
            await self._dispatch(command)
        finally:
            self.gate.finish(command.id)

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
        self._reply(None, encode_error(command_id, kind, int(ErrorCode.RATE_LIMITED), "rate limit exceeded"))

    def _end_subscription(
        self, channel: str, code: int = ErrorCode.TOKEN_EXPIRED, reason: str = "subscription token expired"
    ) -> None:
        """Its subscription expired unrefreshed (or a ``sub_refresh`` hook refused it): end
        the subscription with an ``unsubscribe`` push of ``code``, keep the connection."""
        # Out of the hub now, so that no publication follows the unsubscribe push.
        emptied = self.node.hub.unsubscribe(channel, self.connection)
        self.connection.send(encode_unsubscribe(channel, int(code), reason))
        self._spawn(self._release(channel, emptied))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task cancelled with the connection, like RPCs."""
        self._track(asyncio.get_running_loop().create_task(work))

    def _track(self, task: asyncio.Task[None]) -> None:
        tasks = self._rpc_tasks
        if tasks is None:
            tasks = self._rpc_tasks = set()
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _arm_expiry(self, hook_expiry: float | None = None) -> None:
        """Arm the timer that asks for a refresh when the connection expires: at the
        connection token's ``exp`` or the connect hooks' expiry, whichever comes first."""
        claims = self.context.claims
        expires_at = earliest_expiry((), claims.expires_at if claims is not None else None, hook_expiry)
        if expires_at is not None or self._expiry is not None:
            self.expiry.arm(expires_at)

    def _renew(self, channel: str | None) -> bool:
        """An expiry arrived (the connection's, or ``channel``'s subscription's): when
        ``refresh`` (``sub_refresh``) hooks are registered, ask them in a task and return
        True; else the client is asked for a token (:class:`TokenExpiry`)."""
        if not self.node.hooks.has("refresh" if channel is None else "sub_refresh"):
            return False
        self._spawn(self._run_renewal(channel))
        return True

    async def _run_renewal(self, channel: str | None) -> None:
        """Ask the refresh (sub_refresh) hooks: an :class:`ExpiresAt` extends, no answer
        asks the client for a token, a refusal closes with 4004 (ends the subscription
        with the refusal's code), a ``DisconnectError`` closes with its code."""
        node, connection, ctx = self.node, self.connection, self.context
        if connection.is_closing or (channel is not None and channel not in connection.channels):
            return
        try:
            if channel is None:
                results = await node.run_hooks("refresh", ctx)
            else:
                results = await node.run_hooks("sub_refresh", ctx, channel)
        except DisconnectError as exc:
            connection.close(exc.code, exc.reason)
            return
        except Exception as exc:
            self._renewal_refused(channel, exc)
            return
        if connection.is_closing or (channel is not None and channel not in connection.channels):
            return
        expires_at = earliest_expiry(results)
        if expires_at is None:
            self.expiry.ask_client(channel)
        elif channel is None:
            self.expiry.arm(expires_at)
        else:
            self.expiry.arm_channel(channel, expires_at)

    def _renewal_refused(self, channel: str | None, exc: Exception) -> None:
        """A refresh (sub_refresh) hook refused or failed: close with 4004, or end the
        subscription with the refusal's code.  A frame of its own: a local of the awaiting
        coroutine holding the error would be held by the error's traceback in turn, a
        cycle that kept the whole connection for the cyclic collector."""
        refusal = exc if isinstance(exc, CommandError) else CommandError(ErrorCode.INTERNAL)
        if refusal is not exc:
            logger.exception("%s hook failed", "refresh" if channel is None else "sub_refresh")
        node, connection = self.node, self.connection
        if channel is None:
            node.record_rejected_command("token_expired")
            connection.close(CloseCode.TOKEN_EXPIRED, f"refresh refused: {refusal.message}"[:100])
        elif channel in connection.channels:
            node.record_rejected_command("subscription_token_expired")
            self._end_subscription(channel, refusal.code, refusal.message)

    async def _leave(self, channel: str) -> None:
        """Take this connection out of ``channel`` (hub, broker subscription, presence)."""
        await self._release(channel, self.node.hub.unsubscribe(channel, self.connection))

    async def _release(self, channel: str, emptied: bool) -> None:
        node = self.node
        if self._expiry is not None:
            self._expiry.disarm_channel(channel)
        if emptied:
            await node.release_broker_subscription(channel)
        await node.leave(channel, self.connection)

    async def close(self) -> None:
        """The connection ended: cancel RPCs, unsubscribe everything, run disconnect hooks."""
        if self._expiry is not None:
            self._expiry.cancel()
        # Disconnect hooks are for clients that got through connect (and its hooks).
        connected = self.gate.phase is Phase.CONNECTED
        self.gate.close()
        for task in list(self._rpc_tasks or ()):
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

    async def _run(self, command: m.Request) -> str | None:
        """Run one command; returns its reply frame (None: the command sent its own).

        Exhaustive over the command union (a tagged union on ``type``, which narrows
        ``command``): mypy fails here when a command type is added to the protocol
        without a handler.  Matching the tag string is cheaper than class patterns
        (pydantic's ``isinstance`` goes through ``ABCMeta``); the most frequent commands
        come first.
        """
        match command.type:
            case "publish":
                return await self._cmd_publish(command)
            case "rpc":
                return await self._cmd_rpc(command)
            case "subscribe":
                await self._cmd_subscribe(command)
                return None
            case "unsubscribe":
                return await self._cmd_unsubscribe(command)
            case "history":
                return await self._cmd_history(command)
            case "presence":
                return await self._cmd_presence(command)
            case "presence_stats":
                return await self._cmd_presence_stats(command)
            case "connect":
                return await self._cmd_connect(command)
            case "refresh":
                return await self._cmd_refresh(command)
            case "sub_refresh":
                return await self._cmd_sub_refresh(command)
            case "ping":
                return encode_ping_reply(command.id)
            case _:
                assert_never(command)

    async def _dispatch(self, command: m.Request) -> None:
        try:
            frame = await self._run(command)
        except Exception as exc:
            frame = self._error_reply(command, exc)
        if frame is not None:
            self.connection.send(frame)

    def _error_reply(self, command: m.Request, exc: Exception) -> str | None:
        """The reply to ``command``, which raised ``exc``; None when the error closed the
        connection (a :class:`DisconnectError`: its error reply is sent with the close)."""
        connection = self.connection
        if isinstance(exc, DisconnectError):
            error = _DISCONNECT_ERRORS.get(exc.code, ErrorCode.UNAUTHORIZED)
            connection.send(encode_error(command.id, command.type, int(error), exc.reason))
            connection.close(exc.code, exc.reason)
            return None
        if isinstance(exc, CommandError):
            self.node.record_rejected_command(_reason(exc.code))
            return encode_error(command.id, command.type, int(exc.code), exc.message)
        if isinstance(exc, BrokerError):
            logger.warning(
                "broker error on %s: %s",
                command.type,
                exc,
                extra={"conn": connection.client_id, "channel": getattr(command, "channel", None)},
            )
            return encode_error(
                command.id, command.type, int(ErrorCode.BROKER_UNAVAILABLE), "broker unavailable"
            )
        logger.error(
            "command %s failed",
            command.type,
            exc_info=exc,
            extra={"conn": connection.client_id, "user": connection.user},
        )
        return encode_error(command.id, command.type, int(ErrorCode.INTERNAL), "internal error")

    async def _start_publish(self, command: m.PublishRequest) -> None:
        """Check ``command`` and start its publication without waiting for the broker;
        the pipeline sends its reply in command order (see :mod:`herald.pipeline`).

        Awaited by the transport like any command, so the checks (hooks included) run
        in command order and each publication is started after the one before it; it
        waits beyond them only while the pipeline is full (backpressure).
        """
        try:
            grant, data = await self._publish_checks(command)
        except Exception as exc:
            frame = self._error_reply(command, exc)
            if frame is None:
                self.gate.finish(command.id)
            else:
                self._reply(command.id, frame)
            return
        pipeline = self._pipeline
        if pipeline is None:
            pipeline = self._pipeline = ReplyPipeline(self.connection.send, self.gate.finish)
        # Tasks take their first step in the order they were made, and the publication is
        # handed to the broker in that step (no await before): publications reach the
        # broker in command order, and a broker that pipelines keeps that order.
        reply = asyncio.get_running_loop().create_task(self._published(command, grant, data))
        pipeline.add(command.id, reply)
        if len(pipeline) >= PIPELINE_DEPTH:
            await pipeline.wait_until(PIPELINE_DEPTH - 1)

    async def _published(self, command: m.PublishRequest, grant: Grant, data: Any) -> str | None:
        """The reply to a pipelined publish (errors mapped as for any command)."""
        try:
            return await self._publish(command, grant, data)
        except Exception as exc:
            return self._error_reply(command, exc)

    def _start_rpc(self, command: m.RpcRequest) -> None:
        if len(self._rpc_tasks or ()) >= self.node.settings.max_rpc_in_flight:
            self.gate.finish(command.id)
            self.connection.send(
                encode_error(command.id, "rpc", int(ErrorCode.LIMIT_EXCEEDED), "too many rpc calls in flight")
            )
            return

        async def run() -> None:
            try:
                await self._dispatch(command)
            finally:
                self.gate.finish(command.id)

        self._track(asyncio.get_running_loop().create_task(run()))

    # ------------------------------------------------------------ commands

    async def _cmd_connect(self, command: m.ConnectRequest) -> str:
        node, connection, ctx = self.node, self.connection, self.context
        # Browsers cannot set headers on a WebSocket handshake: the token may also come
        # as /connect?token=... (redacted from logs, see auth.RedactTokensFilter).
        ctx.token = command.token or ctx.query("token")
        ctx.name = command.name
        await node.authenticate(ctx)
        connect_results = await node.run_hooks("connect", ctx)
        connection.user = ctx.user
        connection.info = ctx.info
        admitting = node.admit(connection)
        if admitting is not None:  # the user is counted across the cluster first
            await admitting
        self.gate.connected()
        level = logging.INFO if node.settings.access_log else logging.DEBUG
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "client connected",
                extra={"conn": connection.client_id, "user": ctx.user, "remote": connection.remote},
            )
        self._arm_expiry(earliest_expiry(connect_results))
        settings = node.settings
        return encode_connect_reply(
            command.id,
            client=connection.client_id,
            user=ctx.user,
            version=__version__,
            ping_interval=settings.ping_interval,
            pong_timeout=settings.pong_timeout,
        )

    async def _cmd_refresh(self, command: m.RefreshRequest) -> str:
        """Replace the connection token; the new one must name the same user."""
        ctx = self.context
        claims = self.node.tokens.verify(command.token)
        if claims.user != self.connection.user:
            self.node.record_rejection("auth")
            raise CommandError(ErrorCode.UNAUTHORIZED, "token is for another user")
        ctx.token, ctx.claims = command.token, claims
        self._arm_expiry()
        return encode_refresh_reply(command.id, claims.expires_at)

    async def _cmd_sub_refresh(self, command: m.SubRefreshRequest) -> str:
        """Replace the subscription token of a channel this client is subscribed to."""
        channel = command.channel
        if channel not in self.connection.channels:
            raise CommandError(ErrorCode.NOT_SUBSCRIBED)
        claims = await self.node.authorize_subscribe(self.context, channel, command.token)
        assert claims is not None  # a token was given
        self.expiry.arm_channel(channel, claims.expires_at)
        return encode_sub_refresh_reply(command.id, claims.expires_at)

    async def _cmd_subscribe(self, command: m.SubscribeRequest) -> None:
        """Sends its own reply: held live publications must follow it, not precede it.

        The recovered publications of all channels together stay within one reply
        budget (:func:`herald.policy.reply_byte_budget`): a channel whose missed
        publications do not fit is answered ``recovered: false``.
        """
        node, connection = self.node, self.connection
        results: list[dict[str, Any]] = []
        held: list[tuple[str, int, str]] = []
        budget = reply_byte_budget(node.settings.max_queue_bytes)
        try:
            for index, item in enumerate(command.channels):
                if index:
                    await asyncio.sleep(0)  # many channels: let other clients' work run between them
                try:
                    result, top, used = await self._subscribe_one(item, budget)
                except CommandError as exc:
                    results.append(subscribe_error_item(item.channel, exc.code, exc.message))
                    continue
                except BrokerError as exc:
                    logger.warning("subscribe %s: %s", item.channel, exc)
                    results.append(
                        subscribe_error_item(item.channel, ErrorCode.BROKER_UNAVAILABLE, "broker unavailable")
                    )
                    continue
                except DisconnectError:
                    raise  # a hook (or the proxy) closes the connection: no reply item
                except Exception:
                    # A failing hook must not leave the channels before it half-subscribed
                    # under an error reply for the whole command.
                    logger.exception(
                        "subscribe %s failed", item.channel, extra={"conn": connection.client_id}
                    )
                    results.append(subscribe_error_item(item.channel, ErrorCode.INTERNAL, "internal error"))
                    continue
                budget -= used
                results.append(result)
                held.append((result["channel"], top, result["epoch"]))
            connection.send(encode_subscribe_reply(command.id, results))
        finally:
            # Live publications that raced the history read are sent after the reply,
            # skipping those the reply already carried.
            for channel, after, epoch in held:
                connection.release(channel, after, epoch)
        for channel, _, _ in held:
            if channel in connection.channels:
                await node.join(channel, node.namespace(channel), connection)

    async def _subscribe_one(
        self, item: m.ChannelSubscription, budget: int
    ) -> tuple[dict[str, Any], int, int]:
        """Subscribe one channel; returns its result item, the offset the reply carries
        the channel up to, and the bytes of recovered publications in the item."""
        node, connection, gate = self.node, self.connection, self.gate
        grant = await node.policy.check(self.context, Operation.SUBSCRIBE, item.channel, token=item.token)
        channel, options = grant.channel, grant.options
        gate.check_subscribe(channel)

        connection.hold(channel)
        node.hub.subscribe(channel, connection)
        used = 0
        try:
            await node.ensure_broker_subscription(channel)
            recovered: bool | None = None
            publications: list[Publication] = []
            since = item.since
            if since is not None:
                recovered, publications, position, used = await self._recover(
                    channel, StreamPosition(since.offset, since.epoch), budget
                )
                if recovered:
                    node.stats.recovered += 1
                else:
                    node.stats.not_recovered += 1
            else:
                position = (await node.history(channel, limit=0)).position
        except BaseException:
            if node.hub.unsubscribe(channel, connection):
                await node.release_broker_subscription(channel)
            raise
        if grant.expires_at is not None:
            self.expiry.arm_channel(channel, grant.expires_at)
        top = publications[-1].offset if publications else position.offset
        result = subscribed_item(
            channel,
            StreamPosition(max(top, position.offset), position.epoch),
            recoverable=options.history_size > 0,
            recovered=recovered,
            publications=publication_items(publications),
        )
        return result, top, used

    async def _recover(
        self, channel: str, since: StreamPosition, budget: int
    ) -> tuple[bool, list[Publication], StreamPosition, int]:
        """The publications after ``since``, if they can all be sent: (recovered,
        publications, stream position, their bytes).

        Not recovered (and no publication sent) when clients may not read this
        namespace's history, when the gap holds more than ``max_history_limit``
        publications or more bytes than ``budget``, when the epoch changed, or when
        the broker keeps no history.  The broker read itself is bounded by both.
        """
        node = self.node
        try:
            await node.policy.check(self.context, Operation.RECOVER, channel)
            if not since.epoch:
                # No stream named: nothing proves the offset is one of the current stream.
                raise CommandError(ErrorCode.UNRECOVERABLE_POSITION)
        except CommandError:
            return False, [], (await node.history(channel, limit=0)).position, 0
        try:
            read = await read_history(
                node.history,
                channel,
                since=since,
                limit=node.settings.max_history_limit,
                byte_budget=budget,
                whole=True,
            )
        except NotAvailableError:
            # The broker keeps no history (core NATS): say so instead of failing.
            return False, [], (await node.history(channel, limit=0)).position, 0
        # read_history lets a first publication overrun the budget (history must progress);
        # recovery shares one budget across the reply, so it must fit what is left.
        if read.cut or read.size > budget or not _covers(since, read.publications, read.position):
            return False, [], read.position, 0
        return True, read.publications, read.position, read.size

    async def _cmd_unsubscribe(self, command: m.UnsubscribeRequest) -> str:
        removed: list[str] = []
        for channel in command.channels:
            if channel not in self.connection.channels:
                continue
            await self._leave(channel)
            removed.append(channel)
        if not removed:
            raise CommandError(ErrorCode.NOT_SUBSCRIBED)
        return encode_unsubscribe_reply(command.id, removed)

    async def _check(self, operation: Operation, channel: str) -> Grant:
        return await self.node.policy.check(
            self.context, operation, channel, subscriptions=self.connection.channels
        )

    async def _cmd_publish(self, command: m.PublishRequest) -> str:
        grant, data = await self._publish_checks(command)
        return await self._publish(command, grant, data)

    async def _publish_checks(self, command: m.PublishRequest) -> tuple[Grant, Any]:
        """The grant to publish ``command`` and the data to publish (the publish hooks may
        change it)."""
        grant = await self._check(Operation.PUBLISH, command.channel)
        return grant, await self.node.policy.publish_data(self.context, grant.channel, command.data)

    async def _publish(self, command: m.PublishRequest, grant: Grant, data: Any) -> str:
        """Publish checked ``data``: the broker call, then the reply.  Nothing is awaited
        before the broker call (:meth:`_start_publish` relies on it)."""
        try:
            position = await self.node.publish_json(
                grant.channel,
                orjson.dumps(data),
                grant.options,
                info=self._client_info(),
                idempotency_key=command.idempotency_key,
            )
        except NotAvailableError as exc:
            # The broker cannot do this at all (an idempotency key on core NATS): say why.
            raise CommandError(ErrorCode.NOT_AVAILABLE, str(exc)) from None
        return encode_publish_reply(command.id, position)

    def _client_info(self) -> ClientInfo:
        """Who publishes (kept with the publication)."""
        connection = self.connection
        return ClientInfo(connection.client_id, connection.user, connection.info)

    async def _cmd_rpc(self, command: m.RpcRequest) -> str:
        # RPC names no channel: who may call a method is the handler's decision (ctx.user).
        node = self.node
        if command.method not in node.rpc_methods and node.hooks.has("rpc"):
            # No handler: the rpc hooks answer (the proxy's asks the backend).
            results = await node.run_hooks("rpc", self.context, command.method, command.params)
            return encode_rpc_reply(command.id, first_answer(results))
        data = await node.call_rpc(command.method, command.params, self.context)
        return encode_rpc_reply(command.id, data)

    async def _cmd_presence(self, command: m.PresenceRequest) -> str:
        grant = await self._check(Operation.PRESENCE, command.channel)
        clients = await self.node.presence_of(grant.channel)
        return encode_presence_reply(command.id, clients)

    async def _cmd_presence_stats(self, command: m.PresenceStatsRequest) -> str:
        grant = await self._check(Operation.PRESENCE_STATS, command.channel)
        stats = await self.node.presence_stats(grant.channel)
        return encode_presence_stats_reply(command.id, stats)

    async def _cmd_history(self, command: m.HistoryRequest) -> str:
        """A history reply is cut at the reply budget: fewer publications than ``limit``
        (at least one); the client pages on with ``since`` = the last offset it got."""
        node = self.node
        grant = await self._check(Operation.HISTORY, command.channel)
        since = command.since
        position_since = StreamPosition(since.offset, since.epoch) if since is not None else None
        read = await read_history(
            node.history,
            grant.channel,
            since=position_since,
            limit=clamp_history_limit(command.limit, node.settings.max_history_limit),
            reverse=command.reverse,
            byte_budget=reply_byte_budget(node.settings.max_queue_bytes),
        )
        check_epoch(position_since, read.position)
        return encode_history_reply(command.id, read.publications, read.position)


def _covers(since: StreamPosition, publications: list[Publication], top: StreamPosition) -> bool:
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


__all__ = ["CommandHandler", "render_publication"]
