"""Bidirectional emulation: protocol v1 over plain HTTP, for clients whose WebSocket is blocked.

Two HTTP routes carry what a ``/connect`` WebSocket carries (docs/transports.md):

* **Down**, ``POST /emulation/connect`` (or ``GET``, for ``EventSource``): a streaming
  response carrying the protocol's server frames, the same JSON as on ``/connect``,
  one per line (``application/x-ndjson``), or one per event (``text/event-stream``,
  for ``GET`` or an ``Accept: text/event-stream`` request).  Its first frame,
  ``{"type":"emulation","session":...,"node":...,"secret":...}``, names the session
  and the secret that authenticates the commands sent for it.  A ``POST`` body may
  carry the first commands (``{"commands":[...]}``: ``connect`` and ``subscribe``
  without another round trip).
* **Up**, ``POST /emulation``: ``{"session", "secret", "node"?, "commands": [...]}``
  hands commands (JSON objects, as sent on a WebSocket) to the session, in order.  The
  stream may be held by another node: the POST is routed to it through the broker
  (:meth:`herald.control.ControlChannel.deliver`), so no sticky sessions are needed.
  Answers 204 once the session has queued the commands; the errors are in
  :data:`STATUS_OF`.

An emulated session is :class:`EmulationSession`, a :class:`~herald.sessions.ProtocolSession`
whose socket is the stream: the same admission (``Host``, ``Origin``, per-IP limit),
command handling, access policy, rate limits, backpressure (a client that does not
read its stream is cut as a slow consumer, 4001), pings and metrics (``route`` label
``emulation``).  The server pings over the stream; the client answers with a ``pong``
command in a POST, so a client whose POSTs stop arriving is closed as on a WebSocket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections import deque
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from .admission import async_opener
from .apiguard import BadRequest, body_limit, local_address, read_body, respond
from .context import ScopeHandshake, header_value
from .control import DeliveryStatus
from .exceptions import BrokerError
from .sessions import ProtocolSession
from .transports.sse import (
    STREAM_HEADERS,
    HttpStreamTransport,
    NdjsonFraming,
    SseFraming,
    StreamFraming,
    is_head,
)
from .transports.uvicorn import abort_for

if TYPE_CHECKING:
    from .node import Node
    from .transports.base import Socket

logger = logging.getLogger("herald.emulation")

#: Where :func:`add_emulation_routes` mounts the two routes (under the router's prefix).
EMULATION_CONNECT_PATH = "/emulation/connect"
EMULATION_PATH = "/emulation"

#: Commands one POST may carry (more: 413).
MAX_COMMANDS_PER_POST = 100
#: Commands a session may hold not yet handled (more: 429); the rate limit applies to
#: them as they are handled, as to a WebSocket's messages.
MAX_PENDING_COMMANDS = 1000
#: Seconds between heartbeats (a blank line, or an SSE comment) on a stream whose
#: protocol pings are off (``ping_interval = 0``): keeps proxies from timing it out.
#: With pings on, the pings are the heartbeat.
HEARTBEAT_INTERVAL = 15.0

#: A session id: the id of the node holding the stream, a dot, 16 hex digits.
SESSION_ID = re.compile(r"([0-9a-f]{12})\.[0-9a-f]{16}")

#: The answer to a POST, by what became of its commands: (status, detail).
STATUS_OF: dict[DeliveryStatus, tuple[int, str]] = {
    DeliveryStatus.DELIVERED: (204, ""),
    DeliveryStatus.UNKNOWN: (404, "unknown or ended session"),
    DeliveryStatus.FORBIDDEN: (403, "wrong session secret"),
    DeliveryStatus.OVERLOADED: (429, "too many commands waiting for this session"),
    DeliveryStatus.TIMEOUT: (504, "the node holding the session did not answer"),
}

#: Response headers of POST /emulation answers.
_NO_STORE = (b"cache-control", b"no-store")


def command_texts(value: Any, max_size: int) -> list[str]:
    """The ``commands`` of a POST as text frames, checked: a list of at most
    :data:`MAX_COMMANDS_PER_POST` JSON objects, each at most ``max_size`` characters
    once encoded (a WebSocket message's bound)."""
    if not isinstance(value, list):
        raise BadRequest(400, "commands must be a list of command objects")
    if len(value) > MAX_COMMANDS_PER_POST:
        raise BadRequest(413, f"more than {MAX_COMMANDS_PER_POST} commands in one request")
    texts: list[str] = []
    for command in value:
        if not isinstance(command, dict):
            raise BadRequest(400, "commands must be a list of command objects")
        try:
            text = orjson.dumps(command).decode()
        except orjson.JSONEncodeError:
            # Nested past the 255 levels orjson encodes (it parses 1024): refused here
            # instead of a 500 (the default max_json_depth is 32).
            raise BadRequest(400, "a command nested too deeply (max_json_depth)") from None
        if len(text) > max_size:
            raise BadRequest(413, f"a command larger than {max_size} bytes (max_message_size)")
        texts.append(text)
    return texts


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return value


# ---------------------------------------------------------------- the stream


class EmulationSocket(ScopeHandshake, HttpStreamTransport):
    """The stream of one emulated session, as a :class:`~herald.transports.base.Socket`:
    the request that opened it is the handshake; frames are written by
    :class:`~herald.transports.sse.HttpStreamTransport`."""

    __slots__ = ("scope", "session")

    def __init__(self, scope: Scope, send: Send, receive: Receive, framing: StreamFraming) -> None:
        super().__init__(send, framing, abort=abort_for(receive))
        self.scope: MutableMapping[str, Any] = scope
        self.session: EmulationSession | None = None

    @property
    def busy(self) -> bool:
        session = self.session
        return session is not None and (session.handling or bool(session.inbox))

    def send_now(self, message: str | bytes) -> None:
        # Only the protocol session is served over a stream; it writes through its
        # connection's queue, never around it.
        raise NotImplementedError("an emulated session writes through its connection")

    def close_now(self, code: int, reason: str) -> None:
        session = self.session
        if session is not None:
            session.fail(code, reason)


class EmulationSession(ProtocolSession):
    """Protocol v1 over a stream and POSTs: a :class:`ProtocolSession` whose commands
    arrive in batches (:meth:`accept`) and are handled one at a time, in order, as a
    WebSocket's messages are."""

    __slots__ = ("handling", "inbox", "secret", "session_id", "worker")

    route_label = "emulation"

    def __init__(self, node: Node, socket: EmulationSocket) -> None:
        super().__init__(node, socket)
        self.session_id = f"{node.id}.{secrets.token_hex(8)}"
        self.secret = secrets.token_urlsafe(24)
        self.inbox: deque[str] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.handling = False

    def accept(self, commands: Sequence[str]) -> DeliveryStatus:
        """Queue ``commands`` to be handled in order (never awaits)."""
        if self.connection.is_closing:
            return DeliveryStatus.UNKNOWN
        if len(self.inbox) + len(commands) > MAX_PENDING_COMMANDS:
            return DeliveryStatus.OVERLOADED  # counted by the node that got the POST
        self.inbox.extend(commands)
        if self.worker is None and self.inbox:
            self.worker = asyncio.get_running_loop().create_task(
                self._work(), name=f"herald-emulation-{self.connection.client_id}"
            )
        return DeliveryStatus.DELIVERED

    async def _work(self) -> None:
        inbox, connection = self.inbox, self.connection
        try:
            while inbox and not connection.is_closing:
                text = inbox.popleft()
                self.handling = True
                try:
                    pending = self.message(text)
                    if pending is not None:
                        await pending
                except Exception:  # the handler answers errors itself; this is a bug
                    logger.exception("emulated command failed", extra={"conn": connection.client_id})
                finally:
                    self.handling = False
        finally:
            self.worker = None

    async def lost(self, code: int, reason: str, by_peer: bool) -> None:
        worker = self.worker
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except (asyncio.CancelledError, Exception):
                pass
        self.inbox.clear()
        await super().lost(code, reason, by_peer)


def _stream_framing(scope: Scope) -> StreamFraming:
    """SSE for ``GET`` (``EventSource``) or ``Accept: text/event-stream``; else NDJSON."""
    accept = header_value(scope.get("headers", ()), "accept") or ""
    if scope.get("method") in ("GET", "HEAD") or "text/event-stream" in accept:
        # Unnamed events: EventSource.onmessage sees every frame, as a WebSocket would.
        return SseFraming(named_events=False)
    return NdjsonFraming()


class EmulationRoutes:
    """The two ASGI endpoints of one node (see the module docstring)."""

    __slots__ = ("node", "open_session")

    def __init__(self, node: Node) -> None:
        self.node = node

        def make(socket: Socket) -> EmulationSession:
            assert isinstance(socket, EmulationSocket)
            return EmulationSession(node, socket)

        # The per-IP lease is counted (across the cluster on Redis) before the stream answers.
        self.open_session = async_opener(node, make)

    # ------------------------------------------------------------ down

    async def connect(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/emulation/connect``: open a session and stream its frames until it ends."""
        settings = self.node.settings
        if is_head(scope):
            # herald serve answers HEAD as GET: the head of the stream, no session.
            framing = _stream_framing(scope)
            headers = [(b"content-type", framing.media_type), *STREAM_HEADERS]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        first: list[str] = []
        try:
            if scope.get("method") == "POST":
                body = await read_body(receive, scope, body_limit(settings), settings.api_body_timeout)
                if body is None:
                    return  # the client left
                if body.strip():
                    first = command_texts(
                        parse_json_object(body).get("commands", []), settings.max_message_size
                    )
        except BadRequest as exc:
            await respond(send, exc.status, exc.detail)
            return
        socket = EmulationSocket(scope, send, receive, _stream_framing(scope))
        opened = await self.open_session(socket)
        if isinstance(opened, str):
            await respond(send, 403, opened)
            return
        session: EmulationSession = opened
        socket.session = session
        await self._stream(session, socket, receive, first)

    async def _stream(
        self, session: EmulationSession, socket: EmulationSocket, receive: Receive, first: list[str]
    ) -> None:
        node, connection = self.node, session.connection
        code, reason, by_peer = 1006, "stream closed by client", True
        watcher = asyncio.get_running_loop().create_task(socket.watch(receive))
        node.control.register(session.session_id, session)
        try:
            await socket.start()
            hello = {
                "type": "emulation",
                "session": session.session_id,
                "node": node.id,
                "secret": session.secret,
            }
            # Before the connection's writer exists: the first frame of the stream.
            await socket.send(orjson.dumps(hello).decode())
            session.started()
            if node.settings.ping_interval <= 0:
                socket.start_heartbeats(connection, HEARTBEAT_INTERVAL)
            if first:
                session.accept(first)
            ended = asyncio.ensure_future(connection.closed.wait())
            try:
                await asyncio.wait((watcher, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
            if connection.close_code is not None and connection.close_code != 1006:
                # Herald closed it (the writer ended the response); else the client left.
                code, reason, by_peer = connection.close_code, connection.close_reason, False
        except (ConnectionError, OSError):
            pass  # the client left while the stream was being opened
        finally:
            node.control.unregister(session.session_id)
            socket.stop_heartbeats()
            try:
                await session.lost(code, reason, by_peer)
            finally:
                # The connection's writer ended the response (or dropped the socket); a
                # client that left needs nothing more.
                await socket.close(code, reason)
                watcher.cancel()
                # The session holds its socket: without this cycle an ended session is
                # freed at once, not left (~60 objects) for the cyclic collector.
                socket.session = None

    # ------------------------------------------------------------ up

    async def commands(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /emulation``: hand commands to a session, on this node or another."""
        node = self.node
        settings = node.settings
        try:
            self._check_origin(scope)
            body = await read_body(receive, scope, body_limit(settings), settings.api_body_timeout)
            if body is None:
                return
            request = parse_json_object(body)
            session_id, secret = request.get("session"), request.get("secret")
            if not isinstance(session_id, str) or not isinstance(secret, str):
                raise BadRequest(400, "session and secret must be strings")
            texts = command_texts(request.get("commands"), settings.max_message_size)
            if not texts:
                raise BadRequest(400, "no commands")
            match = SESSION_ID.fullmatch(session_id)
            if match is None:
                status = DeliveryStatus.UNKNOWN  # no node could hold it: no broker round trip
            else:
                status = await node.control.deliver(match.group(1), session_id, secret, texts)
        except BadRequest as exc:
            await respond(send, exc.status, exc.detail, close=exc.status in (408, 413))
            return
        except BrokerError as exc:
            logger.warning("cannot route emulated commands: %s", exc)
            await respond(send, 503, "broker unavailable", close=False)
            return
        if status is not DeliveryStatus.DELIVERED:
            node.record_rejected_command(f"emulation_{status.value}")
        http_status, detail = STATUS_OF[status]
        if http_status == 204:
            await send({"type": "http.response.start", "status": 204, "headers": [_NO_STORE]})
            await send({"type": "http.response.body", "body": b""})
            return
        await respond(send, http_status, detail, close=False)

    def _check_origin(self, scope: Scope) -> None:
        """The ``Host`` and ``Origin`` rules of ``/connect`` (no per-IP slot: a POST holds none)."""
        from .hosts import handshake_refusal

        headers = scope.get("headers", ())
        refused = handshake_refusal(
            self.node.settings,
            host=header_value(headers, "host"),
            origin=header_value(headers, "origin"),
            local_address=local_address(scope),
            scheme="wss" if scope.get("scheme") == "https" else "ws",
        )
        if refused is not None:
            self.node.record_rejection(refused.kind)
            raise BadRequest(400 if refused.kind == "host" else 403, refused.reason)


class _Endpoint:
    """One method of :class:`EmulationRoutes` as a plain ASGI app (Starlette wraps a
    bound method as a request handler; an object with ``__call__`` it calls as ASGI)."""

    __slots__ = ("call",)

    def __init__(self, call: Any) -> None:
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.call(scope, receive, send)


def add_emulation_routes(router: Any, node: Node) -> EmulationRoutes:
    """Add ``/emulation/connect`` and ``/emulation`` to ``router`` (a Starlette or
    FastAPI router): raw ASGI endpoints, outside the OpenAPI schema."""
    routes = EmulationRoutes(node)
    router.routes.append(
        HttpRoute(
            EMULATION_CONNECT_PATH,
            _Endpoint(routes.connect),
            methods=["GET", "POST"],
            name="herald_emulation_connect",
            include_in_schema=False,
        )
    )
    router.routes.append(
        HttpRoute(
            EMULATION_PATH,
            _Endpoint(routes.commands),
            methods=["POST"],
            name="herald_emulation",
            include_in_schema=False,
        )
    )
    return routes


__all__ = [
    "EMULATION_CONNECT_PATH",
    "EMULATION_PATH",
    "MAX_COMMANDS_PER_POST",
    "MAX_PENDING_COMMANDS",
    "STATUS_OF",
    "EmulationRoutes",
    "EmulationSession",
    "EmulationSocket",
    "add_emulation_routes",
]
