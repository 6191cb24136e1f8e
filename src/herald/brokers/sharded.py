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

Faults are per shard: while one Redis is down, calls for its channels raise
:class:`~herald.exceptions.BrokerUnavailableError` and its link reconnects on its own;
on return its subscribed channels catch up or get a :class:`StreamGap`, as with one
Redis.  The other shards' channels are not affected.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

from .base import (
    Broker,
    BrokerHandler,
    HistoryResult,
    PresenceEvent,
    PublishOptions,
    StreamPosition,
)
from .redis import RedisBroker
from .sharded_config import ShardedRedisConfig

#: Placements remembered at most (about 100 bytes each).
_PLACED_MAX = 65_536


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

    async def close(self) -> None:
        self._handler = None
        await asyncio.gather(*(shard.close() for shard in self.shards))

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
