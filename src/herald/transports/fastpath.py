"""The fast path: pre-framed WebSocket frames written straight to the socket.

Under plain ASGI every copy of a fan-out frame costs a Starlette ``send``, an
ASGI message dict, uvicorn's ``send`` coroutine and a framing call in the
WebSocket library.  Herald's connections instead frame a text message once and
hand the same bytes to every subscriber's asyncio transport, without a task
switch or an await (:class:`BatchedWrites`).  Two kinds of connection can:

* natively served routes (:mod:`herald.transports.native`, Herald's own protocol
  under ``herald serve``), where the protocol object is the connection's transport;
* ASGI routes served by :class:`~herald.transports.uvicorn.AsgiWebSocketProtocol`,
  uvicorn's own ``websockets-sansio`` protocol with one addition: it puts itself in
  the connection's ASGI scope, where Herald's ASGI driver finds it
  (:class:`~herald.transports.uvicorn.FastAsgiSocket`).

Under any other ASGI server (or plain uvicorn) the scope key is absent and
Herald uses the ASGI ``send`` path.  This module is the part without I/O
decisions of its own: the frame cache and :class:`BatchedWrites`.

Frames are batched per connection for the rest of the event loop's current turn
and written with one ``write()`` (see :class:`_Flusher`): a publisher's burst of
publications costs each subscriber one system call, not one per frame.  Writing
to the socket dominated the fan-out profile before batching (about two thirds
of the server's CPU time in S1).  With a write delay (``write_delay``, off by
default) fanned-out frames wait up to that long, so that frames of several turns
share a ``write()`` too; a reply or control frame to a connection takes its waiting
frames with it at the end of the turn.

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
import contextlib
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

from .wsframes import frame_text

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


class _Flusher:
    """The fast transports of one event loop with frames waiting, written once per loop turn.

    Frames a connection receives during one turn of the event loop (a publisher's
    burst of publish commands is read and fanned out in one turn) leave in a single
    ``write()``: one system call per subscriber and turn instead of one per frame.
    The flush is a ``call_soon`` callback, so frames wait for the rest of the current
    turn only, never for a timer.
    """

    __slots__ = ("_deadline", "_dirty", "_later", "_loop", "_scheduled", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[BatchedWrites] = []
        self._scheduled = False
        # Batches waiting for a write delay: one timer for all of them, so each frame
        # waits at most its delay (less when it joined a batch already waiting).
        self._later: list[BatchedWrites] = []
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    def add(self, transport: BatchedWrites) -> None:
        self._dirty.append(transport)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def add_later(self, transport: BatchedWrites, delay: float) -> None:
        """Flush ``transport`` within ``delay`` seconds (or earlier, if anything flushes it)."""
        self._later.append(transport)
        deadline = self._loop.time() + delay
        timer = self._timer
        if timer is None or deadline < self._deadline:
            if timer is not None:
                timer.cancel()
            self._deadline = deadline
            self._timer = self._loop.call_at(deadline, self.flush_later)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            transport.flush()

    def flush_later(self) -> None:
        self._timer = None
        later, self._later = self._later, []
        for transport in later:
            transport.flush()  # a no-op for a batch that already left with a reply


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
    attributes (``_delayed`` too) and :meth:`_open_transport`.
    """

    if not TYPE_CHECKING:  # no __dict__ for users with slots; mypy checks the names below
        __slots__ = ()

    _pending: list[bytes]
    _pending_bytes: int
    _buffered: int  # the socket's write buffer when this batch began
    _backlog: int  # frames written since the write buffer was last seen empty
    _delayed: bool  # this batch waits for the write delay, not for the end of the turn
    _flusher: _Flusher

    def _open_transport(self) -> asyncio.Transport | None:
        """The socket, while frames may still be written to it; None otherwise."""
        raise NotImplementedError

    def write_nowait(self, frame: str, max_bytes: int, max_messages: int, delay: float = 0.0) -> bool | None:
        """Accept ``frame`` for writing at the end of this loop turn, without awaiting;
        with ``delay`` > 0, within ``delay`` seconds (a frame without one, written to the
        same connection meanwhile, takes the waiting frames with it at the end of its turn).

        Returns True when accepted, False when it would take the connection over its
        bounds (the socket's write buffer plus the batch over ``max_bytes``, or more than
        ``max_messages`` frames unwritten; the caller disconnects the slow consumer),
        None when the fast path is not usable (handshake not done, closing): the caller
        falls back to its queue.
        """
        cached = _cache
        data = cached[1] if cached[0] is frame else framed(frame)
        pending = self._pending
        if pending:
            size = self._pending_bytes + len(data)
            if self._buffered + size > max_bytes or self._backlog + len(pending) >= max_messages:
                return False
            if self._delayed:
                self._schedule(self._flusher, False, delay)
            pending.append(data)
            self._pending_bytes = size
            return True
        # First frame of this turn: sample the socket's buffer once for the batch (it can
        # only shrink until the flush, so the bound stays conservative).
        transport = self._open_transport()
        if transport is None:
            return None
        buffered = self._buffered = transport.get_write_buffer_size()
        if buffered == 0:
            self._backlog = 0
        size = len(data)
        if buffered + size > max_bytes or self._backlog >= max_messages:
            return False
        self._schedule(self._flusher, True, delay)
        pending.append(data)
        self._pending_bytes = size
        return True

    def _schedule(self, flusher: _Flusher, first: bool, delay: float) -> None:
        """Arrange the flush of the batch a frame is joining (``first``: it was empty).
        Callers skip it for a frame joining a batch that already leaves this turn."""
        if first:
            self._delayed = delay > 0
            if self._delayed:
                flusher.add_later(self, delay)
            else:
                flusher.add(self)
        elif self._delayed and delay <= 0:
            # A reply or control frame: it leaves at the end of this turn, and the frames
            # waiting for the delay leave with it, ahead of it.
            self._delayed = False
            flusher.add(self)

    def is_open(self) -> bool:
        """Whether frames can still be written (the peer is connected, no close frame sent)."""
        return self._open_transport() is not None

    def unwritten(self) -> tuple[int, int]:
        """(frames, bytes) accepted but not yet known to be written to the kernel: the
        batch, plus the socket's write buffer (frames counted since it was last empty)."""
        transport = self._open_transport()
        if transport is None:
            return 0, 0
        buffered = transport.get_write_buffer_size()
        if not buffered:
            return len(self._pending), self._pending_bytes
        return self._backlog + len(self._pending), buffered + self._pending_bytes

    async def drained(self) -> None:
        """Wait until the socket's write buffer is empty (or the socket is closed).

        asyncio reports a draining buffer only through the protocol's ``resume_writing``,
        at the transport's low-water mark: the marks are lowered to zero for the wait (so
        ``pause_writing`` is called at once, and ``resume_writing`` when the buffer is
        empty), and put back after it.
        """
        self.flush()
        transport = self._open_transport()
        if transport is None or not transport.get_write_buffer_size():
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self._until_writable()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def _until_writable(self) -> None:
        """Wait until the protocol's ``resume_writing`` (or the connection's loss)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Write the frames accepted by :meth:`write_nowait`, in one ``write()``."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_bytes = 0
        self._delayed = False
        transport = self._open_transport()
        if transport is None:
            return  # the peer is gone or the close frame left: nothing may follow it
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if transport.get_write_buffer_size():
            self._backlog += len(pending)
        else:
            self._backlog = 0


def abort_transport(transport: Any) -> None:
    """Drop ``transport``'s TCP connection at once.  Linger 0: the kernel resets the
    connection and discards the unsent bytes, instead of holding them (and the socket)
    until a peer that stopped reading reads them."""
    abort = getattr(transport, "abort", None)
    if transport is None or not callable(abort):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    abort()


__all__ = [
    "BatchedWrites",
    "abort_transport",
    "batch_flusher",
    "frame_text",
    "framed",
]
