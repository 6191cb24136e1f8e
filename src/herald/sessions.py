"""Herald's four WebSocket routes, each one session class, for both drivers.

``/connect`` (:class:`ProtocolSession`), ``/ws`` (:class:`EchoSession`), ``/ws_json``
(:class:`JsonSession`) and ``/ws_broadcast`` (:class:`BroadcastSession`) are written
against :class:`~herald.transports.base.Socket`; the native driver
(:mod:`herald.transports.native`) and the ASGI driver (:mod:`herald.transports.asgi`)
feed them alike, so both paths answer alike: same replies, same close codes, same
limits.  :func:`route` makes the :class:`~herald.transports.base.Route` of one of them,
admission included (:mod:`herald.admission`).

Each session counts its route's WebSockets (accepted, ended and how, frames and bytes
each way) in the route's :class:`~herald.stats.RouteStats`, under its ``route_label``:
counting lives here, in the route code, so that both drivers count alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar

import orjson

from .admission import HandshakeTimeout, choose_subprotocol, opener, release_ip
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
from .stats import OTHER_ROUTE
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
        admitting = node.admit(connection)
        if admitting is not None:  # only a client with a user waits (this route's have none)
            return self._join_after(admitting)
        node.hub.subscribe(BROADCAST_CHANNEL, connection)
        if node.broker_subscribed(BROADCAST_CHANNEL):
            return None
        return node.ensure_broker_subscription(BROADCAST_CHANNEL)

    async def _join_after(self, admitting: Awaitable[None]) -> None:
        try:
            await admitting
        except DisconnectError as exc:
            self.connection.close(exc.code, exc.reason, push=False)
            return
        node = self.node
        node.hub.subscribe(BROADCAST_CHANNEL, self.connection)
        await node.ensure_broker_subscription(BROADCAST_CHANNEL)

    async def on_text(self, text: str) -> None:
        node, connection = self.node, self.connection
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


def log_disconnect(connection: Connection, access_log: bool) -> None:
    """One line per ended connection: INFO with the access log on, else DEBUG."""
    level = logging.INFO if access_log else logging.DEBUG
    if not logger.isEnabledFor(level):
        return
    # Structured fields (see herald.logs); never payloads or tokens.
    logger.log(
        level,
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
        write_delay=settings.write_delay,
    )


def end_code(connection: Connection, code: int) -> int:
    """The close code a connection's end is counted under: Herald's own when it closed
    first (``record_end`` keeps it), else the one the driver reported."""
    return connection.close_code if connection.close_code is not None else code


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
    """The part every route's session shares: the socket, the per-IP slot and the
    route's counters.

    A session exists once its socket passed admission and is being accepted (both
    drivers call ``lost`` for every session they made), so it is counted as accepted
    when made and as ended by :meth:`finish`, which every ``lost`` calls last.
    """

    __slots__ = ("ip_slot", "node", "socket", "stats", "subprotocol")

    #: The route's ``route`` label in the metrics (one of ``stats.ROUTE_LABELS``).
    route_label: ClassVar[str] = OTHER_ROUTE

    def __init__(self, node: Node, socket: Socket) -> None:
        self.node = node
        self.socket = socket
        self.subprotocol: str | None = None
        #: Holds a per-IP lease (set by admission; given back once, by :meth:`finish`).
        self.ip_slot = False
        self.stats = node.stats.route(self.route_label)
        self.stats.accepted += 1

    def count_output(self, connection: Connection) -> Connection:
        """Count what ``connection`` writes as this route's output; returns it."""
        self.stats.live.add(connection)
        return connection

    def finish(self, code: int, connection: Connection | None = None) -> None:
        """The socket ended with ``code``: count it and give back its per-IP lease."""
        self.stats.record_end(code, connection)
        if self.ip_slot:
            self.ip_slot = False
            release_ip(self.node, self.socket.client_ip)

    def started(self) -> Awaitable[None] | None:
        return None

    def send_now(self, frame: str) -> None:
        """Write ``frame`` at once, counted (for routes that answer without a connection)."""
        stats = self.stats
        stats.frames_out += 1
        stats.bytes_out += len(frame)
        self.socket.send_now(frame)

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += len(data)
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
        self.finish(code)
        return None


#: Commands of one client handled in a row before the session lets the loop turn.
COMMANDS_BETWEEN_YIELDS = 32


class ProtocolSession(HandshakeTimeout, RouteSession):
    """``/connect``: protocol v1."""

    __slots__ = ("burst", "connection", "handler", "timer")

    route_label = "connect"
    timeout_code = CloseCode.HANDSHAKE_TIMEOUT
    timeout_reason = "handshake timeout"

    def __init__(self, node: Node, socket: Socket) -> None:
        super().__init__(node, socket)
        self.subprotocol = choose_subprotocol(socket.subprotocols, SUBPROTOCOL)
        self.connection = self.count_output(
            new_connection(node.settings, socket, render_publication, protocol=True)
        )
        self.handler = CommandHandler(node, self.connection, socket)
        self.timer: asyncio.TimerHandle | None = None
        self.burst = 0  # commands since the last yield (see on_text)

    @property
    def checks_liveness(self) -> bool:
        """With protocol pings on, the liveness walk pings this client and closes it when
        no pong comes (:meth:`herald.node.Node.check_liveness`), and the handshake
        timeout covers it until ``connect``: WebSocket pings would only double the writes."""
        return self.node.settings.ping_interval > 0

    def started(self) -> None:
        self.connection.start()
        self.arm_handshake_timeout(self.node.settings.handshake_timeout)

    def handshake_pending(self) -> bool:
        return self.handler.gate.phase is Phase.CONNECTING

    def on_text(self, text: str) -> Awaitable[None] | None:
        result = self._receive(text)
        if self.timer is None:
            return result
        # The deadline still runs: drop it as soon as the client is connected rather
        # than leave the timer to fire handshake_timeout later for nothing (in a connect
        # storm every connection held one, ~300 bytes, until then).
        if result is not None:
            return self._drop_deadline_after(result)
        if not self.handshake_pending():
            self.cancel_handshake_timeout()
        return None

    async def _drop_deadline_after(self, handling: Awaitable[None]) -> None:
        await handling
        if not self.handshake_pending():
            self.cancel_handshake_timeout()

    def _receive(self, text: str) -> Awaitable[None] | None:
        self.burst += 1
        if self.burst >= COMMANDS_BETWEEN_YIELDS or self.connection.backlogged():
            self.burst = 0
            return self._handle_later(text)
        return self.handler.receive(text)

    async def _handle_later(self, text: str) -> None:
        """Handle ``text`` after the loop's turn, and after the client's backlog drained.

        * One client's burst of commands (a socket read can hold a thousand publishes) is
          not handled in one turn of the event loop: the frames it fans out are written
          between, so its subscribers are not taken over their bounds by the burst.
        * Backpressure: while the client's own replies pile up (the server is busy, or
          the client reads slowly), its next command waits until they are written, and
          the driver stops reading its socket meanwhile.  Cutting it as a slow consumer
          would punish it for the server's own slowness (issue 19).
        """
        await asyncio.sleep(0)
        connection = self.connection
        if connection.backlogged():
            await connection.drained()
        if connection.is_closing:
            return
        result = self.handler.receive(text)
        if result is not None:
            await result

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
            self.finish(end_code(connection, code), connection)
        log_disconnect(connection, self.node.settings.access_log)


class BroadcastSession(RouteSession):
    """``/ws_broadcast``: ``New message: {data}`` to every other client."""

    __slots__ = ("connection", "input")

    route_label = "ws_broadcast"

    def __init__(self, node: Node, socket: Socket) -> None:
        super().__init__(node, socket)
        self.connection = self.count_output(
            new_connection(node.settings, socket, render_broadcast, protocol=False)
        )
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
            self.finish(end_code(connection, code), connection)


class EchoSession(RouteSession):
    """``/ws``: ``Message text was: {data}``, answered without a task."""

    __slots__ = ()

    route_label = "ws"

    def on_text(self, text: str) -> None:
        self.send_now(echo_reply(text))


class JsonSession(RouteSession):
    """``/ws_json``: ``{"message": "Received JSON data", "data": ...}``; malformed JSON:
    an error frame, then close 1007."""

    __slots__ = ()

    route_label = "ws_json"

    def on_text(self, text: str) -> None:
        answer, malformed = json_answer(text)
        self.send_now(answer)
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
    "end_code",
    "json_answer",
    "log_disconnect",
    "new_connection",
    "record_end",
    "route",
]
