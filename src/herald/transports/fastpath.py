"""The fast path: pre-framed WebSocket frames written straight to the socket.

Under plain ASGI every copy of a fan-out frame costs a Starlette ``send``, an
ASGI message dict, uvicorn's ``send`` coroutine and a framing call in the
WebSocket library.  ``herald serve`` therefore runs uvicorn with
:class:`HeraldWebSocketProtocol`, uvicorn's own ``websockets-sansio`` protocol
with one addition: it puts itself in the connection's ASGI scope under
``"herald.fastpath"``.  Herald's connections (see :func:`transport_for`) then
frame a text message once and ``write()`` the same bytes to every subscriber's
asyncio transport, without a task switch or an await.

Nothing else changes: the handshake, reading, pings, closing and every ordinary
ASGI WebSocket route go through uvicorn's protocol as before, and under any
other ASGI server (or plain uvicorn) the scope key is absent and Herald uses the
ASGI ``send`` path.

The guarantees hold on the fast path too:

* **Bounded buffers.**  A direct write is refused when the socket's user-space
  write buffer would exceed the connection's byte bound, or when more frames
  than the message bound were written since the buffer was last empty; the
  connection is then disconnected as a slow consumer (close code 4001), exactly
  like a full queue.
* **Order.**  A connection writes directly only while its ASGI queue is empty
  and no ASGI send is in progress, so frames leave in the order they were sent.
* **Offsets** are in the frames, which are the same bytes as before.

Frames are sent unfragmented and uncompressed (RFC 6455 section 5.2; with
permessage-deflate negotiated, RFC 7692 section 6 lets a sender leave RSV1
unset for an uncompressed message).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from .fastapi import StarletteTransport

#: The scope key under which :class:`HeraldWebSocketProtocol` exposes itself.
SCOPE_KEY = "herald.fastpath"

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def frame_text(payload: bytes) -> bytes:
    """A complete, unmasked, final text frame carrying ``payload`` (RFC 6455 section 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return _pack_short(0x81, 126, length) + payload
    return _pack_long(0x81, 127, length) + payload


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


class HeraldWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, plus a direct-write entry for Herald.

    Use as ``uvicorn.run(app, ws=HeraldWebSocketProtocol)`` (``herald serve`` does).
    """

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            # The ASGI task was created but has not run yet: it sees these keys.
            scope[SCOPE_KEY] = self
            # StarletteTransport.abort() finds the socket through this (slow peers that
            # do not even read the close frame are dropped).
            scope["herald.send"] = self.send


class FastTransport(StarletteTransport):
    """A :class:`StarletteTransport` that can also write pre-framed frames synchronously."""

    __slots__ = ("_backlog", "_protocol")

    def __init__(self, websocket: WebSocket, protocol: HeraldWebSocketProtocol) -> None:
        super().__init__(websocket)
        self._protocol = protocol
        self._backlog = 0  # frames written since the write buffer was last seen empty

    def write_nowait(self, frame: str, max_bytes: int, max_messages: int) -> bool | None:
        """Write ``frame`` without awaiting.

        Returns True when written, False when writing it would exceed the bounds
        (the caller disconnects the slow consumer), None when the fast path is not
        usable (handshake not done, closing): the caller falls back to its queue.
        """
        protocol = self._protocol
        if not protocol.handshake_complete:
            return None
        data = framed(frame)
        transport = protocol.transport
        if protocol.close_sent or protocol.disconnected or transport.is_closing():
            return None
        buffered = transport.get_write_buffer_size()
        if buffered == 0:
            self._backlog = 0
        if buffered + len(data) > max_bytes or self._backlog >= max_messages:
            return False
        transport.write(data)
        if transport.get_write_buffer_size():
            self._backlog += 1
        return True


def fast_protocol_of(websocket: WebSocket) -> HeraldWebSocketProtocol | None:
    protocol = websocket.scope.get(SCOPE_KEY)
    return protocol if isinstance(protocol, HeraldWebSocketProtocol) else None


def transport_for(websocket: WebSocket, *, fast_path: bool = True) -> StarletteTransport:
    """The best transport for ``websocket``: direct writes when the server allows them."""
    protocol = fast_protocol_of(websocket) if fast_path else None
    if protocol is not None:
        return FastTransport(websocket, protocol)
    return StarletteTransport(websocket)


def uvicorn_ws_protocol(ws_impl: str, fast_path: bool) -> type[asyncio.Protocol] | str:
    """The ``ws=`` argument for uvicorn.

    Herald's protocol class when the fast path is on and the chosen implementation is
    websockets' sans-I/O one it extends (``auto`` picks it too); otherwise ``ws_impl``
    unchanged (``wsproto`` and the legacy ``websockets`` protocol have no fast path).
    """
    if fast_path and ws_impl in ("websockets-sansio", "auto"):
        return HeraldWebSocketProtocol
    return ws_impl


__all__ = [
    "SCOPE_KEY",
    "FastTransport",
    "HeraldWebSocketProtocol",
    "frame_text",
    "framed",
    "transport_for",
    "uvicorn_ws_protocol",
]
