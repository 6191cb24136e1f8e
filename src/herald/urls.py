"""Broker URLs: take Herald's options out of a URL's query string, and hide secrets in it.

Pure helpers shared by the settings, the brokers, the engine factory and the CLI;
this module imports nothing else of Herald but its exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .exceptions import ConfigError

#: A comma that starts another URL (``redis://a:6379,redis://b:6379``): one followed by a scheme.
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_broker_urls(url: str) -> list[str]:
    """``redis://a:6379,redis://b:6379`` -> both URLs (one broker URL -> a list of one).

    Only a comma followed by ``scheme://`` separates URLs, so a comma inside a query value
    or a password stays where it is.
    """
    return [part.strip() for part in _NEXT_URL.split(url.strip())]


def redact_url(url: str) -> str:
    """``url`` with any password or token in its user info replaced, for logs and output:
    ``redis://:secret@host:6379/0`` -> ``redis://***@host:6379/0`` (each URL of a list)."""
    urls = split_broker_urls(url)
    if len(urls) > 1:
        return ",".join(redact_url(part) for part in urls)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    # "user:password" keeps the user; a lone value ("nats://TOKEN@host") is itself the secret.
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:" if colon and user else ""
    return f"{scheme}://{shown}***@{host}"


def non_negative(value: str) -> float:
    """A broker URL option in seconds: a number >= 0."""
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a finite number >= 0")
    return number


def positive_int(value: str) -> int:
    """A broker URL option that counts something: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise ValueError("expected an integer >= 1")
    return number


def split_url_options(
    url: str,
    converters: Mapping[str, Callable[[str], Any]],
    *,
    what: str,
    passthrough: Collection[str] = (),
) -> tuple[str, dict[str, Any]]:
    """Take Herald's broker options out of a broker URL's query string.

    ``redis://h:6379/0?prefix=app&stream_meta_ttl=600`` -> (``redis://h:6379/0``,
    ``{"prefix": "app", "stream_meta_ttl": 600.0}``).  Options named in
    ``passthrough`` stay in the returned URL (for the client library); any other
    option, or a malformed value, raises :class:`~herald.exceptions.ConfigError`.
    """
    base, _, query = url.partition("?")
    values: dict[str, Any] = {}
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        convert = converters.get(key)
        if convert is None:
            if key in passthrough:
                kept.append((key, value))
                continue
            known = ", ".join([*converters, *sorted(passthrough)])
            raise ConfigError(f"unknown {what} broker URL option {key!r} (known: {known})")
        try:
            values[key] = convert(value)
        except ValueError as exc:
            raise ConfigError(f"{what} broker URL option {key}={value!r}: {exc}") from exc
    return (f"{base}?{urlencode(kept)}" if kept else base), values
