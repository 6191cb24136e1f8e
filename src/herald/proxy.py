"""Proxy hooks: the app's backend decides over HTTP what a client may do.

For each event whose URL the settings name (``proxy_connect_url``,
``proxy_refresh_url``, ``proxy_subscribe_url``, ``proxy_sub_refresh_url``,
``proxy_publish_url``, ``proxy_rpc_url``; per namespace ``proxy_subscribe``,
``proxy_publish``, ``proxy_sub_refresh``), :func:`install_proxy` registers a hook
(:mod:`herald.hooks`) that POSTs a JSON body describing the client and the command
to the backend and turns the answer into what an in-process hook would do: return
normally (allow, perhaps with an override), raise ``CommandError`` (deny: an error
reply), or raise ``DisconnectError`` (close the connection).  Registered before any
app hook, the proxy is asked first; the access policy (:mod:`herald.policy`) runs
it where it runs every ``subscribe`` hook.

The contract (request body, answers, codes) is docs/backends.md.  In short,
the backend answers HTTP 200 with one JSON object::

    {"result": {...}}                               allow (the result may override)
    {"error": {"code": 110, "message": "..."}}      deny with an error code
    {"disconnect": {"code": 4501, "reason": "..."}}  close the connection

Anything else (no answer in ``proxy_timeout``, a refused connection, another HTTP
status, a body that is not such an object, a field of the wrong type) denies: error
100 with the message ``proxy timeout``, ``proxy unavailable`` or ``proxy answer
invalid``; a call beyond ``proxy_max_in_flight`` is refused at once with ``proxy
busy``.  Nothing fails open.

Every call ends in one outcome (:data:`PROXY_OUTCOMES`), counted in plain ints
(:attr:`HttpProxy.calls`, :attr:`HttpProxy.in_flight`) that :mod:`herald.metrics`
copies at scrape time; each call that reached the backend reports its duration to
:attr:`HttpProxy.observe_duration` (set by :mod:`herald.metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .codes import ErrorCode
from .exceptions import CommandError, DisconnectError
from .hooks import ExpiresAt

if TYPE_CHECKING:
    from .context import ClientContext
    from .node import Node

logger = logging.getLogger("herald.proxy")

#: The events a backend can be asked about, each with its ``proxy_<event>_url`` setting.
PROXY_EVENTS = ("connect", "refresh", "subscribe", "sub_refresh", "publish", "rpc")
#: The events a namespace can send elsewhere (or nowhere) with ``proxy_<event>``.
NAMESPACE_EVENTS = ("subscribe", "publish", "sub_refresh")
#: How a call ends, one of these per call: the backend ``allowed`` (a ``result``),
#: ``denied`` (an ``error``, or a refresh's ``expired``), asked for a ``disconnect``;
#: or gave no usable answer (``timeout``, ``unavailable``, ``invalid``); or the call
#: was refused before it reached the backend (``busy``).
PROXY_OUTCOMES = ("allowed", "denied", "disconnect", "timeout", "unavailable", "invalid", "busy")

#: The largest answer read from a backend; a longer one is an invalid answer.
MAX_ANSWER_BYTES = 1024 * 1024

#: The messages of the error 100 a failed call gives (docs/backends.md).
BUSY = "proxy busy"
TIMEOUT = "proxy timeout"
UNAVAILABLE = "proxy unavailable"
INVALID = "proxy answer invalid"

#: The error code of a backend's refusal without a code, per event.
DEFAULT_DENY_CODE: dict[str, ErrorCode] = {
    "connect": ErrorCode.UNAUTHORIZED,
    "refresh": ErrorCode.UNAUTHORIZED,
}

#: Error codes a backend may answer besides Herald's own: the application's range.
APP_ERROR_CODES = range(1000, 2000)

#: Seconds between two warnings about failed calls of one event (a backend outage
#: fails every call; one line per call would flood the log).
_WARNING_INTERVAL = 5.0


class ProxyFailure(CommandError):
    """A backend call that gave no usable answer: error 100 with one of the messages
    above.  ``detail`` (logged, never sent to the client) says what happened."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)
        self.detail = detail


# ---------------------------------------------------------------- answers


class _Answer(BaseModel):
    # Strict and closed: a typo ("expire_at") or a wrong type is an invalid answer,
    # which denies, rather than a silently ignored override.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_A = TypeVar("_A", bound=_Answer)


class ErrorAnswer(_Answer):
    """``{"error": ...}``: deny with ``code`` (Herald's error codes, or 1000-1999)."""

    code: int | None = None
    message: str = Field(default="", max_length=512)

    @field_validator("code")
    @classmethod
    def _known_code(cls, code: int | None) -> int | None:
        if code is not None and code not in ErrorCode._value2member_map_ and code not in APP_ERROR_CODES:
            raise ValueError("an error code of Herald's protocol (100-121) or of the app (1000-1999)")
        return code


class DisconnectAnswer(_Answer):
    """``{"disconnect": ...}``: close the connection with ``code`` (4000-4999)."""

    code: int = Field(default=4501, ge=4000, le=4999)
    reason: str = Field(default="disconnected by the backend", max_length=100)


class ProxyAnswer(_Answer):
    """The whole answer: at most one of ``result``, ``error`` and ``disconnect``
    (``{}`` allows, as an empty ``result``)."""

    result: dict[str, Any] | None = None
    error: ErrorAnswer | None = None
    disconnect: DisconnectAnswer | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> ProxyAnswer:
        if len(self.model_fields_set & {"result", "error", "disconnect"}) > 1:
            raise ValueError("answer with one of result, error or disconnect")
        return self


class ConnectResult(_Answer):
    """What a ``connect`` answer may set: the user id, its info, and the expiry."""

    user: str | None = Field(default=None, max_length=255)
    info: Any = None
    expires_at: float | None = Field(default=None, gt=0)


class RefreshResult(_Answer):
    """A ``refresh``/``sub_refresh`` answer: the new expiry, or ``expired``."""

    expires_at: float | None = Field(default=None, gt=0)
    expired: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> RefreshResult:
        if (self.expires_at is None) != self.expired:
            raise ValueError("answer with expires_at or with expired: true")
        return self


class SubscribeResult(_Answer):
    expires_at: float | None = Field(default=None, gt=0)


class DataResult(_Answer):
    """A ``publish`` answer (``data`` replaces the publication's) or an ``rpc`` one."""

    data: Any = None


# ---------------------------------------------------------------- the proxy


class HttpProxy:
    """The backend calls of one node: one pooled HTTP client, a bound on calls in
    flight, and the hooks :meth:`install` registers.

    What the metrics need is kept in plain numbers on the call path (``calls``,
    ``in_flight``); only the duration goes to ``observe_duration`` as it is measured.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        settings = node.settings
        self.urls: dict[str, str | None] = {e: getattr(settings, f"proxy_{e}_url") for e in PROXY_EVENTS}
        self.timeout = settings.proxy_timeout
        self.max_in_flight = settings.proxy_max_in_flight
        self.header_names = frozenset(settings.proxy_headers)
        self.cookie_names = frozenset(settings.proxy_cookies)
        #: Calls sent to the backend and not yet over (answered, failed or timed out).
        self.in_flight = 0
        #: Calls by (event, outcome), one outcome of :data:`PROXY_OUTCOMES` per call.
        self.calls: dict[tuple[str, str], int] = {}
        #: Called with (event, seconds) once per call that reached the backend (every
        #: outcome but ``busy``): the time from sending the request to its answer, its
        #: failure or its timeout.  Set by herald.metrics.
        self.observe_duration: Callable[[str, float], None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._warned: dict[str, float] = {}

    # ------------------------------------------------------------ set-up

    def events(self) -> list[str]:
        """The events this node asks a backend about: a node URL, or a namespace's own."""
        namespaces = self.node.settings.namespaces.values()
        return [
            event
            for event in PROXY_EVENTS
            if self.urls[event] is not None
            or (
                event in NAMESPACE_EVENTS
                and any(isinstance(getattr(o, f"proxy_{event}"), str) for o in namespaces)
            )
        ]

    def install(self) -> list[str]:
        """Register a hook for each configured event on the node; returns the events."""
        hooks: dict[str, Callable[..., Awaitable[Any]]] = {
            "connect": self.on_connect,
            "refresh": self.on_refresh,
            "subscribe": self.on_subscribe,
            "sub_refresh": self.on_sub_refresh,
            "publish": self.on_publish,
            "rpc": self.on_rpc,
        }
        events = self.events()
        for event in events:
            self.node.hooks.add(event, hooks[event])
        return events

    async def close(self) -> None:
        """Close the HTTP client (and its pooled connections)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        """The pooled client of the running loop (made on first use: a node may be built
        before its loop runs)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(
                    max_connections=self.max_in_flight,
                    max_keepalive_connections=min(self.max_in_flight, 100),
                ),
                follow_redirects=False,
                trust_env=False,  # the backend is the app's own: no HTTP(S)_PROXY detour
            )
            self._client_loop = loop
        return self._client

    # ------------------------------------------------------------ hooks

    async def on_connect(self, ctx: ClientContext) -> ExpiresAt | None:
        url = self.urls["connect"]
        assert url is not None
        result = await self.call("connect", url, ctx, self.body(ctx, name=ctx.name), ConnectResult)
        if result.user is not None:
            ctx.user = result.user
        if "info" in result.model_fields_set:
            ctx.info = result.info
        return ExpiresAt(result.expires_at) if result.expires_at is not None else None

    async def on_refresh(self, ctx: ClientContext) -> ExpiresAt:
        url = self.urls["refresh"]
        assert url is not None
        return self._renewal(await self.call("refresh", url, ctx, self.body(ctx), RefreshResult))

    async def on_subscribe(self, ctx: ClientContext, channel: str) -> ExpiresAt | None:
        url = self.namespace_url("subscribe", channel)
        if url is None:
            return None
        result = await self.call("subscribe", url, ctx, self.body(ctx, channel=channel), SubscribeResult)
        return ExpiresAt(result.expires_at) if result.expires_at is not None else None

    async def on_sub_refresh(self, ctx: ClientContext, channel: str) -> ExpiresAt | None:
        url = self.namespace_url("sub_refresh", channel)
        if url is None:
            return None
        answer = await self.call("sub_refresh", url, ctx, self.body(ctx, channel=channel), RefreshResult)
        return self._renewal(answer)

    async def on_publish(self, ctx: ClientContext, channel: str, data: Any) -> Any:
        url = self.namespace_url("publish", channel)
        if url is None:
            return None
        body = self.body(ctx, channel=channel, data=data)
        return (await self.call("publish", url, ctx, body, DataResult)).data

    async def on_rpc(self, ctx: ClientContext, method: str, params: Any) -> Any:
        url = self.urls["rpc"]
        assert url is not None
        body = self.body(ctx, method=method, data=params)
        return (await self.call("rpc", url, ctx, body, DataResult)).data

    @staticmethod
    def _renewal(result: RefreshResult) -> ExpiresAt:
        if result.expired:
            raise CommandError(ErrorCode.TOKEN_EXPIRED, "expired")
        assert result.expires_at is not None
        return ExpiresAt(result.expires_at)

    def namespace_url(self, event: str, channel: str) -> str | None:
        """The endpoint asked about ``channel`` for ``event`` (None: not asked)."""
        choice = getattr(self.node.namespace(channel), f"proxy_{event}")
        if choice is False:
            return None
        if isinstance(choice, str):
            return choice
        return self.urls[event]

    # ------------------------------------------------------------ the call

    def body(self, ctx: ClientContext, **fields: Any) -> dict[str, Any]:
        """The request body: who the client is, then the event's own ``fields``."""
        return {
            "client": ctx.client,
            "user": ctx.user,
            "transport": "websocket",
            "protocol": "1",
            "encoding": "json",
            "remote_addr": ctx.client_ip,
            **fields,
        }

    def forwarded_headers(self, ctx: ClientContext) -> list[tuple[str, str]]:
        """The handshake's headers in ``proxy_headers`` and a ``Cookie`` header with only
        the cookies in ``proxy_cookies``; nothing else of the client reaches the backend."""
        headers = [("content-type", "application/json")]
        if not (self.header_names or self.cookie_names):
            return headers
        cookies: list[str] = []
        for raw_name, raw_value in ctx.handshake.headers:
            name = bytes(raw_name).decode("latin-1").lower()
            if name in self.header_names:
                headers.append((name, bytes(raw_value).decode("latin-1")))
            elif name == "cookie" and self.cookie_names:
                cookies.extend(_pick_cookies(bytes(raw_value).decode("latin-1"), self.cookie_names))
        if cookies:
            headers.append(("cookie", "; ".join(cookies)))
        return headers

    async def call(
        self, event: str, url: str, ctx: ClientContext, body: dict[str, Any], model: type[_A]
    ) -> _A:
        """POST ``body`` to ``url``; the answer's ``result`` (``{}`` when absent) as ``model``.

        Raises ``CommandError`` for an ``error`` answer, ``DisconnectError`` for a
        ``disconnect`` one, and :class:`ProxyFailure` when there is no usable answer
        (a ``result`` that ``model`` refuses included).  Counts the call
        once, under its outcome, and reports its duration unless it was ``busy``.
        """
        if self.in_flight >= self.max_in_flight:
            raise self._failed(event, ctx, "busy", BUSY, f"{self.in_flight} calls in flight")
        self.in_flight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                status, raw = await self._post(url, ctx, body)
        except (TimeoutError, httpx.TimeoutException):
            raise self._failed(event, ctx, "timeout", TIMEOUT, f"no answer in {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise self._failed(
                event, ctx, "unavailable", UNAVAILABLE, f"{type(exc).__name__}: {exc}"
            ) from None
        except _TooLarge:
            raise self._failed(
                event, ctx, "invalid", INVALID, f"answer over {MAX_ANSWER_BYTES} bytes"
            ) from None
        finally:
            self.in_flight -= 1
            observe = self.observe_duration
            if observe is not None:
                observe(event, time.perf_counter() - started)
        if status != 200:
            outcome, message = ("unavailable", UNAVAILABLE) if status >= 500 else ("invalid", INVALID)
            raise self._failed(event, ctx, outcome, message, f"HTTP {status}")
        try:
            answer = ProxyAnswer.model_validate(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise self._failed(event, ctx, "invalid", INVALID, _short(exc)) from None
        if answer.disconnect is not None:
            self._count(event, "disconnect")
            raise DisconnectError(answer.disconnect.code, answer.disconnect.reason)
        if answer.error is not None:
            self._count(event, "denied")
            code = answer.error.code
            if code is None:
                code = DEFAULT_DENY_CODE.get(event, ErrorCode.PERMISSION_DENIED)
            # An app code (1000-1999) goes to the client as it is, like a hook's own.
            raise CommandError(code, answer.error.message or None)  # type: ignore[arg-type]
        try:
            parsed = model.model_validate(answer.result or {})
        except ValidationError as exc:
            raise self._failed(event, ctx, "invalid", INVALID, _short(exc)) from None
        # A refresh answered {"result": {"expired": true}} is that refresh's deny.
        expired = isinstance(parsed, RefreshResult) and parsed.expired
        self._count(event, "denied" if expired else "allowed")
        return parsed

    async def _post(self, url: str, ctx: ClientContext, body: dict[str, Any]) -> tuple[int, bytes]:
        content = orjson.dumps(body)
        request = self._http().build_request(
            "POST", url, content=content, headers=self.forwarded_headers(ctx), timeout=self.timeout
        )
        response = await self._http().send(request, stream=True)
        try:
            if response.status_code != 200:
                return response.status_code, b""
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise _TooLarge
                chunks.append(chunk)
            return 200, b"".join(chunks)
        finally:
            await response.aclose()

    def _count(self, event: str, outcome: str) -> None:
        key = (event, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1

    def _failed(
        self, event: str, ctx: ClientContext, outcome: str, message: str, detail: str
    ) -> ProxyFailure:
        """Count and log (at most one warning per event every few seconds) a failed call."""
        self._count(event, outcome)
        now = time.monotonic()
        if now - self._warned.get(event, -_WARNING_INTERVAL) >= _WARNING_INTERVAL:
            self._warned[event] = now
            logger.warning(
                "proxy %s call failed (%s): %s; denied",
                event,
                outcome,
                detail,
                extra={"conn": ctx.client, "user": ctx.user},
            )
        return ProxyFailure(message, detail)


class _TooLarge(Exception):
    """An answer over :data:`MAX_ANSWER_BYTES`."""


def _short(exc: Exception) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _pick_cookies(header: str, names: frozenset[str]) -> Sequence[str]:
    """The ``name=value`` pairs of a ``Cookie`` header whose name is in ``names``, as sent."""
    picked = []
    for pair in header.split(";"):
        name, equals, _ = pair.strip().partition("=")
        if equals and name in names:
            picked.append(pair.strip())
    return picked


def install_proxy(node: Node) -> HttpProxy | None:
    """Register the proxy hooks the node's settings configure; None when there are none."""
    proxy = HttpProxy(node)
    events = proxy.install()
    if not events:
        return None
    logger.info("proxy hooks: %s", ", ".join(events))
    return proxy


__all__ = [
    "BUSY",
    "INVALID",
    "MAX_ANSWER_BYTES",
    "PROXY_EVENTS",
    "PROXY_OUTCOMES",
    "TIMEOUT",
    "UNAVAILABLE",
    "HttpProxy",
    "ProxyFailure",
    "install_proxy",
]
