"""How the sharded Redis broker is configured: several Redis URLs in one ``broker`` setting.

``redis://a:6379/0,redis://b:6379/0?prefix=app,...`` (or a list in the TOML file) names one
shard per URL.  Kept apart from :mod:`herald.brokers.sharded` so that checking the setting
(:mod:`herald.brokers.options`, at settings load) needs no broker code.

Options, decided once for every shard:

* **Herald's options** (``prefix``, timeouts, ``stream_meta_ttl``, ``max_connections``,
  ``max_held``; see :class:`~herald.brokers.redis_config.RedisBrokerConfig`) apply to every
  shard.  Write each on one URL or repeat it; two URLs giving different values is a
  :class:`~herald.exceptions.ConfigError`.  Every shard uses one key prefix, so a
  deployment is one prefix, whatever shard a channel lives on.
* **Connection options** (password, database number, redis-py's ``ssl_*``,
  ``health_check_interval``, ...) belong to the URL they are written on.
* **``shard=NAME``** names the shard for the hash (default: the URL's ``host:port/db``).
  Name a shard when its address may change: channels follow shard names, so a Redis
  moved to a new address under the same name keeps its channels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..exceptions import ConfigError
from ..urls import redact_url, split_broker_urls
from .redis_config import RedisBrokerConfig

#: The query option that names a shard (taken out before the URL reaches redis-py).
SHARD_OPTION = "shard"
_SCHEMES = ("redis", "rediss", "unix")
#: RedisBrokerConfig's Herald options: the ones every shard shares.
_SHARED = tuple(f.name for f in dataclasses.fields(RedisBrokerConfig) if f.name != "url")


@dataclass(frozen=True, slots=True)
class Shard:
    """One Redis of a sharded broker: its stable ``name`` (what the hash uses) and config."""

    name: str
    config: RedisBrokerConfig


@dataclass(frozen=True, slots=True)
class ShardedRedisConfig:
    """The shards, in the order given (the order changes nothing: see
    :mod:`herald.brokers.sharded`)."""

    shards: tuple[Shard, ...]

    @classmethod
    def from_url(cls, url: str) -> ShardedRedisConfig:
        """``redis://a:6379/0,redis://b:6379/0?prefix=app`` -> config; see the module
        docstring for which options are shared.  Raises :class:`ConfigError`."""
        return cls.from_urls(split_broker_urls(url))

    @classmethod
    def from_urls(cls, urls: list[str]) -> ShardedRedisConfig:
        parsed = [_parse(url) for url in urls]
        if len(urls) < 2:
            raise ConfigError("a sharded Redis broker needs at least two Redis URLs")
        shared: dict[str, Any] = {}
        for _, config, given in parsed:
            for option in given:
                value = getattr(config, option)
                if option in shared and shared[option] != value:
                    raise ConfigError(
                        f"sharded Redis broker: {option} must be the same on every shard "
                        f"(got {shared[option]!r} and {value!r}); write it once or repeat it"
                    )
                shared[option] = value
        shards = tuple(Shard(name, dataclasses.replace(config, **shared)) for name, config, _ in parsed)
        names = [shard.name for shard in shards]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(
                f"sharded Redis broker: shard {duplicates[0]!r} is listed twice "
                "(every URL must name a different Redis, or carry its own shard=NAME)"
            )
        return cls(shards)


def is_sharded(url: str) -> bool:
    """Whether the ``broker`` setting ``url`` is for this broker: several URLs, or one
    ``redis://`` URL listing several hosts (which :meth:`ShardedRedisConfig.from_url`
    refuses, showing the syntax)."""
    urls = split_broker_urls(url)
    return len(urls) > 1 or (urlsplit(url).scheme in _SCHEMES and "," in _hosts(url))


def _hosts(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


def _parse(url: str) -> tuple[str, RedisBrokerConfig, set[str]]:
    """One shard's URL -> (shard name, its config, the shared options it sets)."""
    parts = urlsplit(url)
    if parts.scheme.endswith("+cluster"):
        raise ConfigError(
            "a Redis Cluster is one broker URL listing its nodes (redis+cluster://h1:7000,h2:7001), "
            "not a shard of a sharded broker"
        )
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"sharded Redis broker: {redact_url(url)!r} is not a Redis URL "
            "(every shard is redis://, rediss:// or unix://)"
        )
    if "," in _hosts(url):
        raise ConfigError(
            f"sharded Redis broker: {redact_url(url)!r} lists several hosts in one URL; give each "
            "shard its own URL: redis://a:6379/0,redis://b:6379/0"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [value for key, value in query if key == SHARD_OPTION]
    if any(not name or any(c.isspace() for c in name) for name in names) or len(names) > 1:
        raise ConfigError(f"sharded Redis broker: {redact_url(url)!r}: shard= takes one name without spaces")
    rest = [(key, value) for key, value in query if key != SHARD_OPTION]
    base = url.partition("?")[0]
    config = RedisBrokerConfig.from_url(f"{base}?{urlencode(rest)}" if rest else base)
    given = {key for key, _ in rest if key in _SHARED}
    return (names[0] if names else _address(parts.scheme, url)), config, given


def _address(scheme: str, url: str) -> str:
    """A shard's default name: ``host:port/db`` (``unix:path/db``), spelled one way
    whatever the URL leaves out (port 6379, database 0), without credentials."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if scheme == "unix":
        return f"unix:{parts.path}/{query.get('db', '0')}"
    db = parts.path.strip("/") or query.get("db", "0")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(f"sharded Redis broker: bad port in {redact_url(url)!r}") from exc
    return f"{(parts.hostname or 'localhost').lower()}:{port}/{db}"


__all__ = ["SHARD_OPTION", "Shard", "ShardedRedisConfig", "is_sharded"]
