"""The ASGI driver: a :class:`~herald.transports.base.Route` served by any ASGI server.

:class:`AsgiRoute` is an ASGI application for one WebSocket path (mount it as a
Starlette WebSocket route).  It runs the same :class:`~herald.transports.base.Session`
as the native driver: the route's ``open`` decides on the handshake (a refusal is an
HTTP 403), then every message goes to the session, in order, one at a time.  Its
:class:`AsgiSocket` is the session's socket and the connection's transport.

Rules kept here, as on the native path: a message over the route's ``max_size`` is
refused with the session's ``fail`` (1009) and nothing after it is handed over; the
session's ``lost`` comes once, when the peer closed (its code), when Herald closed
(``close_now``, or the connection's writer closing the transport: Herald's code) or
when the socket broke (1006).  A ``close_now`` while the driver waits for the next
message (a handshake timeout) ends that wait at once.

Under uvicorn with Herald's protocol class the socket also writes fan-out frames
straight to the socket (see :mod:`herald.transports.uvicorn`); elsewhere every frame
is an ASGI ``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..context import AsgiHandshake
from .base import Route, Session

logger = logging.getLogger("herald.transport")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Where :class:`~herald.transports.uvicorn.AsgiWebSocketProtocol` puts itself in the
#: scope; it makes the fast socket (``herald_socket``).
FAST_PATH_SCOPE_KEY = "herald.fastpath"
#: Seconds a close frame may take to leave before the socket is dropped.
CLOSE_SEND_TIMEOUT = 2.0

_OPEN, _CLOSING, _CLOSED = range(3)


class AsgiSocket(AsgiHandshake):
    """A :class:`~herald.transports.base.Socket` over one ASGI WebSocket connection
    (its handshake attributes are the scope's, read by :class:`AsgiHandshake`)."""

    __slots__ = ("_abort", "_outbox", "_receiving", "_send", "_state", "_task", "busy", "close_args")

    def __init__(self, scope: Scope, send: Send, abort: Callable[[], None] | None = None) -> None:
        super().__init__(scope)
        self._send = send
        self._abort = abort
        self._state = _OPEN
        self._outbox: list[str | bytes] | None = None
        self._receiving = False
        self._task: asyncio.Task[Any] | None = None
        self.busy = False
        #: (code, reason) once Herald started closing.
        self.close_args: tuple[int, str] | None = None

    def stop_server_pings(self) -> None:
        """Stop the server's own WebSocket pings on this connection, where the server
        lets Herald do so (see :class:`~herald.transports.uvicorn.FastAsgiSocket`); plain
        ASGI has no way to, so this does nothing."""

    # ------------------------------------------------------------ writing

    def send_now(self, message: str | bytes) -> None:
        """Queue a text (str) or binary (bytes) message behind the message being handled
        (the driver sends it next)."""
        if self._state is _OPEN:
            outbox = self._outbox
            if outbox is None:
                outbox = self._outbox = []
            outbox.append(message)

    async def flush_outbox(self) -> None:
        outbox = self._outbox
        if outbox:
            self._outbox = None
            send = self._send
            # Replies queued before a close_now still leave, before the close frame.
            for message in outbox:
                if self._state is _CLOSED:
                    return
                if isinstance(message, str):
                    await send({"type": "websocket.send", "text": message})
                else:
                    await send({"type": "websocket.send", "bytes": message})

    async def send(self, frame: str) -> None:
        if self._state is not _OPEN:
            raise ConnectionResetError("the WebSocket is closed")
        await self._send({"type": "websocket.send", "text": frame})

    def close_now(self, code: int, reason: str) -> None:
        """Start closing; the driver sends the close frame (ending its wait for a message)."""
        if self._state is not _OPEN:
            return
        self._state = _CLOSING
        self.close_args = (code, reason)
        if self._receiving and self._task is not None:
            self._task.cancel()  # the driver waits for the peer: stop waiting (see AsgiRoute)

    async def close(self, code: int, reason: str) -> None:
        """The connection's writer closes: send the close frame now (never raises)."""
        self.close_now(code, reason)
        await self.send_close()

    async def send_close(self) -> None:
        if self._state is not _CLOSING or self.close_args is None:
            return
        self._state = _CLOSED
        code, reason = self.close_args
        try:
            # A peer that stopped reading blocks the close frame behind flow control.
            await asyncio.wait_for(
                self._send({"type": "websocket.close", "code": code, "reason": reason[:120]}),
                CLOSE_SEND_TIMEOUT,
            )
        except TimeoutError:
            self.abort()
        except Exception:
            pass

    def abort(self) -> None:
        """Drop the TCP connection when the server lets Herald reach it (uvicorn does)."""
        self._outbox = None
        if self._abort is not None:
            self._abort()

    def peer_gone(self) -> None:
        self._state = _CLOSED
        self._outbox = None


#: Makes the socket for a connection: the fast one under Herald's uvicorn protocol.
SocketFactory = Callable[[Scope, Receive, Send], AsgiSocket]


class AsgiRoute:
    """An ASGI application serving one :class:`~herald.transports.base.Route`.

    ``fast_path``: use Herald's direct writes when the server offers them
    (:mod:`herald.transports.uvicorn`).  ``abort_for`` finds a way to drop the TCP
    connection of a plain ASGI connection (None: there is none).
    """

    __slots__ = ("abort_for", "fast_path", "route")

    def __init__(
        self,
        route: Route,
        *,
        fast_path: bool = True,
        abort_for: Callable[[Receive], Callable[[], None] | None] | None = None,
    ) -> None:
        self.route = route
        self.fast_path = fast_path
        self.abort_for = abort_for

    def socket(self, scope: Scope, receive: Receive, send: Send) -> AsgiSocket:
        protocol = scope.get(FAST_PATH_SCOPE_KEY) if self.fast_path else None
        make: SocketFactory | None = getattr(protocol, "herald_socket", None)
        if make is not None:
            return make(scope, receive, send)
        abort = self.abort_for(receive) if self.abort_for is not None else None
        return AsgiSocket(scope, send, abort)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":  # pragma: no cover - mounted as a WebSocket route
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        socket = self.socket(scope, receive, send)
        opened = self.route.open(socket)
        if isinstance(opened, str):
            logger.warning("refused WebSocket %s from %s: %s", socket.path, socket.remote, opened)
            # Before accept, a close is answered with HTTP 403.
            await send({"type": "websocket.close", "code": 1008, "reason": opened})
            return
        try:
            await send({"type": "websocket.accept", "subprotocol": opened.subprotocol})
        except Exception as exc:
            logger.debug("accept failed: %r", exc)
            socket.peer_gone()
            await _finish(opened.lost(1006, "", True))
            return
        if getattr(opened, "checks_liveness", False):
            socket.stop_server_pings()  # the session pings its peer itself (Session contract)
        code, reason, by_peer = await self._serve(socket, opened, receive)
        await _finish(opened.lost(code, reason, by_peer))
        if not by_peer:
            await socket.send_close()

    async def _serve(self, socket: AsgiSocket, session: Session, receive: Receive) -> tuple[int, str, bool]:
        """Hand messages to ``session`` until the socket ends; returns how it ended."""
        max_size = self.route.max_size
        task = socket._task = asyncio.current_task()
        refusing = False  # a message broke a rule: nothing more is handed over
        try:
            await _run(socket, session.started())
            while socket.close_args is None:
                socket._receiving = True
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    # Our own close_now ended the wait; any other cancellation goes on.
                    if socket.close_args is None or task is None or task.uncancel() > 0:
                        raise
                    break
                finally:
                    socket._receiving = False
                kind = message["type"]
                if kind == "websocket.disconnect":
                    socket.peer_gone()
                    return int(message.get("code") or 1005), str(message.get("reason") or ""), True
                if refusing:
                    continue
                text = message.get("text")
                data: str | bytes | None = text if text is not None else message.get("bytes")
                if data is None:
                    continue
                # len(text) <= bytes <= 4 * len(text): only encode when it could matter.
                size = len(data) if isinstance(data, bytes) else len(data) * 4
                if size > max_size and (isinstance(data, bytes) or len(data.encode()) > max_size):
                    refusing = True
                    session.fail(1009, f"message larger than {max_size} bytes")
                    continue
                try:
                    result = session.message(data)
                except Exception:
                    logger.exception("WebSocket session on %s failed", socket.path)
                    socket.close_now(1011, "internal error")
                    continue
                await _run(socket, result)
        except Exception as exc:  # the socket broke under us (or the session failed)
            if socket.close_args is None:
                logger.debug("WebSocket on %s ended: %r", socket.path, exc)
                socket.peer_gone()
                return 1006, "", True
        code, reason = socket.close_args or (1006, "")
        return code, reason, False


async def _run(socket: AsgiSocket, result: Awaitable[None] | None) -> None:
    """Let the session handle one event, then send what it queued with ``send_now``.

    A session that raises is closed with 1011, as on the native path."""
    if result is not None:
        socket.busy = True
        try:
            await result
        except Exception:
            logger.exception("WebSocket session on %s failed", socket.path)
            socket.close_now(1011, "internal error")
        finally:
            socket.busy = False
    if socket._outbox:
        await socket.flush_outbox()


async def _finish(result: Awaitable[None] | None) -> None:
    if result is not None:
        with contextlib.suppress(Exception):
            await result


__all__ = ["FAST_PATH_SCOPE_KEY", "AsgiRoute", "AsgiSocket"]
