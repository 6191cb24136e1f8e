"""The native driver: Herald's routes served without ASGI, as an asyncio protocol.

Under ASGI every open WebSocket keeps a task alive, suspended inside the app's
middleware, Starlette's route and the endpoint, plus uvicorn's receive queue,
events and websockets' parser: about 25 KiB per idle connection, most of it not
Herald's.  ``herald serve`` gives uvicorn
:class:`~herald.transports.uvicorn.HeraldWebSocketProtocol`, a :class:`NativeProtocol`
(its constructor takes uvicorn's protocol arguments).  On each upgrade request it
looks at the path:

* a route the app declared native (``create_app`` declares ``/connect``, ``/ws``,
  ``/ws_json`` and ``/ws_broadcast``; see :func:`register_routes`) is served here:
  the handshake, RFC 6455 framing (its rules live in :mod:`.wsreader`, sans I/O),
  pings and the closing handshake, with the route's
  :class:`~herald.transports.base.Session` receiving each message (this object is
  its :class:`~herald.transports.base.Socket`).  There is no
  task per connection: a task exists only while a message whose handling is a
  coroutine is being handled (on Python 3.12+ it runs eagerly, so one that never
  suspends costs no loop turn).
* any other path goes to :meth:`NativeProtocol.asgi_protocol`
  (:class:`~herald.transports.uvicorn.AsgiWebSocketProtocol`, uvicorn's own protocol
  with Herald's direct-write path), so every ordinary ASGI WebSocket route keeps working.

What natively served routes do not get: ASGI middleware (the app's own
middleware does not see these four routes; uvicorn's proxy-header handling is
applied here, from the same ``forwarded_allow_ips``) and permessage-deflate
(never negotiated; the client falls back to uncompressed frames).

Limits hold as on the ASGI path: a message over the route's ``max_size`` is
refused (1009) without being buffered, and so is one in more frames than its
``max_fragments`` (1009, :data:`~herald.codes.TOO_MANY_FRAGMENTS`); reading stops
while a client's messages wait to be handled (at most :data:`INBOX_LIMIT`) or while
the socket's write buffer is over its high-water mark; a frame batch never exceeds
the connection's queue bound (see :class:`~herald.transports.fastpath.BatchedWrites`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections import deque
from collections.abc import Awaitable
from typing import Any

from .base import Route, Session
from .fastpath import BatchedWrites, abort_transport, batch_flusher
from .wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    close_payload,
    encode_frame,
    frame_text,
)
from .wshandshake import (
    Request,
    accept_response,
    header,
    header_values,
    http_response,
    offered_subprotocols,
    parse_request,
    request_headers,
    upgrade_refusal,
)
from .wsreader import FrameReader

logger = logging.getLogger("herald.transport")
access_logger = logging.getLogger("uvicorn.error")

#: Messages a connection may have waiting while one is handled; reading pauses beyond.
INBOX_LIMIT = 64
#: Seconds a closing connection whose peer does not read gets before it is dropped.
STUCK_CLOSE_TIMEOUT = 2.0
#: Seconds to wait for the peer's close frame after ours (uvicorn's value).
CLOSE_TIMEOUT = 10.0

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED, _DELEGATED = range(5)
_READ_INBOX, _READ_WRITES = 1, 2


# ---------------------------------------------------------------- keepalive


#: A keepalive sweep covers its connections in groups, one group every this many seconds
#: (at most :data:`KEEPALIVE_GROUPS` groups per interval).
KEEPALIVE_TICK = 0.5
KEEPALIVE_GROUPS = 64


class _Keepalive:
    """WebSocket pings for the native connections of one event loop, from one timer.

    Every ``interval`` seconds each connection is looked at once: one heard from since
    it was last looked at is fine; one that was pinged then and stayed silent is closed
    (1011); any other is pinged.  A silent peer is thus closed two to three intervals
    after it went quiet, without a timer per connection.

    The connections are spread over groups (one per :data:`KEEPALIVE_TICK` of the
    interval, at most :data:`KEEPALIVE_GROUPS`), and the timer looks at one group per
    tick: a ping is a ``write()``, and pinging 10,000 silent subscribers in one callback
    held the loop for ~100 ms, long enough to fail a latency step of bench S5 in every
    run.  Connections join the groups in turn, so that a storm of them (all opened
    within one tick) is spread too; a connection's first look comes within one interval
    of its opening.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        count = max(1, min(KEEPALIVE_GROUPS, int(interval / KEEPALIVE_TICK)))
        self.groups: list[set[NativeProtocol]] = [set() for _ in range(count)]
        self.tick = interval / count
        self.turn = 0  # the group looked at next
        self.joining = 0  # the group the next connection joins
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, ws: NativeProtocol) -> None:
        group = ws.keepalive_group = self.joining
        self.joining = (group + 1) % len(self.groups)
        self.groups[group].add(ws)
        self.size += 1
        if self.timer is None:
            self.timer = self.loop.call_later(self.tick, self.sweep)

    def discard(self, ws: NativeProtocol) -> None:
        group = self.groups[ws.keepalive_group]
        if ws in group:
            group.discard(ws)
            self.size -= 1

    def sweep(self) -> None:
        """Look at the next group (the timer's callback)."""
        self.timer = None
        group = self.groups[self.turn]
        self.turn = (self.turn + 1) % len(self.groups)
        for ws in list(group):
            ws.keepalive_tick()
        if self.size:
            self.timer = self.loop.call_later(self.tick, self.sweep)


_local = threading.local()


def _keepalive(loop: asyncio.AbstractEventLoop, interval: float) -> _Keepalive:
    keepalive: _Keepalive | None = getattr(_local, "keepalive", None)
    if keepalive is None or keepalive.loop is not loop or keepalive.interval != interval:
        keepalive = _local.keepalive = _Keepalive(loop, interval)
    return keepalive


# ---------------------------------------------------------------- the protocol


class NativeProtocol(FrameReader, BatchedWrites, asyncio.Protocol):
    """The native driver's protocol (see the module docstring).

    Routes registered for the app (:func:`register_routes`) are served natively;
    every other path is handed to :meth:`asgi_protocol`.

    For a native session this object is also the connection's transport
    (:class:`~herald.transports.base.Transport`), with the request's details
    (``path``, ``headers``, ``client_ip``, ``scope``...).  The frame and message rules
    are :class:`~herald.transports.wsreader.FrameReader`'s; this class does the I/O.
    """

    __slots__ = (
        "__weakref__",
        "_backlog",
        "_buffered",
        "_close_timer",
        "_delayed",
        "_delegate",
        "_ended",
        "_flusher",
        "_head",
        "_headers",
        "_heard",
        "_inbox",
        "_keepalive",
        "_lost_args",
        "_pending",
        "_pending_bytes",
        "_ping_out",
        "_read_paused",
        "_scope",
        "_state",
        "_task",
        "_writable",
        "_write_paused",
        "app_state",
        "busy",
        "client",
        "close_code",
        "close_reason",
        "config",
        "keepalive_group",
        "loop",
        "path",
        "peer_close",
        "query_string",
        "scheme",
        "server",
        "server_state",
        "session",
        "subprotocols",
        "transport",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._state = _HANDSHAKE
        self._delegate: asyncio.Protocol | None = None
        self.session: Session | None = None
        self.busy = False
        self._task: asyncio.Task[None] | None = None
        self._inbox: deque[str | bytes] | None = None
        self.reset_reader(0)  # the route's bounds are set at the handshake
        self._read_paused = 0
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._heard = False
        self._ping_out = False
        self._keepalive: _Keepalive | None = None
        self.keepalive_group = 0
        self._lost_args: tuple[int, str, bool] | None = None
        self._ended = False
        self._scope: dict[str, Any] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.peer_close: tuple[int, str] | None = None
        self.path = ""
        self.query_string = b""
        # The request's header lines, kept raw; parsed (_headers) only while the handshake
        # is checked, and again on each later read (hooks read them rarely): the parsed
        # list was ~800 bytes and 16 objects for the collector per connection.
        self._head = b""
        self._headers: list[tuple[bytes, bytes]] | None = None
        self.subprotocols: tuple[str, ...] = ()
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.scheme = "ws"
        # BatchedWrites
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._buffered = 0
        self._backlog = 0
        self._delayed = False
        self._flusher = batch_flusher(self.loop)

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self.server = (str(local[0]), int(local[1]))
        self.scheme = "wss" if transport.get_extra_info("sslcontext") else "ws"

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _OPEN or state is _CLOSING:
            self._heard = True
            try:
                self.feed(data)
            except FrameError as exc:
                self._fail(exc.code, exc.reason)
        elif state is _HANDSHAKE:
            self._handshake(data)
        elif state is _DELEGATED and self._delegate is not None:
            self._delegate.data_received(data)

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
            return
        self._write_paused = True
        self._pause_reading(_READ_WRITES)

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
            return
        self._write_paused = False
        self._wake_writers()
        self._resume_reading(_READ_WRITES)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
            return
        state = self._state
        self._state = _CLOSED
        self._pending = []
        self.stop_reading()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._wake_writers()
        if state is _HANDSHAKE:
            return
        self.server_state.connections.discard(self)
        if self._keepalive is not None:
            self._keepalive.discard(self)
        if self.session is None:
            return  # refused at the handshake, or the session was already told (_report_lost)
        if self.peer_close is not None:
            self._end(self.peer_close[0], self.peer_close[1], True)
        else:
            self._end(1006, "", True)

    def _end(self, code: int, reason: str, by_peer: bool) -> None:
        """The session is over: tell it once, after the messages it still has to handle.

        That is as soon as a close frame was sent or received (like ASGI's
        ``websocket.disconnect``), or when the socket broke; the socket itself may
        linger until the closing handshake completes or times out.
        """
        if self._ended or self.session is None:
            return
        self._ended = True
        if self.busy:
            self._lost_args = (code, reason, by_peer)  # reported when the inbox is done
        else:
            self._report_lost((code, reason, by_peer))

    # ------------------------------------------------------------ uvicorn hooks

    def shutdown(self) -> None:
        """uvicorn's server is stopping: close with 1012 (service restart)."""
        if self._state is _OPEN:
            self.close_now(1012, "server shutting down")
        if self.transport.get_write_buffer_size():
            self.abort()  # uvicorn waits for every connection: do not wait on a stuck peer
        else:
            self.transport.close()

    # ------------------------------------------------------------ handshake

    def _handshake(self, data: bytes) -> None:
        request = parse_request(data)
        route = self.find_route(request.path)
        if route is None:
            self._hand_over(data)
            return
        self.open_route(route, request, request_headers(request.lines))

    def open_route(self, route: Route, request: Request, headers: list[tuple[bytes, bytes]]) -> None:
        """Answer ``request`` (already parsed, with its ``headers``) for ``route``: the
        101 and the session, or a refusal.  ``_handshake`` calls it, and so does uvicorn's
        HTTP protocol when it hands a native route's upgrade over without re-serializing
        it (:meth:`~herald.transports.uvicorn.HeraldWebSocketProtocol.take_upgrade`)."""
        path = self.path = request.path
        self.query_string = request.query
        self._head = b"\r\n".join(request.lines)
        self._headers = headers
        self.reset_reader(route.max_size, route.max_fragments)
        self._apply_proxy_headers()
        self.subprotocols = tuple(offered_subprotocols(headers))
        key = upgrade_refusal(request.method, headers)
        if not isinstance(key, str):
            self._respond(key.status, key.reason, key.headers)
            return
        if self.transport.is_closing():
            return  # the client left during the handshake
        try:
            opened = route.open(self)
        except Exception:
            logger.exception("opening a WebSocket session on %s failed", path)
            self._respond(500, "Internal Server Error")
            return
        if isinstance(opened, str):
            logger.warning("refused WebSocket %s from %s: %s", path, self.remote, opened)
            self._log_access("403")
            self._respond(403, "")
            return
        self._accept(opened, key)

    def find_route(self, path: str) -> Route | None:
        """The route natively served at ``path`` (None: hand the request over).
        :class:`~herald.transports.uvicorn.HeraldWebSocketProtocol` looks in the routes
        registered for the app uvicorn serves."""
        return None

    def trusted_proxies(self) -> Any:
        """The proxies whose ``X-Forwarded-*`` headers are applied (an object with
        ``__contains__`` and ``get_trusted_client_address``, as uvicorn's), or None."""
        return None

    def asgi_protocol(self) -> asyncio.Protocol | None:
        """The protocol that serves a path which is not natively served (None: 404).
        :class:`~herald.transports.uvicorn.HeraldWebSocketProtocol` gives uvicorn's."""
        return None

    def _hand_over(self, data: bytes) -> None:
        """Not one of Herald's routes: the ASGI protocol serves it."""
        delegate = self.asgi_protocol()
        if delegate is None:
            self._respond(404, "Not Found")
            return
        self._delegate = delegate
        self._state = _DELEGATED
        delegate.connection_made(self.transport)
        delegate.data_received(data)
        # uvicorn makes *this* object the transport's protocol after this call returns;
        # the delegate takes over from the next loop turn (until then, calls are forwarded).
        self.loop.call_soon(self.transport.set_protocol, delegate)

    def _respond(self, status: int, body: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer the upgrade request with a plain HTTP response and close."""
        self._state = _CLOSED
        self.transport.write(
            http_response(status, body, [*self.server_state.default_headers, *(extra or ())])
        )
        self.transport.close()

    def _accept(self, session: Session, key: str) -> None:
        self._headers = None  # parsed again from _head when read
        self.transport.write(accept_response(key, session.subprotocol, self.server_state.default_headers))
        self._state = _OPEN
        self.session = session
        self.server_state.connections.add(self)
        interval = self._ping_interval()
        if interval and not getattr(session, "checks_liveness", False):
            self._keepalive = _keepalive(self.loop, interval)
            self._keepalive.add(self)
        self._log_access("[accepted]")
        self._run(session.started())

    def _log_access(self, outcome: str) -> None:
        # uvicorn's line, at INFO only with its access log on (herald serve: `access_log`).
        level = logging.INFO if getattr(self.config, "access_log", True) else logging.DEBUG
        if access_logger.isEnabledFor(level):
            query = "?" + self.query_string.decode("latin-1") if self.query_string else ""
            access_logger.log(level, '%s - "WebSocket %s%s" %s', self.remote, self.path, query, outcome)

    def _apply_proxy_headers(self) -> None:
        # What uvicorn's ProxyHeadersMiddleware does to the ASGI scope, for the same peers.
        trusted = self.trusted_proxies()
        if trusted is None or self.client is None or self.client[0] not in trusted:
            return
        proto = self.header("x-forwarded-proto")
        if proto is not None and proto.strip() in ("http", "https", "ws", "wss"):
            self.scheme = proto.strip().replace("http", "ws")
        forwarded = self.header_values(b"x-forwarded-for")
        if forwarded:
            host, port = trusted.get_trusted_client_address(", ".join(forwarded))
            if host:
                self.client = (host, port)

    def _ping_interval(self) -> float:
        interval = getattr(self.config, "ws_ping_interval", None)
        return float(interval) if interval else 0.0

    # ------------------------------------------------------------ request details

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The request headers: lower-case names, raw values."""
        headers = self._headers
        if headers is None:
            headers = request_headers(self._head.split(b"\r\n")) if self._head else []
        return headers

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), decoded as Latin-1."""
        return header(self.headers, name.encode())

    def header_values(self, key: bytes) -> list[str]:
        return header_values(self.headers, key)

    @property
    def client_ip(self) -> str:
        return self.client[0] if self.client else "unknown"

    @property
    def local_address(self) -> str | None:
        """The server side of the connection: its IP, or a Unix socket's path (as ASGI's
        ``scope["server"]`` has it)."""
        if self.server is not None:
            return self.server[0]
        sockname = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return sockname if isinstance(sockname, str) else None

    @property
    def remote(self) -> str:
        client = self.client
        return f"{client[0]}:{client[1]}" if client else "unknown"

    @property
    def scope(self) -> dict[str, Any]:
        """An ASGI-style scope of the handshake, for hooks (built on first use)."""
        scope = self._scope
        if scope is None:
            root_path = getattr(self.config, "root_path", "")
            scope = self._scope = {
                "type": "websocket",
                "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": "1.1",
                "scheme": self.scheme,
                "server": self.server,
                "client": self.client,
                "root_path": root_path,
                "path": root_path + self.path,
                "raw_path": (root_path + self.path).encode("latin-1"),
                "query_string": self.query_string,
                "headers": self.headers,
                "subprotocols": self.subprotocols,
                "state": self.app_state.copy(),
                "herald.native": True,
            }
        return scope

    # ------------------------------------------------------------ FrameReader callbacks

    def on_ping(self, payload: bytes) -> None:
        if self._state is _OPEN:
            self.transport.write(encode_frame(OP_PONG, payload))

    def on_pong(self, payload: bytes) -> None:
        self._ping_out = False  # any inbound frame already counts as a sign of life

    def on_too_big(self, reason: str) -> None:
        session = self.session
        if session is not None:
            session.fail(1009, reason)
        else:
            self.close_now(1009, reason)

    def on_close_frame(self, code: int, reason: str) -> None:
        self.peer_close = (code, reason)
        self.discard_data()
        if self._state is _OPEN:
            self.flush()
            # Echo the code (RFC 6455 section 5.5.1), then the server closes TCP first.
            self.transport.write(encode_frame(OP_CLOSE, close_payload(code, "")))
            self._state = _CLOSING
            self._end(code, reason, True)
        self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: send a close frame and drop the connection."""
        logger.warning("WebSocket protocol error from %s: %s (close %d)", self.remote, reason, code)
        self.stop_reading()
        if self._state is _OPEN:
            self.flush()
            self.transport.write(encode_frame(OP_CLOSE, close_payload(code, reason)))
            self._state = _CLOSING
            self.close_code, self.close_reason = code, reason
            self._end(code, reason, False)
        self.transport.close()

    # ------------------------------------------------------------ handing messages over

    def on_message(self, data: str | bytes) -> None:
        if self._discard or self._state is not _OPEN:
            return
        if self.busy:
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = deque()
            inbox.append(data)
            if len(inbox) >= INBOX_LIMIT:
                self._pause_reading(_READ_INBOX)
            return
        session = self.session
        assert session is not None
        try:
            result = session.message(data)
        except Exception:
            logger.exception("WebSocket session on %s failed", self.path)
            self.close_now(1011, "internal error")
            return
        self._run(result)

    def _run(self, awaitable: Awaitable[None] | None) -> None:
        if awaitable is None:
            return
        self.busy = True
        # A strong reference while it runs (the loop keeps only weak ones).
        task = _start(self.loop, self._work(awaitable))
        if not task.done():  # an eager task (3.12+) may have finished already
            self._task = task

    async def _work(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
            inbox = self._inbox
            session = self.session
            while inbox and session is not None:
                data = inbox.popleft()
                if self._read_paused & _READ_INBOX and len(inbox) < INBOX_LIMIT // 2:
                    self._resume_reading(_READ_INBOX)
                # What arrived before a close frame is handled, as under ASGI.
                result = session.message(data)
                if result is not None:
                    await result
        except Exception:
            logger.exception("WebSocket session on %s failed", self.path)
            self.close_now(1011, "internal error")
        finally:
            self.busy = False
            self._task = None
            self._inbox = None
            self._resume_reading(_READ_INBOX)
            lost = self._lost_args
            if lost is not None:
                self._lost_args = None
                self._report_lost(lost)

    def _report_lost(self, args: tuple[int, str, bool]) -> None:
        session = self.session
        if session is None:
            return
        # The session is told once and never used again here.  Letting go of it breaks the
        # cycle protocol -> session -> connection -> protocol, so that a closed connection
        # is freed by reference counting instead of waiting for the cyclic collector
        # (which walks every live connection to find it).
        self.session = None
        try:
            result = session.lost(*args)
        except Exception:
            logger.exception("WebSocket session cleanup on %s failed", self.path)
            return
        if result is not None:
            # uvicorn waits for server_state.tasks at shutdown: cleanups are not cut short.
            task = _start(self.loop, _logged(result, self.path))
            tasks = self.server_state.tasks
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _pause_reading(self, reason: int) -> None:
        if not self._read_paused and self._state is _OPEN:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        self._read_paused |= reason

    def _resume_reading(self, reason: int) -> None:
        if not self._read_paused & reason:
            return
        self._read_paused &= ~reason
        if not self._read_paused and self._state in (_OPEN, _CLOSING):
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    # ------------------------------------------------------------ writing (Transport)

    def _open_transport(self) -> asyncio.Transport | None:
        """BatchedWrites: the socket, while frames may be written to it."""
        if self._state is not _OPEN:
            return None
        transport = self.transport
        return None if transport.is_closing() else transport

    def _wake_writers(self) -> None:
        waiter = self._writable
        if waiter is not None:
            self._writable = None
            if not waiter.done():
                waiter.set_result(None)

    def send_now(self, message: str | bytes) -> None:
        """Write a text (str) or binary (bytes) message at once (replies of the tutorial's
        endpoints).

        Never waits: a client that does not read its replies fills the socket's buffer
        until its high-water mark, and then this connection stops reading it.
        """
        if self._state is _OPEN:
            self.flush()
            if isinstance(message, str):
                self.transport.write(frame_text(message.encode()))
            else:
                self.transport.write(encode_frame(OP_BINARY, message))

    async def _until_writable(self) -> None:
        while self._write_paused and self._state is _OPEN:
            waiter = self._writable
            if waiter is None:
                waiter = self._writable = self.loop.create_future()
            await waiter

    async def send(self, frame: str) -> None:
        """Write a text message, waiting while the socket's write buffer is full."""
        self.flush()
        await self._until_writable()
        if self._state is not _OPEN:
            raise ConnectionResetError("the WebSocket is closed")
        self.transport.write(frame_text(frame.encode()))

    async def close(self, code: int, reason: str) -> None:
        self.close_now(code, reason)

    def close_now(self, code: int, reason: str) -> None:
        """Start the closing handshake: frames batched so far, then the close frame."""
        if self._state is not _OPEN:
            return
        self.flush()
        transport = self.transport
        transport.write(encode_frame(OP_CLOSE, close_payload(code, reason)))
        self._state = _CLOSING
        self.close_code, self.close_reason = code, reason
        self.discard_data()
        # Read on, to see the peer's close frame.
        if self._read_paused:
            self._read_paused = 0
            with contextlib.suppress(Exception):
                transport.resume_reading()
        if transport.get_write_buffer_size():
            # The peer is not reading: it will not read our close frame either.
            self._close_timer = self.loop.call_later(STUCK_CLOSE_TIMEOUT, self.abort)
        else:
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, transport.close)
        self._end(code, reason, False)

    def abort(self) -> None:
        """Drop the TCP connection at once (linger 0: unsent bytes are discarded)."""
        self._pending = []
        abort_transport(self.transport)

    def keepalive_tick(self) -> None:
        """One keepalive sweep (see :class:`_Keepalive`)."""
        if self._state is not _OPEN:
            return
        if self._heard:
            self._heard = False
            self._ping_out = False
        elif self._ping_out:
            self._fail(1011, "keepalive ping timeout")
        else:
            self._ping_out = True
            self.flush()
            self.transport.write(encode_frame(OP_PING, b""))


async def _logged(awaitable: Awaitable[None], path: str) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("WebSocket session cleanup on %s failed", path)


def _start(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[None]:
    if sys.version_info >= (3, 12):
        # Run until the first real suspension right away: most messages never suspend.
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)


__all__ = [
    "INBOX_LIMIT",
    "NativeProtocol",
]
