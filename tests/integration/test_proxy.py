"""Proxy hooks over real sockets: a real FastAPI backend (uvicorn, its own port) decides
for a real Herald server, on both serving drivers (native routes and plain ASGI).

Every event is allowed, denied and overridden; then the failures: a slow backend
(timeout), a backend that is down, one that answers garbage, and more calls than
``proxy_max_in_flight``.  Outcomes are the ones docs/backends.md documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from herald import Herald
from herald.codes import CloseCode, ErrorCode
from herald.config import NamespaceOptions, Settings
from herald.context import ClientContext
from herald.server import create_app
from herald.transports.uvicorn import uvicorn_ws_protocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, async_wait_for, free_port
from .proxy_backend import Backend, Raw, running_backend

pytestmark = pytest.mark.asyncio

PROXY_TIMEOUT = 0.5
MAX_IN_FLIGHT = 2
INTERNAL = int(ErrorCode.INTERNAL)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with running_backend() as backend:
        yield backend


def proxy_settings(backend: Backend, *, native: bool, **overrides: Any) -> Settings:
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    values: dict[str, Any] = {
        "demos": False,
        "native_routes": native,
        "token_refresh_grace": 0.5,
        "proxy_connect_url": backend.url("connect"),
        "proxy_refresh_url": backend.url("refresh"),
        "proxy_subscribe_url": backend.url("subscribe"),
        "proxy_sub_refresh_url": backend.url("sub_refresh"),
        "proxy_publish_url": backend.url("publish"),
        "proxy_rpc_url": backend.url("rpc"),
        "proxy_timeout": PROXY_TIMEOUT,
        "proxy_max_in_flight": MAX_IN_FLIGHT,
        "proxy_headers": ["authorization", "x-trace"],
        "proxy_cookies": ["session"],
        "namespaces": {
            "": NamespaceOptions(),
            "px": NamespaceOptions(),
            # Never asked about: the in-process hooks alone decide.
            "open": NamespaceOptions(proxy_subscribe=False, proxy_publish=False, proxy_sub_refresh=False),
            # Asked at another endpoint.
            "other": NamespaceOptions(
                proxy_subscribe=backend.url("subscribe", "/other"),
                proxy_publish=backend.url("publish", "/other"),
            ),
            # Its endpoint is down.
            "down": NamespaceOptions(proxy_subscribe=dead, proxy_publish=dead),
        },
    }
    values.update(overrides)
    return Settings(**values)


def serve(herald: Herald) -> ThreadServer:
    config = herald.settings
    return ThreadServer(
        create_app(herald=herald),
        ws=uvicorn_ws_protocol(config.ws_impl, config.fast_path),
        http=HeaderTimeoutHTTPProtocol,
        ws_max_size=config.max_message_size,
    ).start()


@dataclass
class Env:
    server: ThreadServer
    herald: Herald
    backend: Backend
    native: bool

    def url(self) -> str:
        return self.server.ws("/connect")


@pytest.fixture(scope="module", params=["native", "asgi"])
def env_server(request: pytest.FixtureRequest, backend: Backend) -> Iterator[Env]:
    native = request.param == "native"
    herald = Herald(proxy_settings(backend, native=native))

    @herald.rpc("local")
    async def local(ctx: ClientContext) -> str:
        return f"in-process for {ctx.user}"

    server = serve(herald)
    try:
        yield Env(server, herald, backend, native)
    finally:
        server.stop()


@pytest.fixture
def env(env_server: Env) -> Iterator[Env]:
    env_server.backend.reset()
    yield env_server
    env_server.backend.reset()


@pytest.fixture
async def clients() -> AsyncIterator[list[ProtocolClient]]:
    opened: list[ProtocolClient] = []
    yield opened
    for client in opened:
        await client.close()


async def opened(
    env: Env, clients: list[ProtocolClient], **connect: Any
) -> tuple[ProtocolClient, dict[str, Any]]:
    """A client that sent connect (with ``connect`` fields); the connect reply."""
    client = await ProtocolClient.open(
        env.url(), connect=False, additional_headers=connect.pop("headers", None)
    )
    clients.append(client)
    reply = await client.call("connect", **connect)
    if "result" in reply:
        client.client_id = reply["result"]["client"]
    return client, reply


async def connected(env: Env, clients: list[ProtocolClient], user: str = "alice") -> ProtocolClient:
    """A client the backend connected as ``user`` (the connect script answers by name)."""
    env.backend.answer("connect", lambda body: {"result": {"user": body.get("name") or ""}})
    client, reply = await opened(env, clients, name=user)
    assert reply["result"]["user"] == user, reply
    return client


@contextlib.asynccontextmanager
async def saturating(
    env: Env, clients: list[ProtocolClient]
) -> AsyncIterator[tuple[list[ProtocolClient], ProtocolClient]]:
    """``MAX_IN_FLIGHT`` clients to hold subscribe calls at the backend (one connection
    runs its commands one at a time: each held call needs its own) and one more; the
    backend holds subscribes, and the proxy waits for them (it must not time them out)."""
    holders = [await connected(env, clients, f"holder{n}") for n in range(MAX_IN_FLIGHT)]
    client = await connected(env, clients)
    env.backend.block("subscribe")
    proxy = env.herald.node.proxy
    assert proxy is not None
    proxy.timeout = 10.0
    try:
        yield holders, client
    finally:
        proxy.timeout = PROXY_TIMEOUT


async def hold_subscribes(env: Env, holders: list[ProtocolClient]) -> list[asyncio.Task[dict[str, Any]]]:
    """Each holder's subscribe, once the backend holds all of them (``saturating``)."""
    held = [
        asyncio.create_task(holder.call("subscribe", channels=[{"channel": "px:held"}], timeout=15))
        for holder in holders
    ]
    await async_wait_for(lambda: env.backend.blocked == len(holders), what="held calls")
    return held


def item_of(reply: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = reply["result"]["channels"][0]
    return item


async def close_of(client: ProtocolClient) -> tuple[int | None, str | None]:
    await asyncio.wait_for(client.closed.wait(), DEFAULT_TIMEOUT)
    return client.ws.close_code, client.ws.close_reason


# ---------------------------------------------------------------- connect


async def test_connect_allowed_sends_the_documented_body(env: Env, clients: list[ProtocolClient]) -> None:
    _, reply = await opened(env, clients, name="tester")
    assert reply["result"]["user"] == ""
    [call] = env.backend.of("connect")
    assert call.body == {
        "client": reply["result"]["client"],
        "user": "",
        "transport": "websocket",
        "protocol": "1",
        "encoding": "json",
        "remote_addr": "127.0.0.1",
        "name": "tester",
    }
    assert call.headers["content-type"] == "application/json"


async def test_connect_override_sets_user_info_and_expiry(env: Env, clients: list[ProtocolClient]) -> None:
    expires = time.time() + 0.6
    env.backend.answer(
        "connect", {"result": {"user": "bob", "info": {"role": "admin"}, "expires_at": expires}}
    )
    env.backend.answer("refresh", {"result": {"expires_at": time.time() + 600}})
    client, reply = await opened(env, clients)
    assert reply["result"]["user"] == "bob"
    # The info reaches publications (and presence) as the connection's own.
    assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": "open:info"}]))
    assert "result" in await client.call("publish", channel="open:info", data="hi")
    publication = await client.push("publication")
    assert publication["info"]["user"] == "bob" and publication["info"]["info"] == {"role": "admin"}
    # The expiry came from the backend: at it, the server asks the refresh endpoint.
    await async_wait_for(lambda: env.backend.of("refresh"), timeout=5, what="refresh call")
    assert env.backend.of("refresh")[0].body["user"] == "bob"
    assert env.backend.of("refresh")[0].body["client"] == reply["result"]["client"]
    # Extended: no refresh push to the client, the connection lives on.
    assert "result" in await client.call("ping")
    assert not any(frame.get("type") == "refresh" for frame in client.frames)


@pytest.mark.parametrize(
    ("answer", "code", "message"),
    [
        ({"error": {"code": 110, "message": "no session"}}, 110, "no session"),
        ({"error": {}}, int(ErrorCode.UNAUTHORIZED), "unauthorized"),  # documented defaults
        ({"error": {"code": 1403, "message": "app says no"}}, 1403, "app says no"),
    ],
)
async def test_connect_denied(
    env: Env, clients: list[ProtocolClient], answer: dict[str, Any], code: int, message: str
) -> None:
    env.backend.answer("connect", answer)
    client, reply = await opened(env, clients)
    assert reply["error"] == {"code": code, "message": message}
    # Not connected: other commands are refused.
    assert (await client.call("ping"))["error"]["code"] == ErrorCode.NOT_CONNECTED


async def test_connect_disconnect_answer_closes(env: Env, clients: list[ProtocolClient]) -> None:
    env.backend.answer("connect", {"disconnect": {"code": 4599, "reason": "banned"}})
    client, reply = await opened(env, clients)
    assert reply["error"]["code"] == ErrorCode.UNAUTHORIZED and reply["error"]["message"] == "banned"
    assert await close_of(client) == (4599, "banned")


# ---------------------------------------------------------------- refresh


@pytest.mark.parametrize(
    ("answer", "close"),
    [
        ({"result": {"expired": True}}, (CloseCode.TOKEN_EXPIRED, "refresh refused: expired")),
        ({"disconnect": {"code": 4502, "reason": "logged out"}}, (4502, "logged out")),
        ({"error": {"code": 110}}, (CloseCode.TOKEN_EXPIRED, "refresh refused: permission denied")),
        (Raw(200, b"nonsense"), (CloseCode.TOKEN_EXPIRED, "refresh refused: proxy answer invalid")),
    ],
)
async def test_refresh_refused_closes(
    env: Env, clients: list[ProtocolClient], answer: Any, close: tuple[int, str]
) -> None:
    env.backend.answer("connect", {"result": {"user": "bob", "expires_at": time.time() + 0.3}})
    env.backend.answer("refresh", answer)
    client, reply = await opened(env, clients)
    assert "result" in reply
    push = await client.push("disconnect", timeout=5)
    assert push["code"] == close[0]
    assert await close_of(client) == close
    assert len(env.backend.of("refresh")) == 1


# ---------------------------------------------------------------- subscribe


async def test_subscribe_allowed_denied_overridden(env: Env, clients: list[ProtocolClient]) -> None:
    client = await connected(env, clients, "alice")

    def decide(body: dict[str, Any]) -> Any:
        if body["channel"] == "px:secret":
            return {"error": {"code": 110, "message": "not for you"}}
        if body["channel"] == "px:short":
            return {"result": {"expires_at": time.time() + 0.3}}
        return {"result": {}}

    env.backend.answer("subscribe", decide)
    env.backend.answer("sub_refresh", {"result": {"expires_at": time.time() + 600}})
    reply = await client.call(
        "subscribe", channels=[{"channel": "px:room"}, {"channel": "px:secret"}, {"channel": "px:short"}]
    )
    room, secret, short = reply["result"]["channels"]
    assert "error" not in room and "error" not in short
    assert secret["error"] == {"code": 110, "message": "not for you"}
    calls = env.backend.of("subscribe")
    assert [c.body["channel"] for c in calls] == ["px:room", "px:secret", "px:short"]
    assert calls[0].body["user"] == "alice" and calls[0].body["client"] == client.client_id
    # The override's expiry: at it the server asks sub_refresh, which extends it.
    await async_wait_for(lambda: env.backend.of("sub_refresh"), timeout=5, what="sub_refresh call")
    call = env.backend.of("sub_refresh")[0]
    assert call.body["channel"] == "px:short" and call.body["user"] == "alice"
    assert "result" in await client.call("publish", channel="px:short", data="still here")
    assert (await client.push("publication"))["data"] == "still here"
    assert not any(frame.get("type") in ("sub_refresh", "unsubscribe") for frame in client.frames)


@pytest.mark.parametrize(
    ("answer", "code", "reason"),
    [
        ({"result": {"expired": True}}, int(ErrorCode.TOKEN_EXPIRED), "expired"),
        ({"error": {"code": 110, "message": "membership ended"}}, 110, "membership ended"),
        (Raw(500, b""), INTERNAL, "proxy unavailable"),
    ],
)
async def test_sub_refresh_refused_ends_the_subscription(
    env: Env, clients: list[ProtocolClient], answer: Any, code: int, reason: str
) -> None:
    client = await connected(env, clients)
    env.backend.answer("subscribe", {"result": {"expires_at": time.time() + 0.3}})
    env.backend.answer("sub_refresh", answer)
    assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": "px:brief"}]))
    push = await client.push("unsubscribe", timeout=5)
    assert push == {"type": "unsubscribe", "channel": "px:brief", "code": code, "reason": reason}
    # The connection stays; the channel no longer delivers.
    assert "result" in await client.call("ping")
    assert (await client.call("unsubscribe", channels=["px:brief"]))["error"][
        "code"
    ] == ErrorCode.NOT_SUBSCRIBED


async def test_subscribe_disconnect_answer_closes(env: Env, clients: list[ProtocolClient]) -> None:
    client = await connected(env, clients)
    env.backend.answer("subscribe", {"disconnect": {"code": 4000, "reason": "come back later"}})
    reply = await client.call("subscribe", channels=[{"channel": "px:room"}])
    assert reply["error"]["code"] == ErrorCode.UNAUTHORIZED
    assert await close_of(client) == (4000, "come back later")


async def test_namespace_choices(env: Env, clients: list[ProtocolClient]) -> None:
    """proxy_subscribe = false: not asked; a URL: that endpoint; unset: the node's."""
    client = await connected(env, clients)
    env.backend.calls.clear()
    for channel in ("open:a", "other:a", "px:a"):
        assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": channel}]))
        assert "result" in await client.call("publish", channel=channel, data=1)
    asked = [(c.path, c.body["channel"]) for c in env.backend.calls]
    assert asked == [
        ("/other/subscribe", "other:a"),
        ("/other/publish", "other:a"),
        ("/proxy/subscribe", "px:a"),
        ("/proxy/publish", "px:a"),
    ]


# ---------------------------------------------------------------- publish


async def test_publish_allowed_denied_overridden(env: Env, clients: list[ProtocolClient]) -> None:
    client = await connected(env, clients, "carol")
    assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": "px:feed"}]))

    def decide(body: dict[str, Any]) -> Any:
        data = body["data"]
        if data == "forbidden":
            return {"error": {"code": 1042, "message": "moderated"}}
        if isinstance(data, dict) and "text" in data:
            return {"result": {"data": {"text": data["text"].upper(), "checked": True}}}
        return {"result": {}}

    env.backend.answer("publish", decide)
    assert "result" in await client.call("publish", channel="px:feed", data="plain")
    assert (await client.push("publication"))["data"] == "plain"
    reply = await client.call("publish", channel="px:feed", data="forbidden")
    assert reply["error"] == {"code": 1042, "message": "moderated"}
    assert "result" in await client.call("publish", channel="px:feed", data={"text": "hi"})
    assert (await client.push("publication"))["data"] == {"text": "HI", "checked": True}
    history = await client.call("history", channel="px:feed")
    assert [p["data"] for p in history["result"]["publications"]] == [
        "plain",
        {"text": "HI", "checked": True},
    ]
    bodies = [c.body for c in env.backend.of("publish")]
    assert [b["data"] for b in bodies] == ["plain", "forbidden", {"text": "hi"}]
    assert all(b["channel"] == "px:feed" and b["user"] == "carol" for b in bodies)


# ---------------------------------------------------------------- rpc


async def test_rpc_answered_denied_and_local_methods_stay_local(
    env: Env, clients: list[ProtocolClient]
) -> None:
    client = await connected(env, clients, "dave")

    def decide(body: dict[str, Any]) -> Any:
        if body["method"] == "sum":
            return {"result": {"data": sum(body["data"])}}
        return {"error": {"code": int(ErrorCode.METHOD_NOT_FOUND), "message": "no such method"}}

    env.backend.answer("rpc", decide)
    assert (await client.call("rpc", method="sum", params=[1, 2, 3]))["result"]["data"] == 6
    reply = await client.call("rpc", method="nope")
    assert reply["error"] == {"code": ErrorCode.METHOD_NOT_FOUND, "message": "no such method"}
    assert (await client.call("rpc", method="local"))["result"]["data"] == "in-process for dave"
    assert [c.body["method"] for c in env.backend.of("rpc")] == ["sum", "nope"]
    assert env.backend.of("rpc")[0].body["user"] == "dave"


# ---------------------------------------------------------------- forwarded headers


async def test_only_allow_listed_headers_and_cookies_are_forwarded(
    env: Env, clients: list[ProtocolClient]
) -> None:
    headers = {
        "Authorization": "Bearer app-session",
        "X-Trace": "trace-1",
        "X-Secret": "never forwarded",
        "Cookie": "theme=dark; session=s3cr3t; tracking=zzz",
    }
    client, reply = await opened(env, clients, headers=headers)
    assert "result" in reply
    assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": "px:h"}]))
    for event in ("connect", "subscribe"):
        [call] = env.backend.of(event)
        assert call.headers["authorization"] == "Bearer app-session"
        assert call.headers["x-trace"] == "trace-1"
        assert call.headers["cookie"] == "session=s3cr3t"
        assert "x-secret" not in call.headers
        assert "sec-websocket-key" not in call.headers and "origin" not in call.headers


# ---------------------------------------------------------------- failures


async def test_slow_backend_times_out(env: Env, clients: list[ProtocolClient]) -> None:
    client = await connected(env, clients)
    env.backend.block("subscribe")
    started = time.monotonic()
    reply = await client.call("subscribe", channels=[{"channel": "px:slow"}])
    took = time.monotonic() - started
    assert item_of(reply)["error"] == {"code": INTERNAL, "message": "proxy timeout"}
    assert PROXY_TIMEOUT * 0.9 <= took < PROXY_TIMEOUT + 2
    env.backend.block("connect")
    _, reply = await opened(env, clients)
    assert reply["error"] == {"code": INTERNAL, "message": "proxy timeout"}


async def test_backend_down_denies(env: Env, clients: list[ProtocolClient]) -> None:
    client = await connected(env, clients)
    reply = await client.call("subscribe", channels=[{"channel": "down:room"}])
    assert item_of(reply)["error"] == {"code": INTERNAL, "message": "proxy unavailable"}
    reply = await client.call("history", channel="down:room")  # a read asks the same subscribe hook
    assert reply["error"] == {"code": INTERNAL, "message": "proxy unavailable"}
    # publish to a channel not subscribed: the subscribe check comes first and is refused
    reply = await client.call("publish", channel="down:room", data=1)
    assert reply["error"] == {"code": INTERNAL, "message": "proxy unavailable"}


async def test_backend_down_refuses_connect(backend: Backend, clients: list[ProtocolClient]) -> None:
    for native in (True, False):
        dead = f"http://127.0.0.1:{free_port()}/connect"
        herald = Herald(proxy_settings(backend, native=native, proxy_connect_url=dead))
        server = serve(herald)
        try:
            client = await ProtocolClient.open(server.ws("/connect"), connect=False)
            clients.append(client)
            reply = await client.call("connect")
            assert reply["error"] == {"code": INTERNAL, "message": "proxy unavailable"}
            # The connection stays open and may try again (the client retries error 100).
            assert (await client.call("ping"))["error"]["code"] == ErrorCode.NOT_CONNECTED
            await client.close()
        finally:
            server.stop()


GARBAGE = [
    pytest.param(Raw(500, b'{"result": {}}'), "proxy unavailable", id="http-500"),
    pytest.param(Raw(404, b"{}"), "proxy answer invalid", id="http-404"),
    pytest.param(Raw(200, b"<html>oops</html>"), "proxy answer invalid", id="not-json"),
    pytest.param(Raw(200, b""), "proxy answer invalid", id="empty"),
    pytest.param(Raw(200, b"[1, 2]"), "proxy answer invalid", id="array"),
    pytest.param({"result": {"expires_at": "soon"}}, "proxy answer invalid", id="wrong-type"),
    pytest.param({"result": {"expire_at": 1}}, "proxy answer invalid", id="unknown-field"),
    pytest.param({"result": []}, "proxy answer invalid", id="result-not-object"),
    pytest.param({"result": {}, "error": {"code": 110}}, "proxy answer invalid", id="two-outcomes"),
    pytest.param({"error": {"code": 777}}, "proxy answer invalid", id="unknown-error-code"),
    pytest.param({"error": {"code": "110"}}, "proxy answer invalid", id="code-as-string"),
    pytest.param({"disconnect": {"code": 1000}}, "proxy answer invalid", id="bad-close-code"),
    pytest.param(
        Raw(200, b'{"result": {}, "pad": "' + b"x" * (1 << 20) + b'"}'),
        "proxy answer invalid",
        id="too-large",
    ),
]


@pytest.mark.parametrize(("answer", "message"), GARBAGE)
async def test_garbage_answer_denies(
    env: Env, clients: list[ProtocolClient], answer: Any, message: str
) -> None:
    client = await connected(env, clients)
    env.backend.answer("subscribe", answer)
    env.backend.answer("publish", answer)
    reply = await client.call("subscribe", channels=[{"channel": "px:garbage"}])
    assert item_of(reply)["error"] == {"code": INTERNAL, "message": message}
    reply = await client.call("publish", channel="open:x", data=1)  # not proxied: unaffected
    assert "result" in reply
    env.backend.answer("subscribe", {"result": {}})
    assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": "px:garbage"}]))
    reply = await client.call("publish", channel="px:garbage", data=1)
    assert reply["error"] == {"code": INTERNAL, "message": message}
    assert (await client.call("history", channel="px:garbage"))["result"]["publications"] == []


async def test_garbage_connect_answer_refuses(env: Env, clients: list[ProtocolClient]) -> None:
    env.backend.answer("connect", {"result": {"user": 42}})
    _, reply = await opened(env, clients)
    assert reply["error"] == {"code": INTERNAL, "message": "proxy answer invalid"}


async def test_calls_beyond_the_in_flight_bound_are_busy(env: Env, clients: list[ProtocolClient]) -> None:
    async with saturating(env, clients) as (holders, client):
        held = await hold_subscribes(env, holders)
        started = time.monotonic()
        reply = await client.call("subscribe", channels=[{"channel": "px:one-more"}])
        assert item_of(reply)["error"] == {"code": INTERNAL, "message": "proxy busy"}
        assert time.monotonic() - started < 1.0  # refused at once, not queued
        assert len(env.backend.of("subscribe")) == MAX_IN_FLIGHT  # the backend never saw it
        env.backend.release.set()
        for task in held:
            assert "error" not in item_of(await task)
        env.backend.answer("subscribe", {"result": {}})
        assert "error" not in item_of(await client.call("subscribe", channels=[{"channel": "px:after"}]))


async def test_in_process_hooks_run_after_the_proxy(env: Env, clients: list[ProtocolClient]) -> None:
    """The proxy is a hook like the app's: registered first, then the app's hooks run
    with the same rules (an app hook still refuses what the backend allowed)."""
    seen: list[str] = []

    async def app_hook(ctx: ClientContext, channel: str) -> None:
        seen.append(f"app:{channel}:{len(env.backend.of('subscribe'))}")
        if channel == "px:app-says-no":
            from herald.exceptions import PermissionDeniedError

            raise PermissionDeniedError("the app says no")

    hooks = env.herald.node.hooks
    hooks.add("subscribe", app_hook)
    try:
        client = await connected(env, clients)
        reply = await client.call("subscribe", channels=[{"channel": "px:app-says-no"}])
        assert item_of(reply)["error"] == {"code": 110, "message": "the app says no"}
        assert seen == ["app:px:app-says-no:1"]  # after the backend's answer
    finally:
        hooks._by_event["subscribe"].remove(app_hook)
