"""Hostile input against a real server, while a bystander's stream must stay complete.

One uvicorn server (Herald's server settings: the same HTTP protocol class and
WebSocket implementation as ``herald serve``) runs on a free port.  A bystander
client is subscribed to ``feed:stream`` and the HTTP API publishes a numbered
stream to it during the whole test.  Then every case of the table below is
played on its own connection: each must get its documented error reply or close
code, the server must stay up, and at the end the bystander must have received
every publication, in order, with no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from herald import Herald
from herald.codes import CloseCode, ErrorCode
from herald.config import NamespaceOptions, Settings
from herald.context import ClientContext
from herald.server import create_app
from herald.transports.uvicorn import uvicorn_ws_protocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from ..helpers import ProtocolClient, ThreadServer, http_get, numbered_stream

SECRET = "hostile-test-secret-0123456789abcdef-0123456789abcdef-0123456789"
API_KEY = "hostile-api-key"
MAX_SIZE = 16 * 1024
PER_IP = 30
PER_USER = 3
TIMEOUT = 5.0

E = ErrorCode
C = CloseCode


#: Lifetime of the cases' tokens: most are minted when this module is collected, and the
#: whole suite runs before the last case does (300 s was outlived once the suite grew).
TOKEN_LIFETIME = 3600.0


def token(
    sub: str = "alice", *, exp_in: float | None = TOKEN_LIFETIME, key: str = SECRET, **claims: Any
) -> str:
    body: dict[str, Any] = {"sub": sub, **claims}
    if exp_in is not None:
        body["exp"] = int(time.time() + exp_in)
    return jwt.encode(body, key, algorithm="HS256")


def settings() -> Settings:
    return Settings(
        token_secret=SECRET,
        api_key=API_KEY,
        demos=False,
        allowed_origins=["https://good.example.com", "https://*.apps.example.com"],
        max_message_size=MAX_SIZE,
        max_json_depth=32,
        max_json_keys=500,
        max_connections_per_ip=PER_IP,
        max_connections_per_user=PER_USER,
        handshake_timeout=1.5,
        rate_limit=100,
        rate_limit_burst=50,
        rate_limit_strikes=10,
        token_refresh_grace=1.0,
        max_history_limit=50,
        namespaces={
            "": NamespaceOptions(),
            "chat": NamespaceOptions(),
            "feed": NamespaceOptions(allow_publish=False, history_size=1000),
            "members": NamespaceOptions(allow_anonymous=False),
            "private": NamespaceOptions(private=True),
            "dm": NamespaceOptions(),
            "closed": NamespaceOptions(allow_subscribe=False),
            "noread": NamespaceOptions(allow_history=False, allow_presence=False),
        },
    )


@dataclass
class Env:
    server: ThreadServer
    herald: Herald
    published: list[int] = field(default_factory=list)

    def url(self, query: str = "") -> str:
        return self.server.ws("/connect") + (f"?{query}" if query else "")


@pytest.fixture(scope="module", params=["native", "asgi"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """A server per serving driver: Herald's native routes, and the plain ASGI path
    (``native_routes=False``) that any other ASGI server uses."""
    config = settings().model_copy(update={"native_routes": request.param == "native"})
    herald = Herald(config)

    @herald.rpc("slow")
    async def slow(params: Any, ctx: ClientContext) -> str:
        await asyncio.sleep(1.0)
        return "done"

    app = create_app(herald=herald)
    server = ThreadServer(
        app,
        ws=uvicorn_ws_protocol(config.ws_impl, config.fast_path),
        http=HeaderTimeoutHTTPProtocol,
        ws_max_size=config.max_message_size,
    ).start()
    try:
        yield Env(server, herald)
    finally:
        server.stop()


# ---------------------------------------------------------------- client helpers


async def open_ws(env: Env, query: str = "", **kwargs: Any) -> ClientConnection:
    return await websockets.connect(env.url(query), open_timeout=TIMEOUT, max_size=None, **kwargs)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    value = json.loads(frame)
    assert isinstance(value, dict), value
    return value


async def reply_to(ws: ClientConnection, command_id: int | None) -> dict[str, Any]:
    """The next reply with ``command_id`` (pushes skipped)."""
    while True:
        frame = await recv_json(ws)
        if "id" in frame and frame["id"] == command_id:
            return frame


async def call(ws: ClientConnection, command_id: int, kind: str, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"id": command_id, "type": kind, **fields}))
    return await reply_to(ws, command_id)


async def connected(env: Env, *, tok: str | None = None, query: str = "") -> ClientConnection:
    ws = await open_ws(env, query)
    reply = await call(ws, 1, "connect", **({"token": tok} if tok else {}))
    assert "result" in reply, reply
    return ws


async def closed_with(ws: ClientConnection) -> int | None:
    """Read until the server closes; return the close code."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    return ws.close_code


def error_code(reply: dict[str, Any]) -> int | None:
    """The error code of a reply, or of its only per-channel subscribe result."""
    if "error" in reply:
        return int(reply["error"]["code"])
    channels = reply.get("result", {}).get("channels")
    if isinstance(channels, list) and len(channels) == 1 and isinstance(channels[0], dict):
        error = channels[0].get("error")
        if error is not None:
            return int(error["code"])
    return None


async def still_serving(ws: ClientConnection) -> None:
    reply = await call(ws, 999_999, "ping")
    assert reply.get("result") == {}, reply


# ---------------------------------------------------------------- the table

Case = Callable[[Env], Awaitable[None]]
CASES: list[tuple[str, Case]] = []


def frame_case(
    name: str, frame: str | bytes, expect: int, *, connect: bool = True, reply_id: int | None = 7
) -> None:
    """Send one raw frame; expect an error reply with ``expect``, then the connection works."""

    async def run(env: Env) -> None:
        ws = await (connected(env) if connect else open_ws(env))
        try:
            await ws.send(frame)
            reply = await reply_to(ws, reply_id)
            assert error_code(reply) == expect, reply
            assert len(json.dumps(reply)) < 2000  # errors never echo large input back
            if connect:
                await still_serving(ws)
        finally:
            await ws.close()

    CASES.append((name, run))


def command_case(name: str, kind: str, expect: int, *, tok: str | None = None, **fields: Any) -> None:
    frame_case(name, json.dumps({"id": 7, "type": kind, **fields}), expect)
    if tok is not None:  # re-register with a token: replace the plain case
        CASES.pop()

        async def run(env: Env) -> None:
            ws = await connected(env, tok=tok)
            try:
                reply = await call(ws, 7, kind, **fields)
                assert error_code(reply) == expect, reply
                await still_serving(ws)
            finally:
                await ws.close()

        CASES.append((name, run))


def close_case(name: str, frame: str | bytes, expect_close: int) -> None:
    async def run(env: Env) -> None:
        ws = await connected(env)
        if isinstance(frame, bytes) and frame.startswith(b"\xff"):
            await ws.send(frame, text=True)  # invalid UTF-8 in a text frame
        else:
            await ws.send(frame)
        assert await closed_with(ws) == expect_close

    CASES.append((name, run))


def refused_case(name: str, expect_status: int, **connect_kwargs: Any) -> None:
    async def run(env: Env) -> None:
        with pytest.raises(websockets.InvalidStatus) as info:
            await open_ws(env, **connect_kwargs)
        assert info.value.response.status_code == expect_status

    CASES.append((name, run))


def case(name: str) -> Callable[[Case], Case]:
    def register(func: Case) -> Case:
        CASES.append((name, func))
        return func

    return register


sub = {"channels": [{"channel": "chat:x"}]}

# -- malformed and truncated JSON, wrong types
frame_case("malformed-json", '{"id":7,"type":', E.BAD_REQUEST, reply_id=None)
frame_case("truncated-json", '{"id": 7, "type": "ping"', E.BAD_REQUEST, reply_id=None)
frame_case("empty-frame", "", E.BAD_REQUEST, reply_id=None)
frame_case("json-array", "[1,2,3]", E.BAD_REQUEST, reply_id=None)
frame_case("json-string", '"ping"', E.BAD_REQUEST, reply_id=None)
frame_case("json-null", "null", E.BAD_REQUEST, reply_id=None)
frame_case("missing-type", '{"id":7}', E.BAD_REQUEST)
frame_case("id-as-string", '{"id":"7","type":"ping"}', E.BAD_REQUEST, reply_id=None)
frame_case("id-negative", '{"id":-7,"type":"ping"}', E.BAD_REQUEST, reply_id=None)
frame_case("id-float", '{"id":7.5,"type":"ping"}', E.BAD_REQUEST, reply_id=None)
frame_case("id-huge-integer", '{"id":' + "9" * 400 + ',"type":"ping"}', E.BAD_REQUEST, reply_id=None)
frame_case("unknown-field", '{"id":7,"type":"ping","admin":true}', E.BAD_REQUEST)
frame_case("channels-wrong-type", '{"id":7,"type":"subscribe","channels":"chat:x"}', E.BAD_REQUEST)
frame_case("type-not-string", '{"id":7,"type":7}', E.UNKNOWN_COMMAND)
frame_case("unknown-command", '{"id":7,"type":"shutdown"}', E.UNKNOWN_COMMAND)
frame_case(
    "data-infinity", '{"id":7,"type":"publish","channel":"chat:x","data":1e999}', E.BAD_REQUEST, reply_id=None
)
frame_case(
    "data-huge-integer",
    '{"id":7,"type":"publish","channel":"chat:x","data":' + "1" * 5000 + "}",
    E.BAD_REQUEST,
    reply_id=None,
)
frame_case(
    "nesting-10000-deep",
    '{"id":7,"type":"publish","channel":"chat:x","data":' + "[" * 5000 + "]" * 5000 + "}",
    E.TOO_DEEP,
    reply_id=None,
)
frame_case(
    "nesting-over-limit",
    '{"id":7,"type":"publish","channel":"chat:x","data":' + "[" * 40 + "]" * 40 + "}",
    E.TOO_DEEP,
    reply_id=7,
)
frame_case(
    "too-many-keys",
    json.dumps({"id": 7, "type": "publish", "channel": "chat:x", "data": {f"k{i}": 0 for i in range(600)}}),
    E.TOO_LARGE,
)
frame_case(
    "connect-name-too-long",
    json.dumps({"id": 7, "type": "connect", "name": "n" * 65}),
    E.BAD_REQUEST,
    connect=False,
)
frame_case(
    "too-many-channels-in-one-subscribe",
    json.dumps({"id": 7, "type": "subscribe", "channels": [{"channel": f"chat:{i}"} for i in range(257)]}),
    E.BAD_REQUEST,
)

# -- commands before connect, twice connect, not subscribed
frame_case(
    "subscribe-before-connect",
    json.dumps({"id": 7, "type": "subscribe", **sub}),
    E.NOT_CONNECTED,
    connect=False,
)
frame_case(
    "publish-before-connect",
    json.dumps({"id": 7, "type": "publish", "channel": "chat:x", "data": 1}),
    E.NOT_CONNECTED,
    connect=False,
)
command_case("connect-twice", "connect", E.ALREADY_CONNECTED)
command_case("unsubscribe-not-subscribed", "unsubscribe", E.NOT_SUBSCRIBED, channels=["chat:x"])

# -- channel names: control characters, path tricks, reserved, length, namespaces
for label, channel in [
    ("nul", "chat:a\x00b"),
    ("newline", "chat:a\nb"),
    ("escape-sequence", "chat:\x1b[31mred"),
    ("dotdot-slash", "../../etc/passwd"),
    ("namespace-slash", "chat:../admin"),
    ("backslash", "chat:..\\admin"),
    ("reserved-dollar", "$broadcast"),
    ("too-long", "chat:" + "x" * 300),
    ("unicode-lookalike", "chat:lobby\u200b"),
]:
    command_case(
        f"channel-{label}-subscribe", "subscribe", E.INVALID_CHANNEL, channels=[{"channel": channel}]
    )
command_case("channel-control-publish", "publish", E.INVALID_CHANNEL, channel="chat:\x07", data=1)
command_case("unknown-namespace", "subscribe", E.UNKNOWN_NAMESPACE, channels=[{"channel": "nope:x"}])

# -- forged offsets
command_case(
    "history-forged-epoch",
    "history",
    E.UNRECOVERABLE_POSITION,
    channel="chat:x",
    since={"offset": 3, "epoch": "forged"},
)
command_case(
    "history-negative-offset", "history", E.BAD_REQUEST, channel="chat:x", since={"offset": -1, "epoch": "e"}
)
command_case(
    "history-offset-as-string",
    "history",
    E.BAD_REQUEST,
    channel="chat:x",
    since={"offset": "1", "epoch": "e"},
)


@case("subscribe-forged-offset-not-recovered")
async def _forged_offset(env: Env) -> None:
    ws = await connected(env)
    try:
        reply = await call(
            ws,
            7,
            "subscribe",
            channels=[{"channel": "chat:forged", "since": {"offset": 10**12, "epoch": "x"}}],
        )
        item = reply["result"]["channels"][0]
        assert item["recovered"] is False and item["publications"] == []
    finally:
        await ws.close()


@case("history-limit-capped")
async def _history_limit(env: Env) -> None:
    ws = await connected(env)
    try:
        reply = await call(ws, 7, "history", channel="feed:stream", limit=10**12)
        assert len(reply["result"]["publications"]) <= 50
    finally:
        await ws.close()


# -- permissions
command_case("publish-where-forbidden", "publish", E.PERMISSION_DENIED, channel="feed:stream", data={"n": -1})
command_case(
    "subscribe-other-users-channel",
    "subscribe",
    E.PERMISSION_DENIED,
    tok=token("mallory"),
    channels=[{"channel": "dm:room#alice,bob"}],
)
command_case(
    "publish-other-users-channel",
    "publish",
    E.PERMISSION_DENIED,
    tok=token("mallory"),
    channel="dm:room#alice,bob",
    data=1,
)
command_case(
    "anonymous-in-members-namespace", "subscribe", E.PERMISSION_DENIED, channels=[{"channel": "members:x"}]
)
command_case(
    "private-channel-without-token",
    "subscribe",
    E.PERMISSION_DENIED,
    tok=token("alice"),
    channels=[{"channel": "private:x"}],
)
command_case(
    "private-channel-with-another-users-token",
    "subscribe",
    E.PERMISSION_DENIED,
    tok=token("mallory"),
    channels=[{"channel": "private:x", "token": token("alice", channel="private:x", typ="subscription")}],
)
command_case(
    "connection-token-replayed-as-subscription-token",
    "subscribe",
    E.UNAUTHORIZED,
    tok=token("alice"),
    channels=[{"channel": "private:x", "token": token("alice")}],
)
command_case(
    "subscribe-closed-namespace", "subscribe", E.PERMISSION_DENIED, channels=[{"channel": "closed:x"}]
)
command_case("history-forbidden", "history", E.PERMISSION_DENIED, channel="noread:x")
command_case("presence-forbidden", "presence", E.PERMISSION_DENIED, channel="noread:x")


@case("user-limited-channel-allows-its-users")
async def _user_limited_ok(env: Env) -> None:
    ws = await connected(env, tok=token("alice"))
    try:
        reply = await call(ws, 7, "subscribe", channels=[{"channel": "dm:room#alice,bob"}])
        assert error_code(reply) is None, reply
        good = token("alice", channel="private:y", typ="subscription")
        reply = await call(ws, 8, "subscribe", channels=[{"channel": "private:y", "token": good}])
        assert error_code(reply) is None, reply
    finally:
        await ws.close()


# -- tokens
command_case(
    "refresh-with-another-users-token", "refresh", E.UNAUTHORIZED, tok=token("alice"), token=token("mallory")
)


def connect_token_case(name: str, tok: str, expect: int, *, in_query: bool = False) -> None:
    async def run(env: Env) -> None:
        ws = await open_ws(env, f"token={tok}" if in_query else "")
        try:
            reply = await call(ws, 7, "connect", **({} if in_query else {"token": tok}))
            assert error_code(reply) == expect, reply
            assert tok not in json.dumps(reply)
        finally:
            await ws.close()

    CASES.append((name, run))


connect_token_case("token-expired", token(exp_in=-60), E.TOKEN_EXPIRED)
connect_token_case("token-expired-in-query", token(exp_in=-60), E.TOKEN_EXPIRED, in_query=True)
connect_token_case(
    "token-unsigned-alg-none", jwt.encode({"sub": "root"}, None, algorithm="none"), E.UNAUTHORIZED
)
connect_token_case("token-wrong-key", token(key="not-the-server-secret-0123456789ab" * 2), E.UNAUTHORIZED)
connect_token_case(
    "token-wrong-algorithm-hs512", jwt.encode({"sub": "root"}, SECRET, algorithm="HS512"), E.UNAUTHORIZED
)
connect_token_case("token-garbage", "a.b.c", E.UNAUTHORIZED)


@case("token-in-query-parameter")
async def _query_token(env: Env) -> None:
    ws = await open_ws(env, f"token={token('carol')}")
    try:
        reply = await call(ws, 1, "connect")
        assert reply["result"]["user"] == "carol"
    finally:
        await ws.close()


#: The lifetime of a token that expires while connected: whole seconds (``exp`` is an
#: integer), at least 2 s so that ``connect`` under load never sees it expired already.
SHORT_LIFETIME = 2
#: The longest wait for the refresh push: up to ``SHORT_LIFETIME + 1`` s, plus slack.
PUSH_TIMEOUT = SHORT_LIFETIME + 1 + TIMEOUT


def short_lived_token(sub: str) -> str:
    """A token whose ``exp`` is at least ``SHORT_LIFETIME`` whole seconds ahead."""
    exp = math.ceil(time.time()) + SHORT_LIFETIME
    return jwt.encode({"sub": sub, "exp": exp}, SECRET, algorithm="HS256")


@case("token-expires-while-connected-closed-4004")
async def _token_expiry(env: Env) -> None:
    ws = await connected(env, tok=short_lived_token("dave"))
    push = json.loads(await asyncio.wait_for(ws.recv(), PUSH_TIMEOUT))
    assert push == {"type": "refresh", "grace": 1.0}
    assert await closed_with(ws) == C.TOKEN_EXPIRED


@case("token-refreshed-in-time-stays")
async def _token_refresh(env: Env) -> None:
    ws = await connected(env, tok=short_lived_token("erin"))
    try:
        assert json.loads(await asyncio.wait_for(ws.recv(), PUSH_TIMEOUT))["type"] == "refresh"
        pushed = time.monotonic()
        reply = await call(ws, 2, "refresh", token=token("erin", exp_in=300))
        assert reply["result"]["expires_at"] > time.time() + 200
        # Past the grace period (1 s after the push): must still be connected.
        await asyncio.sleep(max(0.0, pushed + 1.5 - time.monotonic()))
        await still_serving(ws)
    finally:
        await ws.close()


# -- transport-level abuse
close_case("invalid-utf8", b"\xff\xfe", C.INVALID_PAYLOAD)
close_case("binary-frame", b'{"id":7,"type":"ping"}', C.UNSUPPORTED_DATA)
close_case("oversized-frame", "x" * (MAX_SIZE + 1), C.MESSAGE_TOO_BIG)
refused_case("foreign-origin", 403, origin="https://evil.example.net")
refused_case("null-origin", 403, origin="null")
refused_case("lookalike-origin", 403, origin="https://good.example.com.evil.net")


@case("allowed-wildcard-origin")
async def _wildcard_origin(env: Env) -> None:
    ws = await open_ws(env, origin="https://a.apps.example.com")
    await ws.close()


@case("duplicate-id-of-in-flight-rpc")
async def _duplicate_id(env: Env) -> None:
    ws = await connected(env)
    try:
        await ws.send(json.dumps({"id": 7, "type": "rpc", "method": "slow"}))
        await ws.send(json.dumps({"id": 7, "type": "ping"}))
        first = await recv_json(ws)
        assert first["id"] == 7 and error_code(first) == E.DUPLICATE_ID, first
        second = await reply_to(ws, 7)
        assert second["result"] == {"data": "done"}
    finally:
        await ws.close()


@case("handshake-timeout-4505")
async def _handshake_timeout(env: Env) -> None:
    ws = await open_ws(env)
    assert await closed_with(ws) == C.HANDSHAKE_TIMEOUT


@case("flood-over-rate-limit")
async def _flood(env: Env) -> None:
    ws = await connected(env)
    frames = [json.dumps({"id": i, "type": "ping"}) for i in range(10, 210)]
    for frame in frames:
        await ws.send(frame)
    limited = 0
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            if error_code(frame) == E.RATE_LIMITED:
                limited += 1
    assert limited >= 1
    assert ws.close_code == C.RATE_LIMIT


@case("garbage-flood-over-rate-limit")
async def _garbage_flood(env: Env) -> None:
    ws = await connected(env)
    for _ in range(200):
        await ws.send("{{{{")
    assert await closed_with(ws) == C.RATE_LIMIT


@case("connections-per-user-4503")
async def _per_user(env: Env) -> None:
    tok = token("frank")
    sockets = [await connected(env, tok=tok) for _ in range(PER_USER)]
    try:
        extra = await open_ws(env)
        reply = await call(extra, 1, "connect", token=tok)
        assert error_code(reply) == E.LIMIT_EXCEEDED
        assert await closed_with(extra) == C.CONNECTION_LIMIT
    finally:
        for ws in sockets:
            await ws.close()


@case("connections-per-ip-refused")
async def _per_ip(env: Env) -> None:
    sockets: list[ClientConnection] = []
    refused = False
    try:
        for _ in range(PER_IP + 1):
            try:
                sockets.append(await open_ws(env))
            except websockets.InvalidStatus as exc:
                assert exc.response.status_code == 403
                refused = True
                break
        assert refused and len(sockets) < PER_IP  # the bystander holds one slot too
    finally:
        for ws in sockets:
            await ws.close()
    # Slots are given back: a new connection is accepted again.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            ws = await open_ws(env)
            await ws.close()
            break
        except websockets.InvalidStatus:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------- the test


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({name for name, _ in CASES}) == len(CASES)


async def test_hostile_inputs_do_no_harm(env: Env) -> None:
    bystander = await ProtocolClient.open(env.server.ws("/connect"))
    reply = await bystander.call("subscribe", channels=[{"channel": "feed:stream"}])
    assert "error" not in reply["result"]["channels"][0], reply
    failures: list[str] = []
    async with numbered_stream(env.server.http, API_KEY) as sent:
        for name, run in CASES:
            try:
                await asyncio.wait_for(run(env), 15)
            except Exception as exc:  # collect every failing case, not just the first
                failures.append(f"{name}: {type(exc).__name__}: {exc!r}"[:400])
    assert not failures, "\n".join(failures)
    # The server is up and the bystander got the whole stream, in order, exactly once.
    assert http_get(env.server.http + "/healthz")[0] == 200
    received = [p["data"]["n"] for p in await bystander.publications(len(sent), timeout=10)]
    assert received == list(range(len(sent)))
    assert len(sent) > 50
    assert not bystander.closed.is_set()
    await bystander.close()
    # Every kind of rejection was counted for the metrics.
    rejected = env.herald.node.rejected_commands
    for reason in ("rate_limited", "rate_limit_disconnect", "bad_request", "too_deep", "permission_denied"):
        assert rejected.get(reason, 0) > 0, rejected
    refused = env.herald.node.rejected_handshakes
    for reason in ("origin", "ip_limit", "user_limit", "auth"):
        assert refused.get(reason, 0) > 0, refused
