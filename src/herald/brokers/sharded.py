"""Channels spread over several Redis instances: :class:`ShardedRedisBroker`.

Each shard is a whole :class:`~herald.brokers.redis.RedisBroker` (its own Pub/Sub link,
command pool, catch-up and rollback guard); this class only routes.  A channel lives on
exactly one shard: its stream, offsets, idempotency keys and Pub/Sub traffic there, and its
presence too (:class:`~herald.presence.sharded.ShardedPresenceManager`).  Nothing is ever
copied between shards, so per-channel guarantees are exactly those of one Redis.

Placement: **rendezvous hashing** (highest random weight).  Every shard has a stable name
(:mod:`herald.brokers.sharded_config`: ``host:port/db`` or ``shard=NAME``); a channel goes
to the shard whose ``blake2b(name, channel)`` is highest.  Chosen over jump hash (which
Centrifugo uses) because it keys on names, not list positions:

* the order of the URLs does not matter, so nodes configured in any order agree;
* adding a shard moves only the channels that now hash highest on it (about 1/(N+1) of
  them), each from its old shard to the new one; nothing moves between old shards;
* removing a shard moves only its own channels, spread over the others (jump hash can
  only drop the last bucket cheaply; removing one in the middle renumbers the rest);
* the cost, N hashes of the channel name per lookup, is small for the handful of shards
  a deployment has, and recent placements are remembered.

A moved channel starts a new stream on its new shard: offsets restart in a new epoch,
so a client resuming across the change is told ``recovered: false``, and presence is
rebuilt by the nodes' refresh within ``presence_ttl``.  Change the shard list on every
node at once (a rolling change leaves nodes disagreeing about where a channel is).

Nodes that disagree on the shard list are found: each node records its list (the shard
names, sorted) on every shard every :data:`PLACEMENT_CHECK_INTERVAL` seconds, kept for three
intervals, and reads the lists recorded there; a list other than its own is logged as an
error and counted (``placement_mismatches``).  Two nodes are found when they share at
least one shard.

Faults are per shard: while one Redis is down, calls for its channels raise
:class:`~herald.exceptions.BrokerUnavailableError` and its link reconnects on its own;
on return its subscribed channels catch up or get a :class:`StreamGap`, as with one
Redis.  The other shards' channels are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from typing import Any

from ..periodic import every
from .base import (
    Broker,
    BrokerHandler,
    HistoryResult,
    PresenceEvent,
    PublishOptions,
    StreamPosition,
)
from .redis import RedisBroker, reply_text
from .sharded_config import ShardedRedisConfig

#: Placements remembered at most (about 100 bytes each).
_PLACED_MAX = 65_536
#: Seconds between two records of this node's shard list on every shard.
PLACEMENT_CHECK_INTERVAL = 10.0

logger = logging.getLogger("herald.brokers.sharded")

# KEYS[1]: the shard lists of the nodes (a sorted set scored by expiry, Redis's clock).
# ARGV[1]: this node's list; ARGV[2]: how long it is kept (ms).  Returns every list kept.
_RECORD_PLACEMENT = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[2])
return redis.call('zrange', KEYS[1], 0, -1)
"""


class ShardedRedisBroker(Broker):
    """A :class:`Broker` over one :class:`RedisBroker` per shard, routing by channel.

    Every shard delivers through this broker's :meth:`Broker._deliver`, so handler errors
    are counted here once.  :meth:`ready` is True while **any** shard is ready: see
    :meth:`ready` and :meth:`shards_ready`.
    """

    def __init__(self, config: ShardedRedisConfig) -> None:
        self.config = config
        #: The shards, in configuration order, and their names (what the hash uses).
        self.shards: tuple[RedisBroker, ...] = tuple(RedisBroker(shard.config) for shard in config.shards)
        self.names: tuple[str, ...] = tuple(shard.name for shard in config.shards)
        # A channel's publishes all go to its one shard (routing does not await).
        self.pipelines_publishes = all(shard.pipelines_publishes for shard in self.shards)
        # Each shard's hash state after its name: a lookup copies it and adds the channel.
        self._seeds = [hashlib.blake2b(name.encode() + b"\0", digest_size=8) for name in self.names]
        # Recent answers: a lookup hashes the name once per shard (a few microseconds with
        # five shards), and the same channels are looked up on every call.
        self._placed: dict[str, RedisBroker] = {}
        #: This node's shard list as recorded on the shards (names sorted: order changes nothing).
        self.placement = ",".join(sorted(self.names))
        #: Other nodes' shard lists seen at the last check (empty: every node agrees).
        self.foreign_placements: set[str] = set()
        #: Shard lists other than this node's found so far (each counted once when it appears).
        self.placement_mismatches = 0
        self.placement_check_interval = PLACEMENT_CHECK_INTERVAL
        self._checks = contextlib.AsyncExitStack()

    def shard_for(self, name: str) -> RedisBroker:
        """The shard that owns ``name`` (a channel, or any other key that must live with
        one shard): the same answer on every node and in every process."""
        shard = self._placed.get(name)
        if shard is not None:
            return shard
        data = name.encode()
        best, best_weight = 0, -1
        for index, seed in enumerate(self._seeds):
            digest = seed.copy()
            digest.update(data)
            weight = int.from_bytes(digest.digest(), "big")
            if weight > best_weight:
                best, best_weight = index, weight
        if len(self._placed) >= _PLACED_MAX:
            self._placed.clear()  # bounded; refilled by the channels in use
        shard = self._placed[name] = self.shards[best]
        return shard

    # ------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        """Start every shard (each waits up to its ``connect_timeout``, never fails: a shard
        that is down keeps reconnecting in the background)."""
        self._handler = handler
        await asyncio.gather(*(shard.start(self._deliver) for shard in self.shards))
        await self._checks.enter_async_context(
            every(self.placement_check_interval, self.check_placement, name="herald-shard-lists")
        )

    async def close(self) -> None:
        self._handler = None
        await self._checks.aclose()
        await asyncio.gather(*(shard.close() for shard in self.shards))

    async def check_placement(self) -> set[str]:
        """Record this node's shard list on every shard and return the other lists that
        nodes recorded there lately (three check intervals).

        A node with another list places some channels on other shards than this node:
        what one publishes to such a channel never reaches the other's subscribers, and
        their offsets and histories part.  Each list not seen at the previous check is
        logged as an error and counted in ``placement_mismatches``.  A shard that does
        not answer is skipped (its own errors are reported by its links).
        """
        ttl_ms = str(int(self.placement_check_interval * 3000))
        key = f"{self.shards[0].config.prefix}:placements"

        async def record(shard: RedisBroker) -> Any:
            return await shard.client.eval(_RECORD_PLACEMENT, 1, key, self.placement, ttl_ms)

        answers = await asyncio.gather(*(record(shard) for shard in self.shards), return_exceptions=True)
        seen = {
            reply_text(value)
            for answer in answers
            if not isinstance(answer, BaseException)
            for value in answer
        }
        foreign = seen - {self.placement}
        for placement in sorted(foreign - self.foreign_placements):
            self.placement_mismatches += 1
            logger.error(
                "another node spreads channels over other Redis shards (%s; this node: %s): "
                "publications between nodes that disagree are lost for the channels placed "
                "differently; give every node the same shard list (docs/scaling.md)",
                placement,
                self.placement,
            )
        self.foreign_placements = foreign
        return foreign

    async def ready(self) -> bool:
        """True while at least one shard is ready.

        A shard that is down makes only its channels fail, and every node sees the same
        shards: were ``/readyz`` to answer 503 for it, load balancers would take every
        node out and the healthy shards' channels would go down too.  Which shards are
        down: :meth:`shards_ready`, the nodes' logs, and ``herald_broker_events`` (each
        shard's ``reconnects``).
        """
        return any(await self.shards_ready())

    async def shards_ready(self) -> list[bool]:
        """Whether each shard (in :attr:`shards` order) is ready."""
        return list(await asyncio.gather(*(shard.ready() for shard in self.shards)))

    def counters(self) -> dict[str, int]:
        """Every shard's counters summed, and this broker's handler errors."""
        total: Counter[str] = Counter(super().counters())
        for shard in self.shards:
            total.update(shard.counters())
        total["placement_mismatches"] = self.placement_mismatches
        return dict(total)

    # ------------------------------------------------------------ routed by channel

    async def subscribe(self, channel: str) -> None:
        await self.shard_for(channel).subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        await self.shard_for(channel).unsubscribe(channel)

    def channels(self) -> set[str]:
        return set().union(*(shard.channels() for shard in self.shards))

    async def publish(self, channel: str, data: bytes, options: PublishOptions) -> StreamPosition:
        return await self.shard_for(channel).publish(channel, data, options)

    async def publish_idempotent(
        self, channel: str, data: bytes, options: PublishOptions, key: str, window: float
    ) -> tuple[StreamPosition, bool]:
        return await self.shard_for(channel).publish_idempotent(channel, data, options, key, window)

    async def publish_event(self, event: PresenceEvent) -> None:
        await self.shard_for(event.channel).publish_event(event)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        return await self.shard_for(channel).history(channel, since=since, limit=limit, reverse=reverse)

    async def remove_history(self, channel: str) -> None:
        await self.shard_for(channel).remove_history(channel)


__all__ = ["ShardedRedisBroker", "ShardedRedisConfig"]
