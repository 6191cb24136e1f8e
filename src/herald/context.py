"""What Herald knows about a client: its WebSocket handshake and its :class:`ClientContext`.

A :class:`Handshake` is transport-neutral: the native driver's protocol object is one
(no copy is made per connection), and :class:`AsgiHandshake` reads one out of an ASGI
scope.  Hooks and RPC handlers see the client as a :class:`ClientContext` built from
it; ``ctx.scope`` still gives an ASGI-style scope for code that wants one (FastAPI
dependencies, see :func:`herald.transports.fastapi.run_dependency`), built on first use
on the native path.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from .auth import TokenClaims


class Handshake(Protocol):
    """The request that opened a WebSocket, as every driver can describe it."""

    @property
    def path(self) -> str:
        """The path the route was found at."""

    @property
    def query_string(self) -> bytes:
        """The raw query string (without ``?``)."""

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        """The request headers: lower-case names, raw values."""

    @property
    def client(self) -> tuple[str, int] | None:
        """The client's address (the proxy-forwarded one when the proxy is trusted)."""

    @property
    def subprotocols(self) -> Sequence[str]:
        """The subprotocols the client offered, in its order."""

    @property
    def scope(self) -> MutableMapping[str, Any]:
        """An ASGI scope of the handshake (the real one under ASGI)."""


class ScopeHandshake:
    """The :class:`Handshake` attributes (and the address properties a route's socket
    has) read from ``self.scope``, an ASGI scope: a WebSocket's, or an HTTP request's
    for the HTTP transports.  Slot-less, so stream transports can mix it in."""

    __slots__ = ()

    scope: MutableMapping[str, Any]

    @property
    def path(self) -> str:
        return str(self.scope.get("path", ""))

    @property
    def query_string(self) -> bytes:
        raw = self.scope.get("query_string", b"")
        return bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw).encode("latin-1")

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        headers: Sequence[tuple[bytes, bytes]] = self.scope.get("headers", ())
        return headers

    @property
    def client(self) -> tuple[str, int] | None:
        client = self.scope.get("client")
        return (str(client[0]), int(client[1] or 0)) if client else None

    @property
    def subprotocols(self) -> Sequence[str]:
        offered: Sequence[str] = self.scope.get("subprotocols") or ()
        return offered

    @property
    def scheme(self) -> str:
        """``ws``/``wss`` (a WebSocket) or ``http``/``https`` (the Origin check takes both)."""
        return str(self.scope.get("scheme", "ws"))

    @property
    def local_address(self) -> str | None:
        """The server side of the connection: its IP (None: a Unix socket or unknown)."""
        server = self.scope.get("server")
        return str(server[0]) if server else None

    @property
    def client_ip(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else "unknown"

    @property
    def remote(self) -> str:
        client = self.scope.get("client")
        return f"{client[0]}:{client[1]}" if client else "unknown"

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


class AsgiHandshake(ScopeHandshake):
    """A :class:`Handshake` read from an ASGI scope (no copy is made)."""

    __slots__ = ("scope",)

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        self.scope = scope


def header_value(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    """The first value of header ``name`` (any case) in ``headers``, decoded as Latin-1."""
    wanted = name.lower().encode("latin-1")
    for key, value in headers:
        if key == wanted:
            return bytes(value).decode("latin-1")
    return None


def _no_handshake() -> Handshake:
    return AsgiHandshake({})


@dataclass(slots=True)
class ClientContext:
    """What hooks and RPC handlers know about a client.

    ``on_connect`` hooks may set ``user`` and ``info``.  ``handshake`` is the request
    that opened the WebSocket (headers, cookies, query string, client address);
    ``scope`` is it as an ASGI scope.
    """

    client: str
    user: str = ""
    info: Any = None
    token: str | None = None
    handshake: Handshake = field(default_factory=_no_handshake)
    name: str | None = None
    #: The verified connection token's claims (None for anonymous or hook-authenticated clients).
    claims: TokenClaims | None = None

    @property
    def scope(self) -> MutableMapping[str, Any]:
        """The handshake as an ASGI scope (the server's own under ASGI; on the native
        path one is built the first time it is asked for)."""
        return self.handshake.scope

    def header(self, name: str) -> str | None:
        return header_value(self.handshake.headers, name)

    def cookie(self, name: str) -> str | None:
        """A cookie sent with the handshake (browsers send the site's cookies on WebSockets)."""
        raw = self.header("cookie")
        if not raw:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel is not None else None

    def query(self, name: str) -> str | None:
        """A query parameter of the handshake URL (``/connect?token=...``): the first
        non-empty value of ``name``, decoded as in a form (``%XX``, ``+``).

        Any number of other parameters is fine: the scan is linear in the query string,
        which the server already bounds with the request head.
        """
        text = self.handshake.query_string.decode("latin-1")
        for part in text.split("&"):
            key, equals, value = part.partition("=")
            if equals and value and unquote_plus(key) == name:
                return unquote_plus(value)
        return None

    @property
    def client_ip(self) -> str:
        """The client's IP (the proxy-forwarded one when the proxy is trusted)."""
        client = self.handshake.client
        return str(client[0]) if client else ""


__all__ = ["AsgiHandshake", "ClientContext", "Handshake", "header_value"]
