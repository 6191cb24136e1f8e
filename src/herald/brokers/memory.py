"""The embedded broker: one process, history in memory.

Fan-out is a direct call into the node's handler, so publications of a channel
reach the hub in offset order without any queue in between.

Only a publish creates state.  A read of a channel that has no stream (never
published to, or its stream expired or was removed) returns offset 0 in the
channel's *empty epoch* and stores nothing, so clients cannot grow the broker
by naming channels.  The first publication then starts the stream at offset 1
in that same epoch, so a subscriber told ``(0, epoch)`` continues (and can
recover) without any special case.  The empty epoch is computed, not stored:
this broker's random token and a generation counter of the channel's bucket
(``crc32(channel) % EPOCH_BUCKETS``), which every stream creation in the
bucket increments.  So a channel whose stream was created (and perhaps lost
again) since a client read ``(0, epoch)`` never reads as that epoch again, and
that client is told ``recovered: false`` instead of missing the lost stream.
The counters are bounded (at most ``EPOCH_BUCKETS`` integers).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import (
    Broker,
    BrokerHandler,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamGap,
    StreamPosition,
    epoch_bucket,
)

#: Streams an operation removes at most; the rest go on the next operations.
SWEEP_BATCH = 512
#: Idempotency keys remembered at most (the oldest are forgotten first beyond it).
MAX_IDEMPOTENCY_KEYS = 100_000

#: One publication kept in a stream's history (see ``_Stream.entries``).
_Entry = tuple[int, bytes, str | None, str, Any, float]


@dataclass(slots=True)
class _Stream:
    epoch: str
    offset: int = 0
    # (offset, data, publisher's client id or None, its user id, its info, monotonic
    # expiry time).  Plain tuples of strings, bytes and numbers, not Publication
    # objects: the collector stops tracking such a tuple at its first young collection,
    # so a full history (history_size entries in every channel) adds nothing to a full
    # collection's walk (with objects, 2,000 channels of 100 entries made each one
    # ~100 ms longer).  Flat, because a nested tuple is untracked one collection later.
    entries: deque[_Entry] = field(default_factory=deque)
    expires_at: float = 0.0  # the whole stream is forgotten after this (0: never)
    ttl: float = 0.0  # the lifetime group (``_expiry`` key) it is in (0: none)


class MemoryBroker(Broker):
    """In-memory broker: the default for a single process.

    A stream is forgotten ``history_ttl`` seconds after its last publication
    (namespaces with history and a TTL) or ``stream_meta_ttl`` seconds after it
    (namespaces without history: only the offset is kept; 0 keeps it forever),
    and the next publish starts a new epoch, as a Redis key with a TTL would.
    Reads never create a stream (see the module docstring).

    Expiry is incremental: streams are kept in one insertion-ordered dict per
    lifetime (a publication moves its stream to the end), so each dict is in
    expiry order and an operation only looks at the heads: its cost is the
    number of streams that expired, at most :data:`SWEEP_BATCH` per operation.
    ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        stream_meta_ttl: float = 3600.0,
        max_idempotency_keys: int = MAX_IDEMPOTENCY_KEYS,
    ) -> None:
        if stream_meta_ttl < 0:
            raise ValueError("stream_meta_ttl must be >= 0")
        if max_idempotency_keys < 1:
            raise ValueError("max_idempotency_keys must be >= 1")
        self._clock = clock or time.monotonic
        self.stream_meta_ttl = stream_meta_ttl
        self._streams: dict[str, _Stream] = {}
        # lifetime (seconds) -> channel -> expiry time, oldest publication first.
        self._expiry: dict[float, OrderedDict[str, float]] = {}
        self._token = secrets.token_hex(4)
        self._generations: dict[int, int] = {}
        self._subscribed: set[str] = set()
        self._handler: BrokerHandler | None = None
        #: Streams removed by expiry (for tests and metrics).
        self.expired = 0
        #: (channel, idempotency key) -> (position, expiry), oldest first; at most
        #: ``max_idempotency_keys`` entries (the oldest are forgotten first).
        self._idempotency: OrderedDict[tuple[str, str], tuple[StreamPosition, float]] = OrderedDict()
        self.max_idempotency_keys = max_idempotency_keys
        #: Idempotency keys forgotten before their window ended, to respect the bound.
        self.idempotency_evicted = 0
        #: Test hook: when it returns True for a publication, this node "misses" it
        #: (as if its link had dropped it) and reports a StreamGap instead.
        self.drop_hook: Callable[[Publication], bool] | None = None

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

    # ------------------------------------------------------------ streams and expiry

    def empty_epoch(self, channel: str) -> str:
        """The epoch ``channel`` reads as while it has no stream (and its next stream's)."""
        return f"{self._token}.{self._generations.get(epoch_bucket(channel), 0):x}"

    def _create(self, channel: str) -> _Stream:
        bucket = epoch_bucket(channel)
        generation = self._generations.get(bucket, 0)
        stream = _Stream(f"{self._token}.{generation:x}")
        self._generations[bucket] = generation + 1
        self._streams[channel] = stream
        return stream

    def _live(self, channel: str, now: float) -> _Stream | None:
        self.sweep(now)
        stream = self._streams.get(channel)
        if stream is not None and stream.expires_at and stream.expires_at <= now:
            self._forget(channel, stream)
            self.expired += 1
            return None
        return stream

    def _forget(self, channel: str, stream: _Stream) -> None:
        del self._streams[channel]
        self._forget_expiry(channel, stream.ttl)

    def _forget_expiry(self, channel: str, ttl: float) -> None:
        group = self._expiry.get(ttl)
        if group is not None:
            group.pop(channel, None)

    def _set_lifetime(self, channel: str, stream: _Stream, ttl: float, now: float) -> None:
        if stream.ttl and stream.ttl != ttl:
            self._forget_expiry(channel, stream.ttl)
        stream.ttl = ttl
        if not ttl:
            stream.expires_at = 0.0
            return
        stream.expires_at = now + ttl
        group = self._expiry.get(ttl)
        if group is None:
            group = self._expiry[ttl] = OrderedDict()
        group[channel] = stream.expires_at
        group.move_to_end(channel)

    def sweep(self, now: float, limit: int = SWEEP_BATCH) -> int:
        """Forget up to ``limit`` expired streams; returns how many.  Looks only at
        streams that expired (plus one head per lifetime group)."""
        removed = 0
        for ttl, group in list(self._expiry.items()):
            while group and removed < limit:
                channel, expires_at = next(iter(group.items()))
                if expires_at > now:
                    break
                group.popitem(last=False)
                stream = self._streams.get(channel)
                if stream is not None and stream.ttl == ttl and stream.expires_at == expires_at:
                    del self._streams[channel]
                    self.expired += 1
                removed += 1
            if not group:
                del self._expiry[ttl]
        return removed

    def stream_count(self) -> int:
        """Streams kept in memory (for tests and the admin page)."""
        return len(self._streams)

    def _trim(self, stream: _Stream, now: float) -> None:
        entries = stream.entries
        while entries and entries[0][5] <= now:
            entries.popleft()

    # ------------------------------------------------------------ publishing

    publishes_now = True

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        return self.publish_now(channel, data, options)

    def publish_now(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        now = self._clock()
        stream = self._live(channel, now) or self._create(channel)
        stream.offset += 1
        publication = Publication(channel, stream.offset, stream.epoch, data, options.info)
        if options.history_size > 0:
            ttl = options.history_ttl if options.history_ttl > 0 else float("inf")
            info = options.info
            if info is None:
                stream.entries.append((stream.offset, data, None, "", None, now + ttl))
            else:
                stream.entries.append((stream.offset, data, info.client, info.user, info.info, now + ttl))
            while len(stream.entries) > options.history_size:
                stream.entries.popleft()
            self._set_lifetime(channel, stream, max(options.history_ttl, 0.0), now)
        else:
            stream.entries.clear()
            # Only the offset is kept; it expires like a Redis meta key (stream_meta_ttl).
            self._set_lifetime(channel, stream, self.stream_meta_ttl, now)
        self._fan_out(publication)
        return StreamPosition(stream.offset, stream.epoch)

    async def publish_idempotent(
        self, channel: str, data: bytes, options: PublishOptions, key: str, window: float
    ) -> tuple[StreamPosition, bool]:
        """Publish once per ``(channel, key)`` within ``window`` seconds (see the base class).

        One process, one event loop: :meth:`publish_now` does not suspend, so nothing can
        publish the same key between the lookup and the record.  At most
        ``max_idempotency_keys`` keys are remembered; beyond that the oldest is
        forgotten before its window ends (counted in ``idempotency_evicted``).
        """
        now = self._clock()
        remembered = self._idempotency
        # Keys are recorded in time order: the expired ones are at the head.
        while remembered:
            head = next(iter(remembered.values()))
            if head[1] > now:
                break
            remembered.popitem(last=False)
        entry = remembered.get((channel, key))
        if entry is not None and entry[1] > now:
            return entry[0], True
        position = self.publish_now(channel, data, options)
        remembered.pop((channel, key), None)
        remembered[(channel, key)] = (position, now + window)
        while len(remembered) > self.max_idempotency_keys:
            remembered.popitem(last=False)
            self.idempotency_evicted += 1
        return position, False

    def idempotency_key_count(self) -> int:
        """Idempotency keys remembered now (for tests)."""
        return len(self._idempotency)

    async def publish_event(self, event: PresenceEvent) -> None:
        self._fan_out(event)

    def _fan_out(self, message: Publication | PresenceEvent) -> None:
        if self._handler is None or message.channel not in self._subscribed:
            return
        if isinstance(message, Publication) and self.drop_hook is not None and self.drop_hook(message):
            # A missed publication is reported, never skipped silently (broker contract).
            last = StreamPosition(message.offset - 1, message.epoch)
            self._deliver(StreamGap(message.channel, last, StreamPosition(message.offset, message.epoch)))
        else:
            self._deliver(message)

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "streams_expired": self.expired,
            "idempotency_evicted": self.idempotency_evicted,
        }

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        now = self._clock()
        stream = self._live(channel, now)
        if stream is None:
            # No stream: nothing is stored for a read (see the module docstring).
            return HistoryResult([], StreamPosition(0, self.empty_epoch(channel)))
        self._trim(stream, now)
        position = StreamPosition(stream.offset, stream.epoch)
        if limit == 0:
            return HistoryResult([], position)
        entries = list(stream.entries)
        if since is not None and since.epoch == stream.epoch:
            after = since.offset
            entries = [entry for entry in entries if entry[0] > after]
        if reverse:
            entries.reverse()
        if limit is not None:
            entries = entries[:limit]
        # Publication objects only for the entries read (see _Stream.entries).
        epoch = stream.epoch
        items = [
            Publication(
                channel, offset, epoch, data, None if client is None else ClientInfo(client, user, info)
            )
            for offset, data, client, user, info, _ in entries
        ]
        return HistoryResult(items, position)

    async def remove_history(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is not None:
            self._forget(channel, stream)
