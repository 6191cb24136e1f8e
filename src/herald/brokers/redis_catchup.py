"""No gap across a Redis link blip: what each subscribed channel delivered last, and its catch-up.

The broker remembers, per subscribed channel, the
position (offset, epoch) of the last publication it delivered (Pub/Sub delivers
a channel's publications in offset order).  While the subscriber link is down
and until each channel has caught up after it came back, live publications are
held; the catch-up reads the channel's stream from the remembered offset and
delivers what was missed, in order, then the held ones, dropping any offset
already delivered.  When the stream no longer covers the gap (trimmed, expired,
a channel without history whose offset jumped) or the stream was lost (new
epoch), nothing of the gap is delivered and the handler gets a
:class:`~herald.brokers.base.StreamGap`; the node then closes the channel's
subscribers with close code 4005 so they resume with ``since``.

Second line against rollbacks (the first is the run-id stamp of
:mod:`herald.brokers.redis_scripts`): a node whose catch-up finds a stream below
the offset it delivered in the same epoch drops that epoch (``RESET``) and
reports the lost stream.

:class:`RedisCatchUp` is a mixin of :class:`~herald.brokers.redis.RedisBroker`
rather than a separate object: the link loop and ``_dispatch`` (the per-message
path) work on the same ``_tracks`` with no extra indirection.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..exceptions import BrokerError
from .base import BackgroundTasks, BrokerMessage, HistoryResult, Publication, StreamGap, StreamPosition

if TYPE_CHECKING:
    from .redis_config import RedisBrokerConfig

# The Redis broker's logger: operators tune one logger per broker.
logger = logging.getLogger("herald.brokers.redis")

_DELIVER, _DROP, _JUMP = 0, 1, 2


@dataclass(slots=True)
class _Track:
    """One subscribed channel: what this node delivered last, and its catch-up.

    ``held`` is not None while live publications must wait (the link is down or
    the channel is catching up).  ``wanted``/``done`` count catch-up requests and
    the ones served by a read that started after them.
    """

    epoch: str | None = None
    offset: int = 0
    held: list[Publication] | None = None
    wanted: int = 0
    done: int = 0
    catch_up: asyncio.Task[None] | None = field(default=None, repr=False)

    def step(self, publication: Publication) -> int:
        """Whether to deliver ``publication`` next (advancing), drop it (seen), or read first."""
        if self.epoch is None:
            self.epoch, self.offset = publication.epoch, publication.offset
            return _DELIVER
        if publication.epoch == self.epoch:
            if publication.offset <= self.offset:
                return _DROP
            if publication.offset == self.offset + 1:
                self.offset = publication.offset
                return _DELIVER
            return _JUMP
        if publication.offset == 1:
            # The stream restarted while we listened (expired, removed): nothing missed.
            self.epoch, self.offset = publication.epoch, 1
            return _DELIVER
        return _JUMP


class RedisCatchUp:
    """Holds live publications while a channel may have missed some, reads what it
    missed from the stream, and reports what is lost (see the module docstring)."""

    config: RedisBrokerConfig
    _tracks: dict[str, _Track]
    _closed: bool
    _tasks: BackgroundTasks
    _reset_script: Any
    gaps_filled: int
    gaps_lost: int
    rollbacks: int

    if TYPE_CHECKING:  # provided by RedisBroker

        def _deliver(self, message: BrokerMessage) -> None: ...

        async def _await_link(self, channel: str) -> None: ...

        def stream_key(self, channel: str) -> str: ...

        def meta_key(self, channel: str) -> str: ...

        async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any: ...

        async def run_script(self, script: Any, keys: list[Any], args: list[Any]) -> Any: ...

        async def history(
            self,
            channel: str,
            *,
            since: StreamPosition | None = None,
            limit: int | None = None,
            reverse: bool = False,
        ) -> HistoryResult: ...

    def _hold(self, channel: str, track: _Track, publication: Publication) -> None:
        assert track.held is not None
        track.held.append(publication)
        if len(track.held) > self.config.max_held:
            # The catch-up cannot keep up (Redis reachable by Pub/Sub but not for reads):
            # give the gap up rather than grow without bound; continue from the newest.
            last = StreamPosition(track.offset, track.epoch or "")
            newest = track.held[-1]
            track.epoch, track.offset, track.held = newest.epoch, newest.offset, None
            self.gaps_lost += 1
            # Reported before anything newer is delivered: no client gets past the gap unaware.
            self._deliver(StreamGap(channel, last, StreamPosition(newest.offset, newest.epoch)))

    def _start_catch_up(self, channel: str, track: _Track) -> None:
        track.wanted += 1
        if track.catch_up is None or track.catch_up.done():
            track.catch_up = self._tasks.spawn(self._catch_up(channel, track))

    async def _catch_up(self, channel: str, track: _Track) -> None:
        """Deliver what ``channel`` missed while it was not (reliably) subscribed, then
        the held live publications, in offset order; report what cannot be delivered.

        Runs until a read that started after the latest (re)subscription succeeded
        and nothing held is out of order; retries reads with backoff while Redis is
        unreachable.  Only one runs per channel (``track.catch_up``).
        """
        delay = self.config.reconnect_min
        while self._tracks.get(channel) is track and not self._closed:
            if track.done >= track.wanted and track.held is None:
                return
            # Until the channel is subscribed on a live connection (on a cluster: its master's).
            await self._await_link(channel)
            wanted = track.wanted
            since = StreamPosition(track.offset, track.epoch) if track.epoch is not None else None
            # Held publications received before the read: the read sees a stream at least as new.
            before_read = len(track.held or ())
            try:
                history = await self.history(channel, since=since, limit=None if since else 0)
            except Exception as exc:
                # Whatever failed, the channel's subscribers wait on this catch-up: it must
                # retry, never end (a client library's own error included).
                log = logger.debug if isinstance(exc, BrokerError) else logger.warning
                log("catching up %s failed: %r; retrying", channel, exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.config.reconnect_max)
                continue
            if self._tracks.get(channel) is not track:
                return
            delay = self.config.reconnect_min
            if since is None and track.epoch is not None:
                pass  # a live publication set the position meanwhile: keep it
            elif since is not None and (track.epoch, track.offset) != (since.epoch, since.offset):
                continue  # moved meanwhile (held publications given up): read again
            else:
                try:
                    await self._apply(channel, track, since, history)
                except Exception as exc:  # a rollback found, but Redis failed resetting it
                    log = logger.debug if isinstance(exc, BrokerError) else logger.warning
                    log("catching up %s failed: %r; retrying", channel, exc)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    continue
            track.done = wanted
            # Release the held publications in order; a jump among them needs another read.
            held = track.held or []
            while held:
                publication = held[0]
                if before_read > 0 and publication.epoch != track.epoch:
                    # Its epoch was already gone when the stream was read (a rollback or a
                    # lost stream, reported above): another read would never place it.
                    held.pop(0)
                    before_read -= 1
                    continue
                step = track.step(publication)
                if step == _JUMP:
                    track.wanted += 1
                    break
                held.pop(0)
                before_read -= 1
                if step == _DELIVER:
                    self._deliver(publication)
            else:
                if track.done >= track.wanted:
                    track.held = None  # no await since the last check: nothing slips in between

    async def _apply(
        self, channel: str, track: _Track, since: StreamPosition | None, history: HistoryResult
    ) -> None:
        top = history.position
        if since is None:
            # First position of this channel (it was registered while Redis was down).
            track.epoch, track.offset = top.epoch, top.offset
            return
        if top.epoch != since.epoch:
            # The stream was lost (expired, flushed, Redis restarted empty): whatever came
            # after ``since`` in the old stream cannot be delivered any more.
            track.epoch, track.offset = top.epoch, top.offset
            self.gaps_lost += 1
            self._deliver(StreamGap(channel, since, top, epoch_changed=True))
            return
        missed = [p for p in history.publications if p.offset > track.offset]
        if top.offset < track.offset:
            # This node delivered further in this epoch than the stream now reaches: Redis
            # rolled back (a failover or restart the run-id stamp could not see).  Its next
            # offsets would repeat ones clients hold, so the stream must start again.
            await self._roll_back(channel, track, since)
            return
        if top.offset == track.offset:
            return
        if missed and missed[0].offset == track.offset + 1:
            self.gaps_filled += len(missed)
            for publication in missed:
                if track.step(publication) == _DELIVER:
                    self._deliver(publication)
            return
        # Trimmed, expired, or a channel without history: the gap cannot be filled.
        # Deliver nothing of it (a client must not get past a gap it cannot see).
        last = StreamPosition(track.offset, since.epoch)
        track.offset = top.offset
        self.gaps_lost += 1
        self._deliver(StreamGap(channel, last, top))

    async def _roll_back(self, channel: str, track: _Track, since: StreamPosition) -> None:
        """Start ``channel`` again in a new epoch (unless it already moved past ``since``)
        and report the lost stream, as for any stream lost while this node listened."""
        await self.run_script(
            self._reset_script, [self.stream_key(channel), self.meta_key(channel)], [since.epoch]
        )
        top = (await self.history(channel, limit=0)).position
        logger.warning(
            "channel %s: redis rolled back below offset %d of epoch %s; new epoch %s",
            channel,
            since.offset,
            since.epoch,
            top.epoch,
        )
        self.rollbacks += 1
        self.gaps_lost += 1
        track.epoch, track.offset = top.epoch, top.offset
        self._deliver(StreamGap(channel, since, top, epoch_changed=top.epoch != since.epoch))


__all__ = ["RedisCatchUp"]
