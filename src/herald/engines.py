"""Pick the broker and presence manager a settings' ``broker`` URL names."""

from __future__ import annotations

import importlib.util

from .brokers.base import Broker
from .brokers.memory import MemoryBroker
from .brokers.options import MEMORY_OPTIONS, broker_scheme
from .config import Settings
from .exceptions import ConfigError
from .presence.base import PresenceManager
from .presence.memory import MemoryPresenceManager
from .urls import split_url_options


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
    if scheme in ("redis", "rediss", "unix"):
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
    raise ConfigError(f"unknown broker {url!r}: use memory, redis://host:port/db or nats://host:port")
