"""Pick the broker and presence manager a settings' ``broker`` URL names."""

from __future__ import annotations

import importlib.util
from urllib.parse import urlsplit

from .brokers.base import Broker
from .brokers.memory import MemoryBroker
from .config import Settings, non_negative, split_url_options
from .exceptions import ConfigError
from .presence.base import PresenceManager
from .presence.memory import MemoryPresenceManager


def _scheme(url: str) -> str:
    return urlsplit(url).scheme if "://" in url else url.partition("?")[0]


def check_broker_options(url: str) -> None:
    """Parse the broker settings in ``url``'s query string without building anything;
    raises :class:`ConfigError` naming a bad one (``Settings`` checks at load time)."""
    scheme = _scheme(url)
    if scheme == "memory":
        split_url_options(url, {"stream_meta_ttl": non_negative}, what="memory")
    elif scheme in ("redis", "rediss", "unix"):
        from .brokers.redis import RedisBrokerConfig

        RedisBrokerConfig.from_url(url)
    elif scheme in ("nats", "tls"):
        from .brokers.nats import NatsBrokerConfig

        NatsBrokerConfig.from_url(url)


def engines_for(settings: Settings) -> tuple[Broker, PresenceManager]:
    """``memory`` -> in-process engines; ``redis://`` -> Redis; ``nats://`` -> NATS.

    Broker settings come from the URL's query string (``memory?stream_meta_ttl=600``,
    ``redis://host:6379/0?prefix=app``, ``nats://host:4222?jetstream=1``); an unknown
    or malformed one raises :class:`ConfigError`.
    """
    url = settings.broker
    scheme = _scheme(url)
    if scheme == "memory":
        _, options = split_url_options(url, {"stream_meta_ttl": non_negative}, what="memory")
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
