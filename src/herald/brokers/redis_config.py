"""How the Redis broker reaches Redis and names its keys: :class:`RedisBrokerConfig`.

Kept apart from :mod:`herald.brokers.redis` so that checking a broker URL
(:mod:`herald.brokers.options`, at settings load) needs no broker code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..urls import non_negative, positive_int, split_url_options


@dataclass(frozen=True, slots=True)
class RedisBrokerConfig:
    """How to reach Redis and name keys.

    ``url``: ``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or ``unix://path``.
    ``prefix``: prepended to every key and Pub/Sub channel, so several Herald
    deployments can share one Redis.  ``stream_meta_ttl``: seconds a channel's
    offset/epoch key lives after its last publication when the namespace keeps
    no history (0: forever; with history the key lives as long as the history,
    ``history_ttl``).  ``reconnect_min``/``reconnect_max``:
    the backoff between reconnect attempts (doubled each failure, with jitter).
    ``max_connections``: command connections per node; more concurrent commands
    wait (up to ``command_timeout``) for a free one.  ``max_held``: live
    publications held per channel while it catches up after a link blip; beyond
    it the gap is reported as lost.  :meth:`from_url` reads these from the URL.
    """

    url: str = field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    prefix: str = "herald"
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    stream_meta_ttl: float = 3600.0
    max_connections: int = 50
    max_held: int = 10_000

    @classmethod
    def from_url(cls, url: str) -> RedisBrokerConfig:
        """``redis://host:6379/0?prefix=app&stream_meta_ttl=600`` -> config.

        Query options: ``prefix``, ``connect_timeout``, ``command_timeout``,
        ``reconnect_min``, ``reconnect_max``, ``stream_meta_ttl``,
        ``max_connections``, ``max_held``; redis-py's own URL options (``ssl_*``,
        ``health_check_interval``, ...) are passed through.  Anything else, or a
        malformed value, raises :class:`ConfigError`.
        """
        from redis.connection import URL_QUERY_ARGUMENT_PARSERS

        converters: dict[str, Callable[[str], Any]] = {
            "prefix": _prefix,
            "connect_timeout": non_negative,
            "command_timeout": non_negative,
            "reconnect_min": non_negative,
            "reconnect_max": non_negative,
            "stream_meta_ttl": non_negative,
            "max_connections": positive_int,
            "max_held": positive_int,
        }
        base, values = split_url_options(
            url, converters, what="Redis", passthrough=set(URL_QUERY_ARGUMENT_PARSERS) - set(converters)
        )
        return cls(url=base, **values)


def _prefix(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a non-empty key prefix without spaces")
    return value


__all__ = ["RedisBrokerConfig"]
