"""Pick the broker and presence manager a settings' ``broker`` URL names."""

from __future__ import annotations

import importlib.util
from urllib.parse import urlsplit

from .brokers.base import Broker
from .brokers.memory import MemoryBroker
from .config import Settings
from .exceptions import ConfigError
from .presence.base import PresenceManager
from .presence.memory import MemoryPresenceManager


def engines_for(settings: Settings) -> tuple[Broker, PresenceManager]:
    """``memory`` -> in-process engines; ``redis://`` -> Redis; ``nats://`` -> NATS."""
    url = settings.broker
    scheme = urlsplit(url).scheme if "://" in url else url
    if scheme == "memory":
        return MemoryBroker(), MemoryPresenceManager()
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .brokers.redis import RedisBroker, RedisBrokerConfig
            from .presence.redis import RedisPresenceManager
        except ImportError as exc:  # pragma: no cover - redis is a dependency
            raise ConfigError(f"the redis broker is not available: {exc}") from exc
        config = RedisBrokerConfig(url=url)
        broker = RedisBroker(config)
        return broker, RedisPresenceManager(broker)
    if scheme in ("nats", "tls"):
        # brokers.nats imports nats-py lazily, so look for it here to fail at start, clearly.
        if importlib.util.find_spec("nats") is None:
            raise ConfigError("the NATS broker needs nats-py: pip install 'herald[nats]'")
        from .brokers.nats import NatsBroker, NatsBrokerConfig

        nats_broker = NatsBroker(NatsBrokerConfig.from_url(url))
        return nats_broker, nats_broker.presence_manager()
    raise ConfigError(f"unknown broker {url!r}: use memory, redis://host:port/db or nats://host:port")
