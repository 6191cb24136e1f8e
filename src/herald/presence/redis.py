"""Presence in Redis: a hash and a sorted set per channel, entries expiring by score.

``PREFIX:presence:{bB}:CHANNEL`` maps client id -> ClientInfo JSON and
``PREFIX:presence-exp:{bB}:CHANNEL`` maps client id -> expiry time (milliseconds, by
Redis's clock so that nodes' clocks do not matter).  ``{bB}`` is the channel's hash
tag (:func:`~herald.brokers.redis_scripts.bucket_tag`): on a Redis Cluster both keys
live on the master that owns the channel's stream.  The owning node refreshes
its clients' entries every ``presence_ttl / 3`` seconds (``PresenceUpkeep.refresh_forever``);
when a node dies its entries stop being refreshed and disappear from
:meth:`RedisPresenceManager.presence` within ``presence_ttl``.  Both keys expire
as a whole when nobody refreshes any entry, so an abandoned channel leaves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ..brokers.base import ClientInfo
from ..brokers.redis_scripts import bucket_tag
from .base import PresenceManager

if TYPE_CHECKING:
    from ..brokers.redis import RedisBroker

_ADD = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('zadd', KEYS[2], now + ttl, ARGV[1])
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
-- Keep the keys as long as their longest-lived entry.
for _, key in ipairs(KEYS) do
  if redis.call('pttl', key) < ttl then redis.call('pexpire', key, ttl) end
end
return 1
"""

# KEYS: hash, sorted set; ARGV: ttl, then client, payload pairs (one node's refresh).
_REFRESH = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('zadd', KEYS[2], now + ttl, ARGV[i])
  redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1])
end
for _, key in ipairs(KEYS) do
  if redis.call('pttl', key) < ttl then redis.call('pexpire', key, ttl) end
end
return 1
"""

_REMOVE = """
redis.call('zrem', KEYS[2], ARGV[1])
redis.call('hdel', KEYS[1], ARGV[1])
return 1
"""

_LIVE = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('zrangebyscore', KEYS[2], '-inf', now)
if #expired > 0 then
  redis.call('zremrangebyscore', KEYS[2], '-inf', now)
  for i = 1, #expired, 1000 do
    redis.call('hdel', KEYS[1], unpack(expired, i, math.min(i + 999, #expired)))
  end
end
return redis.call('hgetall', KEYS[1])
"""


#: Entries refreshed per script call (bounds one call's time in Redis).
_REFRESH_BATCH = 500


class RedisPresenceManager(PresenceManager):
    """Presence shared by every node on one Redis (or Redis Cluster); uses the broker's
    connection pool.

    Raises :class:`~herald.exceptions.BrokerUnavailableError` when Redis is down.
    """

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self._scripts: dict[str, Any] = {}

    def _keys(self, channel: str) -> list[str]:
        prefix, tag = self.broker.config.prefix, bucket_tag(channel)
        return [f"{prefix}:presence:{tag}:{channel}", f"{prefix}:presence-exp:{tag}:{channel}"]

    def _script(self, name: str, source: str) -> Any:
        # Scripts are bound to the broker's client, which is replaced after close().
        client = self.broker.client
        script = self._scripts.get(name)
        if script is None or script.registered_client is not client:
            script = self._scripts[name] = client.register_script(source)
        return script

    async def add(self, channel: str, info: ClientInfo, ttl: float) -> None:
        ttl_ms = max(int(ttl * 1000), 1)
        payload = orjson.dumps(info.as_dict())
        await self.broker.run_script(
            self._script("add", _ADD), self._keys(channel), [info.client, payload, ttl_ms]
        )

    async def refresh(self, channel: str, infos: Sequence[ClientInfo], ttl: float) -> None:
        # One script per channel and refresh instead of one per (client, channel) pair: the
        # idle cost of 10,000 subscribed clients was dominated by these round trips.
        ttl_ms = max(int(ttl * 1000), 1)
        for start in range(0, len(infos), _REFRESH_BATCH):
            args: list[Any] = [ttl_ms]
            for info in infos[start : start + _REFRESH_BATCH]:
                args += (info.client, orjson.dumps(info.as_dict()))
            await self.broker.run_script(self._script("refresh", _REFRESH), self._keys(channel), args)

    async def remove(self, channel: str, client: str) -> None:
        await self.broker.run_script(self._script("remove", _REMOVE), self._keys(channel), [client])

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        flat = await self.broker.run_script(self._script("live", _LIVE), self._keys(channel), [])
        entries: dict[str, ClientInfo] = {}
        for i in range(0, len(flat), 2):
            info = ClientInfo.from_dict(orjson.loads(flat[i + 1]))
            entries[info.client] = info
        return entries


__all__ = ["RedisPresenceManager"]
