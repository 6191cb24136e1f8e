"""Herald's four WebSocket routes as native sessions (see :mod:`herald.transports.native`).

``herald serve`` serves ``/connect``, ``/ws``, ``/ws_json`` and ``/ws_broadcast``
with these sessions, without ASGI; :mod:`herald.app` has the same routes as ASGI
endpoints for every other server.  Both share the per-message logic kept here
(:class:`BroadcastInput`, :func:`json_answer`, :func:`log_disconnect`), so the two
paths answer alike: same replies, same close codes, same limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from .brokers.base import ClientInfo
from .codes import BINARY_REFUSED, CloseCode
from .commands import ProtocolHandler, render_publication
from .connection import Connection, Renderer, new_client_id
from .exceptions import DisconnectError
from .hosts import handshake_refusal
from .limits import CommandRateLimiter, RateVerdict
from .node import Node
from .protocol.messages import SUBPROTOCOL
from .protocol.session import SessionState
from .transports.native import HeraldWebSocketProtocol, NativeRoute, NativeSession
from .tutorial import BROADCAST_CHANNEL, echo_reply, json_reply, render_broadcast

if TYPE_CHECKING:
    from .app import Herald

logger = logging.getLogger("herald")

# ---------------------------------------------------------------- shared by both paths


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
        node.stats["messages_in"] += 1
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
    herald: Herald, transport: Any, remote: str, renderer: Renderer, protocol: bool
) -> Connection:
    """A connection for one of Herald's routes (``protocol``: ``/connect``, else ``/ws_broadcast``)."""
    settings = herald.settings
    return Connection(
        transport,
        new_client_id(),
        renderer=renderer,
        echo_own=protocol,
        events=protocol,
        max_queue_messages=settings.max_queue_messages,
        max_queue_bytes=settings.max_queue_bytes,
        remote=remote,
    )


def _ended(connection: Connection, code: int, reason: str, by_peer: bool) -> None:
    """Record on ``connection`` how its socket ended, unless Herald already closed it."""
    if by_peer:
        connection.peer_closed(code)
    elif connection.close_code is None:
        # Closed below Herald's own logic (protocol error, keepalive, server shutdown).
        connection.close_code, connection.close_reason = code, reason
        connection.peer_closed(code)


# ---------------------------------------------------------------- native sessions


class _Session:
    """The part every native session shares: the socket and the per-IP slot."""

    __slots__ = ("herald", "ip", "subprotocol", "ws")

    def __init__(self, herald: Herald, ws: HeraldWebSocketProtocol, ip: str) -> None:
        self.herald = herald
        self.ws = ws
        self.ip = ip
        self.subprotocol: str | None = None

    def release(self) -> None:
        self.herald.node.ip_connections.release(self.ip)

    def started(self) -> Awaitable[None] | None:
        return None

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        # All four routes are text-only: a binary frame closes with 1003, as on ASGI.
        if isinstance(data, bytes):
            self.fail(CloseCode.UNSUPPORTED_DATA, BINARY_REFUSED)
            return None
        return self.on_text(data)

    def on_text(self, text: str) -> Awaitable[None] | None:
        raise NotImplementedError

    def fail(self, code: int, reason: str) -> None:
        self.ws.close_now(code, reason)

    def lost(self, code: int, reason: str, by_peer: bool) -> Awaitable[None] | None:
        self.release()
        return None


class ProtocolSession(_Session):
    """``/connect``: protocol v1."""

    __slots__ = ("connection", "handler", "timer")

    def __init__(self, herald: Herald, ws: HeraldWebSocketProtocol, ip: str) -> None:
        super().__init__(herald, ws, ip)
        if SUBPROTOCOL in ws.subprotocols:
            self.subprotocol = SUBPROTOCOL
        self.connection = new_connection(herald, ws, ws.remote, render_publication, True)
        self.handler = ProtocolHandler(herald.node, self.connection, ws.scope)
        self.timer: asyncio.TimerHandle | None = None

    def started(self) -> None:
        self.connection.start()
        self._arm(self.herald.settings.handshake_timeout)

    def _arm(self, delay: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(delay, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.handler.session.state is SessionState.CONNECTING:
            if self.ws.busy:  # a connect command is being handled: give it its time
                self._arm(0.25)
            else:
                self.fail(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout")

    def on_text(self, text: str) -> Awaitable[None] | None:
        return self.handler.receive(text)

    def fail(self, code: int, reason: str) -> None:
        self.connection.close(code, reason)

    async def lost(self, code: int, reason: str, by_peer: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connection = self.connection
        _ended(connection, code, reason, by_peer)
        try:
            await self.handler.close()
        finally:
            await connection.stop()
            self.release()
        log_disconnect(connection)


class BroadcastSession(_Session):
    """``/ws_broadcast``: ``New message: {data}`` to every other client."""

    __slots__ = ("connection", "input")

    def __init__(self, herald: Herald, ws: HeraldWebSocketProtocol, ip: str) -> None:
        super().__init__(herald, ws, ip)
        self.connection = new_connection(herald, ws, ws.remote, render_broadcast, False)
        self.input = BroadcastInput(herald.node, self.connection)

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
        _ended(connection, code, reason, by_peer)
        try:
            await self.herald.node.unregister(connection, protocol_channels=False)
        finally:
            await connection.stop()
            self.release()


class EchoSession(_Session):
    """``/ws``: ``Message text was: {data}``, answered without a task."""

    __slots__ = ()

    def on_text(self, text: str) -> None:
        self.ws.send_now(echo_reply(text))


class JsonSession(_Session):
    """``/ws_json``: ``{"message": "Received JSON data", "data": ...}``; malformed JSON: close 1007."""

    __slots__ = ()

    def on_text(self, text: str) -> None:
        answer, malformed = json_answer(text)
        self.ws.send_now(answer)
        if malformed:
            self.fail(CloseCode.INVALID_PAYLOAD, "malformed JSON")


SessionClass = Callable[["Herald", HeraldWebSocketProtocol, str], NativeSession]


def _opener(
    herald: Herald, session_class: SessionClass
) -> Callable[[HeraldWebSocketProtocol], NativeSession | str]:
    """The checks every route gets before accept (Host and Origin allow-lists: the same
    function as on the ASGI path; per-IP limit), then a session."""
    node, settings = herald.node, herald.settings

    def open_session(ws: HeraldWebSocketProtocol) -> NativeSession | str:
        refusal = handshake_refusal(
            settings,
            host=ws.header("host"),
            origin=ws.header("origin"),
            local_address=_local_address(ws),
            scheme=ws.scheme,
        )
        if refusal is not None:
            node.record_rejection(refusal.kind)
            return refusal.reason
        ip = ws.client_ip
        if not node.ip_connections.acquire(ip):
            node.record_rejection("ip_limit")
            return "too many connections from this address"
        try:
            return session_class(herald, ws, ip)
        except BaseException:
            node.ip_connections.release(ip)
            raise

    return open_session


def _local_address(ws: HeraldWebSocketProtocol) -> str | None:
    """The server side of the connection: its IP, or a Unix socket's path (as ASGI's
    ``scope["server"]`` has it)."""
    if ws.server is not None:
        return ws.server[0]
    sockname = ws.transport.get_extra_info("sockname") if ws.transport is not None else None
    return sockname if isinstance(sockname, str) else None


#: Route name -> native session class (the names of the routes in ``Herald.router``).
SESSIONS: dict[str, SessionClass] = {
    "herald_connect": ProtocolSession,
    "tutorial_echo": EchoSession,
    "tutorial_json": JsonSession,
    "tutorial_broadcast": BroadcastSession,
}


def native_route(herald: Herald, name: str) -> NativeRoute:
    settings = herald.settings
    return NativeRoute(
        _opener(herald, SESSIONS[name]), settings.max_message_size, settings.max_message_fragments
    )


__all__ = [
    "BroadcastInput",
    "BroadcastSession",
    "EchoSession",
    "JsonSession",
    "ProtocolSession",
    "json_answer",
    "log_disconnect",
    "native_route",
    "new_connection",
]
