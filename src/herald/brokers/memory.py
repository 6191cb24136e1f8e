"""The embedded broker: one process, history in memory.

Fan-out is a direct call into the node's handler, so publications of a channel
reach the hub in offset order without any queue in between.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import (
    Broker,
    BrokerHandler,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamPosition,
    new_epoch,
)


@dataclass(slots=True)
class _Stream:
    epoch: str = field(default_factory=new_epoch)
    offset: int = 0
    # (publication, monotonic expiry time)
    entries: deque[tuple[Publication, float]] = field(default_factory=deque)
    expires_at: float = 0.0  # the whole stream is forgotten after this (0: never)


class MemoryBroker(Broker):
    """In-memory broker: the default for a single process.

    A stream whose history has fully expired (no publication for ``history_ttl``)
    is forgotten, and the next publish starts a new epoch, as a Redis key with a
    TTL would.  A stream that only a read created (a subscribe to a channel nobody
    published to) is forgotten after ``read_stream_ttl`` seconds, so clients cannot
    grow the broker by naming channels.  Expired streams are swept once a minute.
    ``clock`` is injectable for tests.
    """

    SWEEP_INTERVAL = 60.0

    def __init__(self, *, clock: Callable[[], float] | None = None, read_stream_ttl: float = 3600.0) -> None:
        self._clock = clock or time.monotonic
        self._read_stream_ttl = read_stream_ttl
        self._next_sweep = 0.0
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._handler: BrokerHandler | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None
        self._subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def channels(self) -> set[str]:
        return set(self._subscribed)

    def _stream(self, channel: str, now: float, *, read: bool = False) -> _Stream:
        if now >= self._next_sweep:
            self._sweep(now)
        stream = self._streams.get(channel)
        if stream is None or (stream.expires_at and stream.expires_at <= now):
            stream = self._streams[channel] = _Stream()
            if read and self._read_stream_ttl > 0:
                stream.expires_at = now + self._read_stream_ttl
        return stream

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.SWEEP_INTERVAL
        expired = [name for name, s in self._streams.items() if s.expires_at and s.expires_at <= now]
        for name in expired:
            del self._streams[name]

    def stream_count(self) -> int:
        """Streams kept in memory (for tests and the admin page)."""
        return len(self._streams)

    def _trim(self, stream: _Stream, now: float) -> None:
        entries = stream.entries
        while entries and entries[0][1] <= now:
            entries.popleft()

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        now = self._clock()
        stream = self._stream(channel, now)
        stream.offset += 1
        publication = Publication(channel, stream.offset, stream.epoch, data, options.info)
        if options.history_size > 0:
            ttl = options.history_ttl if options.history_ttl > 0 else float("inf")
            stream.entries.append((publication, now + ttl))
            while len(stream.entries) > options.history_size:
                stream.entries.popleft()
            stream.expires_at = now + ttl if options.history_ttl > 0 else 0.0
        else:
            stream.expires_at = 0.0  # offsets of a channel without history are kept
        await self._deliver(publication)
        return StreamPosition(stream.offset, stream.epoch)

    async def publish_event(self, event: PresenceEvent) -> None:
        await self._deliver(event)

    async def _deliver(self, message: Publication | PresenceEvent) -> None:
        if self._handler is None or message.channel not in self._subscribed:
            return
        result = self._handler(message)
        if inspect.isawaitable(result):
            await result

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        now = self._clock()
        stream = self._stream(channel, now, read=True)
        self._trim(stream, now)
        position = StreamPosition(stream.offset, stream.epoch)
        if limit == 0:
            return HistoryResult([], position)
        items = [publication for publication, _ in stream.entries]
        if since is not None and since.epoch == stream.epoch:
            items = [p for p in items if p.offset > since.offset]
        if reverse:
            items.reverse()
        if limit is not None:
            items = items[:limit]
        return HistoryResult(items, position)

    async def remove_history(self, channel: str) -> None:
        self._streams.pop(channel, None)
