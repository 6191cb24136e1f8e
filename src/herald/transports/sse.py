"""HTTP streaming responses as a connection's transport: SSE and NDJSON framing.

A Herald :class:`~herald.connection.Connection` writes text frames through a
:class:`~herald.transports.base.Transport`.  :class:`HttpStreamTransport` is that
transport for one streaming HTTP response under ASGI: each frame becomes one chunk
of the response body, framed by a :class:`StreamFraming`:

* :class:`SseFraming`: ``text/event-stream`` (Server-Sent Events), which a browser's
  ``EventSource`` and ``curl -N`` read with no Herald code;
* :class:`NdjsonFraming`: ``application/x-ndjson``, one JSON value per line.

Everything that makes a WebSocket connection safe holds for a stream too, because the
stream *is* a :class:`~herald.connection.Connection`: the same bounded queue, and a
client that stops reading is cut as a slow consumer (4001) exactly as on a WebSocket.
The closing event (``disconnect``, with the close code) is written before the response
ends; when it cannot be written in time (the client does not read), the TCP connection
is dropped.  Heartbeats go through the connection's queue too (:data:`HEARTBEAT_FRAME`),
so a client that never reads fills its queue even on a silent stream.

This module knows ASGI only (no Herald core): the route that uses it
(:mod:`herald.sse`, and the bidirectional emulation) decides what is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

import orjson

from .fastpath import BatchedWrites, batch_flusher

ASGIMessage = MutableMapping[str, Any]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]

#: The frame a stream's heartbeat timer queues on its connection; the framing writes it
#: as a comment (SSE) or an empty line (NDJSON), which no client treats as an event.
HEARTBEAT_FRAME = "\x00heartbeat"

#: How protocol push frames start (:mod:`herald.protocol.encoders`): the event's type
#: is the string after it.
_TYPE_PREFIX = '{"type":"'
_DISCONNECT_PREFIX = '{"type":"disconnect"'

#: Response headers every stream sends: no caching, and no buffering by nginx.
STREAM_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-cache, no-store"),
    (b"x-accel-buffering", b"no"),
    (b"x-content-type-options", b"nosniff"),
)


def frame_type(frame: str) -> str | None:
    """The ``type`` of a protocol frame (``"publication"``, ``"disconnect"``...), read
    from its first bytes without parsing; None for a frame of another shape."""
    if not frame.startswith(_TYPE_PREFIX):
        return None
    end = frame.find('"', len(_TYPE_PREFIX))
    return frame[len(_TYPE_PREFIX) : end] if end > 0 else None


def disconnect_frame(code: int, reason: str, reconnect: bool) -> str:
    """The ``disconnect`` event's JSON (the protocol's push of the same name)."""
    return orjson.dumps(
        {"type": "disconnect", "code": code, "reason": reason, "reconnect": reconnect}
    ).decode()


class StreamFraming(Protocol):
    """How a stream writes frames: the bytes of each piece of the response body."""

    #: The response's ``content-type``.
    media_type: bytes

    def preamble(self) -> bytes:
        """The first chunk of the body (SSE: ``retry:``)."""

    def encode(self, frame: str) -> bytes:
        """One frame a connection sends (a protocol frame, or :data:`HEARTBEAT_FRAME`)."""

    def closing(self, code: int, reason: str, reconnect: bool) -> bytes:
        """The last chunk, saying why the stream ends (a ``disconnect`` event)."""


class SseFraming:
    """``text/event-stream``: each frame is one event, ``data: <frame>``.

    With ``named_events`` a protocol frame other than a publication is sent as the
    event named by its ``type`` (``event: disconnect``), so that ``EventSource.onmessage``
    sees publications only; without, every frame is a default ``message`` event (the
    frame's JSON says its type).  ``retry_ms`` is the reconnection delay the browser is
    told.  Frames never contain a line break (JSON from orjson has none), so one
    ``data:`` line carries each.
    """

    __slots__ = ("named_events", "retry_ms")

    media_type = b"text/event-stream; charset=utf-8"

    def __init__(self, *, retry_ms: int = 1000, named_events: bool = True) -> None:
        self.retry_ms = retry_ms
        self.named_events = named_events

    def preamble(self) -> bytes:
        # A comment first: some proxies hold a response until its first bytes arrive.
        return f": herald\nretry: {self.retry_ms}\n\n".encode()

    def encode(self, frame: str) -> bytes:
        if frame is HEARTBEAT_FRAME or frame == HEARTBEAT_FRAME:
            return b":\n\n"
        return self.event(frame).encode()

    def event(self, frame: str, event_id: str | None = None) -> str:
        """The text of one event carrying ``frame`` (and ``id: event_id``)."""
        head = ""
        if self.named_events:
            kind = frame_type(frame)
            if kind is not None and kind != "publication":
                head = f"event: {kind}\n"
        tail = f"id: {event_id}\n\n" if event_id is not None else "\n"
        return f"{head}data: {frame}\n{tail}"

    def closing(self, code: int, reason: str, reconnect: bool) -> bytes:
        return self.event(disconnect_frame(code, reason, reconnect)).encode()


class NdjsonFraming:
    """``application/x-ndjson``: each frame is one line of JSON; heartbeats are empty
    lines (readers skip blank lines)."""

    __slots__ = ()

    media_type = b"application/x-ndjson"

    def preamble(self) -> bytes:
        return b""

    def encode(self, frame: str) -> bytes:
        if frame is HEARTBEAT_FRAME or frame == HEARTBEAT_FRAME:
            return b"\n"
        return (frame + "\n").encode()

    def closing(self, code: int, reason: str, reconnect: bool) -> bytes:
        return (disconnect_frame(code, reason, reconnect) + "\n").encode()


class HttpStreamTransport(BatchedWrites):
    """One streaming HTTP response (ASGI) as a connection's :class:`~herald.transports.base.Transport`.

    Contract (stable: the SSE route and the bidirectional emulation build on it):

    * :meth:`start` sends the response head (200, the framing's content type,
      :data:`STREAM_HEADERS` and ``headers``) and the framing's preamble.  Call it once,
      before the connection's writer runs.
    * :meth:`send` (the connection's writer calls it, one frame at a time) writes
      ``framing.encode(frame)`` as one body chunk; it waits while the server's write
      buffer is full (ASGI flow control) and raises ``ConnectionError`` once the
      client is gone, which the connection records as 1006.
    * :meth:`close` writes the framing's closing chunk (unless a ``disconnect`` frame
      was already sent) and ends the response, within ``close_timeout`` seconds; a
      client that does not read by then has its TCP connection dropped (``abort``,
      from :func:`herald.transports.uvicorn.abort_for`) when the server allows it.
    * :meth:`watch` reads the request's ``receive`` until the client disconnects and
      then marks the transport gone (:meth:`is_open` is False).  Run it for the life
      of the response: it is how the route learns the client left.
    * :meth:`start_heartbeats` queues :data:`HEARTBEAT_FRAME` on a connection every
      ``interval`` seconds (a timer, no task) until :meth:`stop_heartbeats`.
    * Optional fast path, :meth:`write_directly`: under uvicorn, once the head is sent,
      body chunks may go straight to the socket (:meth:`write_nowait`, batched per loop
      turn, bounded like the WebSocket fast path of :mod:`herald.transports.fastpath`)
      instead of through the ASGI ``send`` chain.  Only for responses no middleware
      rewrites: the caller decides.
    """

    __slots__ = (
        "_abort",
        "_backlog",
        "_beat_connection",
        "_beat_every",
        "_buffered",
        "_close_timeout",
        "_cycle",
        "_delayed",
        "_ended",
        "_gone",
        "_heartbeat",
        "_pending",
        "_pending_bytes",
        "_send",
        "_started",
        "_told_end",
        "framing",
    )

    def __init__(
        self,
        send: ASGISend,
        framing: StreamFraming,
        *,
        abort: Callable[[], None] | None = None,
        close_timeout: float = 1.0,
    ) -> None:
        self._send = send
        self.framing = framing
        self._abort = abort
        self._close_timeout = close_timeout
        self._started = False
        self._ended = False  # the response's last chunk was sent (or the socket dropped)
        self._gone: asyncio.Event | None = None  # set when the client disconnected
        self._told_end = False  # a disconnect frame was written
        self._heartbeat: asyncio.TimerHandle | None = None
        self._beat_connection: Any = None  # the connection heartbeats go through
        self._beat_every = 0.0
        # The direct path (write_directly): uvicorn's request cycle, and the chunks
        # accepted in this loop turn (written by flush).
        self._cycle: Any = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._buffered = 0  # the socket's write buffer when this turn's batch began
        self._backlog = 0  # chunks written since the write buffer was last seen empty
        self._delayed = False

    # ------------------------------------------------------------ response

    async def start(self, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Send the response head and the framing's preamble."""
        self._started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", self.framing.media_type), *STREAM_HEADERS, *headers],
            }
        )
        preamble = self.framing.preamble()
        if preamble:
            await self._send({"type": "http.response.body", "body": preamble, "more_body": True})

    def is_open(self) -> bool:
        """The client is still connected and the response has not ended."""
        return not self._ended and not (self._gone is not None and self._gone.is_set())

    async def send(self, frame: str) -> None:
        if not self.is_open():
            raise ConnectionError("the stream's client is gone")
        self.flush()  # chunks accepted by the fast path go first
        body = self.framing.encode(frame)
        if frame.startswith(_DISCONNECT_PREFIX):
            self._told_end = True
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def close(self, code: int, reason: str) -> None:
        """End the response (never raises); see the class docstring."""
        self.stop_heartbeats()
        if code == 4001:
            self._pending, self._pending_bytes = [], 0  # a slow consumer gets no more
        self.flush()
        if self._ended or not self._started:
            self._ended = True
            return
        self._ended = True
        if self._gone is not None and self._gone.is_set():
            return
        last = (
            b"" if self._told_end else self.framing.closing(code, reason, 4000 <= code < 4500 or code == 1012)
        )
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._send({"type": "http.response.body", "body": last, "more_body": False})
        except (TimeoutError, Exception):
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection (when the server lets Herald), without a last chunk."""
        self._ended = True
        self._pending, self._pending_bytes = [], 0
        if self._abort is not None:
            with contextlib.suppress(Exception):
                self._abort()

    async def watch(self, receive: ASGIReceive) -> None:
        """Return when the client disconnected (the request body is read and ignored)."""
        gone = self.gone
        try:
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    break
        finally:
            gone.set()

    @property
    def gone(self) -> asyncio.Event:
        """Set once the client disconnected (see :meth:`watch`)."""
        if self._gone is None:
            self._gone = asyncio.Event()
        return self._gone

    # ------------------------------------------------------------ the direct path

    def write_directly(self, receive: ASGIReceive) -> bool:
        """Write body chunks straight to the socket from now on, when the server is
        uvicorn (its request cycle is ``receive``'s object) and the response is chunked;
        returns whether it will.  Call after :meth:`start`."""
        cycle = uvicorn_cycle(receive)
        if cycle is None or not self._started or cycle.chunked_encoding is not True:
            return False
        self._cycle = cycle
        return True

    def _socket(self) -> Any:
        """The socket's asyncio transport while chunks may be written directly; None otherwise."""
        cycle = self._cycle
        if cycle is None or self._ended or cycle.disconnected or cycle.response_complete:
            return None
        if self._gone is not None and self._gone.is_set():
            return None
        transport = cycle.transport
        return None if transport.is_closing() else transport

    def write_nowait(self, frame: str, max_bytes: int, max_messages: int, delay: float = 0.0) -> bool | None:
        """Accept ``frame`` for writing at the end of this loop turn (or within ``delay``
        seconds), without awaiting (the :class:`~herald.connection.Connection` fast-path
        contract, :meth:`BatchedWrites.write_nowait`): True accepted; False over the bounds
        (the socket's buffer plus the batched chunks over ``max_bytes``, or more than
        ``max_messages`` chunks unwritten: the caller cuts the slow consumer); None when
        the direct path is off (the caller queues)."""
        pending = self._pending
        if not pending:
            transport = self._socket()
            if transport is None:
                return None
            buffered = self._buffered = transport.get_write_buffer_size()
            if buffered == 0:
                self._backlog = 0
        body = self.framing.encode(frame)
        chunk = b"%x\r\n%b\r\n" % (len(body), body)
        size = self._pending_bytes + len(chunk)
        if self._buffered + size > max_bytes or self._backlog + len(pending) >= max_messages:
            return False
        if frame.startswith(_DISCONNECT_PREFIX):
            self._told_end = True
        if not pending or self._delayed:
            # One flush per loop turn (or write delay) for every stream with chunks, as for WebSockets.
            self._schedule(batch_flusher(asyncio.get_running_loop()), not pending, delay)
        pending.append(chunk)
        self._pending_bytes = size
        return True

    # flush() and unwritten() are BatchedWrites', over _open_transport().

    def _open_transport(self) -> Any:
        return self._socket()

    async def drained(self) -> None:
        """Wait until the socket's write buffer is empty or the response ended."""
        self.flush()
        # asyncio tells only the protocol (uvicorn's) that a buffer drained: look again.
        while (transport := self._socket()) is not None and transport.get_write_buffer_size():  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)

    # ------------------------------------------------------------ heartbeats

    def start_heartbeats(self, connection: Any, interval: float) -> None:
        """Queue a heartbeat on ``connection`` (its ``send(frame)``) every ``interval``
        seconds while it is open; 0 turns heartbeats off."""
        if interval <= 0:
            return
        self.stop_heartbeats()
        self._beat_connection = connection
        self._beat_every = interval
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat)

    def _beat(self) -> None:
        # A method, not a closure that schedules itself: such a closure holds itself
        # through its own cell, a cycle that kept every ended stream (~58 objects) for
        # the cyclic collector.
        self._heartbeat = None
        connection = self._beat_connection
        if connection is None or connection.is_closing or not self.is_open():
            return
        connection.send(HEARTBEAT_FRAME)
        self._heartbeat = asyncio.get_running_loop().call_later(self._beat_every, self._beat)

    def stop_heartbeats(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self._beat_connection = None  # it holds this transport: no cycle once stopped


#: Seconds between looks at the socket's write buffer in :meth:`HttpStreamTransport.drained`.
DRAIN_POLL = 0.005


def uvicorn_cycle(receive: ASGIReceive) -> Any:
    """uvicorn's request cycle behind an ASGI ``receive`` (uvicorn hands the application
    the cycle's bound method), or None under another server or a wrapped ``receive``."""
    cycle = getattr(receive, "__self__", None)
    for name in ("transport", "chunked_encoding", "disconnected", "response_complete", "scope"):
        if not hasattr(cycle, name):
            return None
    return cycle


#: Scope key set by a middleware that serves ``HEAD`` as ``GET`` (herald serve's
#: ``server.HeadAsGet``): a stream endpoint answers its head and opens nothing.
HEAD_AS_GET = "herald.head_as_get"


def is_head(scope: Any) -> bool:
    """Whether this request is a ``HEAD`` (itself, or a ``GET`` marked :data:`HEAD_AS_GET`)."""
    return scope.get("method") == "HEAD" or bool(scope.get(HEAD_AS_GET))


__all__ = [
    "DRAIN_POLL",
    "HEAD_AS_GET",
    "HEARTBEAT_FRAME",
    "STREAM_HEADERS",
    "HttpStreamTransport",
    "NdjsonFraming",
    "SseFraming",
    "StreamFraming",
    "disconnect_frame",
    "frame_type",
    "is_head",
    "uvicorn_cycle",
]
