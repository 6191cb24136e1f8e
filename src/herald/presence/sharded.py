"""Presence on a sharded Redis broker: a channel's presence lives on its channel's shard.

One :class:`~herald.presence.redis.RedisPresenceManager` per shard; every call goes to the
one of :meth:`ShardedRedisBroker.shard_for(channel) <herald.brokers.sharded.ShardedRedisBroker.shard_for>`,
so a shard that is down fails (:class:`~herald.exceptions.BrokerUnavailableError`) only
its own channels' presence.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..brokers.base import ClientInfo
from ..brokers.sharded import ShardedRedisBroker
from .base import PresenceManager
from .redis import RedisPresenceManager


class ShardedPresenceManager(PresenceManager):
    def __init__(self, broker: ShardedRedisBroker) -> None:
        self.broker = broker
        self._managers = {id(shard): RedisPresenceManager(shard) for shard in broker.shards}

    def _for(self, channel: str) -> RedisPresenceManager:
        return self._managers[id(self.broker.shard_for(channel))]

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        await self._for(channel).add(channel, info, ttl)

    async def refresh(self, channel: str, infos: Sequence[ClientInfo], ttl: float) -> None:
        await self._for(channel).refresh(channel, infos, ttl)

    async def remove(self, channel: str, client: str) -> None:
        await self._for(channel).remove(channel, client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return await self._for(channel).presence(channel)


__all__ = ["ShardedPresenceManager"]
