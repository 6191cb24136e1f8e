"""One client connection: a bounded outbound queue drained by a writer task.

Everything that reaches a client goes through :meth:`Connection.send`, which
never awaits: it appends the frame to the queue, or, when the queue is over its
bounds (count or bytes), disconnects the client as a *slow consumer* (close
code 4001).  One client that stops reading therefore costs at most its queue
bound in memory and never delays anybody else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from .brokers.base import Publication
from .codes import CloseCode, should_reconnect
from .protocol.encoders import encode_disconnect
from .transports.base import DirectWrites, Transport

logger = logging.getLogger("herald.connection")


def new_client_id() -> str:
    """A random client id (16 hex digits)."""
    return secrets.token_hex(8)


#: Renders a publication into the text frame a kind of connection receives.
#: The hub calls a renderer once per publication and shares the frame.
Renderer = Callable[[Publication], str]


class Connection:
    """A client of this node.

    ``renderer`` turns a publication into this client's frame (protocol JSON, or
    the tutorial's ``New message: ...``); ``echo_own=False`` skips publications
    this client published itself; ``events=False`` skips join/leave pushes.

    The writer task, its wake-up event, the queue and the hold buffers are created
    on first use: on ``herald serve``'s fast path frames go straight to the socket,
    so an idle connection (and most busy ones) never needs a writer until it closes.
    """

    __slots__ = (
        "_buffering",
        "_closed",
        "_closing",
        "_done",
        "_drain_waiter",
        "_fast",
        "_floors",
        "_max_bytes",
        "_max_messages",
        "_queue",
        "_queued_bytes",
        "_started",
        "_wakeup",
        "_write_delay",
        "_writer",
        "_writing",
        "bytes_out",
        "channels",
        "client_id",
        "close_code",
        "close_reason",
        "created_at",
        "echo_own",
        "events",
        "frames_out",
        "info",
        "last_active",
        "last_ping",
        "last_seen",
        "remote",
        "renderer",
        "transport",
        "user",
    )

    def __init__(
        self,
        transport: Transport,
        client_id: str,
        *,
        renderer: Renderer,
        echo_own: bool = True,
        events: bool = True,
        max_queue_messages: int = 1024,
        max_queue_bytes: int = 4 * 1024 * 1024,
        remote: str = "",
        write_delay: float = 0.0,
    ) -> None:
        self.transport = transport
        self.client_id = client_id
        self.user = ""
        self.info: Any = None
        self.remote = remote
        self.renderer = renderer
        self.echo_own = echo_own
        self.events = events
        self.channels: set[str] = set()
        self.created_at = time.monotonic()
        self.last_seen = self.created_at  # any inbound frame
        self.last_active = self.created_at  # any inbound command other than pong
        self.last_ping = self.created_at
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames_out = 0
        self.bytes_out = 0
        self._max_messages = max_queue_messages
        self._max_bytes = max_queue_bytes
        # Channel frames (deliver) may wait this long on the fast path, to share a write.
        self._write_delay = write_delay
        self._queue: deque[str] | None = None  # created when a frame first has to wait
        self._queued_bytes = 0
        self._wakeup: asyncio.Event | None = None  # created with the writer
        self._closing = False
        self._buffering: dict[str, list[tuple[int | None, str, str]]] | None = None
        # channel -> position (offset, epoch) already sent in a subscribe reply: a live
        # publication of that epoch at or below it that was still on its way from the broker
        # (asynchronous brokers) is a duplicate.  A publication of another epoch never is: the
        # stream restarted, and its offsets 1, 2, ... are new (issue 13: comparing offsets
        # alone dropped the start of a new stream).
        self._floors: dict[str, tuple[int, str]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._started = False
        # Fast path (transports/fastpath.py): a synchronous, bounded write of a pre-framed
        # frame, used while nothing is queued so that order is kept; and, for backpressure
        # on the client's own commands (see backlogged()), what it has accepted but not yet
        # written.  None elsewhere.  The transport itself, not three bound methods of it:
        # they were 200 bytes and three objects for the collector per connection.
        self._fast: DirectWrites | None = (
            cast("DirectWrites", transport) if hasattr(transport, "write_nowait") else None
        )
        self._drain_waiter: asyncio.Event | None = None  # set by the writer when the queue empties
        self._writing = False  # the writer task is between popping a frame and writing it
        self._closed: asyncio.Event | None = None
        self._done = False  # the writer finished (or was never needed) after the close

    # ------------------------------------------------------------ sending

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def closed(self) -> asyncio.Event:
        """Set once the connection is closed and its writer has finished."""
        event = self._closed
        if event is None:
            event = self._closed = asyncio.Event()
            if self._done:
                event.set()
        return event

    @property
    def queued(self) -> tuple[int, int]:
        """(frames, bytes) waiting to be written."""
        return (len(self._queue) if self._queue else 0), self._queued_bytes

    def send(self, frame: str, delay: float = 0.0) -> bool:
        """Queue ``frame``; never awaits.  Returns False if the frame was not queued.

        ``delay``: on the fast path, the frame may wait up to that many seconds so that
        later ones share its ``write()`` (see ``write_delay``); 0 writes it at the end of
        this loop turn."""
        if self._closing:
            return False
        queue = self._queue
        if not queue and not self._writing:
            fast = self._fast
            if fast is not None:
                written = fast.write_nowait(frame, self._max_bytes, self._max_messages, delay)
                if written:
                    self.frames_out += 1
                    self.bytes_out += len(frame)
                    return True
                if written is not None:
                    self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
                    return False
        size = len(frame)
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= self._max_messages or self._queued_bytes + size > self._max_bytes:
            self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
            return False
        queue.append(frame)
        self._queued_bytes += size
        self._wake()
        return True

    def backlogged(self) -> bool:
        """Whether half of either bound (frames or bytes) is waiting to be written.

        A client's commands are not read while it is backlogged (:meth:`drained`): the
        replies to its own commands can then never take it over its bounds, whatever the
        server's speed, and the slow-consumer cut (close 4001) stays for clients that do
        not read what they are sent.
        """
        frames = len(self._queue) if self._queue else 0
        size = self._queued_bytes
        fast = self._fast
        if fast is not None:
            more_frames, more_bytes = fast.unwritten()
            frames += more_frames
            size += more_bytes
        return frames * 2 >= self._max_messages or size * 2 >= self._max_bytes

    async def drained(self) -> None:
        """Wait until nothing is waiting to be written (or the connection closes)."""
        while not self._closing:
            if self._queue or self._writing:
                waiter = self._drain_waiter
                if waiter is None:
                    waiter = self._drain_waiter = asyncio.Event()
                    if self._started:
                        self._spawn_writer()
                await waiter.wait()
                continue
            fast = self._fast
            if fast is None or not self.backlogged():
                return
            await fast.drained()
            if not self.backlogged():
                return

    def deliver(self, channel: str, offset: int | None, frame: str, epoch: str = "") -> None:
        """Hand a channel frame to this client, holding it back while the channel recovers.

        ``offset``/``epoch``: the publication's position (``None`` for join/leave events).
        """
        if (self._buffering is not None or self._floors is not None) and self._held_back(
            channel, offset, frame, epoch
        ):
            return
        self.send(frame, self._write_delay)

    def _held_back(self, channel: str, offset: int | None, frame: str, epoch: str) -> bool:
        """Whether ``frame`` waits for a subscribe in progress (held), or was already sent
        in a subscribe reply (at or below the channel's floor)."""
        buffering = self._buffering
        if buffering is not None:
            pending = buffering.get(channel)
            if pending is not None:
                # Held frames count against the same bound as the queue.
                if len(pending) >= self._max_messages:
                    self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
                    return True
                pending.append((offset, epoch, frame))
                return True
        floors = self._floors
        if floors is not None and offset and channel in floors:
            floor_offset, floor_epoch = floors[channel]
            if epoch == floor_epoch and offset <= floor_offset:
                return True
            # Per-channel order: everything after this one is past the floor too (a later
            # position of the same stream, or a stream that restarted).
            del floors[channel]
            if not floors:
                self._floors = None
        return False

    def hold(self, channel: str) -> None:
        """Buffer ``channel``'s live frames until :meth:`release` (used during subscribe)."""
        if self._buffering is None:
            self._buffering = {}
        self._buffering[channel] = []

    def release(self, channel: str, after_offset: int | None, epoch: str = "") -> None:
        """Send the frames held for ``channel``, skipping publications at or below the
        position (``after_offset``, ``epoch``) the subscribe reply carried.

        Publications at or below that position that arrive later (still in flight from
        an asynchronous broker when the history was read) are dropped too.  Only the
        same epoch is compared: a publication of another epoch belongs to a stream that
        restarted, and is never a duplicate.
        """
        pending = self._pop_hold(channel)
        for offset, held_epoch, frame in pending or ():
            # Offset 0 marks a publication outside any stream (core NATS): never a duplicate.
            if offset and after_offset is not None and held_epoch == epoch and offset <= after_offset:
                continue
            after_offset = None if offset else after_offset  # passed the floor
            self.send(frame)
        if after_offset:
            if self._floors is None:
                self._floors = {}
            self._floors[channel] = (after_offset, epoch)

    def drop_hold(self, channel: str) -> None:
        self._pop_hold(channel)
        if self._floors is not None:
            self._floors.pop(channel, None)
            if not self._floors:
                self._floors = None

    def _pop_hold(self, channel: str) -> list[tuple[int | None, str, str]] | None:
        buffering = self._buffering
        if buffering is None:
            return None
        pending = buffering.pop(channel, None)
        if not buffering:
            self._buffering = None
        return pending

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Allow the writer task to run; it is started when a frame has to be queued or
        the connection closes (at once if that already happened)."""
        self._started = True
        if self._queue or self._closing:
            self._spawn_writer()

    def _spawn_writer(self) -> None:
        if self._writer is None and not self._done:
            self._wakeup = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"herald-writer-{self.client_id}"
            )

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()
        elif self._started:
            self._spawn_writer()

    def close(self, code: int, reason: str, *, push: bool = True) -> None:
        """Close after flushing what is queued; with ``push`` a disconnect notice goes first."""
        if self._closing:
            return
        if push:
            self.send(encode_disconnect(code, reason, should_reconnect(code)))
        self._closing = True
        self.close_code, self.close_reason = code, reason
        self._wake()

    def abort(self, code: int, reason: str) -> None:
        """Close now, dropping whatever is queued (slow consumers, protocol abuse).

        The writer may be blocked on a peer that stopped reading (flow control), so it is
        cancelled; its cleanup closes the transport, which aborts the socket if the close
        frame cannot be written either.
        """
        if code == CloseCode.SLOW_CONSUMER and self.close_code is None and not self._peer_open():
            # The client is already gone (a mass disconnect: the others' leave events fill
            # its queue before its own end is handled): it was not slow; no 4001, no warning.
            self.peer_closed(1006)
            return
        writer = self._writer
        if self._closing and not self._queue and self.close_code is not None:
            # Already closing (e.g. a disconnect push is being written): just make sure a
            # writer stuck on a peer that stopped reading does not pin the connection.
            if writer is not None and not writer.done() and self._writing:
                writer.cancel()
            return
        self._closing = True
        self.close_code, self.close_reason = code, reason
        if self._queue:
            self._queue.clear()
        self._queued_bytes = 0
        self._wake()
        if writer is not None and not writer.done() and self._writing:
            writer.cancel()
        if code == CloseCode.SLOW_CONSUMER:
            logger.warning("client %s (%s) disconnected: slow consumer (4001)", self.client_id, self.remote)

    def _peer_open(self) -> bool:
        is_open = getattr(self.transport, "is_open", None)
        return is_open is None or bool(is_open())

    def peer_closed(self, code: int) -> None:
        """The peer went away; stop writing."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, "closed by client"
        self._closing = True
        if self._queue:
            self._queue.clear()
        self._queued_bytes = 0
        if self._wakeup is not None:
            self._wakeup.set()

    async def wait_closed(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _finished(self) -> None:
        self._done = True
        if self._closed is not None:
            self._closed.set()

    async def _write_loop(self) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        wakeup = self._wakeup
        assert wakeup is not None
        transport = self.transport
        try:
            while True:
                while queue:
                    frame = queue.popleft()
                    self._queued_bytes -= len(frame)
                    self._writing = True
                    await transport.send(frame)
                    self._writing = False
                    self.frames_out += 1
                    self.bytes_out += len(frame)
                self._wake_drain_waiter()
                if self._closing:
                    break
                wakeup.clear()
                await wakeup.wait()
        except asyncio.CancelledError:
            if self.close_code is None:  # cancelled from outside, not by abort()
                raise
        except Exception as exc:  # the peer vanished mid-write
            logger.debug("write to %s failed: %r", self.client_id, exc)
            self.peer_closed(1006)
        finally:
            queue.clear()
            self._queued_bytes = 0
            self._wake_drain_waiter()
            if self.close_code is not None and self.close_code != 1006:
                await transport.close(self.close_code, self.close_reason)
            self._finished()

    def _wake_drain_waiter(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            waiter.set()

    async def stop(self) -> None:
        """Cancel the writer (after the read loop ended); waits for it to finish."""
        self._closing = True
        writer = self._writer
        if writer is not None and not writer.done():
            if self._wakeup is not None:
                self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(writer), 1.0)
            except TimeoutError:
                writer.cancel()
                try:
                    await writer
                except (asyncio.CancelledError, Exception):
                    pass
            except Exception:
                pass
        self._finished()
