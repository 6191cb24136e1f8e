"""The fast path: pre-framed WebSocket frames written straight to the socket.

Under plain ASGI every copy of a fan-out frame costs a Starlette ``send``, an
ASGI message dict, uvicorn's ``send`` coroutine and a framing call in the
WebSocket library.  Herald's connections instead frame a text message once and
hand the same bytes to every subscriber's asyncio transport, without a task
switch or an await (:class:`BatchedWrites`).  Two kinds of connection can:

* natively served routes (:mod:`herald.transports.native`, Herald's own protocol
  under ``herald serve``), where the protocol object is the connection's transport;
* ASGI routes served by :class:`AsgiWebSocketProtocol`, uvicorn's own
  ``websockets-sansio`` protocol with one addition: it puts itself in the
  connection's ASGI scope under ``"herald.fastpath"``, where
  :func:`transport_for` finds it (:class:`FastTransport`).

Under any other ASGI server (or plain uvicorn) the scope key is absent and
Herald uses the ASGI ``send`` path.

Frames are batched per connection for the rest of the event loop's current turn
and written with one ``write()`` (see :class:`_Flusher`): a publisher's burst of
publications costs each subscriber one system call, not one per frame.  Writing
to the socket dominated the fan-out profile before batching (about two thirds
of the server's CPU time in S1).

The guarantees hold on the fast path too:

* **Bounded buffers.**  A frame is refused when the socket's user-space write
  buffer plus the frames batched in this turn would exceed the connection's
  byte bound, or when more frames than the message bound are unwritten (batched,
  or written since the buffer was last empty); the connection is then
  disconnected as a slow consumer (close code 4001), exactly like a full queue.
* **Order.**  A connection uses the fast path only while its queue is empty and
  no queued send is in progress, and every other write flushes the batch first,
  so frames leave in the order they were sent.  Nothing is written after a close
  frame.
* **Offsets** are in the frames, which are the same bytes as before.

Frames are sent unfragmented and uncompressed (RFC 6455 section 5.2; with
permessage-deflate negotiated, RFC 7692 section 6 lets a sender leave RSV1
unset for an uncompressed message).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..codes import TOO_MANY_FRAGMENTS
from .fastapi import StarletteTransport
from .wsframes import frame_text
from .wsreader import DEFAULT_MAX_FRAGMENTS

#: The scope key under which :class:`AsgiWebSocketProtocol` exposes itself.
SCOPE_KEY = "herald.fastpath"


# Fan-out hands the *same* str object to every subscriber in a row, so a one-entry
# cache keyed by identity frames each publication once per node, not once per copy.
# One tuple, read and replaced whole, so servers in several threads never mix entries.
_cache: tuple[str | None, bytes] = (None, b"")


def framed(text: str) -> bytes:
    """``text`` as a text frame, reusing the previous result for the same object."""
    global _cache
    cached = _cache
    if cached[0] is text:
        return cached[1]
    frame = frame_text(text.encode())
    _cache = (text, frame)
    return frame


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


class BoundedSansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a bound on the frames of one message.

    websockets' sans-I/O parser bounds a message's bytes (``ws_max_size``) but leaves
    assembling fragments to uvicorn, which keeps every fragment in a list: a text frame
    with FIN=0 followed by millions of empty continuation frames grew that list without
    limit.  Here the frame after the :func:`fragment_limit`-th of a message fails the
    connection with 1009 (:data:`~herald.codes.TOO_MANY_FRAGMENTS`), so the list holds
    at most that many entries.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_fragments = fragment_limit()
        self.fragments = 0  # frames of the message being received

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
    :class:`BoundedSansIOProtocol`), plus a direct-write entry for Herald.

    :class:`~herald.transports.native.HeraldWebSocketProtocol` hands it every
    upgrade request that is not for a natively served route.
    """

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The parsed request is only read above (the scope now carries its headers);
        # dropping it saves about 2 KiB per open connection.
        self.request = None  # type: ignore[assignment]
        scope: Any = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            # The ASGI task was created but has not run yet: it sees these keys.
            scope[SCOPE_KEY] = self
            # StarletteTransport.abort() finds the socket through this (slow peers that
            # do not even read the close frame are dropped).
            scope["herald.send"] = self.send


class _Flusher:
    """The fast transports of one event loop with frames waiting, written once per loop turn.

    Frames a connection receives during one turn of the event loop (a publisher's
    burst of publish commands is read and fanned out in one turn) leave in a single
    ``write()``: one system call per subscriber and turn instead of one per frame.
    The flush is a ``call_soon`` callback, so frames wait for the rest of the current
    turn only, never for a timer.
    """

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[BatchedWrites] = []
        self._scheduled = False

    def add(self, transport: BatchedWrites) -> None:
        self._dirty.append(transport)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            transport.flush()


# One flusher per thread's running loop (test servers run loops in threads).
_local = threading.local()


def batch_flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher: _Flusher | None = getattr(_local, "flusher", None)
    if flusher is None or flusher._loop is not loop:
        flusher = _local.flusher = _Flusher(loop)
    return flusher


class BatchedWrites:
    """Synchronous, bounded writes of pre-framed text frames, batched per loop turn.

    Frames accepted by :meth:`write_nowait` wait in a small per-connection batch until
    the end of the event loop's current turn (see :class:`_Flusher`); every other way
    out must call :meth:`flush` first, so order is kept.  The class using it provides
    the ``_pending``, ``_pending_bytes``, ``_buffered``, ``_backlog`` and ``_flusher``
    attributes and :meth:`_open_transport`.
    """

    if not TYPE_CHECKING:  # no __dict__ for users with slots; mypy checks the names below
        __slots__ = ()

    _pending: list[bytes]
    _pending_bytes: int
    _buffered: int  # the socket's write buffer when this batch began
    _backlog: int  # frames written since the write buffer was last seen empty
    _flusher: _Flusher

    def _open_transport(self) -> asyncio.Transport | None:
        """The socket, while frames may still be written to it; None otherwise."""
        raise NotImplementedError

    def write_nowait(self, frame: str, max_bytes: int, max_messages: int) -> bool | None:
        """Accept ``frame`` for writing at the end of this loop turn, without awaiting.

        Returns True when accepted, False when it would take the connection over its
        bounds (the socket's write buffer plus the batch over ``max_bytes``, or more than
        ``max_messages`` frames unwritten; the caller disconnects the slow consumer),
        None when the fast path is not usable (handshake not done, closing): the caller
        falls back to its queue.
        """
        cached = _cache
        data = cached[1] if cached[0] is frame else framed(frame)
        pending = self._pending
        if not pending:
            # First frame of this turn: sample the socket's buffer once for the batch
            # (it can only shrink until the flush, so the bound stays conservative).
            transport = self._open_transport()
            if transport is None:
                return None
            buffered = self._buffered = transport.get_write_buffer_size()
            if buffered == 0:
                self._backlog = 0
        size = self._pending_bytes + len(data)
        if self._buffered + size > max_bytes or self._backlog + len(pending) >= max_messages:
            return False
        if not pending:
            self._flusher.add(self)
        pending.append(data)
        self._pending_bytes = size
        return True

    def flush(self) -> None:
        """Write the frames accepted by :meth:`write_nowait`, in one ``write()``."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_bytes = 0
        transport = self._open_transport()
        if transport is None:
            return  # the peer is gone or the close frame left: nothing may follow it
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if transport.get_write_buffer_size():
            self._backlog += len(pending)
        else:
            self._backlog = 0


class FastTransport(BatchedWrites, StarletteTransport):
    """A :class:`StarletteTransport` that can also write pre-framed frames synchronously
    (see :class:`BatchedWrites`)."""

    __slots__ = ("_backlog", "_buffered", "_flusher", "_pending", "_pending_bytes", "_protocol")

    def __init__(self, websocket: WebSocket, protocol: AsgiWebSocketProtocol) -> None:
        super().__init__(websocket)
        self._protocol = protocol
        self._flusher = batch_flusher(protocol.loop)
        self._pending = []
        self._pending_bytes = 0
        self._buffered = 0
        self._backlog = 0

    def _open_transport(self) -> asyncio.Transport | None:
        protocol = self._protocol
        if protocol.close_sent or protocol.disconnected or not protocol.handshake_complete:
            return None
        transport = protocol.transport
        return None if transport.is_closing() else transport

    async def send(self, frame: str) -> None:
        self.flush()
        await super().send(frame)

    async def close(self, code: int, reason: str) -> None:
        self.flush()
        await super().close(code, reason)

    def abort(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        super().abort()


def fast_protocol_of(websocket: WebSocket) -> AsgiWebSocketProtocol | None:
    protocol = websocket.scope.get(SCOPE_KEY)
    return protocol if isinstance(protocol, AsgiWebSocketProtocol) else None


def transport_for(websocket: WebSocket, *, fast_path: bool = True) -> StarletteTransport:
    """The best transport for ``websocket``: direct writes when the server allows them."""
    protocol = fast_protocol_of(websocket) if fast_path else None
    if protocol is not None:
        if protocol.handshake_complete:
            # The 101 response was sent at accept and is not read again: free its headers.
            protocol.response = None  # type: ignore[assignment]
        return FastTransport(websocket, protocol)
    return StarletteTransport(websocket)


def uvicorn_ws_protocol(ws_impl: str, fast_path: bool) -> type[asyncio.Protocol] | str:
    """The ``ws=`` argument for uvicorn.

    Herald's protocol class when the fast path is on and the chosen implementation is
    websockets' sans-I/O one it extends (``auto`` picks it too); without the fast path,
    uvicorn's implementation with Herald's bounds: :class:`BoundedSansIOProtocol`, or for
    ``wsproto`` :class:`~herald.transports.uvicorn_ws.BoundedWSProtocol` (no
    permessage-deflate).  The legacy ``websockets`` protocol is uvicorn's own: websockets
    bounds its fragments itself (4096 per message, close 1009 "too many fragments").
    """
    if ws_impl in ("websockets-sansio", "auto"):
        if fast_path:
            from .native import HeraldWebSocketProtocol

            return HeraldWebSocketProtocol
        return BoundedSansIOProtocol
    if ws_impl == "wsproto":
        from .uvicorn_ws import BoundedWSProtocol

        return BoundedWSProtocol
    return ws_impl


__all__ = [
    "FRAGMENTS_ENV",
    "SCOPE_KEY",
    "AsgiWebSocketProtocol",
    "BatchedWrites",
    "BoundedSansIOProtocol",
    "FastTransport",
    "batch_flusher",
    "fragment_limit",
    "frame_text",
    "framed",
    "transport_for",
    "uvicorn_ws_protocol",
]
