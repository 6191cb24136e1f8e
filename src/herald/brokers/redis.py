"""The Redis broker: several processes and machines share channels through one Redis.

Fan-out uses Redis Pub/Sub; history and offsets live in Redis and are changed
only by Lua scripts, so every publication of a channel gets the next offset
(1, 2, 3, ... with no gap) however many nodes publish at once, and reaches the
subscribed nodes in offset order.

The keys, the scripts and how a channel's epoch is chosen are described in
:mod:`herald.brokers.redis_scripts`; the configuration is
:class:`~herald.brokers.redis_config.RedisBrokerConfig`.

Pub/Sub channels: ``PREFIX:ch:CHANNEL`` carries the channel's envelopes and
``PREFIX:link`` (never published to) keeps the subscriber connection up and
tells when every subscription of a (re)connection was confirmed.

Faults: when Redis is unreachable, :meth:`RedisBroker.publish`, ``history`` and
presence calls raise :class:`~herald.exceptions.BrokerUnavailableError`,
:meth:`RedisBroker.ready` is False, and a background task reconnects with
exponential backoff and jitter, then re-subscribes every channel.

No gap across a link blip: live publications are held while a channel may have
missed some, and its stream is read to deliver them in order or report a
:class:`~herald.brokers.base.StreamGap` (:mod:`herald.brokers.redis_catchup`).

Rollbacks (Redis restarted from an older RDB snapshot or an AOF not fsynced on
every write, a replica promoted before it had every write): a stream may come
back *behind* what was acknowledged, and its offsets would be handed out again
in the same epoch.  Two guards: every channel script first runs ``RUN_CHECK``,
which keeps a meta key stamped with another Redis run id only when both runs
keep every acknowledged write (:mod:`herald.brokers.redis_scripts`); and a node
whose catch-up finds a stream below the offset it delivered in the same epoch
drops that epoch (:mod:`herald.brokers.redis_catchup`).  Limits are listed in
docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
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
from ..urls import redact_url
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
    StreamPosition,
    new_epoch,
)
from .redis_catchup import _DELIVER, _JUMP, RedisCatchUp, _Track
from .redis_config import RedisBrokerConfig
from .redis_scripts import (
    EMPTY_EPOCH,
    HISTORY,
    PUBLISH,
    PUBLISH_ONCE,
    RESET,
    RUN_CHECK,
    RUN_INFO,
    epoch_bucket,
)

logger = logging.getLogger("herald.brokers.redis")

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _close_pubsub(pubsub: PubSub) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisBroker(RedisCatchUp, Broker):
    """Broker on Redis Pub/Sub (fan-out) and Lua-maintained streams (history, offsets).

    One Pub/Sub connection per node carries every subscribed channel; one
    connection pool serves commands.  See the module docstring for faults,
    :mod:`herald.brokers.redis_scripts` for keys.
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
        self._publish_once_script: Any = None
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

    def idempotency_key(self, channel: str, key: str) -> str:
        """Where the position published with idempotency ``key`` is remembered.

        The channel's length goes first: channels and keys may both contain ``:``, and
        ``a:b`` + ``c`` must not name the same key as ``a`` + ``b:c``.
        """
        return f"{self.config.prefix}:idem:{len(channel)}:{channel}:{key}"

    @property
    def epochs_key(self) -> str:
        """The one hash the empty epochs are computed from (see :mod:`.redis_scripts`)."""
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
            self._publish_script = self._client.register_script(RUN_CHECK + EMPTY_EPOCH + PUBLISH)
            self._publish_once_script = self._client.register_script(RUN_CHECK + EMPTY_EPOCH + PUBLISH_ONCE)
            self._history_script = self._client.register_script(RUN_CHECK + EMPTY_EPOCH + HISTORY)
            self._reset_script = self._client.register_script(RESET)
            self._run_info_script = self._client.register_script(RUN_INFO)
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
                        self._dispatch(name, message["data"])
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

    def _dispatch(self, name: str, payload: bytes) -> None:
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
            self._deliver(message)
            return
        if track.held is not None:
            self._hold(channel, track, message)
            return
        step = track.step(message)
        if step == _DELIVER:
            self._deliver(message)
        elif step == _JUMP:
            # Offsets are missing (a publication lost on the way): read them from the stream.
            track.held = [message]
            self._start_catch_up(channel, track)

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

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "reconnects": self.reconnects,
            "rollbacks": self.rollbacks,
            "gaps_filled": self.gaps_filled,
            "gaps_lost": self.gaps_lost,
        }

    def channels(self) -> set[str]:
        return set(self._channels)

    # ------------------------------------------------------------ publishing

    def _publish_args(self, channel: str, data: bytes, options: PublishOptions) -> list[Any]:
        """ARGV of the publish scripts (see :mod:`.redis_scripts`)."""
        info = orjson.dumps(options.info.as_dict()) if options.info is not None else b""
        ttl_ms = int(options.history_ttl * 1000) if options.history_ttl > 0 else 0
        return [
            self.pubsub_channel(channel),
            data,
            info,
            options.history_size,
            ttl_ms,
            new_epoch(),
            int(self.config.stream_meta_ttl * 1000),
            epoch_bucket(channel),
        ]

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        args = self._publish_args(channel, data, options)
        _ = self.client
        result = await self._scripted(self._publish_script, channel, args)
        return StreamPosition(int(result[0]), _text(result[1]))

    async def publish_idempotent(
        self, channel: str, data: bytes, options: PublishOptions, key: str, window: float
    ) -> tuple[StreamPosition, bool]:
        """The publish script behind an atomic look-up of the key (``PUBLISH_ONCE`` in
        :mod:`.redis_scripts`): of any number of nodes racing, exactly one publishes."""
        args = [*self._publish_args(channel, data, options), max(int(window * 1000), 1)]
        _ = self.client
        result = await self._scripted(
            self._publish_once_script, channel, args, extra_keys=(self.idempotency_key(channel, key),)
        )
        return StreamPosition(int(result[0]), _text(result[1])), int(result[2]) == 1

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

    async def _scripted(
        self, script: Any, channel: str, args: list[Any], extra_keys: tuple[str, ...] = ()
    ) -> Any:
        """Run a channel script behind the rollback guard (``RUN_CHECK``).

        The guard needs the current Redis run checked first: after a restart or a
        failover the first call answers ``{-1, run_id}``, the run is checked, and the
        call is made again.
        """
        keys = [self.stream_key(channel), self.meta_key(channel), self.epochs_key, *extra_keys]
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
