"""Check a broker URL's options without building a broker (``Settings`` does at load time).

The settings import this module, so it imports the brokers' config classes lazily:
``herald.config`` must not load redis-py or nats-py, and nothing here imports the settings.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..urls import non_negative, positive_int, split_url_options

#: The memory broker's URL options (``memory?stream_meta_ttl=600&max_idempotency_keys=1000``).
MEMORY_OPTIONS = {"stream_meta_ttl": non_negative, "max_idempotency_keys": positive_int}


#: Schemes of the Redis broker: one Redis, or a Redis Cluster (``redis+cluster://h1:7000,h2:7001``).
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def broker_scheme(url: str) -> str:
    """``redis`` for ``redis://host``; a bare name (``memory?x=1``) is its own scheme."""
    return urlsplit(url).scheme if "://" in url else url.partition("?")[0]


def check_broker_options(url: str) -> None:
    """Parse the broker settings in ``url``'s query string without building anything;
    raises :class:`~herald.exceptions.ConfigError` naming a bad one."""
    scheme = broker_scheme(url)
    if scheme == "memory":
        split_url_options(url, MEMORY_OPTIONS, what="memory")
    elif scheme in REDIS_SCHEMES:
        from .redis_config import RedisBrokerConfig
        from .sharded_config import ShardedRedisConfig, is_sharded

        if is_sharded(url):  # several Redis URLs (herald.brokers.sharded)
            ShardedRedisConfig.from_url(url)
        else:
            RedisBrokerConfig.from_url(url)
    elif scheme in ("nats", "tls"):
        from .nats_config import NatsBrokerConfig

        NatsBrokerConfig.from_url(url)
