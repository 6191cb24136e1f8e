"""Pick the broker and presence manager a settings' ``broker`` URL names."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from .brokers.base import Broker
from .brokers.memory import MemoryBroker
from .brokers.options import MEMORY_OPTIONS, REDIS_SCHEMES, broker_scheme
from .config import Settings
from .exceptions import ConfigError
from .leases import ConnectionLeases
from .presence.base import PresenceManager
from .presence.memory import MemoryPresenceManager
from .urls import split_broker_urls, split_url_options


def engines_for(settings: Settings) -> tuple[Broker, PresenceManager]:
    """``memory`` -> in-process engines; ``redis://`` -> Redis; ``nats://`` -> NATS.

    Broker settings come from the URL's query string (``memory?stream_meta_ttl=600``,
    ``redis://host:6379/0?prefix=app``, ``nats://host:4222?jetstream=1``); an unknown
    or malformed one raises :class:`ConfigError`.
    """
    url = settings.broker
    scheme = broker_scheme(url)
    if scheme == "memory":
        _, options = split_url_options(url, MEMORY_OPTIONS, what="memory")
        return MemoryBroker(**options), MemoryPresenceManager()
    if scheme in REDIS_SCHEMES and len(split_broker_urls(url)) > 1:
        # Several Redis URLs: channels spread over them (docs/scaling.md, sharding).
        from .brokers.sharded import ShardedRedisBroker, ShardedRedisConfig
        from .presence.sharded import ShardedPresenceManager

        sharded = ShardedRedisBroker(ShardedRedisConfig.from_url(url))
        return sharded, ShardedPresenceManager(sharded)
    if scheme in REDIS_SCHEMES:
        try:
            from .brokers.redis import RedisBroker, RedisBrokerConfig
            from .presence.redis import RedisPresenceManager
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ConfigError(f"the redis broker is not available: {exc}") from exc
        config = RedisBrokerConfig.from_url(url)
        broker = RedisBroker(config)
        return broker, RedisPresenceManager(broker)
    if scheme in ("nats", "tls"):
        # brokers.nats imports nats-py lazily, so look for it here to fail at start, clearly.
        if importlib.util.find_spec("nats") is None:
            raise ConfigError("the NATS broker needs nats-py: pip install 'herald[nats]'")
        from .brokers.nats import NatsBroker, NatsBrokerConfig

        nats_broker = NatsBroker(NatsBrokerConfig.from_url(url))
        return nats_broker, nats_broker.presence_manager()
    raise ConfigError(
        f"unknown broker {url!r}: use memory, redis://host:port/db (several separated by commas: "
        "shards), redis+cluster://host:port or nats://host:port"
    )


def leases_for(
    settings: Settings, broker: Broker, *, on_error: Callable[[], None] | None = None
) -> ConnectionLeases:
    """How ``max_connections_per_user`` and ``max_connections_per_ip`` are counted
    (:mod:`herald.leases`): across every node on a Redis broker (one Redis, a Redis
    Cluster or a sharded one, each key on the shard its name hashes to), per node on the
    memory and NATS brokers, or when ``connection_lease_ttl`` is 0."""
    ttl = settings.connection_lease_ttl
    if ttl > 0 and not isinstance(broker, MemoryBroker):
        from .brokers.redis import RedisBroker
        from .leases import RedisConnectionLeases

        shard_for = getattr(broker, "shard_for", None)  # a sharded Redis broker
        if callable(shard_for):
            return RedisConnectionLeases(shard_for, ttl, on_error=on_error)
        if isinstance(broker, RedisBroker):
            redis_broker = broker
            return RedisConnectionLeases(lambda _name: redis_broker, ttl, on_error=on_error)
    return ConnectionLeases()
