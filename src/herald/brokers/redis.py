"""The Redis broker: several processes and machines share channels through one Redis.

Fan-out uses Redis Pub/Sub; history and offsets live in Redis and are changed
only by Lua scripts, so every publication of a channel gets the next offset
(1, 2, 3, ... with no gap) however many nodes publish at once, and reaches the
subscribed nodes in offset order.

Keys (``prefix`` defaults to ``herald``; ``CHANNEL`` is the Herald channel name):

=============================  ==========  ===================================================
key                            type        contents
=============================  ==========  ===================================================
``PREFIX:meta:CHANNEL``        hash        ``e`` = epoch, ``o`` = offset of the newest publication,
                                           ``r`` = Redis run id of the last write, ``d`` = '1'
                                           when that run kept every acknowledged write
``PREFIX:stream:CHANNEL``      stream      the last ``history_size`` publications; entry id
                                           ``OFFSET-0``, fields ``d`` data, ``i`` info, ``x``
                                           expiry (ms since the Unix epoch, 0 = never)
``PREFIX:presence:CHANNEL``    hash        client id -> ClientInfo JSON (see presence/redis.py)
``PREFIX:presence-exp:CHANNEL`` sorted set client id -> expiry (ms)
``PREFIX:epochs``              hash        ``i`` = this Redis data set's random incarnation,
                                           bucket -> streams created in it (one key in all)
=============================  ==========  ===================================================

Pub/Sub channels: ``PREFIX:ch:CHANNEL`` carries the channel's envelopes and
``PREFIX:link`` (never published to) keeps the subscriber connection up and
tells when every subscription of a (re)connection was confirmed.

Both history keys expire ``history_ttl`` seconds after the last publication;
the meta key of a namespace without history expires ``stream_meta_ttl`` seconds
after it.  Only a publish writes a channel's keys.  A channel without a meta key
(never published to, TTL expired, Redis restarted without persistence,
``remove_history``) reads as offset 0 in its *empty epoch*, and nothing is stored
for the read, so clients cannot fill Redis by naming channels.  The next publish
starts the stream at offset 1 in that same epoch, so a subscriber told ``(0,
epoch)`` simply continues.  The empty epoch is computed, not stored per channel:
from the Redis ``run_id`` (a restart, a promoted replica or a restored snapshot
never reproduces it), a random incarnation kept in ``PREFIX:epochs`` (a FLUSHALL
does not either) and the generation of the channel's bucket (``crc32(channel) %
16384``) in that hash, which every stream creation in the bucket increments.  So
once a channel's stream was created (and perhaps lost), the channel never reads
as an earlier empty epoch again, and a client holding ``(0, old epoch)`` is told
``recovered: false`` instead of silently missing that stream.

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

Rollbacks (Redis restarted from an older RDB snapshot or an AOF not fsynced on
every write, a replica promoted before it had every write): a stream may come
back *behind* what was acknowledged, and its offsets would be handed out again
in the same epoch.  Every channel script first runs ``_RUN_CHECK``: a meta key
stamped (``r``) with another Redis run id than the current one was last written
before Redis (re)started; it is kept only when the run that wrote it and the
current run both keep every acknowledged write (see :meth:`RedisBroker._check_run`),
and otherwise dropped, so the stream starts again in a new epoch whichever node
touches it first.  Second line: a node whose catch-up finds a stream below the
offset it delivered in the same epoch drops that epoch (``_RESET``).  Limits are
listed in docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import zlib
from collections.abc import Callable
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

from ..config import non_negative, positive_int, redact_url, split_url_options
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
    no history (0: forever; with history the key lives as long as the history,
    ``history_ttl``).  ``reconnect_min``/``reconnect_max``:
    the backoff between reconnect attempts (doubled each failure, with jitter).
    ``max_connections``: command connections per node; more concurrent commands
    wait (up to ``command_timeout``) for a free one.  ``max_held``: live
    publications held per channel while it catches up after a link blip; beyond
    it the gap is reported as lost.  :meth:`from_url` reads these from the URL.
    """

    url: str = field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    prefix: str = "herald"
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    stream_meta_ttl: float = 3600.0
    max_connections: int = 50
    max_held: int = 10_000

    @classmethod
    def from_url(cls, url: str) -> RedisBrokerConfig:
        """``redis://host:6379/0?prefix=app&stream_meta_ttl=600`` -> config.

        Query options: ``prefix``, ``connect_timeout``, ``command_timeout``,
        ``reconnect_min``, ``reconnect_max``, ``stream_meta_ttl``,
        ``max_connections``, ``max_held``; redis-py's own URL options (``ssl_*``,
        ``health_check_interval``, ...) are passed through.  Anything else, or a
        malformed value, raises :class:`ConfigError`.
        """
        from redis.connection import URL_QUERY_ARGUMENT_PARSERS

        converters: dict[str, Callable[[str], Any]] = {
            "prefix": _prefix,
            "connect_timeout": non_negative,
            "command_timeout": non_negative,
            "reconnect_min": non_negative,
            "reconnect_max": non_negative,
            "stream_meta_ttl": non_negative,
            "max_connections": positive_int,
            "max_held": positive_int,
        }
        base, values = split_url_options(
            url, converters, what="Redis", passthrough=set(URL_QUERY_ARGUMENT_PARSERS) - set(converters)
        )
        return cls(url=base, **values)


def _prefix(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a non-empty key prefix without spaces")
    return value


# Lua scripts run atomically: nothing else touches a channel's keys between the
# epoch check, the offset increment, the append and the PUBLISH.

# Rollback guard, run first by every script that reads or writes a channel's keys.  The
# last two ARGV are the Redis run id the calling node checked and '1' when that run keeps
# every acknowledged write (see ``RedisBroker._check_run``).  A run id changes on every
# Redis start and differs on a promoted replica, and no snapshot or replica can bring a
# future one back: a stream whose meta key is stamped with another run id (field ``r``)
# was last written before Redis (re)started, and may have been rolled back.  It is kept
# only when the run that wrote it and the current run both keep every acknowledged write
# (field ``d``); otherwise it is dropped here and the script continues as for a lost
# stream: a new epoch, offsets from 1.  ``{-1, run}``: the node must check this run first.
_RUN_CHECK = """
local run = string.match(redis.call('info', 'server'), 'run_id:(%x+)')
if ARGV[#ARGV - 1] ~= run then return {-1, run} end
local durable = ARGV[#ARGV]
if redis.call('hget', KEYS[2], 'r') ~= run and redis.call('hexists', KEYS[2], 'e') == 1 then
  if durable == '1' and redis.call('hget', KEYS[2], 'd') == '1' then
    redis.call('hset', KEYS[2], 'r', run)
  else
    redis.call('del', KEYS[1], KEYS[2])
  end
end
"""

#: Number of generation counters in ``PREFIX:epochs`` (see the module docstring).
EPOCH_BUCKETS = 16384

# The epoch a channel without a stream reads as, and its next stream starts in (module
# docstring).  ``epochs`` is KEYS[3] (PREFIX:epochs), ``bucket`` the channel's bucket,
# ``fresh`` a random token (the incarnation when the hash is new).
_EMPTY_EPOCH = """
local function empty_epoch(epochs, bucket, fresh)
  local incarnation = redis.call('hget', epochs, 'i')
  if not incarnation then
    incarnation = fresh
    redis.call('hset', epochs, 'i', incarnation)
  end
  local server_run = string.match(redis.call('info', 'server'), 'run_id:(%x+)') or ''
  local generation = redis.call('hget', epochs, bucket) or '0'
  return string.sub(redis.sha1hex(server_run .. incarnation), 1, 8) .. '.' .. generation
end
"""

_PUBLISH = """
local stream, meta = KEYS[1], KEYS[2]
local pubsub, data, info = ARGV[1], ARGV[2], ARGV[3]
local size, ttl, meta_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[7])
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  -- No stream (never published, expired, flushed, Redis restarted empty): start one in
  -- the empty epoch readers were told; later streams of this bucket get another one.
  epoch = empty_epoch(KEYS[3], ARGV[8], ARGV[6])
  redis.call('hincrby', KEYS[3], ARGV[8], 1)
  redis.call('del', stream)
  redis.call('hset', meta, 'e', epoch)
end
local offset = redis.call('hincrby', meta, 'o', 1)
redis.call('hset', meta, 'r', run, 'd', durable)
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
  -- The namespace may have kept history (with a TTL) before: published keys persist.
  redis.call('persist', meta)
end
redis.call('publish', pubsub,
  'p' .. string.format('%d', offset) .. ':' .. epoch .. ':' .. string.len(info) .. ':' .. info .. data)
return {offset, epoch}
"""

_HISTORY = """
local stream, meta = KEYS[1], KEYS[2]
local since_offset, since_epoch = ARGV[2], ARGV[3]
local limit, reverse = tonumber(ARGV[4]), ARGV[5]
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  -- No stream: a read stores nothing for the channel (a left-over stream key is stale).
  return {0, empty_epoch(KEYS[3], ARGV[6], ARGV[1]), {}}
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

# The node-side high-water mark found the stream below what this node delivered in the
# same epoch (a rollback the run-id stamp could not see): every later offset of that epoch
# repeats one already handed out, so the epoch is dropped (unless another node did it).
_RESET = """
if redis.call('hget', KEYS[2], 'e') == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

# What decides whether a run keeps every acknowledged write (CONFIG is not allowed here).
_RUN_INFO = """
local server = redis.call('info', 'server')
local persistence = redis.call('info', 'persistence')
local replication = redis.call('info', 'replication')
return {
  string.match(server, 'run_id:(%x+)'),
  string.match(persistence, 'aof_enabled:(%d+)') or '0',
  string.match(replication, 'role:(%a+)') or '',
  string.match(replication, 'second_repl_offset:(%-?%d+)') or '',
}
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


def epoch_bucket(channel: str) -> int:
    """The generation counter of ``PREFIX:epochs`` that ``channel``'s streams share."""
    return zlib.crc32(channel.encode()) % EPOCH_BUCKETS


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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
        self._reset_script: Any = None
        self._run_info_script: Any = None
        #: The Redis run this node checked (run id) and whether it keeps every acknowledged
        #: write; the scripts refuse to run for another run id until it is checked.
        self._run: tuple[str, bool] = ("", False)
        self._run_check: asyncio.Future[tuple[str, bool]] | None = None
        #: Streams found rolled back and started again in a new epoch (tests/metrics).
        self.rollbacks = 0
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

    @property
    def epochs_key(self) -> str:
        """The one hash the empty epochs are computed from (see the module docstring)."""
        return f"{self.config.prefix}:epochs"

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
            self._publish_script = self._client.register_script(_RUN_CHECK + _EMPTY_EPOCH + _PUBLISH)
            self._history_script = self._client.register_script(_RUN_CHECK + _EMPTY_EPOCH + _HISTORY)
            self._reset_script = self._client.register_script(_RESET)
            self._run_info_script = self._client.register_script(_RUN_INFO)
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
            # Held publications received before the read: the read sees a stream at least as new.
            before_read = len(track.held or ())
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
                try:
                    await self._apply(channel, track, since, history)
                except BrokerError as exc:  # a rollback found, but Redis failed resetting it
                    logger.debug("catching up %s failed: %s; retrying", channel, exc)
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
                    await self._deliver(publication)
            return
        # Trimmed, expired, or a channel without history: the gap cannot be filled.
        # Deliver nothing of it (a client must not get past a gap it cannot see).
        last = StreamPosition(track.offset, since.epoch)
        track.offset = top.offset
        self.gaps_lost += 1
        await self._deliver(StreamGap(channel, last, top))

    async def _roll_back(self, channel: str, track: _Track, since: StreamPosition) -> None:
        """Start ``channel`` again in a new epoch (unless it already moved past ``since``)
        and report the lost stream, as for any stream lost while this node listened."""
        await self._call(
            self._reset_script,
            keys=[self.stream_key(channel), self.meta_key(channel)],
            args=[since.epoch],
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
        await self._deliver(StreamGap(channel, since, top, epoch_changed=top.epoch != since.epoch))

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
            epoch_bucket(channel),
        ]
        _ = self.client
        result = await self._scripted(self._publish_script, channel, args)
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
            epoch_bucket(channel),
        ]
        result = await self._scripted(self._history_script, channel, args)
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

    async def _scripted(self, script: Any, channel: str, args: list[Any]) -> Any:
        """Run a channel script behind the rollback guard (``_RUN_CHECK``).

        The guard needs the current Redis run checked first: after a restart or a
        failover the first call answers ``{-1, run_id}``, the run is checked, and the
        call is made again.
        """
        keys = [self.stream_key(channel), self.meta_key(channel), self.epochs_key]
        for _ in range(3):
            run_id, durable = self._run
            result = await self._call(script, keys=keys, args=[*args, run_id, "1" if durable else "0"])
            if not (isinstance(result[0], int) and result[0] == -1):
                return result
            # One check per node however many calls found the new run at once.
            check = self._run_check
            if check is None or check.done():
                check = self._run_check = asyncio.ensure_future(self._check_run())
                check.add_done_callback(_retrieve)  # its callers may all have been cancelled
            self._run = await asyncio.shield(check)
        raise BrokerUnavailableError("redis unavailable: its run id keeps changing (restarting?)")

    async def _check_run(self) -> tuple[str, bool]:
        """The current Redis run id, and whether that run keeps every acknowledged write.

        It does when Redis is a master that was not promoted from a replica in this run
        (``second_repl_offset`` -1) and writes an append-only file it fsyncs before
        answering (``appendonly yes``, ``appendfsync always``).  Anything else, or a
        ``CONFIG`` command that is refused or renamed, counts as not durable: a restart
        then starts every stream again in a new epoch rather than risk a rollback.
        """
        for _ in range(3):
            before = [_text(value) for value in await self._call(self._run_info_script, keys=[], args=[])]
            try:
                reply = await self.client.config_get("appendfsync")
                config = {_text(k): _text(v) for k, v in reply.items()}
                fsync_always = config.get("appendfsync") == "always"
            except _UNAVAILABLE as exc:
                raise BrokerUnavailableError(f"redis unavailable: {exc}") from exc
            except RedisError as exc:
                logger.warning(
                    "redis refused CONFIG GET appendfsync (%s): every stream starts a new epoch "
                    "after a Redis restart (see docs/scaling.md, Rollbacks)",
                    exc,
                )
                fsync_always = False
            after = [_text(value) for value in await self._call(self._run_info_script, keys=[], args=[])]
            if before != after:
                continue  # Redis restarted (or changed) while we looked: look again
            run_id, aof_enabled, role, second_offset = after
            durable = fsync_always and aof_enabled == "1" and role == "master" and second_offset == "-1"
            if run_id != self._run[0]:
                logger.info("redis run %s: %s", run_id[:12], "durable" if durable else "not durable")
            return run_id, durable
        raise BrokerUnavailableError("redis unavailable: its run id keeps changing (restarting?)")

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a Redis call, mapping connection trouble to :class:`BrokerUnavailableError`."""
        try:
            return await function(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"redis unavailable: {exc}") from exc
        except RedisError as exc:
            raise BrokerError(f"redis error: {exc}") from exc


__all__ = ["RedisBroker", "RedisBrokerConfig"]
