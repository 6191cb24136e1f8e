"""The Redis broker: several processes and machines share channels through Redis.

Fan-out uses Redis Pub/Sub; history and offsets live in Redis and are changed
only by Lua scripts, so every publication of a channel gets the next offset
(1, 2, 3, ... with no gap) however many nodes publish at once, and reaches the
subscribed nodes in offset order.

The keys, the scripts and how a channel's epoch is chosen are described in
:mod:`herald.brokers.redis_scripts`; the configuration is
:class:`~herald.brokers.redis_config.RedisBrokerConfig`.

One Redis (``redis://``) or a Redis Cluster (``redis+cluster://h1:7000,h2:7001``):
the keys are the same (each channel's keys and its Pub/Sub channel share one hash
tag, so one slot).  On a cluster the scripts run on the master that owns the
channel's slot, publish with sharded Pub/Sub (``SPUBLISH``), and the node keeps one
Pub/Sub connection per master (``SSUBSCRIBE`` there to the channels of its slots):
a master that is down fails only its channels.

Round trips: on one Redis the script calls of one moment (publications, position
reads, presence) go out as one pipeline (:mod:`herald.brokers.redis_batch`); on a
cluster each goes on its own to its slot's master.  The subscribes requested in one
event-loop turn go out as one ``SUBSCRIBE`` (on a cluster one ``SSUBSCRIBE`` per hash
tag), and a Pub/Sub connection's publications are read off its socket without
redis-py's per-message wrapping.

Pub/Sub channels: ``PREFIX:ch:{bB}:CHANNEL`` carries the channel's envelopes and
``PREFIX:link`` (never published to) keeps each subscriber connection up and
tells when every subscription of a (re)connection was confirmed.

Faults: when Redis (or the channel's master) is unreachable,
:meth:`RedisBroker.publish`, ``history`` and presence calls raise
:class:`~herald.exceptions.BrokerUnavailableError`, and a background task per
Pub/Sub connection reconnects with exponential backoff and jitter, then
re-subscribes its channels (on a cluster, first asking the cluster which master
owns each channel now: a failover moves them).  A command that Redis (that
master) answers while the connection waits out its backoff cuts the wait short:
Redis is back and accepting publications, which the connection would otherwise
miss for as long as the backoff lasts (more than history may hold).

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
drops that epoch (:mod:`herald.brokers.redis_catchup`).  On a cluster the node
checks each master's run on its own (a script that meets an unchecked run has
that master checked, no other).  Limits are listed in docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..exceptions import BrokerError, BrokerUnavailableError
from ..tasks import stop_tasks
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
from .redis_batch import ScriptBatcher
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
    bucket_tag,
)

logger = logging.getLogger("herald.brokers.redis")

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: What redis-py raises from its own insides when a connection is closed under a command
#: (seen on a cluster while a restarted master rejoins: ``'NoneType' object has no
#: attribute 'writelines'``, ``unable to perform operation on <TCPTransport closed=True>``).
_CLIENT_BROKEN = (AttributeError, RuntimeError)
#: What a cluster call raises when the slot's master is unknown or down (redis-py's
#: cluster errors are not all RedisErrors).
_CLUSTER_TROUBLE = (RedisClusterException, RedisError, *_UNAVAILABLE)

#: What a Pub/Sub connection reads for a publication (plain and sharded Pub/Sub).
_PUBLICATION_KINDS = (b"message", b"smessage")

#: The name of the one link (Pub/Sub connection) to a single Redis.
_SINGLE = ""

#: Seconds a failed link waits at least before a command answered by its Redis may wake it
#: (bounds the attempts when commands work but the Pub/Sub connection keeps failing).
_WAKE_AFTER = 0.05


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def reply_text(value: Any) -> str:
    """A value from a Redis reply (bytes, or already text) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def _close_pubsub(pubsub: PubSub) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


def _cluster_options(url: str) -> dict[str, Any]:
    """The options of a node URL that :class:`RedisCluster` takes (credentials, TLS, ...)."""
    accepted = inspect.signature(RedisCluster.__init__).parameters
    options: dict[str, Any] = dict(parse_url(url))
    if options.pop("connection_class", None) is not None and url.startswith("rediss:"):
        options["ssl"] = True
    return {k: v for k, v in options.items() if k in accepted and k not in ("host", "port", "db")}


class _Link:
    """One Pub/Sub connection: to the one Redis, or to one cluster master (``node``,
    ``host:port``), with the channels it carries and its state on this connection."""

    __slots__ = (
        "channels", "client", "confirmed", "leaving", "node", "pending", "pubsub", "requested", "runner", "up",
        "wake",
    )  # fmt: skip

    def __init__(self, node: str, client: aioredis.Redis) -> None:
        self.node = node
        self.client = client
        self.up = asyncio.Event()
        self.pubsub: PubSub | None = None
        #: Herald channels this connection carries, and those Redis confirmed on it.
        self.channels: set[str] = set()
        self.confirmed: set[str] = set()
        #: Pub/Sub channel name -> a subscribe waiting for its confirmation.
        self.pending: dict[str, asyncio.Future[None]] = {}
        #: Pub/Sub channel names this node unsubscribed, whose confirmation is due.
        self.leaving: set[str] = set()
        #: Pub/Sub channel names whose SUBSCRIBE is to be sent (with the others of this turn).
        self.requested: dict[str, None] = {}
        self.runner: asyncio.Task[None] | None = None
        #: Set when a command to the same Redis succeeded while this link waits to reconnect.
        self.wake = asyncio.Event()

    def fail_pending(self, exc: BaseException) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self.pending.clear()


class RedisBroker(RedisCatchUp, Broker):
    """Broker on Redis Pub/Sub (fan-out) and Lua-maintained streams (history, offsets).

    One Pub/Sub connection per node (per master on a Redis Cluster) carries the
    subscribed channels; one connection pool serves commands.  See the module
    docstring for faults, :mod:`herald.brokers.redis_scripts` for keys.
    """

    def __init__(self, config: RedisBrokerConfig | None = None) -> None:
        self.config = config or RedisBrokerConfig()
        prefix = self.config.prefix
        self._cluster = self.config.cluster
        # One Redis: script calls are queued at once, in call order, on one pipeline
        # (ScriptBatcher).  A cluster sends each on its own pooled connection: no order.
        self.pipelines_publishes = not self._cluster
        #: The Pub/Sub command of the scripts and events: sharded on a cluster.
        self._fanout = "spublish" if self._cluster else "publish"
        self._channel_prefix = f"{prefix}:ch:"
        self._link_channel = f"{prefix}:link"
        self._client: aioredis.Redis | RedisCluster | None = None
        self._handler: BrokerHandler | None = None
        self._channels: set[str] = set()
        #: Pub/Sub connections by node (``_SINGLE`` for one Redis) and each channel's node.
        self._links: dict[str, _Link] = {}
        self._routes: dict[str, str] = {}
        #: Links waiting out their reconnect backoff, by node: a command answered by that
        #: node wakes its link (:meth:`_answered`).  Empty in normal operation.
        self._backing_off: dict[str, _Link] = {}
        self._closed = False
        self.reconnects = 0  # link re-establishments after the first (for tests and metrics)
        self._publish_script: Any = None
        self._publish_once_script: Any = None
        self._history_script: Any = None
        self._reset_script: Any = None
        #: One Redis: script calls go out in pipelines (:mod:`.redis_batch`).
        self._batcher = ScriptBatcher(self._single_client)
        #: Per node (``_SINGLE`` for one Redis, else the master's ``host:port``): the run
        #: this node checked (run id) and whether it keeps every acknowledged write; the
        #: scripts refuse to run for another run id until it is checked.
        self._runs: dict[str, tuple[str, bool]] = {}
        self._run_checks: dict[str, asyncio.Future[tuple[str, bool]]] = {}
        #: Cluster: the task that learns which master owns which slot and routes channels.
        self._topology: asyncio.Task[None] | None = None
        self._topology_known = asyncio.Event()
        self._reroute = asyncio.Event()
        #: Cluster: redis-py's cluster pool refuses (rather than waits) past its size.
        self._gate: asyncio.Semaphore | None = None
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
        return f"{self.config.prefix}:meta:{bucket_tag(channel)}:{channel}"

    def stream_key(self, channel: str) -> str:
        return f"{self.config.prefix}:stream:{bucket_tag(channel)}:{channel}"

    def idempotency_key(self, channel: str, key: str) -> str:
        """Where the position published with idempotency ``key`` is remembered.

        The channel's length goes first: channels and keys may both contain ``:``, and
        ``a:b`` + ``c`` must not name the same key as ``a`` + ``b:c``.
        """
        return f"{self.config.prefix}:idem:{bucket_tag(channel)}:{len(channel)}:{channel}:{key}"

    def epochs_key(self, channel: str) -> str:
        """The hash ``channel``'s empty epoch is computed from: one per epoch bucket
        (see :mod:`.redis_scripts`)."""
        return f"{self.config.prefix}:epochs:{bucket_tag(channel)}"

    def pubsub_channel(self, channel: str) -> str:
        return f"{self._channel_prefix}{bucket_tag(channel)}:{channel}"

    @property
    def cluster(self) -> bool:
        """Whether this broker talks to a Redis Cluster (``redis+cluster://``)."""
        return self._cluster

    # ------------------------------------------------------------ connection

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The command client (created on first use; shared with the presence manager):
        a :class:`redis.asyncio.RedisCluster` on a cluster."""
        if self._client is None:
            cfg = self.config
            client: aioredis.Redis | RedisCluster
            if self._cluster:
                host, port = cfg.cluster_seeds()[0]
                client = RedisCluster(
                    startup_nodes=[ClusterNode(h, p) for h, p in cfg.cluster_seeds()],
                    # A master down must fail only its slots, not the client.
                    require_full_coverage=False,
                    max_connections=cfg.max_connections + 10,
                    socket_connect_timeout=cfg.connect_timeout,
                    socket_timeout=cfg.command_timeout,
                    # As for one Redis: one retry (a stale connection after a restart or
                    # a moved slot), not a long backoff a waiting client would sit through.
                    retry=Retry(NoBackoff(), 1),
                    # Credentials, TLS and redis-py's URL options, as a node's URL gives them.
                    **_cluster_options(cfg.node_url(host, port)),
                )
                self._gate = asyncio.Semaphore(cfg.max_connections)
            else:
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
                client = aioredis.Redis.from_pool(pool)
            self._client = client
            self._publish_script = client.register_script(RUN_CHECK + EMPTY_EPOCH + PUBLISH)
            self._publish_once_script = client.register_script(RUN_CHECK + EMPTY_EPOCH + PUBLISH_ONCE)
            self._history_script = client.register_script(RUN_CHECK + EMPTY_EPOCH + HISTORY)
            self._reset_script = client.register_script(RESET)
        return self._client

    def _single_client(self) -> aioredis.Redis:
        client = self.client
        assert isinstance(client, aioredis.Redis)
        return client

    def _link_client(self, host: str = "", port: int = 0) -> aioredis.Redis:
        """A client for one Pub/Sub connection (to one Redis, or to the master ``host:port``)."""
        cfg = self.config
        return aioredis.Redis.from_url(
            cfg.node_url(host, port) if self._cluster else cfg.url,
            socket_connect_timeout=cfg.connect_timeout,
            retry=Retry(NoBackoff(), 0),  # the link loop does its own reconnecting
        )

    async def start(self, handler: BrokerHandler) -> None:
        """Start the subscriber link; waits up to ``connect_timeout`` for Redis, never fails.

        If Redis is down the node starts anyway (``ready()`` is False) and the link
        keeps retrying in the background.
        """
        self._handler = handler
        self._closed = False
        _ = self.client
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self._cluster:
            self._topology = loop.create_task(self._run_topology(), name="herald-redis-topology")
            up = self._topology_known
        else:
            link = self._links[_SINGLE] = _Link(_SINGLE, self._link_client())
            link.channels = self._channels  # one connection carries every channel
            link.runner = loop.create_task(self._run_link(link), name="herald-redis-link")
            up = link.up
        try:
            await asyncio.wait_for(up.wait(), cfg.connect_timeout)
        except TimeoutError:
            logger.warning("redis %s not reachable yet; retrying in the background", redact_url(cfg.url))

    async def close(self) -> None:
        self._closed = True
        self._handler = None
        tasks = [t for t in (self._topology, *(link.runner for link in self._links.values())) if t]
        await stop_tasks(tasks)
        self._topology = None
        self._topology_known.clear()
        closed = BrokerUnavailableError("broker closed")
        for link in self._links.values():
            link.up.clear()
            link.fail_pending(closed)
        await self._tasks.cancel_all()
        await self._batcher.close()
        self._tracks.clear()
        for client in [*(link.client for link in self._links.values()), self._client]:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._links.clear()
        self._routes.clear()
        self._client = None
        self._channels = set()

    async def ready(self) -> bool:
        """Whether Redis answers (on a cluster: the topology is known and a master answers;
        a master that is down fails only its own channels)."""
        if self._closed:
            return False
        try:
            if not self._cluster:
                if not self.connected:
                    return False
                await asyncio.wait_for(self.client.ping(), self.config.connect_timeout)
                return True
            client = self.client
            assert isinstance(client, RedisCluster)
            if not self._topology_known.is_set():
                return False
            primaries = client.get_primaries()
            pings = [client.execute_command("PING", target_nodes=node) for node in primaries]
            answers = await asyncio.wait_for(
                asyncio.gather(*pings, return_exceptions=True), self.config.connect_timeout
            )
            if self._backing_off:
                for node, answer in zip(primaries, answers, strict=True):
                    if answer is True:
                        self._answered(node.name)
            return any(answer is True for answer in answers)
        except (RedisClusterException, RedisError, *_UNAVAILABLE):
            return False

    @property
    def connected(self) -> bool:
        """Whether every subscriber link is up (cheaper than :meth:`ready`)."""
        if self._cluster and not self._topology_known.is_set():
            return False
        if not self._cluster and not self._links:
            return False
        return all(link.up.is_set() for link in self._links.values())

    @property
    def _pubsub(self) -> PubSub | None:
        """The Pub/Sub connection to a single Redis (tests cut it)."""
        link = self._links.get(_SINGLE)
        return link.pubsub if link is not None else None

    def pubsub_connections(self) -> list[PubSub]:
        """The Pub/Sub connections that are up (one, or one per master on a cluster)."""
        return [link.pubsub for link in self._links.values() if link.pubsub is not None]

    async def _run_link(self, link: _Link) -> None:
        """Keep one Pub/Sub connection subscribed to its channels; reconnect with backoff."""
        cfg = self.config
        delay = cfg.reconnect_min
        first = True
        while not self._closed and self._links.get(link.node) is link:
            pubsub = link.client.pubsub()
            try:
                link.confirmed.clear()
                link.leaving.clear()
                names = [self.pubsub_channel(c) for c in link.channels]
                if self._cluster:
                    # SSUBSCRIBE takes channels of one slot: one command each (they are
                    # pipelined: a subscribe does not wait for its confirmation).
                    for name in names:
                        await pubsub.ssubscribe(name)
                    await pubsub.subscribe(self._link_channel)
                else:
                    # The link channel goes last: its confirmation means all before it are confirmed.
                    await pubsub.subscribe(*names, self._link_channel)
                link.pubsub = pubsub
                connection = pubsub.connection
                assert connection is not None  # set by the subscribe above
                while True:
                    # Read the connection directly: a publication is dispatched without
                    # redis-py's per-message wrapping (a timer, a dict), which cost more
                    # than the delivery itself.  Anything else goes through redis-py so
                    # that its subscription bookkeeping stays right.
                    response = await connection.read_response(
                        timeout=math.inf, disconnect_on_error=False, push_request=True
                    )
                    if type(response) is list and len(response) == 3 and response[0] in _PUBLICATION_KINDS:
                        self._dispatch(reply_text(response[1]), response[2])
                        continue
                    message = await pubsub.handle_message(response)
                    if message is None:
                        continue
                    kind = message["type"]
                    name = reply_text(message["channel"])
                    if kind in ("message", "smessage"):
                        self._dispatch(name, message["data"])
                    elif kind in ("subscribe", "ssubscribe"):
                        if name == self._link_channel:
                            if not first:
                                self.reconnects += 1
                                logger.warning(
                                    "redis link %s re-established; %d channels re-subscribed",
                                    link.node or redact_url(cfg.url),
                                    len(names),
                                )
                            first = False
                            delay = cfg.reconnect_min
                            link.up.set()
                            # Every channel is subscribed again: read what the blip hid.
                            for channel in link.channels:
                                track = self._tracks.get(channel)
                                if track is not None and (track.held is not None or track.epoch is None):
                                    self._start_catch_up(channel, track)
                        else:
                            self._confirmed(link, name)
                    elif kind == "sunsubscribe":
                        self._lost_subscription(link, name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                where = link.node or redact_url(cfg.url)
                if link.up.is_set():
                    logger.warning("redis link %s lost: %r; reconnecting", where, exc)
                else:
                    logger.debug("redis link %s attempt failed: %r", where, exc)
                link.up.clear()
                link.pubsub = None
                link.confirmed.clear()
                # From here on publications may be missed: hold live ones until each
                # channel has read its stream after the link is back.
                for channel in link.channels:
                    self._hold_all(channel)
                link.fail_pending(BrokerUnavailableError(f"redis unavailable: {exc}"))
                await _close_pubsub(pubsub)
                if self._cluster:
                    self._reroute.set()  # a failover may have moved this master's slots
                pause = delay * random.uniform(0.5, 1.0)
                delay = min(delay * 2, cfg.reconnect_max)
                await self._back_off(link, pause)
            finally:
                if self._closed or self._links.get(link.node) is not link:
                    await _close_pubsub(pubsub)

    async def _back_off(self, link: _Link, pause: float) -> None:
        """Wait ``pause`` seconds before ``link``'s next attempt, or less: a command its Redis
        answers meanwhile (:meth:`_answered`) wakes it after ``_WAKE_AFTER``.

        Redis answering means it accepts publications again; each one published while the
        link is still down must later be read from the stream, and a backoff of seconds
        could outlast what the stream keeps (``history_size``), turning a restart that
        kept every write into a gap reported to clients (4005)."""
        link.wake.clear()
        self._backing_off[link.node] = link
        try:
            await asyncio.sleep(min(pause, _WAKE_AFTER))
            if pause > _WAKE_AFTER and not link.wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.wake.wait(), pause - _WAKE_AFTER)
        finally:
            if self._backing_off.get(link.node) is link:
                del self._backing_off[link.node]

    def _answered(self, node: str | None) -> None:
        """A command to ``node`` (``_SINGLE``, or a cluster master) succeeded: wake its link
        if it waits out a backoff.  Called only while some link does (``_backing_off``)."""
        link = self._backing_off.get(node) if node is not None else None
        if link is not None and not link.wake.is_set():
            logger.info(
                "redis %s answers again: reconnecting its link now", node or redact_url(self.config.url)
            )
            link.wake.set()

    def _hold_all(self, channel: str) -> None:
        """``channel`` may miss publications from now on: hold live ones until it caught up."""
        track = self._tracks.get(channel)
        if track is not None:
            if track.held is None:
                track.held = []
            track.wanted += 1  # a running catch-up must read again after the reconnect

    def _channel_of(self, name: str) -> str | None:
        """The Herald channel of a Pub/Sub channel name (``PREFIX:ch:{bB}:CHANNEL``)."""
        if not name.startswith(self._channel_prefix):
            return None
        tag, sep, channel = name[len(self._channel_prefix) :].partition("}:")
        return channel if sep and tag.startswith("{b") else None

    def _confirmed(self, link: _Link, name: str) -> None:
        """Redis confirmed the subscription ``name`` on ``link``'s current connection."""
        future = link.pending.pop(name, None)
        if future is not None and not future.done():
            future.set_result(None)
        channel = self._channel_of(name)
        if channel is None or channel not in link.channels:
            return
        link.confirmed.add(channel)
        track = self._tracks.get(channel)
        if link.up.is_set() and track is not None and track.held is not None:
            # A channel moved onto this connection (its slot changed master): read what it
            # may have missed, now that every later publication arrives here.
            self._start_catch_up(channel, track)

    def _lost_subscription(self, link: _Link, name: str) -> None:
        """A ``sunsubscribe`` this node did not ask for: the slot moved to another master."""
        if name in link.leaving:
            link.leaving.discard(name)
            return
        channel = self._channel_of(name)
        if channel is None or channel not in self._channels or channel not in link.channels:
            return
        logger.info(
            "redis %s dropped the subscription to %s (its slot moved); re-routing", link.node, channel
        )
        link.confirmed.discard(channel)
        link.channels.discard(channel)
        self._routes.pop(channel, None)
        self._hold_all(channel)
        self._reroute.set()

    async def _await_link(self, channel: str) -> None:
        """Until ``channel`` is subscribed on a connection that is up (catch-ups read after it)."""
        while not self._closed:
            link = self._links.get(self._routes.get(channel, _SINGLE))
            if link is not None and link.up.is_set() and channel in link.confirmed:
                return
            # Woken by the link coming up; the bound re-reads the route (it may change).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((link.up if link else self._reroute).wait(), 0.5)
            if link is not None and link.up.is_set() and channel not in link.confirmed:
                await asyncio.sleep(0.05)  # its confirmation is on the way

    def _dispatch(self, name: str, payload: bytes) -> None:
        channel = self._channel_of(name)
        if self._handler is None or channel is None:
            return
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

    # ------------------------------------------------------------ cluster topology

    async def _run_topology(self) -> None:
        """Cluster: learn which master owns which slot, and route every channel to the
        Pub/Sub connection of its master; again whenever a link fails or a slot moves."""
        cfg = self.config
        client = self.client
        assert isinstance(client, RedisCluster)
        delay = cfg.reconnect_min
        refresh = False
        while not self._closed:
            self._reroute.clear()
            try:
                if refresh:
                    await client.nodes_manager.initialize()
                else:
                    await client.initialize()
                refresh = True
                self._topology_known.set()
                unrouted = self._route_all()
            except asyncio.CancelledError:
                raise
            except _CLUSTER_TROUBLE as exc:
                logger.debug("redis cluster topology: %r; retrying", exc)
                unrouted = True
            if unrouted:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, cfg.reconnect_max)
                continue
            delay = cfg.reconnect_min
            await self._reroute.wait()

    def _route_all(self) -> bool:
        """Route every channel to its master's link; True when some slot has no master."""
        unrouted = False
        for channel in list(self._channels):
            try:
                self._route(channel, resubscribe=True)
            except _CLUSTER_TROUBLE:
                unrouted = True
        for node, link in list(self._links.items()):
            if not link.channels:  # no channel of this master left: close its connection
                del self._links[node]
                if link.runner is not None:
                    link.runner.cancel()
                self._tasks.spawn(link.client.aclose())
        return unrouted

    def _route(self, channel: str, *, resubscribe: bool = False) -> _Link:
        """The link that carries ``channel`` (cluster: its slot's master's, started if new).

        With ``resubscribe`` (a topology refresh), a channel not subscribed on its live
        link (it moved there, or Redis dropped its subscription) is subscribed there.
        Raises when no master is known for the channel's slot.
        """
        if not self._cluster:
            single = self._links.get(_SINGLE)
            if single is None:
                raise BrokerUnavailableError("redis unavailable: the broker is not started")
            return single
        name = self.pubsub_channel(channel)
        node = self._master_of(name)
        current = self._routes.get(channel)
        if current is not None and current != node.name and current in self._links:
            old = self._links[current]
            old.channels.discard(channel)
            old.confirmed.discard(channel)
            self._hold_all(channel)
        link = self._links.get(node.name)
        if link is None:
            link = self._links[node.name] = _Link(node.name, self._link_client(node.host, int(node.port)))
            link.runner = asyncio.get_running_loop().create_task(
                self._run_link(link), name=f"herald-redis-link-{node.name}"
            )
        link.channels.add(channel)
        self._routes[channel] = node.name
        if resubscribe and channel not in link.confirmed and link.pubsub is not None and link.up.is_set():
            self._tasks.spawn(self._subscribe_on(link, name))
        return link

    async def _subscribe_on(self, link: _Link, name: str) -> None:
        pubsub = link.pubsub
        if pubsub is not None:
            # A failure here fails the connection, whose loop re-subscribes everything.
            with contextlib.suppress(RedisError, *_UNAVAILABLE):
                await (pubsub.ssubscribe(name) if self._cluster else pubsub.subscribe(name))

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, channel: str) -> None:
        """Register ``channel``, wait until Redis confirmed the subscription, then read the
        channel's position (from which this node guarantees delivery with no gap).

        Raises :class:`BrokerUnavailableError` when the link (on a cluster: the link to the
        channel's master) is down or the confirmation does not come within
        ``connect_timeout``; the channel stays registered (and is subscribed when the
        link comes back) until :meth:`unsubscribe`.
        """
        self._channels.add(channel)
        track = self._tracks.get(channel)
        if track is None:
            track = self._tracks[channel] = _Track()
        try:
            link: _Link | None = self._route(channel)
        except _CLUSTER_TROUBLE:
            link = None
            self._reroute.set()  # route it when the cluster answers
        if track.epoch is None and track.held is None and (link is None or not link.up.is_set()):
            track.held = []
        if link is not None and self._cluster and not link.up.is_set():
            # A master this node had no connection to yet: give it the time to connect.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.up.wait(), self.config.connect_timeout)
        pubsub = link.pubsub if link is not None else None
        if link is None or pubsub is None or not link.up.is_set():
            raise BrokerUnavailableError("redis unavailable: subscriber link is down")
        name = self.pubsub_channel(channel)
        future = link.pending.get(name)
        if future is None or future.done():
            future = link.pending[name] = asyncio.get_running_loop().create_future()
        if not link.requested:
            # The subscribes of this turn go out together, in one command (per slot on a cluster).
            self._tasks.spawn(self._send_subscribes(link))
        link.requested[name] = None
        try:
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

    async def _send_subscribes(self, link: _Link) -> None:
        """Send the subscribes requested on ``link`` during the last turn; a failure fails
        the callers waiting for them (and the connection, whose loop re-subscribes)."""
        names, link.requested = list(link.requested), {}
        pubsub = link.pubsub
        try:
            if pubsub is None or not link.up.is_set():
                raise BrokerUnavailableError("redis unavailable: subscriber link is down")
            if not self._cluster:
                await pubsub.subscribe(*names)
                return
            # SSUBSCRIBE takes the channels of one slot: one command per hash tag.
            by_tag: dict[str, list[str]] = {}
            for name in names:
                by_tag.setdefault(name[len(self._channel_prefix) :].partition("}")[0], []).append(name)
            for group in by_tag.values():
                await pubsub.ssubscribe(*group)
        except (BrokerError, RedisError, *_UNAVAILABLE) as exc:
            failure = (
                exc
                if isinstance(exc, BrokerError)
                else BrokerUnavailableError(f"redis subscribe failed: {exc!r}")
            )
            for name in names:
                future = link.pending.get(name)
                if future is not None and not future.done():
                    future.set_exception(failure)
                    future.exception()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        track = self._tracks.pop(channel, None)
        if track is not None and track.catch_up is not None:
            track.catch_up.cancel()
        link = self._links.get(self._routes.pop(channel, _SINGLE))
        if link is None:
            return
        link.channels.discard(channel)
        link.confirmed.discard(channel)
        pubsub = link.pubsub
        if pubsub is not None and link.up.is_set():
            name = self.pubsub_channel(channel)
            if self._cluster:
                link.leaving.add(name)
            with contextlib.suppress(RedisError, *_UNAVAILABLE):
                await (pubsub.sunsubscribe(name) if self._cluster else pubsub.unsubscribe(name))

    def counters(self) -> dict[str, int]:
        return {
            **super().counters(),
            "reconnects": self.reconnects,
            "rollbacks": self.rollbacks,
            "gaps_filled": self.gaps_filled,
            "gaps_lost": self.gaps_lost,
            # Pipelines sent on one Redis and the calls they carried (calls per round trip).
            "pipelines": self._batcher.batches,
            "pipelined_calls": self._batcher.calls,
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
            self._fanout,
        ]

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        args = self._publish_args(channel, data, options)
        _ = self.client
        result = await self._scripted(self._publish_script, channel, args)
        return StreamPosition(int(result[0]), reply_text(result[1]))

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
        return StreamPosition(int(result[0]), reply_text(result[1])), int(result[2]) == 1

    async def publish_event(self, event: PresenceEvent) -> None:
        name, payload = self.pubsub_channel(event.channel), envelope.encode_event(event)
        if self._cluster:
            # Sent once, as scripts are (_run_on_master): redis-py's resend after a lost
            # reply would push the join or leave twice.
            await self._call(self._send_to_master, name, "SPUBLISH", name, payload)
        else:
            await self._call(self._batcher.execute, "PUBLISH", name, payload)

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
        ]
        result = await self._scripted(self._history_script, channel, args)
        epoch = reply_text(result[1])
        publications = []
        for entry_id, fields in result[2]:
            values = {reply_text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
            offset = int(reply_text(entry_id).split("-", 1)[0])
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
        keys = [self.stream_key(channel), self.meta_key(channel), self.epochs_key(channel), *extra_keys]
        for _ in range(3):
            run_id, durable = self._runs.get(self._node_of(keys[0]) or _SINGLE, ("", False))
            result = await self.run_script(script, keys, [*args, run_id, "1" if durable else "0"])
            if not (isinstance(result[0], int) and result[0] == -1):
                return result
            # The master that ran it (the slot's owner, now that redis-py followed any
            # MOVED) has a run this node has not checked: check that master, no other.
            node = self._node_of(keys[0])
            if node is None:
                raise BrokerUnavailableError("redis unavailable: no master known for the channel's slot")
            # One check per master however many calls found its new run at once.
            check = self._run_checks.get(node)
            if check is None or check.done():
                check = self._run_checks[node] = asyncio.ensure_future(self._check_run(node))
                check.add_done_callback(_retrieve)  # its callers may all have been cancelled
            self._runs[node] = await asyncio.shield(check)
        raise BrokerUnavailableError("redis unavailable: its run id keeps changing (restarting?)")

    def _node_of(self, key: str) -> str | None:
        """The node that runs scripts on ``key``: ``_SINGLE``, or on a cluster the master
        of its slot as redis-py knows it (None when no master is known)."""
        if not self._cluster:
            return _SINGLE
        try:
            return str(self._master_of(key).name)
        except _CLUSTER_TROUBLE:
            return None

    def _master_of(self, key: str) -> ClusterNode:
        """The master that owns ``key``'s slot, as redis-py last learnt it (raises when none)."""
        client = self.client
        assert isinstance(client, RedisCluster)
        node = client.get_node_from_key(key)
        if node is None:
            raise SlotNotCoveredError(f"no master known for {key!r}")
        return node

    async def _check_run(self, node: str = _SINGLE) -> tuple[str, bool]:
        """The current run id of Redis (or of the cluster master ``node``), and whether
        that run keeps every acknowledged write.

        It does when Redis is a master that was not promoted from a replica in this run
        (``second_repl_offset`` -1) and writes an append-only file it fsyncs before
        answering (``appendonly yes``, ``appendfsync always``).  Anything else, or a
        ``CONFIG`` command that is refused or renamed, counts as not durable: a restart
        then starts every stream again in a new epoch rather than risk a rollback.
        """
        client = self.client
        target: dict[str, Any] = {}
        if isinstance(client, RedisCluster):
            master = client.get_node(node_name=node)
            if master is None:
                raise BrokerUnavailableError(f"redis unavailable: cluster master {node} is gone")
            target["target_nodes"] = master
        for _ in range(3):
            before = [
                reply_text(v) for v in await self._call(client.execute_command, "EVAL", RUN_INFO, 0, **target)
            ]
            try:
                reply = await client.config_get("appendfsync", **target)
                config = {reply_text(k): reply_text(v) for k, v in reply.items()}
                fsync_always = config.get("appendfsync") == "always"
            except (*_UNAVAILABLE, *_CLIENT_BROKEN, ClusterDownError, SlotNotCoveredError) as exc:
                raise BrokerUnavailableError(f"redis unavailable: {exc!r}") from exc
            except RedisError as exc:
                logger.warning(
                    "redis refused CONFIG GET appendfsync (%s): every stream starts a new epoch "
                    "after a Redis restart (see docs/scaling.md, Rollbacks)",
                    exc,
                )
                fsync_always = False
            after = [
                reply_text(v) for v in await self._call(client.execute_command, "EVAL", RUN_INFO, 0, **target)
            ]
            if before != after:
                continue  # Redis restarted (or changed) while we looked: look again
            run_id, aof_enabled, role, second_offset = after
            durable = fsync_always and aof_enabled == "1" and role == "master" and second_offset == "-1"
            if run_id != self._runs.get(node, ("", False))[0]:
                logger.info(
                    "redis %srun %s: %s",
                    f"{node} " if node else "",
                    run_id[:12],
                    "durable" if durable else "not durable",
                )
            return run_id, durable
        raise BrokerUnavailableError("redis unavailable: its run id keeps changing (restarting?)")

    async def run_script(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script`` (registered on :attr:`client`) as :meth:`_call` runs a call.

        On one Redis it goes out in a pipeline with the other calls of the moment
        (:class:`~.redis_batch.ScriptBatcher`: one round trip for many callers, in the
        order they were made); on a cluster on its own, to the master of its keys' slot.
        Either way a call is sent once: after a connection error Redis may have run it.
        """
        if self._cluster:
            return await self._call(self._run_on_master, script, keys, args)
        return await self._call(self._batcher.run, script, keys, args)

    async def _run_on_master(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script`` on the cluster master that owns ``keys[0]``'s slot, sent once.

        Named as the target, the master gets the call without redis-py's retry: on a
        connection error RedisCluster sends a command again (after finding the masters
        anew), which for a publish Redis already ran publishes it twice.  Redirections
        (``MOVED``, ``ASK``: the script did not run) are still followed, and a master
        that lacks the script (``NOSCRIPT``: a new master) gets it loaded and the call
        again.  After a connection error the next call finds the masters anew.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._send_to_master(keys[0], *command)
        except NoScriptError:
            # The slot's master (after a MOVED, the new one) lacks the script: load it there.
            await self._send_to_master(keys[0], "SCRIPT", "LOAD", script.script)
            return await self._send_to_master(keys[0], *command)

    async def _send_to_master(self, key: str, *command: Any) -> Any:
        """Send ``command`` once to the cluster master that owns ``key``'s slot (see
        :meth:`_run_on_master`)."""
        client = self.client
        assert isinstance(client, RedisCluster)
        # Learns the masters when it has not yet, or again after a connection error (as
        # redis-py does at the start of every command, before the target is chosen).
        await client.initialize()
        master = self._master_of(key)
        result = await client.execute_command(*command, target_nodes=master)
        if self._backing_off:
            self._answered(master.name)  # the master answers: wake its link if it backs off
        return result

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a Redis call, mapping connection trouble to :class:`BrokerUnavailableError`."""
        try:
            if self._gate is None:
                result = await function(*args, **kwargs)
            else:
                async with self._gate:
                    result = await function(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"redis unavailable: {exc}") from exc
        except (ClusterDownError, SlotNotCoveredError, MaxConnectionsError) as exc:
            # A master down (its slots not served) or the pool full: retrying later may work.
            raise BrokerUnavailableError(f"redis unavailable: {exc}") from exc
        except (RedisError, RedisClusterException) as exc:
            raise BrokerError(f"redis error: {exc}") from exc
        except _CLIENT_BROKEN as exc:
            # Unavailable, as the connection errors it stands for: callers retry or answer
            # 121 / HTTP 503 instead of failing with an error they cannot place.
            raise BrokerUnavailableError(f"redis unavailable: client error {exc!r}") from exc
        if self._backing_off and not self._cluster:
            # Redis answers while the link waits to reconnect: reconnect it now.  (On a
            # cluster the answering master is known where it is chosen: _send_to_master.)
            self._answered(_SINGLE)
        return result


__all__ = ["RedisBroker", "RedisBrokerConfig"]
