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
``recovered: false``.

Faults: when Redis is unreachable, :meth:`RedisBroker.publish`, ``history`` and
presence calls raise :class:`~herald.exceptions.BrokerUnavailableError`,
:meth:`RedisBroker.ready` is False, and a background task reconnects with
exponential backoff and jitter, then re-subscribes every channel.  Publications
made while this node's subscriber link was down are not delivered to its
clients live; clients get them from history by resubscribing with ``since``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import secrets
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..exceptions import BrokerError, BrokerUnavailableError
from . import envelope
from .base import (
    Broker,
    BrokerHandler,
    ClientInfo,
    HistoryResult,
    PresenceEvent,
    Publication,
    PublishOptions,
    StreamPosition,
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
    wait (up to ``command_timeout``) for a free one.
    """

    url: str = "redis://localhost:6379/0"
    prefix: str = "herald"
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    stream_meta_ttl: float = 0.0
    max_connections: int = 50


def new_epoch() -> str:
    return secrets.token_hex(4)


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
            logger.warning("redis %s not reachable yet; retrying in the background", cfg.url)

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
                self._fail_pending(BrokerUnavailableError(f"redis unavailable: {exc}"))
                await _close_pubsub(pubsub)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, cfg.reconnect_max)
            finally:
                if self._closed:
                    await _close_pubsub(pubsub)

    async def _dispatch(self, name: str, payload: bytes) -> None:
        handler = self._handler
        if handler is None or not name.startswith(self._channel_prefix):
            return
        channel = name[len(self._channel_prefix) :]
        try:
            message = envelope.decode(channel, payload)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            logger.warning("dropping malformed envelope on %s: %r", name, exc)
            return
        try:
            result = handler(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("broker handler failed for %s", channel)

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, channel: str) -> None:
        """Register ``channel`` and wait until Redis confirmed the subscription.

        Raises :class:`BrokerUnavailableError` when the link is down or the
        confirmation does not come within ``connect_timeout``; the channel stays
        registered (and is subscribed when the link comes back) until
        :meth:`unsubscribe`.
        """
        self._channels.add(channel)
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

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
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
            int(self.config.stream_meta_ttl * 1000),
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
