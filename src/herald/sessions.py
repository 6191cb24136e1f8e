"""Herald's four WebSocket routes, each one session class, for both drivers.

``/connect`` (:class:`ProtocolSession`), ``/ws`` (:class:`EchoSession`), ``/ws_json``
(:class:`JsonSession`) and ``/ws_broadcast`` (:class:`BroadcastSession`) are written
against :class:`~herald.transports.base.Socket`; the native driver
(:mod:`herald.transports.native`) and the ASGI driver (:mod:`herald.transports.asgi`)
feed them alike, so both paths answer alike: same replies, same close codes, same
limits.  :func:`route` makes the :class:`~herald.transports.base.Route` of one of them,
admission included (:mod:`herald.admission`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson

from .admission import HandshakeTimeout, choose_subprotocol, opener
from .brokers.base import ClientInfo
from .codes import BINARY_REFUSED, CloseCode
from .commands import CommandHandler, render_publication
from .config import Settings
from .connection import Connection, Renderer, new_client_id
from .exceptions import DisconnectError
from .limits import CommandRateLimiter, RateVerdict
from .node import Node
from .protocol.gate import Phase
from .protocol.messages import SUBPROTOCOL
from .transports.base import Route, Socket
from .tutorial import BROADCAST_CHANNEL, echo_reply, json_reply, render_broadcast

logger = logging.getLogger("herald")


def json_answer(text: str) -> tuple[str, bool]:
    """``/ws_json``'s answer to ``text``, and whether the connection must close (1007)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return orjson.dumps({"error": {"code": 1007, "message": f"malformed JSON: {exc}"}}).decode(), True
    return json_reply(value), False


class BroadcastInput:
    """What ``/ws_broadcast`` does with a client's text: rate-limit it, then publish it."""

    __slots__ = ("connection", "info", "node", "rate")

    def __init__(self, node: Node, connection: Connection) -> None:
        self.node = node
        self.connection = connection
        self.info = ClientInfo(connection.client_id, "")
        settings = node.settings
        # One fast sender fans out to everybody: meter it like a protocol client.
        self.rate = CommandRateLimiter(
            settings.rate_limit, settings.rate_limit_burst, settings.rate_limit_strikes
        )

    def join(self) -> Awaitable[None] | None:
        """Admit the client and subscribe it; returns what is left to await, if anything
        (the node's first broker subscription to the broadcast channel).

        Raises ``DisconnectError`` when the node refuses the client (shutting down).
        """
        node, connection = self.node, self.connection
        node.admit(connection)
        node.hub.subscribe(BROADCAST_CHANNEL, connection)
        if node.broker_subscribed(BROADCAST_CHANNEL):
            return None
        return node.ensure_broker_subscription(BROADCAST_CHANNEL)

    async def on_text(self, text: str) -> None:
        node, connection = self.node, self.connection
        node.stats.frames_in += 1
        verdict = self.rate.check()
        if verdict is RateVerdict.ABUSE:
            node.record_rejected_command("rate_limit_disconnect")
            connection.close(CloseCode.RATE_LIMIT, "rate limit exceeded", push=False)
            return
        if verdict is RateVerdict.LIMITED:
            node.record_rejected_command("rate_limited")
            connection.send("Error: rate limit exceeded, message dropped")
            return
        try:
            await node.publish_internal(BROADCAST_CHANNEL, orjson.dumps(text), self.info)
        except Exception as exc:
            logger.warning("broadcast publish failed: %r", exc)
            connection.send(f"Error: broadcast failed ({type(exc).__name__})")


def log_disconnect(connection: Connection) -> None:
    # Structured fields (see herald.logs); never payloads or tokens.
    logger.info(
        "client disconnected",
        extra={
            "conn": connection.client_id,
            "user": connection.user,
            "remote": connection.remote,
            "code": connection.close_code,
            "reason": connection.close_reason,
        },
    )


def new_connection(
    settings: Settings,
    socket: Socket,
    renderer: Renderer,
    *,
    protocol: bool,
    max_queue_messages: int | None = None,
) -> Connection:
    """A connection over ``socket`` (``protocol``: ``/connect``'s kind, with its own
    publications echoed and join/leave events; else ``/ws_broadcast``'s and the admin page's)."""
    return Connection(
        socket,
        new_client_id(),
        renderer=renderer,
        echo_own=protocol,
        events=protocol,
        max_queue_messages=max_queue_messages or settings.max_queue_messages,
        max_queue_bytes=settings.max_queue_bytes,
        remote=socket.remote,
    )


def record_end(connection: Connection, code: int, reason: str, by_peer: bool) -> None:
    """Record on ``connection`` how its socket ended, unless Herald already closed it
    (the one place for this bookkeeping, whichever driver reports the end)."""
    if by_peer:
        connection.peer_closed(code)
    elif connection.close_code is None:
        # Closed below Herald's own logic (protocol error, keepalive, server shutdown).
        connection.close_code, connection.close_reason = code, reason
        connection.peer_closed(code)


# ---------------------------------------------------------------- sessions


class RouteSession:
    """The part every route's session shares: the socket and the per-IP slot."""

    __slots__ = ("node", "socket", "subprotocol")

    def __init__(self, node: Node, socket: Socket) -> None:
        self.node = node
        self.socket = socket
        self.subprotocol: str | None = None

    def release(self) -> None:
        self.node.ip_connections.release(self.socket.client_ip)

    def started(self) -> Awaitable[None] | None:
        return None

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        # Every route is text-only: a binary frame closes with 1003.
        if isinstance(data, bytes):
            self.fail(CloseCode.UNSUPPORTED_DATA, BINARY_REFUSED)
            return None
        return self.on_text(data)

    def on_text(self, text: str) -> Awaitable[None] | None:
        raise NotImplementedError

    def fail(self, code: int, reason: str) -> None:
        self.socket.close_now(code, reason)

    def lost(self, code: int, reason: str, by_peer: bool) -> Awaitable[None] | None:
        self.release()
        return None


class ProtocolSession(HandshakeTimeout, RouteSession):
    """``/connect``: protocol v1."""

    __slots__ = ("connection", "handler", "timer")

    timeout_code = CloseCode.HANDSHAKE_TIMEOUT
    timeout_reason = "handshake timeout"

    def __init__(self, node: Node, socket: Socket) -> None:
        super().__init__(node, socket)
        self.subprotocol = choose_subprotocol(socket.subprotocols, SUBPROTOCOL)
        self.connection = new_connection(node.settings, socket, render_publication, protocol=True)
        self.handler = CommandHandler(node, self.connection, socket)
        self.timer: asyncio.TimerHandle | None = None

    def started(self) -> None:
        self.connection.start()
        self.arm_handshake_timeout(self.node.settings.handshake_timeout)

    def handshake_pending(self) -> bool:
        return self.handler.gate.phase is Phase.CONNECTING

    def on_text(self, text: str) -> Awaitable[None] | None:
        return self.handler.receive(text)

    def fail(self, code: int, reason: str) -> None:
        self.connection.close(code, reason)

    async def lost(self, code: int, reason: str, by_peer: bool) -> None:
        self.cancel_handshake_timeout()
        connection = self.connection
        record_end(connection, code, reason, by_peer)
        try:
            await self.handler.close()
        finally:
            await connection.stop()
            self.release()
        log_disconnect(connection)


class BroadcastSession(RouteSession):
    """``/ws_broadcast``: ``New message: {data}`` to every other client."""

    __slots__ = ("connection", "input")

    def __init__(self, node: Node, socket: Socket) -> None:
        super().__init__(node, socket)
        self.connection = new_connection(node.settings, socket, render_broadcast, protocol=False)
        self.input = BroadcastInput(node, self.connection)

    def started(self) -> Awaitable[None] | None:
        self.connection.start()
        try:
            return self.input.join()
        except DisconnectError as exc:
            self.fail(exc.code, exc.reason)
            return None

    def on_text(self, text: str) -> Awaitable[None] | None:
        return self.input.on_text(text)

    def fail(self, code: int, reason: str) -> None:
        self.connection.close(code, reason, push=False)

    async def lost(self, code: int, reason: str, by_peer: bool) -> None:
        connection = self.connection
        record_end(connection, code, reason, by_peer)
        try:
            await self.node.unregister(connection, protocol_channels=False)
        finally:
            await connection.stop()
            self.release()


class EchoSession(RouteSession):
    """``/ws``: ``Message text was: {data}``, answered without a task."""

    __slots__ = ()

    def on_text(self, text: str) -> None:
        self.socket.send_now(echo_reply(text))


class JsonSession(RouteSession):
    """``/ws_json``: ``{"message": "Received JSON data", "data": ...}``; malformed JSON:
    an error frame, then close 1007."""

    __slots__ = ()

    def on_text(self, text: str) -> None:
        answer, malformed = json_answer(text)
        self.socket.send_now(answer)
        if malformed:
            self.fail(CloseCode.INVALID_PAYLOAD, "malformed JSON")


SessionClass = Callable[[Node, Socket], RouteSession]

#: Route name -> session class (the names of the routes in ``Herald.router``).
SESSIONS: dict[str, SessionClass] = {
    "herald_connect": ProtocolSession,
    "tutorial_echo": EchoSession,
    "tutorial_json": JsonSession,
    "tutorial_broadcast": BroadcastSession,
}


def route(node: Node, name: str) -> Route:
    """The route ``name`` (a key of :data:`SESSIONS`), for either driver."""
    session_class = SESSIONS[name]
    settings = node.settings

    def make(socket: Socket) -> RouteSession:
        return session_class(node, socket)

    return Route(opener(node, make), settings.max_message_size, settings.max_message_fragments)


__all__ = [
    "SESSIONS",
    "BroadcastInput",
    "BroadcastSession",
    "EchoSession",
    "JsonSession",
    "ProtocolSession",
    "RouteSession",
    "json_answer",
    "log_disconnect",
    "new_connection",
    "record_end",
    "route",
]
