"""Which ``Host`` names a request may use, and when a loopback peer is trusted.

DNS rebinding: a page on ``rebind.evil.example`` makes its own name resolve to
``127.0.0.1``, and the visitor's browser then talks to a server on the visitor's
machine under the attacker's name, with the attacker's page as the same origin.
The peer address is loopback, so "only loopback clients" is no protection, and
``Origin`` equals ``Host``, so the same-origin rule is none either.  What differs
is the name: the browser sends ``Host: rebind.evil.example:PORT``.

Rules (see docs/security.md, "Host names"):

* loopback names (``localhost``, ``*.localhost``, ``127.0.0.0/8``, ``::1``) are
  always accepted: a page served from them is local already;
* names listed in ``allowed_hosts`` are accepted (``*.example.com``: any
  subdomain; ``*``: any name);
* with ``allowed_hosts`` empty (the default): the bind address (``host``), the
  hosts of ``allowed_origins`` and any IP address literal are accepted (a rebinding
  page needs a DNS name the attacker controls, so an address cannot be one), and so
  is any name on a request that came over no socket (an in-process test client);
  every other name must be configured, on every interface;
* loopback trust (the HTTP API and ``/admin`` without an API key) needs a
  loopback peer *and* a loopback name in ``Host`` (or no ``Host`` at all, which
  browsers never send).

Everything here is pure: both serving drivers and the HTTP guard call it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .config import Settings


# ---------------------------------------------------------------- origin
# Browsers send ``Origin`` on WebSocket handshakes but Starlette's CORS middleware
# does not apply to WebSockets, so without this check any web page could open a
# socket to Herald with the visitor's cookies (cross-site WebSocket hijacking).


def _origin_parts(origin: str) -> tuple[str, str] | None:
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.hostname:
        return None
    default_port = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    try:
        port = parts.port or default_port
    except ValueError:
        return None
    return parts.scheme, f"{parts.hostname}:{port}"


_WILDCARD_LABELS = r"[a-z0-9-]+(?:\.[a-z0-9-]+)*"


def _pattern_matches(pattern: str, origin: str) -> bool:
    """Whether ``origin`` matches one allow-list entry.

    ``*`` alone allows every origin.  ``https://*.example.com`` allows any
    subdomain (at any depth) of example.com over https, but not example.com
    itself, and not ``https://example.com.evil.net``.  Other entries are compared
    as (scheme, host, port), so ``https://app.example.com`` equals
    ``https://app.example.com:443``.
    """
    pattern = pattern.strip()
    if pattern == "*":
        return True
    if "*" in pattern:
        regex = re.escape(pattern.lower().rstrip("/")).replace(r"\*", _WILDCARD_LABELS)
        return re.fullmatch(regex, origin.strip().lower().rstrip("/")) is not None
    want, got = _origin_parts(pattern), _origin_parts(origin)
    return want is not None and want == got


def check_origin(
    origin: str | None,
    host: str | None,
    allowed: list[str],
    *,
    allow_missing: bool = True,
    scheme: str = "http",
) -> str | None:
    """Return None when the handshake may proceed, else the reason it is refused.

    Allowed: a request without ``Origin`` (if ``allow_missing``), an ``Origin``
    whose host and port equal the request's ``Host``, or one matching an entry of
    ``allowed`` (exact origins, ``https://*.example.com`` wildcards, or ``*``).
    The reason is safe to log: it quotes at most 100 characters of the origin.
    """
    if origin is None or origin == "":
        return None if allow_missing else "missing Origin header"
    if origin == "null":
        return "opaque origin (null) not allowed"
    parts = _origin_parts(origin)
    if parts is None:
        return "malformed Origin header"
    if host:
        http_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        own = _origin_parts(f"{http_scheme}://{host}")
        if own is not None and own[1] == parts[1]:
            return None
    if any(_pattern_matches(pattern, origin) for pattern in allowed):
        return None
    return f"origin {origin[:100]} not allowed"


#: Bind addresses that mean "every interface".
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "[::]", "*"})

_NAME = re.compile(r"[a-z0-9_.\-]+|[0-9a-f:.]+")


def host_name(host_header: str) -> str | None:
    """The name of a ``Host`` header value: lower case, without port, brackets or a
    trailing dot (``Example.COM:80`` -> ``example.com``, ``[::1]:8000`` -> ``::1``).
    None when the value is not a host name or address with an optional port."""
    value = host_header.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not _port_ok(rest) or ":" not in name:
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not _port_ok(":" + port):
            return None
    name = name.removesuffix(".")
    if not name or _NAME.fullmatch(name) is None:
        return None
    return name


def _port_ok(rest: str) -> bool:
    return rest == "" or (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_name(name: str) -> bool:
    """Whether ``name`` (as :func:`host_name` returns it) can only mean this machine."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    return address is not None and address.is_loopback


def is_local_address(address: str | None) -> bool:
    """Whether a connection's local (server-side) address is loopback, or a Unix socket
    path (only this machine, typically a reverse proxy, can reach it).  Anything else,
    unknown included (None; Starlette's test client says ``testserver``), is not."""
    if not address:
        return False
    if address.startswith(("/", "\0", "@")):
        return True
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def _in_process(local_address: str | None) -> bool:
    """Whether the request reached the app over no network socket: the ASGI server gave
    no local address, or a name that is neither an address nor a socket path (Starlette's
    ``TestClient`` says ``testserver``).  uvicorn always gives one of the two."""
    if not local_address:
        return True
    return not is_local_address(local_address) and _ip(local_address) is None


def trusts_loopback(client_host: str | None, host_header: str | None) -> bool:
    """The rule for loopback trust: a loopback peer that names the server by a loopback
    name (or sends no ``Host``: browsers always send one)."""
    peer = _ip(client_host)
    if not (client_host == "localhost" or (peer is not None and peer.is_loopback)):
        return False
    if host_header is None or host_header == "":
        return True
    name = host_name(host_header)
    return name is not None and is_loopback_name(name)


def _entry_name(entry: str) -> str | None:
    """A name from an ``allowed_hosts`` entry (``*``, ``*.example.com``, ``example.com:8000``...)."""
    entry = entry.strip().lower()
    if entry in ("*", ""):
        return entry or None
    wildcard = entry.startswith("*.")
    name = host_name(entry[2:] if wildcard else entry)
    if name is None:
        return None
    return "*." + name if wildcard else name


def _origin_host(origin: str) -> str | None:
    origin = origin.strip().lower()
    if origin == "*":
        return "*"
    wildcard = "://*." in origin
    parts = urlsplit(origin.replace("://*.", "://", 1) if wildcard else origin)
    if not parts.hostname:
        return None
    return ("*." if wildcard else "") + parts.hostname


class HostPolicy:
    """The ``Host`` allow-list of one server (built once from its settings)."""

    __slots__ = ("_verdicts", "any_name", "explicit", "names", "suffixes")

    def __init__(
        self, allowed_hosts: Sequence[str], *, bind_host: str = "", allowed_origins: Sequence[str] = ()
    ) -> None:
        self.explicit = bool(allowed_hosts)
        entries = [_entry_name(entry) for entry in allowed_hosts]
        if not self.explicit:
            if bind_host.strip().lower() not in WILDCARD_ADDRESSES:
                entries.append(_entry_name(bind_host))
            entries.extend(_origin_host(origin) for origin in allowed_origins)
        names = {name for name in entries if name}
        self.any_name = "*" in names
        self.suffixes = tuple(sorted(name[1:] for name in names if name.startswith("*.")))
        self.names = frozenset(name for name in names if not name.startswith("*"))
        # refusal() per (Host, local address): a handshake asks again for the same few
        # pairs, and parsing costs about as much as the rest of the handshake's checks.
        self._verdicts: dict[tuple[str, str | None], str | None] = {}

    @classmethod
    def for_settings(cls, settings: Settings) -> HostPolicy:
        """The policy of ``settings`` (built once per distinct configuration)."""
        key = (tuple(settings.allowed_hosts), settings.host, tuple(settings.allowed_origins))
        policy = _policies.get(key)
        if policy is None:
            if len(_policies) >= 64:
                _policies.clear()
            policy = _policies[key] = cls(key[0], bind_host=key[1], allowed_origins=key[2])
        return policy

    def allows_name(self, name: str) -> bool:
        return (
            self.any_name
            or is_loopback_name(name)
            or name in self.names
            or any(name.endswith(suffix) for suffix in self.suffixes)
        )

    def refusal(self, host_header: str | None, local_address: str | None) -> str | None:
        """None when a request with this ``Host``, received on ``local_address`` (the
        server side of the connection), may proceed; else the reason (safe to log)."""
        if host_header is None or host_header == "":
            return None  # not a browser: DNS rebinding needs one
        key = (host_header, local_address)
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        verdict = self._decide(host_header, local_address)
        if len(self._verdicts) >= _VERDICTS_KEPT:
            self._verdicts.clear()  # many distinct names (a scan): bounded, never grows
        self._verdicts[key] = verdict
        return verdict

    def _decide(self, host_header: str, local_address: str | None) -> str | None:
        name = host_name(host_header)
        if name is None:
            return "malformed Host header"
        if self.allows_name(name):
            return None
        if not self.explicit and (_ip(name) is not None or _in_process(local_address)):
            # An address literal cannot be rebound (the attack needs a name the attacker's
            # DNS answers for); a request that came over no socket cannot be a browser's.
            return None
        return f"Host {name[:100]} not allowed (set HERALD_ALLOWED_HOSTS)"


_policies: dict[tuple[tuple[str, ...], str, tuple[str, ...]], HostPolicy] = {}

#: Host verdicts a policy remembers (see :meth:`HostPolicy.refusal`).
_VERDICTS_KEPT = 1024


class Refusal(NamedTuple):
    """Why a WebSocket handshake is refused: ``kind`` counts it (``host``, ``origin``),
    ``reason`` is logged."""

    kind: str
    reason: str


def handshake_refusal(
    settings: Settings, *, host: str | None, origin: str | None, local_address: str | None, scheme: str
) -> Refusal | None:
    """The checks every WebSocket route makes before accept, on both serving drivers:
    the ``Host`` allow-list, then the ``Origin`` allow-list (same origin as ``Host``, or
    listed in ``allowed_origins``).  None: the handshake may proceed."""
    reason = HostPolicy.for_settings(settings).refusal(host, local_address)
    if reason is not None:
        return Refusal("host", reason)
    reason = check_origin(
        origin, host, settings.allowed_origins, allow_missing=settings.allow_missing_origin, scheme=scheme
    )
    if reason is not None:
        return Refusal("origin", reason)
    return None


__all__ = [
    "HostPolicy",
    "Refusal",
    "check_origin",
    "handshake_refusal",
    "host_name",
    "is_local_address",
    "is_loopback_name",
    "trusts_loopback",
]
