"""Everything of Herald that knows uvicorn's internals (and Starlette's private ones).

* :class:`HeraldWebSocketProtocol`: the ``ws=`` class ``herald serve`` gives uvicorn.
  Registered routes are served natively (:class:`~herald.transports.native.NativeProtocol`);
  every other upgrade is handed to :class:`AsgiWebSocketProtocol`.
* :class:`BoundedSansIOProtocol` and ``BoundedWSProtocol``: uvicorn's websockets-sansio
  and wsproto protocols with Herald's bound on the frames of one message (and for
  wsproto, permessage-deflate refused); :func:`uvicorn_ws_protocol` picks the class.
  After the close frame that fails a connection (1009, 1002, 1007) they half-close and
  read on until the peer closes (:func:`linger_after_close`), so that the close frame
  is not lost to a TCP reset.
* :class:`AsgiWebSocketProtocol` puts itself in the ASGI scope, and
  :class:`FastAsgiSocket` then writes fan-out frames straight to its socket (the
  attributes of uvicorn's protocol it reads: ``transport``, ``loop``,
  ``close_sent``, ``disconnected``, ``handshake_complete``).
* the registry of natively served routes (:func:`register_routes`), found again from
  uvicorn's config, and uvicorn's trusted proxies for the native path's
  ``X-Forwarded-*`` headers;
* :func:`abort_for`: the asyncio transport under a plain ASGI connection, reached
  through the bound ``receive`` uvicorn hands the app (to drop a stuck peer).
* :func:`stop_listening`: closes uvicorn's listening sockets from its signal handler
  (:mod:`herald.shutdown`); :func:`install_log_filters`: Herald's filters on uvicorn's
  loggers.

The HTTP protocol with the request-header timeout is next door
(:mod:`herald.transports.uvicorn_protocol`): uvicorn loads it by import string in
every worker, and it reads its timeout from the environment when it is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..auth import install_token_redaction
from ..codes import TOO_MANY_FRAGMENTS
from .asgi import FAST_PATH_SCOPE_KEY, AsgiSocket, Receive, Scope, Send
from .base import Route
from .fastpath import BatchedWrites, abort_transport, batch_flusher
from .native import CLOSE_TIMEOUT, STUCK_CLOSE_TIMEOUT, NativeProtocol
from .wshandshake import websocket_upgrade
from .wsreader import DEFAULT_MAX_FRAGMENTS

#: The environment variable the ASGI WebSocket protocols read their fragment bound from
#: (``herald serve`` exports the effective ``max_message_fragments`` there).
FRAGMENTS_ENV = "HERALD_MAX_MESSAGE_FRAGMENTS"


def fragment_limit() -> int:
    """The most frames one inbound message may arrive in, for a connection opening now.

    Read from :data:`FRAGMENTS_ENV` (a uvicorn protocol class knows the server's
    options, not Herald's settings; like ``ws_max_size``, the bound is the server's).
    """
    try:
        limit = int(os.environ.get(FRAGMENTS_ENV, DEFAULT_MAX_FRAGMENTS))
    except ValueError:
        return DEFAULT_MAX_FRAGMENTS
    return limit if limit >= 1 else DEFAULT_MAX_FRAGMENTS


# ---------------------------------------------------------------- failing a connection


def linger_after_close(protocol: Any) -> None:
    """After a uvicorn protocol wrote the close frame that fails a connection: half-close,
    read on and discard until the peer closes, instead of closing the socket at once.

    uvicorn closes the socket right after the close frame of a failure (1009 for a
    message over ``ws_max_size``, 1007, 1002).  The rest of the offending message is
    then unread in the kernel, and closing a socket with unread data makes Linux send a
    TCP RST instead of a FIN; a client still writing that message meets the reset on
    its next write and may drop the connection before it reads the close frame (3 runs
    in 8 of Autobahn's 9.* cases lost the 1009).  Here the close frame is followed by a
    FIN (``write_eof``), what the peer still sends is read and discarded, and the socket
    is closed when the peer closes its side, or after :data:`~herald.transports.native.CLOSE_TIMEOUT`
    (:data:`~herald.transports.native.STUCK_CLOSE_TIMEOUT`, dropped, when the peer does
    not even read): what the native path does.  ``protocol`` is uvicorn's
    websockets-sansio or wsproto protocol (``transport``, ``loop``, ``read_paused``,
    ``close_timer``); its ``data_received`` must drop data once ``lingering`` is set.
    A transport that cannot half-close (TLS) is closed at once, as uvicorn does.
    """
    transport = protocol.transport
    if transport.is_closing() or protocol.lingering:
        return
    if not transport.can_write_eof():
        transport.close()
        return
    protocol.lingering = True
    transport.write_eof()
    # Read on even if reading was paused (a message waiting for the app, or a full
    # write buffer: see _ReadsHeldWhileWritesWait).
    protocol.read_paused = False
    transport.resume_reading()
    if protocol.close_timer is not None:
        protocol.close_timer.cancel()
    if transport.get_write_buffer_size():
        # The peer is not reading: it will not read the close frame either.
        protocol.close_timer = protocol.loop.call_later(STUCK_CLOSE_TIMEOUT, abort_transport, transport)
    else:
        protocol.close_timer = protocol.loop.call_later(CLOSE_TIMEOUT, transport.close)


# ---------------------------------------------------------------- reading held while writes wait


class _ReadsHeldWhileWritesWait:
    """Mixed into uvicorn's WebSocket protocols: the socket is not read while its write
    buffer is over the transport's high-water mark.

    uvicorn answers a ping frame inside ``data_received`` (a pong written at once, no
    app involved) and writes with no regard for a full buffer: a client flooding pings
    and never reading grew the server's write buffer without limit (800 MB in seconds),
    and slowed every other client of the process.  A client's pings, like its commands,
    are now read only as fast as it reads the answers (the native path does the same).
    The pause is undone by ``resume_writing`` (the buffer drained to the low-water
    mark), and a ``receive`` that lets uvicorn resume reading puts it back while the
    buffer is still full.  A failed connection that lingers (:func:`linger_after_close`)
    reads on regardless.
    """

    transport: Any
    writable: Any  # asyncio.Event, set while the buffer is under the high-water mark
    read_paused: bool  # uvicorn's own pause: a message waits for the app's receive()
    lingering: bool

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if not self.lingering:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    async def receive(self) -> Any:
        message = await super().receive()  # type: ignore[misc]
        # uvicorn resumed reading if its queue emptied; the buffer may still be full.
        if not self.writable.is_set() and not self.lingering and not self.transport.is_closing():
            self.transport.pause_reading()
        return message


# ---------------------------------------------------------------- websockets-sansio


class BoundedSansIOProtocol(_ReadsHeldWhileWritesWait, WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a bound on the frames of one message.

    websockets' sans-I/O parser bounds a message's bytes (``ws_max_size``) but leaves
    assembling fragments to uvicorn, which keeps every fragment in a list: a text frame
    with FIN=0 followed by millions of empty continuation frames grew that list without
    limit.  Here the frame after the :func:`fragment_limit`-th of a message fails the
    connection with 1009 (:data:`~herald.codes.TOO_MANY_FRAGMENTS`), so the list holds
    at most that many entries.
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.max_fragments = fragment_limit()
        self.fragments = 0  # frames of the message being received
        self.lingering = False  # failed: reading on until the peer closes (linger_after_close)
        if not getattr(config, "access_log", True):
            # uvicorn's access_log switch does not cover its per-connection WebSocket line.
            self.logger = _AcceptedAtDebug(self.logger)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the connection failed: what the peer still sends is discarded
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        """The connection failed (``conn.fail``, or uvicorn's 1007): tell the app, write
        the close frame, then linger (see :func:`linger_after_close`) where uvicorn
        closes the socket at once."""
        close = self.conn.close_sent
        code, reason = (close.code, close.reason) if close is not None else (1006, "")
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        linger_after_close(self)

    def handle_text(self, event: Any) -> None:
        self.fragments = 1
        super().handle_text(event)

    def handle_bytes(self, event: Any) -> None:
        self.fragments = 1
        super().handle_bytes(event)

    def handle_cont(self, event: Any) -> None:
        if self.close_sent:
            # Closing (or failed, with more frames of this batch still to dispatch): a
            # message completed now would be dropped anyway, so its fragments are not kept.
            self.frames = []
            return
        self.fragments += 1
        if self.fragments > self.max_fragments:
            self.frames = []
            self.conn.fail(1009, TOO_MANY_FRAGMENTS.format(limit=self.max_fragments))
            self.handle_parser_exception()
            return
        super().handle_cont(event)


class AsgiWebSocketProtocol(BoundedSansIOProtocol):
    """uvicorn's websockets-sansio protocol (with Herald's fragment bound, see
    :class:`BoundedSansIOProtocol`), plus a direct-write entry for Herald: it puts
    itself in the connection's ASGI scope, where Herald's ASGI driver finds it and asks
    it for a :class:`FastAsgiSocket` (:meth:`herald_socket`).

    :class:`HeraldWebSocketProtocol` hands it every upgrade request that is not for a
    natively served route.
    """

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The parsed request is only read above (the scope now carries its headers);
        # dropping it saves about 2 KiB per open connection.
        self.request = None  # type: ignore[assignment]
        scope: Any = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            # The ASGI task was created but has not run yet: it sees this key.
            scope[FAST_PATH_SCOPE_KEY] = self

    def herald_socket(self, scope: Scope, receive: Receive, send: Send) -> AsgiSocket:
        """The socket Herald's ASGI driver uses for this connection."""
        return FastAsgiSocket(scope, send, self)

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        finally:
            # The scope holds this protocol (above), and this protocol its scope: without
            # this, every connection that ended waited for the cyclic collector.
            self.scope.pop(FAST_PATH_SCOPE_KEY, None)  # type: ignore[misc]


class _AcceptedAtDebug(logging.LoggerAdapter):  # type: ignore[type-arg]
    """uvicorn's logger for one connection, with its per-connection ``[accepted]`` line at
    DEBUG: uvicorn's ``access_log`` switch does not cover WebSocket lines."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, None)

    def __getattr__(self, name: str) -> Any:
        # uvicorn also reads the logger's attributes (``level`` for its TRACE lines).
        return getattr(self.logger, name)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.endswith("[accepted]"):
            self.logger.debug(msg, *args, **kwargs)
        else:
            self.logger.info(msg, *args, **kwargs)


class FastAsgiSocket(BatchedWrites, AsgiSocket):
    """An :class:`~herald.transports.asgi.AsgiSocket` that also writes pre-framed frames
    synchronously to uvicorn's socket (see :class:`~herald.transports.fastpath.BatchedWrites`)."""

    __slots__ = ("_backlog", "_buffered", "_delayed", "_flusher", "_pending", "_pending_bytes", "_protocol")

    def __init__(self, scope: Scope, send: Send, protocol: AsgiWebSocketProtocol) -> None:
        super().__init__(scope, send, None)
        self._protocol = protocol
        self._flusher = batch_flusher(protocol.loop)
        self._pending = []
        self._pending_bytes = 0
        self._buffered = 0
        self._backlog = 0
        self._delayed = False

    def stop_server_pings(self) -> None:
        # uvicorn started its keepalive pings when the accept was sent.
        self._protocol.stop_keepalive()

    def _open_transport(self) -> asyncio.Transport | None:
        protocol = self._protocol
        if protocol.close_sent or protocol.disconnected or not protocol.handshake_complete:
            return None
        transport = protocol.transport
        return None if transport.is_closing() else transport

    async def send(self, frame: str) -> None:
        self.flush()
        await super().send(frame)

    async def _until_writable(self) -> None:
        # uvicorn's protocol clears ``writable`` in pause_writing and sets it in
        # resume_writing and connection_lost.
        await self._protocol.writable.wait()

    async def flush_outbox(self) -> None:
        self.flush()
        await super().flush_outbox()

    async def send_close(self) -> None:
        self.flush()
        await super().send_close()

    def abort(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        super().abort()
        abort_transport(self._protocol.transport)


def abort_for(receive: Receive) -> Callable[[], None] | None:
    """How to drop the TCP connection of a plain ASGI WebSocket, when the server allows it.

    ASGI has no way to abort a socket.  uvicorn hands the application its protocol
    object's bound ``receive``; that protocol owns the asyncio transport.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "abort", None)):
        return None
    return lambda: abort_transport(transport)


# ---------------------------------------------------------------- route registry

# ASGI app object -> its natively served routes.  Registered by the app
# (Herald.serve_natively); found again from uvicorn's config (its loaded_app wraps the
# application in middleware that keep it as ``.app``).
_registry: weakref.WeakKeyDictionary[Any, dict[str, Route]] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def register_routes(app: Any, routes: dict[str, Route]) -> None:
    """Serve ``routes`` (path -> route) natively for the ASGI application ``app``."""
    with _registry_lock:
        _registry[app] = {**_registry.get(app, {}), **routes}


# uvicorn config -> its loaded app and the middleware around it, outermost first.  Built
# once per server (the chain does not change after loading), read on every handshake.
_chains: weakref.WeakKeyDictionary[Any, tuple[list[Any], Any]] = weakref.WeakKeyDictionary()


def _app_chain(config: Any) -> tuple[list[Any], Any]:
    """The app chain of ``config`` and uvicorn's trusted-host set when it applies proxy
    headers (else None)."""
    cached = _chains.get(config)
    if cached is None:
        chain = []
        app = getattr(config, "loaded_app", None)
        for _ in range(16):
            if app is None:
                break
            chain.append(app)
            app = getattr(app, "app", None)
        trust = None
        if getattr(config, "proxy_headers", False):
            for app in chain:
                trusted = getattr(app, "trusted_hosts", None)
                if trusted is not None and hasattr(trusted, "get_trusted_client_address"):
                    trust = trusted
                    break
        cached = _chains[config] = (chain, trust)
    return cached


def routes_for(config: Any) -> dict[str, Route] | None:
    for app in _app_chain(config)[0]:
        try:
            routes = _registry.get(app)
        except TypeError:  # not weak-referenceable: cannot be registered
            continue
        if routes is not None:
            return routes
    return None


# ---------------------------------------------------------------- Herald's protocol class


class HeraldWebSocketProtocol(NativeProtocol):
    """uvicorn's ``ws=`` protocol class for ``herald serve``.

    Use as ``uvicorn.run(app, ws=HeraldWebSocketProtocol)``.  The routes the app
    declared (see :meth:`herald.Herald.serve_natively`) are served natively; every
    other path is handed to :class:`AsgiWebSocketProtocol`.
    """

    __slots__ = ()

    def find_route(self, path: str) -> Route | None:
        routes = routes_for(self.config)
        return routes.get(path) if routes else None

    @classmethod
    def take_upgrade(cls, http: Any, data: bytes) -> bool:
        """Serve a connection's first bytes when they are a WebSocket upgrade to one of
        the app's native routes (True), straight from uvicorn's HTTP protocol ``http``
        (:class:`~herald.transports.uvicorn_protocol.HeaderTimeoutHTTPProtocol` asks).

        uvicorn would feed them to httptools, build an ASGI scope, write the request
        out again and hand that to this class, which parses it once more: 12-15 % of
        a connect + subscribe's server CPU in bench S7.  Anything else (another
        path, a malformed or partial head, a plain request) returns False and goes
        through uvicorn as before.
        """
        upgrade = websocket_upgrade(data)
        if upgrade is None:
            return False
        request, headers = upgrade
        routes = routes_for(http.config)
        route = routes.get(request.path) if routes else None
        if route is None:
            return False
        http.connections.discard(http)  # as uvicorn's own upgrade does
        protocol = cls(config=http.config, server_state=http.server_state, app_state=http.app_state)
        protocol.connection_made(http.transport)
        http.transport.set_protocol(protocol)
        protocol.open_route(route, request, headers)
        return True

    def trusted_proxies(self) -> Any:
        # What uvicorn's ProxyHeadersMiddleware trusts, found in the app's middleware chain.
        return _app_chain(self.config)[1]

    def asgi_protocol(self) -> asyncio.Protocol:
        return AsgiWebSocketProtocol(
            config=self.config, server_state=self.server_state, app_state=self.app_state, _loop=self.loop
        )


# ---------------------------------------------------------------- wsproto


# The server's config -> the same config with permessage-deflate off, made once per server.
_without_deflate: weakref.WeakKeyDictionary[Config, Config] = weakref.WeakKeyDictionary()


def _no_deflate(config: Config) -> Config:
    if not config.ws_per_message_deflate:
        return config
    plain = _without_deflate.get(config)
    if plain is None:
        if not config.loaded:
            config.load()
        plain = copy.copy(config)
        plain.ws_per_message_deflate = False
        _without_deflate[config] = plain
    return plain


_wsproto_class: type[asyncio.Protocol] | None = None


def _bounded_wsproto() -> type[asyncio.Protocol]:
    """uvicorn's ``wsproto`` protocol without permessage-deflate and with a bound on the
    frames of one message (built on first use, so that wsproto is imported only when it
    is the chosen implementation).

    * permessage-deflate is never negotiated: wsproto inflates a compressed frame whole
      before uvicorn compares the message with ``ws_max_size`` (a few KiB of deflated
      zeros became hundreds of MiB in the server);
    * the frame after the :func:`fragment_limit`-th of a message closes with 1009;
    * a frame wsproto cannot parse gets a close frame (1002, 1007...) before the TCP
      connection is closed; the plain class closed it silently.
    """
    global _wsproto_class
    if _wsproto_class is not None:
        return _wsproto_class
    from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
    from wsproto import events
    from wsproto.connection import ConnectionState

    class BoundedWSProtocol(_ReadsHeldWhileWritesWait, WSProtocol):
        def __init__(
            self,
            config: Config,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(_no_deflate(config), server_state, app_state, _loop)
            self.max_fragments = fragment_limit()
            self.fragments = 0  # complete frames of the message being received
            self.lingering = False  # failed: reading on until the peer closes (linger_after_close)

        def data_received(self, data: bytes) -> None:
            if self.lingering:
                return  # the connection failed: what the peer still sends is discarded
            super().data_received(data)

        def handle_message(self, event: events.TextMessage | events.BytesMessage) -> None:
            # wsproto hands over a frame in pieces as its bytes arrive: count whole frames.
            if event.frame_finished:
                count = self.fragments + 1
                if count > self.max_fragments:
                    self._fail_message(TOO_MANY_FRAGMENTS.format(limit=self.max_fragments))
                    return
                self.fragments = 0 if event.message_finished else count
            # uvicorn's own size check closes the socket at once: checked here first.
            buffer = self.buffer
            data = event.data
            size = len(data)
            if isinstance(data, str) and buffer.length + size * 4 > buffer.max_length:
                size = len(data.encode())
            if buffer.length + size > buffer.max_length:
                self._fail_message(f"Message exceeds the maximum size ({buffer.max_length} bytes)")
                return
            super().handle_message(event)

        def handle_close(self, event: events.CloseConnection) -> None:
            if (
                not self.close_sent
                and self.conn.state is ConnectionState.OPEN
                and not self.transport.is_closing()
            ):
                # wsproto reports a frame it could not parse as a close event without
                # closing its side: send the close frame, so the client learns why.
                self.transport.write(
                    self.conn.send(events.CloseConnection(code=event.code, reason=event.reason))
                )
                self.close_sent = True
                self.queue.put_nowait(
                    {"type": "websocket.disconnect", "code": event.code, "reason": event.reason}
                )
                linger_after_close(self)
                return
            super().handle_close(event)

        def _fail_message(self, reason: str) -> None:
            """Close with 1009: the message being received is over a bound."""
            self.close_sent = True
            self.buffer.clear()
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1009, "reason": reason})
            if not self.transport.is_closing():
                self.transport.write(self.conn.send(events.CloseConnection(code=1009, reason=reason)))
                linger_after_close(self)

    # Found again by name (pickled configs of worker processes): see __getattr__ below.
    BoundedWSProtocol.__module__ = __name__
    BoundedWSProtocol.__qualname__ = "BoundedWSProtocol"
    _wsproto_class = BoundedWSProtocol
    return BoundedWSProtocol


def __getattr__(name: str) -> Any:
    if name == "BoundedWSProtocol":
        return _bounded_wsproto()
    raise AttributeError(name)


def uvicorn_ws_protocol(ws_impl: str, fast_path: bool) -> type[asyncio.Protocol] | str:
    """The ``ws=`` argument for uvicorn.

    :class:`HeraldWebSocketProtocol` when the fast path is on and the chosen
    implementation is websockets' sans-I/O one it extends (``auto`` picks it too);
    without the fast path, uvicorn's implementation with Herald's bounds:
    :class:`BoundedSansIOProtocol`, or for ``wsproto`` ``BoundedWSProtocol`` (no
    permessage-deflate).  The legacy ``websockets`` protocol is uvicorn's own:
    websockets bounds its fragments itself (4096 per message, close 1009 "too many
    fragments").
    """
    if ws_impl in ("websockets-sansio", "auto"):
        return HeraldWebSocketProtocol if fast_path else BoundedSansIOProtocol
    if ws_impl == "wsproto":
        return _bounded_wsproto()
    return ws_impl


# ---------------------------------------------------------------- logs and signals


class _QuietProtocolErrors(logging.Filter):
    """uvicorn logs a full traceback when a client sends invalid UTF-8 (it then closes with
    1007, which is correct).  Bad client input must not put tracebacks in our logs: keep the
    one-line message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "Invalid UTF-8" in str(record.msg):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_log_filters() -> None:
    """Idempotently attach Herald's filters to uvicorn's error logger."""
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietProtocolErrors) for f in target.filters):
        target.addFilter(_QuietProtocolErrors())
    # uvicorn logs the handshake path with its query string: keep ?token=... out of logs.
    install_token_redaction("uvicorn.error", "uvicorn.access", "herald", "herald.transport")


def stop_listening(signal_handler: Any) -> None:
    """Close uvicorn's listening sockets, when ``signal_handler`` is a uvicorn ``Server``'s
    (the handler :func:`herald.shutdown.drain_on_signals` wrapped)."""
    owner = getattr(signal_handler, "__self__", None)
    if owner is None or not type(owner).__module__.startswith("uvicorn"):
        return
    for server in getattr(owner, "servers", None) or ():
        with contextlib.suppress(Exception):
            server.close()


__all__ = [
    "FRAGMENTS_ENV",
    "AsgiWebSocketProtocol",
    "BoundedSansIOProtocol",
    "FastAsgiSocket",
    "HeraldWebSocketProtocol",
    "abort_for",
    "fragment_limit",
    "install_log_filters",
    "linger_after_close",
    "register_routes",
    "routes_for",
    "stop_listening",
    "uvicorn_ws_protocol",
]
