"""How the NATS broker reaches NATS and what it keeps: :class:`NatsBrokerConfig`.

Kept apart from :mod:`herald.brokers.nats` so that checking a broker URL
(:mod:`herald.brokers.options`, at settings load) needs no broker code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from ..exceptions import ConfigError
from ..urls import non_negative

_BAD_NAME_CHARS = " .*>/\\\t\r\n"


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"NATS broker URL: expected a boolean, got {value!r}")


@dataclass(frozen=True, slots=True)
class NatsBrokerConfig:
    """How to reach NATS and what to keep.

    ``url``: ``nats://host:port`` (a comma-separated list for a cluster).
    ``prefix`` starts every subject (a single subject token).
    ``jetstream``: keep history and shared offsets in a JetStream stream (the
    server must run with JetStream, ``nats-server -js``).  The JetStream options:
    ``stream`` (name; default ``HERALD_<prefix>``), ``storage`` (``file`` or
    ``memory``), ``replicas``, ``max_age`` (seconds any message is kept at most,
    0: no cap), ``gap_wait`` (seconds a node waits for a missing offset before
    reading it from the stream), ``trim_every`` (publications between trims of a
    channel to its history size), ``request_timeout`` (seconds per JetStream request).

    :meth:`from_url` reads the same options from the broker URL's query string.
    """

    url: str = "nats://localhost:4222"
    prefix: str = "herald"
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.5
    jetstream: bool = False
    stream: str = ""
    storage: str = "file"
    replicas: int = 1
    max_age: float = 0.0
    gap_wait: float = 0.25
    trim_every: int = 16
    request_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in _BAD_NAME_CHARS):
            raise ConfigError("NATS prefix must be a single subject token (no '.', '*', '>')")
        if self.stream and any(c in self.stream for c in _BAD_NAME_CHARS):
            raise ConfigError(f"invalid JetStream stream name {self.stream!r}")
        if self.storage not in ("file", "memory"):
            raise ConfigError("NATS storage must be 'file' or 'memory'")
        if self.replicas < 1 or self.max_age < 0 or self.gap_wait <= 0 or self.trim_every < 1:
            raise ConfigError("NATS broker: replicas and trim_every must be >= 1, max_age >= 0, gap_wait > 0")

    @property
    def stream_name(self) -> str:
        return self.stream or f"HERALD_{self.prefix}"

    @classmethod
    def from_url(cls, url: str) -> NatsBrokerConfig:
        """``nats://host:4222?jetstream=1&prefix=app&max_age=86400`` -> config.

        Query options: ``jetstream``, ``prefix``, ``stream``, ``storage``,
        ``replicas``, ``max_age``, ``gap_wait``, ``trim_every``, ``connect_timeout``,
        ``reconnect_wait``, ``request_timeout``.  An unknown or malformed option
        raises :class:`ConfigError`.
        """
        base, _, query = url.partition("?")
        values: dict[str, Any] = {}
        converters: dict[str, Callable[[str], Any]] = {
            "jetstream": _flag,
            "prefix": str,
            "stream": str,
            "storage": str,
            "replicas": int,
            "max_age": float,
            "gap_wait": float,
            "trim_every": int,
            "connect_timeout": non_negative,
            "reconnect_wait": non_negative,
            "request_timeout": non_negative,
        }
        for key, value in parse_qsl(query, keep_blank_values=True):
            convert = converters.get(key)
            if convert is None:
                raise ConfigError(f"unknown NATS broker URL option {key!r} (known: {', '.join(converters)})")
            try:
                values[key] = convert(value)
            except ValueError as exc:
                raise ConfigError(f"NATS broker URL option {key}={value!r}: {exc}") from exc
        return cls(url=base, **values)


__all__ = ["NatsBrokerConfig"]
