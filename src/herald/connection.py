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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .brokers.base import Publication
from .codes import CloseCode, should_reconnect
from .protocol.codec import encode_disconnect
from .transports.base import Transport

logger = logging.getLogger("herald.connection")

#: Renders a publication into the text frame a kind of connection receives.
#: The hub calls a renderer once per publication and shares the frame.
Renderer = Callable[[Publication], str]


class Connection:
    """A client of this node.

    ``renderer`` turns a publication into this client's frame (protocol JSON, or
    the tutorial's ``New message: ...``); ``echo_own=False`` skips publications
    this client published itself; ``events=False`` skips join/leave pushes.
    """

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
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._buffering: dict[str, list[tuple[int | None, str]]] = {}
        self._writer: asyncio.Task[None] | None = None
        # Fast path (transports/fastpath.py): a synchronous, bounded write of a pre-framed
        # frame, used while nothing is queued so that order is kept.  None elsewhere.
        self._direct: Callable[[str, int, int], bool | None] | None = getattr(transport, "write_nowait", None)
        self._writing = False  # the writer task is between popping a frame and writing it
        self.closed = asyncio.Event()

    # ------------------------------------------------------------ sending

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> tuple[int, int]:
        """(frames, bytes) waiting to be written."""
        return len(self._queue), self._queued_bytes

    def send(self, frame: str) -> bool:
        """Queue ``frame``; never awaits.  Returns False if the frame was not queued."""
        if self._closing:
            return False
        size = len(frame)
        direct = self._direct
        if direct is not None and not self._queue and not self._writing:
            written = direct(frame, self._max_bytes, self._max_messages)
            if written is not None:
                if not written:
                    self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
                    return False
                self.frames_out += 1
                self.bytes_out += size
                return True
        if len(self._queue) >= self._max_messages or self._queued_bytes + size > self._max_bytes:
            self.abort(CloseCode.SLOW_CONSUMER, "slow consumer")
            return False
        self._queue.append(frame)
        self._queued_bytes += size
        self._wakeup.set()
        return True

    def deliver(self, channel: str, offset: int | None, frame: str) -> None:
        """Hand a channel frame to this client, holding it back while the channel recovers."""
        pending = self._buffering.get(channel)
        if pending is not None:
            pending.append((offset, frame))
        else:
            self.send(frame)

    def hold(self, channel: str) -> None:
        """Buffer ``channel``'s live frames until :meth:`release` (used during subscribe)."""
        self._buffering[channel] = []

    def release(self, channel: str, after_offset: int | None) -> None:
        """Send the frames held for ``channel``, skipping publications at or below ``after_offset``."""
        pending = self._buffering.pop(channel, None)
        if not pending:
            return
        for offset, frame in pending:
            # Offset 0 marks a publication outside any stream (core NATS): never a duplicate.
            if offset and after_offset is not None and offset <= after_offset:
                continue
            self.send(frame)

    def drop_hold(self, channel: str) -> None:
        self._buffering.pop(channel, None)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer task."""
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name=f"herald-writer-{self.client_id}"
        )

    def close(self, code: int, reason: str, *, push: bool = True) -> None:
        """Close after flushing what is queued; with ``push`` a disconnect notice goes first."""
        if self._closing:
            return
        if push:
            self.send(encode_disconnect(code, reason, should_reconnect(code)))
        self._closing = True
        self.close_code, self.close_reason = code, reason
        self._wakeup.set()

    def abort(self, code: int, reason: str) -> None:
        """Close now, dropping whatever is queued (slow consumers, protocol abuse).

        The writer may be blocked on a peer that stopped reading (flow control), so it is
        cancelled; its cleanup closes the transport, which aborts the socket if the close
        frame cannot be written either.
        """
        if self._closing and not self._queue and self.close_code is not None:
            return
        self._closing = True
        self.close_code, self.close_reason = code, reason
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()
        writer = self._writer
        if writer is not None and not writer.done() and self._writing:
            writer.cancel()
        if code == CloseCode.SLOW_CONSUMER:
            logger.warning("client %s (%s) disconnected: slow consumer (4001)", self.client_id, self.remote)

    def peer_closed(self, code: int) -> None:
        """The peer went away; stop writing."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, "closed by client"
        self._closing = True
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()

    async def wait_closed(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _write_loop(self) -> None:
        queue = self._queue
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
                if self._closing:
                    break
                self._wakeup.clear()
                await self._wakeup.wait()
        except asyncio.CancelledError:
            if self.close_code is None:  # cancelled from outside, not by abort()
                raise
        except Exception as exc:  # the peer vanished mid-write
            logger.debug("write to %s failed: %r", self.client_id, exc)
            self.peer_closed(1006)
        finally:
            self._queue.clear()
            self._queued_bytes = 0
            if self.close_code is not None and self.close_code != 1006:
                await transport.close(self.close_code, self.close_reason)
            self.closed.set()

    async def stop(self) -> None:
        """Cancel the writer (after the read loop ended); waits for it to finish."""
        self._closing = True
        self._wakeup.set()
        writer = self._writer
        if writer is not None and not writer.done():
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
        self.closed.set()
