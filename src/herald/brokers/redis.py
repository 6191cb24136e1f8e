"""The Redis broker: several processes and machines share channels through one Redis.

Fan-out uses Redis Pub/Sub; history and offsets live in Redis and are changed
only by Lua scripts, so every publication of a channel gets the next offset
(1, 2, 3, ... with no gap) however many nodes publish at once, and reaches the
subscribed nodes in offset order.

Keys (``prefix`` defaults to ``herald``; ``CHANNEL`` is the Herald channel name):

=============================  ==========  ===================================================
key                            type        contents
=============================  ==========  ===================================================
``PREFIX:meta:CHANNEL``        hash        ``e`` = epoch, ``o`` = offset of the newest publication
``PREFIX:stream:CHANNEL``      stream      the last ``history_size`` publications; entry id
                                           ``OFFSET-0``, fields ``d`` data, ``i`` info, ``x``
                                           expiry (ms since the Unix epoch, 0 = never)
``PREFIX:presence:CHANNEL``    hash        client id -> ClientInfo JSON (see presence/redis.py)
``PREFIX:presence-exp:CHANNEL`` sorted set client id -> expiry (ms)
=============================  ==========  ===================================================

Pub/Sub channels: ``PREFIX:ch:CHANNEL`` carries the channel's envelopes and
``PREFIX:link`` (never published to) keeps the subscriber connection up and
tells when every subscription of a (re)connection was confirmed.

Both history keys expire ``history_ttl`` seconds after the last publication.
When the meta key is missing (TTL expired, Redis restarted without persistence,
``remove_history``), the next publish or history read creates a new random
epoch and offsets restart at 1, so clients holding an old position are told
``recovered: false``.  A meta key created by a *read* (a client subscribed to or
read the history of a channel that never had a publication) expires after
``read_meta_ttl`` seconds, so clients cannot fill Redis with permanent keys by
subscribing to random names; the first publish then applies the publish rules
(``history_ttl``, ``stream_meta_ttl``, or no expiry).

Faults: when Redis is unreachable, :meth:`RedisBroker.publish`, ``history`` and
presence calls raise :class:`~herald.exceptions.BrokerUnavailableError`,
:meth:`RedisBroker.ready` is False, and a background task reconnects with
exponential backoff and jitter, then re-subscribes every channel.

No gap across a link blip: the broker remembers, per subscribed channel, the
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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import redact_url
from ..exceptions import BrokerError, BrokerUnavailableError
from . import envelope
from .base import (
    BackgroundTasks,
    Broker,
    BrokerHandler,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamGap,
    StreamPosition,
    new_epoch,
)

logger = logging.getLogger("herald.brokers.redis")

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class RedisBrokerConfig:
    """How to reach Redis and name keys.

    ``url``: ``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or ``unix://path``.
    ``prefix``: prepended to every key and Pub/Sub channel, so several Herald
    deployments can share one Redis.  ``stream_meta_ttl``: seconds a channel's
    offset/epoch key lives after its last publication when the namespace keeps
    no history (0: forever, like the memory broker; with history the key lives
    as long as the history, ``history_ttl``).  ``reconnect_min``/``reconnect_max``:
    the backoff between reconnect attempts (doubled each failure, with jitter).
    ``max_connections``: command connections per node; more concurrent commands
    wait (up to ``command_timeout``) for a free one.  ``read_meta_ttl``: seconds
    a channel's offset/epoch key lives when a read (subscribe, history) created
    it and nothing was published yet (0: forever; the first publish applies the
    rules above).  ``max_held``: live publications held per channel while it
    catches up after a link blip; beyond it the gap is reported as lost.
    """

    url: str = field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    prefix: str = "herald"
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    stream_meta_ttl: float = 0.0
    max_connections: int = 50
    read_meta_ttl: float = 3600.0
    max_held: int = 10_000


# Lua scripts run atomically: nothing else touches a channel's keys between the
# epoch check, the offset increment, the append and the PUBLISH.

_PUBLISH = """
local stream, meta = KEYS[1], KEYS[2]
local pubsub, data, info = ARGV[1], ARGV[2], ARGV[3]
local size, ttl, meta_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7])
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  -- The stream was lost (expired, flushed, Redis restarted empty): start a new epoch.
  epoch = ARGV[6]
  redis.call('del', stream)
  redis.call('hset', meta, 'e', epoch)
end
local offset = redis.call('hincrby', meta, 'o', 1)
if size > 0 then
  local expires = 0
  if ttl > 0 then
    local t = redis.call('time')
    expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
  end
  redis.call('xadd', stream, 'MAXLEN', size, string.format('%d-0', offset),
             'd', data, 'i', info, 'x', string.format('%d', expires))
  if ttl > 0 then
    redis.call('pexpire', stream, ttl)
    redis.call('pexpire', meta, ttl)
  else
    redis.call('persist', stream)
    redis.call('persist', meta)
  end
elseif meta_ttl > 0 then
  redis.call('pexpire', meta, meta_ttl)
else
  -- A read may have created the key with an expiry (read_meta_ttl): published keys persist.
  redis.call('persist', meta)
end
redis.call('publish', pubsub,
  'p' .. string.format('%d', offset) .. ':' .. epoch .. ':' .. string.len(info) .. ':' .. info .. data)
return {offset, epoch}
"""

_HISTORY = """
local stream, meta = KEYS[1], KEYS[2]
local since_offset, since_epoch = ARGV[2], ARGV[3]
local limit, reverse, meta_ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('del', stream)
  redis.call('hset', meta, 'e', epoch)
  -- Created by a read: expire it (read_meta_ttl) unless a publish comes and keeps it.
  if meta_ttl > 0 then redis.call('pexpire', meta, meta_ttl) end
end
local offset = tonumber(redis.call('hget', meta, 'o') or '0')
if limit == 0 then return {offset, epoch, {}} end
-- Entries expire one by one (field x); they are in expiry order, so trim the head.
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  local head = redis.call('xrange', stream, '-', '+', 'COUNT', 100)
  local cut = nil
  for _, entry in ipairs(head) do
    local fields, expires = entry[2], 0
    for i = 1, #fields, 2 do
      if fields[i] == 'x' then expires = tonumber(fields[i + 1]) end
    end
    if expires > 0 and expires <= now then cut = entry[1] else break end
  end
  if cut == nil then break end
  local n = tonumber(string.match(cut, '^(%d+)'))
  redis.call('xtrim', stream, 'MINID', string.format('%d-0', n + 1))
  if cut ~= head[#head][1] then break end
end
local start = '-'
if since_offset ~= '' and since_epoch == epoch then
  start = string.format('%d-0', tonumber(since_offset) + 1)
end
local entries
if reverse == '1' then
  if limit > 0 then
    entries = redis.call('xrevrange', stream, '+', start, 'COUNT', limit)
  else
    entries = redis.call('xrevrange', stream, '+', start)
  end
else
  if limit > 0 then
    entries = redis.call('xrange', stream, start, '+', 'COUNT', limit)
  else
    entries = redis.call('xrange', stream, start, '+')
  end
end
return {offset, epoch, entries}
"""


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _close_pubsub(pubsub: PubSub) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisBroker(Broker):
    """Broker on Redis Pub/Sub (fan-out) and Lua-maintained streams (history, offsets).

    One Pub/Sub connection per node carries every subscribed channel; one
    connection pool serves commands.  See the module docstring for keys and faults.
    """

    def __init__(self, config: RedisBrokerConfig | None = None) -> None:
        self.config = config or RedisBrokerConfig()
        prefix = self.config.prefix
        self._channel_prefix = f"{prefix}:ch:"
        self._link_channel = f"{prefix}:link"
        self._client: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._handler: BrokerHandler | None = None
        self._channels: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._link_up = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0  # link re-establishments after the first (for tests and metrics)
        self._publish_script: Any = None
        self._history_script: Any = None
        #: Per subscribed channel: the last delivered position and the catch-up state.
        self._tracks: dict[str, _Track] = {}
        self._tasks = BackgroundTasks()
        #: Publications read from streams after a blip, and gaps reported lost (tests/metrics).
        self.gaps_filled = 0
        self.gaps_lost = 0

    # ------------------------------------------------------------ keys

    def meta_key(self, channel: str) -> str:
        return f"{self.config.prefix}:meta:{channel}"

    def stream_key(self, channel: str) -> str:
        return f"{self.config.prefix}:stream:{channel}"

    def pubsub_channel(self, channel: str) -> str:
        return self._channel_prefix + channel

    # ------------------------------------------------------------ connection

    @property
    def client(self) -> aioredis.Redis:
        """The command client (created on first use; shared with the presence manager)."""
        if self._client is None:
            cfg = self.config
            # A blocking pool: a burst of more concurrent commands than ``max_connections``
            # (300 clients subscribing at once) waits for a connection instead of failing
            # with "Too many connections" as redis-py's default pool (100) does.
            pool = aioredis.BlockingConnectionPool.from_url(
                cfg.url,
                max_connections=cfg.max_connections,
                timeout=cfg.command_timeout,
                socket_connect_timeout=cfg.connect_timeout,
                socket_timeout=cfg.command_timeout,
                # One retry on a fresh connection: a pooled connection may be stale after a
                # Redis restart.  More would only delay the error a client is waiting for.
                retry=Retry(NoBackoff(), 1),
                retry_on_error=[RedisConnectionError],
            )
            self._client = aioredis.Redis.from_pool(pool)
            self._publish_script = self._client.register_script(_PUBLISH)
            self._history_script = self._client.register_script(_HISTORY)
        return self._client

    async def start(self, handler: BrokerHandler) -> None:
        """Start the subscriber link; waits up to ``connect_timeout`` for Redis, never fails.

        If Redis is down the node starts anyway (``ready()`` is False) and the link
        keeps retrying in the background.
        """
        self._handler = handler
        self._closed = False
        _ = self.client
        cfg = self.config
        self._sub_client = aioredis.Redis.from_url(
            cfg.url,
            socket_connect_timeout=cfg.connect_timeout,
            retry=Retry(NoBackoff(), 0),  # the link loop does its own reconnecting
        )
        self._runner = asyncio.get_running_loop().create_task(self._run_link(), name="herald-redis-link")
        try:
            await asyncio.wait_for(self._link_up.wait(), cfg.connect_timeout)
        except TimeoutError:
            logger.warning("redis %s not reachable yet; retrying in the background", redact_url(cfg.url))

    async def close(self) -> None:
        self._closed = True
        self._handler = None
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
        self._link_up.clear()
        self._fail_pending(BrokerUnavailableError("broker closed"))
        await self._tasks.cancel_all()
        self._tracks.clear()
        for client in (self._sub_client, self._client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._sub_client = self._client = None
        self._channels.clear()

    async def ready(self) -> bool:
        if not self._link_up.is_set() or self._closed:
            return False
        try:
            await asyncio.wait_for(self.client.ping(), self.config.connect_timeout)
        except (RedisError, *_UNAVAILABLE):
            return False
        return True

    @property
    def connected(self) -> bool:
        """Whether the subscriber link is up (cheaper than :meth:`ready`)."""
        return self._link_up.is_set()

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self._pending.clear()

    async def _run_link(self) -> None:
        """Keep one Pub/Sub connection subscribed to every channel; reconnect with backoff."""
        cfg = self.config
        delay = cfg.reconnect_min
        first = True
        while not self._closed:
            assert self._sub_client is not None
            pubsub = self._sub_client.pubsub()
            try:
                names = [self.pubsub_channel(c) for c in self._channels]
                # The link channel goes last: its confirmation means all before it are confirmed.
                await pubsub.subscribe(*names, self._link_channel)
                self._pubsub = pubsub
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    kind = message["type"]
                    name = _text(message["channel"])
                    if kind == "message":
                        await self._dispatch(name, message["data"])
                    elif kind == "subscribe":
                        if name == self._link_channel:
                            if not first:
                                self.reconnects += 1
                                logger.warning(
                                    "redis link re-established; %d channels re-subscribed",
                                    len(names),
                                )
                            first = False
                            delay = cfg.reconnect_min
                            self._link_up.set()
                            # Every channel is subscribed again: read what the blip hid.
                            for channel, track in self._tracks.items():
                                if track.held is not None or track.epoch is None:
                                    self._start_catch_up(channel, track)
                        else:
                            future = self._pending.pop(name, None)
                            if future is not None and not future.done():
                                future.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._link_up.is_set():
                    logger.warning("redis link lost: %r; reconnecting", exc)
                else:
                    logger.debug("redis link attempt failed: %r", exc)
                self._link_up.clear()
                self._pubsub = None
                # From here on publications may be missed: hold live ones until each
                # channel has read its stream after the link is back.
                for track in self._tracks.values():
                    if track.held is None:
                        track.held = []
                    track.wanted += 1  # a running catch-up must read again after the reconnect
                self._fail_pending(BrokerUnavailableError(f"redis unavailable: {exc}"))
                await _close_pubsub(pubsub)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, cfg.reconnect_max)
            finally:
                if self._closed:
                    await _close_pubsub(pubsub)

    async def _dispatch(self, name: str, payload: bytes) -> None:
        if self._handler is None or not name.startswith(self._channel_prefix):
            return
        channel = name[len(self._channel_prefix) :]
        try:
            message = envelope.decode(channel, payload)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            logger.warning("dropping malformed envelope on %s: %r", name, exc)
            return
        track = self._tracks.get(channel)
        if track is None or not isinstance(message, Publication):
            await self._deliver(message)
            return
        if track.held is not None:
            await self._hold(channel, track, message)
            return
        step = track.step(message)
        if step == _DELIVER:
            await self._deliver(message)
        elif step == _JUMP:
            # Offsets are missing (a publication lost on the way): read them from the stream.
            track.held = [message]
            self._start_catch_up(channel, track)

    async def _deliver(self, message: Publication | PresenceEvent | StreamGap) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            result = handler(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("broker handler failed for %s", message.channel)

    # ------------------------------------------------------------ no gap across link blips

    async def _hold(self, channel: str, track: _Track, publication: Publication) -> None:
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
            await self._deliver(StreamGap(channel, last, StreamPosition(newest.offset, newest.epoch)))

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
            await self._link_up.wait()
            wanted = track.wanted
            since = StreamPosition(track.offset, track.epoch) if track.epoch is not None else None
            try:
                history = await self.history(channel, since=since, limit=None if since else 0)
            except BrokerError as exc:
                logger.debug("catching up %s failed: %s; retrying", channel, exc)
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
                await self._apply(channel, track, since, history)
            track.done = wanted
            # Release the held publications in order; a jump among them needs another read.
            held = track.held or []
            while held:
                publication = held[0]
                step = track.step(publication)
                if step == _JUMP:
                    track.wanted += 1
                    break
                held.pop(0)
                if step == _DELIVER:
                    await self._deliver(publication)
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
            await self._deliver(StreamGap(channel, since, top, epoch_changed=True))
            return
        missed = [p for p in history.publications if p.offset > track.offset]
        if top.offset <= track.offset:
            return
        if missed and missed[0].offset == track.offset + 1:
            self.gaps_filled += len(missed)
            for publication in missed:
                if track.step(publication) == _DELIVER:
                    await self._deliver(publication)
            return
        # Trimmed, expired, or a channel without history: the gap cannot be filled.
        # Deliver nothing of it (a client must not get past a gap it cannot see).
        last = StreamPosition(track.offset, since.epoch)
        track.offset = top.offset
        self.gaps_lost += 1
        await self._deliver(StreamGap(channel, last, top))

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, channel: str) -> None:
        """Register ``channel``, wait until Redis confirmed the subscription, then read the
        channel's position (from which this node guarantees delivery with no gap).

        Raises :class:`BrokerUnavailableError` when the link is down or the
        confirmation does not come within ``connect_timeout``; the channel stays
        registered (and is subscribed when the link comes back) until
        :meth:`unsubscribe`.
        """
        self._channels.add(channel)
        track = self._tracks.get(channel)
        if track is None:
            track = self._tracks[channel] = _Track()
            if not self._link_up.is_set():
                track.held = []
        pubsub = self._pubsub
        if pubsub is None or not self._link_up.is_set():
            raise BrokerUnavailableError("redis unavailable: subscriber link is down")
        name = self.pubsub_channel(channel)
        future = self._pending.get(name)
        if future is None or future.done():
            future = self._pending[name] = asyncio.get_running_loop().create_future()
        try:
            await pubsub.subscribe(name)
            await asyncio.wait_for(asyncio.shield(future), self.config.connect_timeout)
        except BrokerError:
            raise
        except (RedisError, *_UNAVAILABLE) as exc:
            raise BrokerUnavailableError(f"redis subscribe failed: {exc!r}") from exc
        if track.epoch is None:
            # Read after the confirmation: every later publication arrives live.  A live
            # one at or below this top may still be in the socket; dropping it is safe
            # because every client subscribing reads the position after this one.
            position = (await self.history(channel, limit=0)).position
            if self._tracks.get(channel) is track and track.epoch is None:
                track.epoch, track.offset = position.epoch, position.offset

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        track = self._tracks.pop(channel, None)
        if track is not None and track.catch_up is not None:
            track.catch_up.cancel()
        pubsub = self._pubsub
        if pubsub is not None and self._link_up.is_set():
            with contextlib.suppress(RedisError, *_UNAVAILABLE):
                await pubsub.unsubscribe(self.pubsub_channel(channel))

    def channels(self) -> set[str]:
        return set(self._channels)

    # ------------------------------------------------------------ publishing

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        info = orjson.dumps(options.info.as_dict()) if options.info is not None else b""
        ttl_ms = int(options.history_ttl * 1000) if options.history_ttl > 0 else 0
        args = [
            self.pubsub_channel(channel),
            data,
            info,
            options.history_size,
            ttl_ms,
            new_epoch(),
            int(self.config.stream_meta_ttl * 1000),
        ]
        _ = self.client
        result = await self._call(
            self._publish_script,
            keys=[self.stream_key(channel), self.meta_key(channel)],
            args=args,
        )
        return StreamPosition(int(result[0]), _text(result[1]))

    async def publish_event(self, event: PresenceEvent) -> None:
        await self._call(
            self.client.publish, self.pubsub_channel(event.channel), envelope.encode_event(event)
        )

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        _ = self.client
        args = [
            new_epoch(),
            str(since.offset) if since is not None else "",
            since.epoch if since is not None else "",
            -1 if limit is None else max(limit, 0),
            "1" if reverse else "0",
            int(self.config.read_meta_ttl * 1000),
        ]
        result = await self._call(
            self._history_script,
            keys=[self.stream_key(channel), self.meta_key(channel)],
            args=args,
        )
        epoch = _text(result[1])
        publications = []
        for entry_id, fields in result[2]:
            values = {_text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
            offset = int(_text(entry_id).split("-", 1)[0])
            info_json = values.get("i") or b""
            info = ClientInfo.from_dict(orjson.loads(info_json)) if info_json else None
            publications.append(Publication(channel, offset, epoch, bytes(values["d"]), info))
        return HistoryResult(publications, StreamPosition(int(result[0]), epoch))

    async def remove_history(self, channel: str) -> None:
        await self._call(self.client.delete, self.stream_key(channel), self.meta_key(channel))

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a Redis call, mapping connection trouble to :class:`BrokerUnavailableError`."""
        try:
            return await function(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"redis unavailable: {exc}") from exc
        except RedisError as exc:
            raise BrokerError(f"redis error: {exc}") from exc


__all__ = ["RedisBroker", "RedisBrokerConfig"]
