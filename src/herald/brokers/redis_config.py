"""How the Redis broker reaches Redis and names its keys: :class:`RedisBrokerConfig`.

Kept apart from :mod:`herald.brokers.redis` so that checking a broker URL
(:mod:`herald.brokers.options`, at settings load) needs no broker code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ConfigError
from ..urls import non_negative, positive_int, split_url_options

#: URL schemes of a Redis Cluster (seed nodes ``host:port,host:port``); ``rediss+`` is TLS.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class RedisBrokerConfig:
    """How to reach Redis and name keys.

    ``url``: ``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or ``unix://path``;
    a Redis Cluster: ``redis+cluster://[[user]:password@]host:port[,host:port...]``
    (seed nodes, from which the cluster's masters are found; ``rediss+cluster://``
    for TLS; no database number, a cluster has only 0).
    ``prefix``: prepended to every key and Pub/Sub channel, so several Herald
    deployments can share one Redis.  ``stream_meta_ttl``: seconds a channel's
    offset/epoch key lives after its last publication when the namespace keeps
    no history (0: forever; with history the key lives as long as the history,
    ``history_ttl``).  ``reconnect_min``/``reconnect_max``:
    the backoff between reconnect attempts (doubled each failure, with jitter).
    ``reconnect_max`` is short on purpose: a node whose Pub/Sub connection is
    still waiting to reconnect when Redis is back misses every publication made
    meanwhile, and can read them from the stream only while they number no more
    than ``history_size`` (docs/scaling.md, *When a gap cannot be filled*).
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
    reconnect_max: float = 0.25
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
        config = cls(url=base, **values)
        if config.cluster:
            config.cluster_seeds()  # a malformed seed list fails here, at settings load
            if "{" in config.prefix or "}" in config.prefix:
                raise ConfigError("a Redis Cluster key prefix may not contain { or } (hash tags)")
        return config

    @property
    def cluster(self) -> bool:
        """Whether :attr:`url` names a Redis Cluster (``redis+cluster://``)."""
        return self.url.partition("://")[0] in CLUSTER_SCHEMES

    def cluster_seeds(self) -> list[tuple[str, int]]:
        """The seed nodes of a cluster URL: ``redis+cluster://a:7000,b:7001`` -> [(a, 7000), (b, 7001)]."""
        _, hosts, _ = self._cluster_parts()
        seeds = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    f"Redis Cluster seed {item!r}: expected host:port (redis+cluster://h1:7000,h2:7001)"
                )
            seeds.append((host.strip("[]"), int(port)))
        return seeds

    def node_url(self, host: str, port: int) -> str:
        """A ``redis://`` URL (``rediss://`` for TLS) for one cluster node, with the cluster
        URL's credentials and redis-py options: how one master's Pub/Sub link connects."""
        userinfo, _, query = self._cluster_parts()
        scheme = "rediss" if self.url.startswith("rediss+") else "redis"
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}{host}:{port}/0" + (f"?{query}" if query else "")

    def _cluster_parts(self) -> tuple[str, str, str]:
        """(user info, ``host:port,...``, query) of a cluster URL."""
        if not self.cluster:
            raise ValueError(f"not a Redis Cluster URL: {self.url.partition('://')[0]}://")
        rest, _, query = self.url.partition("://")[2].partition("?")
        userinfo, _, hosts = rest.rpartition("@")
        hosts, slash, db = hosts.partition("/")
        if slash and db not in ("", "0"):
            raise ConfigError(f"a Redis Cluster has only database 0, not /{db}")
        if not hosts:
            raise ConfigError(
                "a Redis Cluster URL needs seed nodes: redis+cluster://host:port[,host:port...]"
            )
        return userinfo, hosts, query


def _prefix(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("expected a non-empty key prefix without spaces")
    return value


__all__ = ["CLUSTER_SCHEMES", "RedisBrokerConfig"]
