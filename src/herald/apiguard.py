"""What Herald's HTTP routes check before a handler runs, as plain ASGI.

FastAPI reads and parses a route's body before it resolves the route's
dependencies, so an API-key check written as a dependency runs only after the
whole body is in memory, however large, and however slowly it arrives.  Herald's
routes therefore check in this order, before the body is touched:

1. ``Host`` against the allow-list (400; see :mod:`herald.hosts`);
2. the API key (401 wrong or missing key; 403 no key configured and not a
   loopback client naming the server by a loopback name), for ``/api``;
3. the body: a declared ``Content-Length`` over the limit is refused at once
   (413), a streamed body is counted as it arrives (413 once over), and the whole
   body must arrive within ``api_body_timeout`` seconds (408).

Refusals are JSON (``{"detail": "..."}``, the shape of FastAPI's errors) and
close the connection, so that an unread body is never read for nothing.

:func:`guarded_route_class` gives an ``APIRouter`` these checks for each of its
routes, so they hold wherever the router is included;
:class:`HostGuardMiddleware` checks ``Host`` on every other HTTP request of the
app ``herald serve`` runs, and keeps HTML pages out of frames.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import api_key_allows
from .hosts import HostPolicy

if TYPE_CHECKING:
    from .config import Settings

#: The API body limit when ``max_api_body_bytes`` is not set: this many times
#: ``max_message_size`` (a publish body is the message plus its envelope) ...
BODY_LIMIT_FACTOR = 4
#: ... and at least this much (broadcast bodies list up to 1000 channels).
MIN_BODY_LIMIT = 1024 * 1024

#: Headers that keep a page out of other sites' frames (clickjacking).
FRAME_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
]
FRAME_HEADERS_DICT = {name.decode(): value.decode() for name, value in FRAME_HEADERS}


def body_limit(settings: Settings) -> int:
    """The largest body the HTTP API reads (``max_api_body_bytes``, or its default)."""
    if settings.max_api_body_bytes is not None:
        return settings.max_api_body_bytes
    return max(BODY_LIMIT_FACTOR * settings.max_message_size, MIN_BODY_LIMIT)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) in ``scope``, decoded as Latin-1."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def local_address(scope: Scope) -> str | None:
    """The server side of the connection (None: a Unix socket or unknown)."""
    server = scope.get("server")
    return str(server[0]) if server else None


def supplied_key(scope: Scope) -> str | None:
    """The API key a request carries: ``X-API-Key``, or ``Authorization: apikey|bearer KEY``."""
    supplied = header(scope, b"x-api-key")
    if supplied is None:
        scheme, _, value = (header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() in ("apikey", "bearer"):
            supplied = value.strip()
    return supplied


async def respond(send: Send, status: int, detail: str, *, close: bool = True) -> None:
    """A JSON error response (``{"detail": ...}``); ``close`` ends the connection after it."""
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BadRequest(Exception):
    """A request Herald refuses before handling it: ``status`` and ``detail`` answer it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def read_body(receive: Receive, scope: Scope, limit: int, timeout: float) -> bytes | None:
    """The request body, bounded in size (413, before reading when ``Content-Length`` says
    so) and time (408); None if the client left.  Raises :class:`BadRequest`."""
    too_large = f"request body larger than {limit} bytes (max_api_body_bytes)"
    declared = header(scope, b"content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(400, "malformed Content-Length")
        if int(declared) > limit:
            raise BadRequest(413, too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None  # http.disconnect
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BadRequest(413, too_large)
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BadRequest(408, f"request body not received within {timeout:g} s (api_body_timeout)") from None


class HttpGate:
    """The checks of one Herald's HTTP routes (reads its settings on every request)."""

    __slots__ = ("settings",)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def host_refusal(self, scope: Scope) -> str | None:
        hosts = HostPolicy.for_settings(self.settings)
        return hosts.refusal(header(scope, b"host"), local_address(scope))

    def key_refusal(self, scope: Scope) -> tuple[int, str] | None:
        """None when the request may use the API; else its status and detail."""
        key = self.settings.api_key
        client = scope.get("client")
        if api_key_allows(
            key, supplied_key(scope), str(client[0]) if client else None, header(scope, b"host")
        ):
            return None
        if key is None:
            return (
                403,
                "HERALD_API_KEY is not set: the API answers only from loopback (to a loopback "
                "Host name); set a key to use it from other hosts",
            )
        return 401, "missing or wrong API key"

    async def admit(self, scope: Scope, receive: Receive, send: Send, *, require_key: bool) -> Receive | None:
        """Check a request before its handler runs.  Returns the ``receive`` the handler
        must use (the body, read within its bounds, then the connection's own), or None
        when the request was answered here."""
        refusal = self.host_refusal(scope)
        if refusal is not None:
            await respond(send, 400, refusal)
            return None
        if require_key:
            denied = self.key_refusal(scope)
            if denied is not None:
                await respond(send, *denied)
                return None
        if not _has_body(scope):
            return receive
        try:
            body = await read_body(receive, scope, body_limit(self.settings), self.settings.api_body_timeout)
        except BadRequest as exc:
            await respond(send, exc.status, exc.detail)
            return None
        if body is None:
            return None  # the client left
        return _replay(body, receive)


def _has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    if length is not None:
        return length.strip() != "0"
    return header(scope, b"transfer-encoding") is not None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over ``body`` whole, then defers to the connection's."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def guarded_route_class(gate: HttpGate, *, require_key: bool) -> type[APIRoute]:
    """An ``APIRoute`` class whose routes pass ``gate`` before anything else (``Host``,
    the API key when ``require_key``, the body's bounds).  Give it to an ``APIRouter`` as
    ``route_class``: FastAPI keeps a route's class when the router is included elsewhere."""

    class HeraldRoute(APIRoute):
        async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
            admitted = await gate.admit(scope, receive, send, require_key=require_key)
            if admitted is not None:
                await super().handle(scope, admitted, send)

    return HeraldRoute


class HostGuardMiddleware:
    """Pure ASGI: every HTTP request of the app must name an allowed ``Host`` (400
    otherwise), and every HTML response gets :data:`FRAME_HEADERS` (unless it set its own).

    WebSocket handshakes pass through: Herald's WebSocket routes check ``Host`` and
    ``Origin`` themselves, on both serving drivers.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.gate = HttpGate(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.gate.host_refusal(scope)
        if refusal is not None:
            await respond(send, 400, refusal)
            return

        async def send_framed(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[Any] = list(message.get("headers", ()))
                names = {bytes(name).lower() for name, _ in headers}
                content_type = next(
                    (bytes(v) for n, v in headers if bytes(n).lower() == b"content-type"), b""
                )
                if content_type.startswith(b"text/html") and b"x-frame-options" not in names:
                    message = {**message, "headers": [*headers, *FRAME_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_framed)


__all__ = [
    "FRAME_HEADERS",
    "HostGuardMiddleware",
    "HttpGate",
    "body_limit",
    "guarded_route_class",
]
