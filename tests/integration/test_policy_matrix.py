"""The access policy as a matrix: every operation x every rule, over a real server.

One uvicorn server (Herald's own server protocols, as in test_hostile.py) serves a
Herald app with one namespace per rule, an ``on_subscribe`` hook (``team:*``: only
alice) and an ``on_publish`` hook (``guarded:*``: only alice).  Each cell opens a
fresh connection as one client, does one operation and asserts that it was allowed
or refused with the documented error code (docs/security.md, "Access policy").
Refused publishes must leave no trace in the channel's history.

The cells run twice: with the in-process hooks, and with a real FastAPI backend
answering the proxy's subscribe and publish calls exactly as those hooks decide
(``proxy_env``): the proxy is one more hook, so every cell must come out the same.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest

from herald import Herald
from herald.codes import ErrorCode
from herald.config import NamespaceOptions, Settings
from herald.context import ClientContext
from herald.exceptions import PermissionDeniedError
from herald.server import create_app
from herald.transports.uvicorn import uvicorn_ws_protocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, async_wait_for
from .proxy_backend import start_backend

pytestmark = pytest.mark.asyncio

SECRET = "policy-matrix-secret-0123456789abcdef-0123456789abcdef-01234567"
API_KEY = "policy-api-key"
MAX_HISTORY = 5
GRACE = 1.0
DENIED = int(ErrorCode.PERMISSION_DENIED)


def token(sub: str, *, exp_in: float = 300, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time() + exp_in), **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def sub_token(sub: str, channel: str, *, exp_in: float = 300) -> str:
    return token(sub, exp_in=exp_in, channel=channel, typ="subscription")


def settings() -> Settings:
    return Settings(
        token_secret=SECRET,
        api_key=API_KEY,
        demos=False,
        max_history_limit=MAX_HISTORY,
        token_refresh_grace=GRACE,
        namespaces={
            "": NamespaceOptions(),
            "open": NamespaceOptions(),
            "private": NamespaceOptions(private=True),
            "members": NamespaceOptions(allow_anonymous=False),
            "nopub": NamespaceOptions(allow_publish=False),
            "nohist": NamespaceOptions(allow_history=False),
            "nopres": NamespaceOptions(allow_presence=False),
            "dm": NamespaceOptions(),
            "team": NamespaceOptions(),
            "guarded": NamespaceOptions(),
        },
    )


@dataclass
class Env:
    server: ThreadServer
    hook_calls: list[tuple[str, str, str]]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    config = settings()
    herald = Herald(config)
    calls: list[tuple[str, str, str]] = []

    @herald.on_subscribe
    async def team_members_only(ctx: ClientContext, channel: str) -> None:
        calls.append(("subscribe", ctx.user, channel))
        if channel.startswith("team:") and ctx.user != "alice":
            raise PermissionDeniedError("not a member of this team")

    @herald.on_publish
    async def guarded_writers(ctx: ClientContext, channel: str, data: Any) -> Any:
        if channel.startswith("guarded:") and ctx.user != "alice":
            raise PermissionDeniedError("read-only for you")
        return None

    @herald.rpc("whoami")
    async def whoami(ctx: ClientContext) -> str:
        return ctx.user

    server = serve_seeded(herald)
    try:
        yield Env(server, calls)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy_env() -> Iterator[Env]:
    """The same rules, decided by a backend over HTTP instead of in-process hooks."""
    backend = start_backend()
    calls: list[tuple[str, str, str]] = []

    def subscribe(body: dict[str, Any]) -> Any:
        calls.append(("subscribe", body["user"], body["channel"]))
        if body["channel"].startswith("team:") and body["user"] != "alice":
            return {"error": {"code": DENIED, "message": "not a member of this team"}}
        return {"result": {}}

    def publish(body: dict[str, Any]) -> Any:
        if body["channel"].startswith("guarded:") and body["user"] != "alice":
            return {"error": {"code": DENIED, "message": "read-only for you"}}
        return {}

    backend.answer("subscribe", subscribe)
    backend.answer("publish", publish)
    config = settings().model_copy(
        update={"proxy_subscribe_url": backend.url("subscribe"), "proxy_publish_url": backend.url("publish")}
    )
    server = serve_seeded(Herald(config))
    try:
        yield Env(server, calls)
    finally:
        server.stop()
        backend.server.stop()


@pytest.fixture(scope="module", params=["hooks", "proxy"])
def policy_env(request: pytest.FixtureRequest) -> Env:
    """The matrix's server: rules decided by in-process hooks, or by the proxy's backend."""
    env: Env = request.getfixturevalue("env" if request.param == "hooks" else "proxy_env")
    return env


def serve_seeded(herald: Herald) -> ThreadServer:
    """Serve ``herald`` on Herald's own server protocols, with three publications in
    every channel of the matrix."""
    config = herald.settings
    server = ThreadServer(
        create_app(herald=herald),
        ws=uvicorn_ws_protocol(config.ws_impl, config.fast_path),
        http=HeaderTimeoutHTTPProtocol,
        ws_max_size=config.max_message_size,
    ).start()
    for channel in CHANNELS:
        for n in range(3):
            status, _ = api(server, "POST", "/api/publish", {"channel": channel, "data": n})
            assert status == 200
    return server


def api(server: ThreadServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(server.http + path, method=method)
    request.add_header("X-API-Key", API_KEY)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, data, timeout=DEFAULT_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def api_history(env: Env, channel: str, query: str = "") -> tuple[int, Any]:
    path = "/api/history?" + urllib.parse.urlencode({"channel": channel}) + query
    return await asyncio.to_thread(api, env.server, "GET", path)


async def top_of(env: Env, channel: str) -> tuple[int, str]:
    status, body = await api_history(env, channel, "&limit=0")
    assert status == 200, body
    return int(body["offset"]), str(body["epoch"])


# ---------------------------------------------------------------- clients

#: Who connects, with which connection token, and which subscription token it sends.
#: Functions, so that tokens are minted when a cell runs, not when the module is
#: collected: the whole suite takes longer than a token lives.
CLIENTS: dict[str, Callable[[], tuple[str | None, str | None]]] = {
    "anonymous": lambda: (None, None),
    "alice": lambda: (token("alice"), None),
    "mallory": lambda: (token("mallory"), None),
    # alice holding a subscription token for private:room (sent with subscribe; for
    # the other operations she subscribes with it first).
    "alice+subtoken": lambda: (token("alice"), sub_token("alice", "private:room")),
    # alice whose connection token grants private:* (no subscription needed).
    "alice+grant": lambda: (token("alice", channels=["private:*"]), None),
    # mallory replaying alice's subscription token.
    "mallory+stolen": lambda: (token("mallory"), sub_token("alice", "private:room")),
    # a subscription token offered as the connection token: connect refuses it (tested
    # below); the matrix needs clients that connected.
}


async def open_client(env: Env, who: str) -> ProtocolClient:
    connection_token, _ = CLIENTS[who]()
    client = await ProtocolClient.open(env.server.ws("/connect"), connect=False)
    reply = await client.call("connect", **({"token": connection_token} if connection_token else {}))
    assert "result" in reply, reply
    return client


@pytest.fixture
async def clients(env: Env) -> AsyncIterator[list[ProtocolClient]]:
    opened: list[ProtocolClient] = []
    yield opened
    for client in opened:
        await client.close()


def channel_error(reply: dict[str, Any]) -> int | None:
    if "error" in reply:
        return int(reply["error"]["code"])
    item = reply["result"]["channels"][0]
    return int(item["error"]["code"]) if "error" in item else None


# ---------------------------------------------------------------- the matrix

OPERATIONS = ("subscribe", "recover", "history", "presence", "presence_stats", "publish")
OK = "ok"
NOT_RECOVERED = "not recovered"
Outcome = str | int


def row(default: Outcome, **overrides: Outcome) -> dict[str, Outcome]:
    return {op: overrides.get(op, default) for op in OPERATIONS}


#: (rule, channel, client, outcome per operation)
MATRIX: list[tuple[str, str, str, dict[str, Outcome]]] = [
    ("baseline", "open:room", "anonymous", row(OK)),
    ("baseline", "open:room", "alice", row(OK)),
    ("private", "private:room", "anonymous", row(DENIED)),
    ("private", "private:room", "alice", row(DENIED)),
    ("private", "private:room", "alice+subtoken", row(OK)),
    ("private", "private:room", "alice+grant", row(OK)),
    ("private", "private:room", "mallory+stolen", row(DENIED)),
    ("allow_anonymous", "members:room", "anonymous", row(DENIED)),
    ("allow_anonymous", "members:room", "alice", row(OK)),
    ("allow_publish", "nopub:room", "alice", row(OK, publish=DENIED)),
    ("allow_history", "nohist:room", "alice", row(OK, history=DENIED, recover=NOT_RECOVERED)),
    ("allow_presence", "nopres:room", "alice", row(OK, presence=DENIED, presence_stats=DENIED)),
    ("user_limited", "dm:room#alice,bob", "alice", row(OK)),
    ("user_limited", "dm:room#alice,bob", "mallory", row(DENIED)),
    ("user_limited", "dm:room#alice,bob", "anonymous", row(DENIED)),
    ("on_subscribe", "team:red", "alice", row(OK)),
    ("on_subscribe", "team:red", "mallory", row(DENIED)),
    ("on_subscribe", "team:red", "anonymous", row(DENIED)),
    ("on_publish", "guarded:room", "alice", row(OK)),
    ("on_publish", "guarded:room", "mallory", row(OK, publish=DENIED)),
]

CHANNELS = sorted({channel for _, channel, _, _ in MATRIX} | {"open:long", "open:epoch"})

CELLS = [
    pytest.param(channel, who, op, outcomes[op], id=f"{rule}-{who}-{op}")
    for rule, channel, who, outcomes in MATRIX
    for op in OPERATIONS
]


async def attempt(env: Env, client: ProtocolClient, who: str, op: str, channel: str) -> Outcome:
    """Do ``op`` on ``channel`` as ``who``; the outcome: OK, NOT_RECOVERED or an error code."""
    _, subscription_token = CLIENTS[who]()
    item: dict[str, Any] = {"channel": channel}
    if subscription_token is not None:
        item["token"] = subscription_token
    if op in ("subscribe", "recover"):
        if op == "recover":
            offset, epoch = await top_of(env, channel)
            assert offset >= 3
            since = offset - 3  # three missed publications (within max_history_limit)
            item["since"] = {"offset": since, "epoch": epoch}
        reply = await client.call("subscribe", channels=[item])
        code = channel_error(reply)
        if code is not None:
            return code
        result = reply["result"]["channels"][0]
        if op == "subscribe":
            assert result["recovered"] is None and result["publications"] == []
            return OK
        offsets = [p["offset"] for p in result["publications"]]
        if not result["recovered"]:
            assert offsets == [], result  # never publications with recovered: false
            return NOT_RECOVERED
        assert offsets == list(range(since + 1, result["offset"] + 1)) and result["offset"] >= offset
        return OK
    if subscription_token is not None:
        # The holder of a subscription token reads and publishes as a subscriber (a stolen
        # token is refused here, and the operation below must be refused too).
        subscribed = await client.call("subscribe", channels=[item])
        assert (channel_error(subscribed) is None) is (who == "alice+subtoken"), subscribed
    if op == "publish":
        before, _ = await top_of(env, channel)
        reply = await client.call("publish", channel=channel, data={"from": who})
        after, _ = await top_of(env, channel)
        if "error" in reply:
            assert after == before, "a refused publication reached the channel"
            return int(reply["error"]["code"])
        assert after == before + 1 and reply["result"]["offset"] == after
        return OK
    fields: dict[str, Any] = {"channel": channel}
    reply = await client.call(op, **fields)
    if "error" in reply:
        assert "result" not in reply
        return int(reply["error"]["code"])
    result = reply["result"]
    if op == "history":
        assert len(result["publications"]) >= 3
    elif op == "presence":
        assert isinstance(result["clients"], dict)
    else:
        assert result["num_clients"] >= 0
    return OK


@pytest.mark.parametrize(("channel", "who", "op", "expected"), CELLS)
async def test_policy_cell(
    policy_env: Env, clients: list[ProtocolClient], channel: str, who: str, op: str, expected: Outcome
) -> None:
    client = await open_client(policy_env, who)
    clients.append(client)
    assert await attempt(policy_env, client, who, op, channel) == expected


# ---------------------------------------------------------------- publishes answered at once

#: Without an on_publish hook, a publish on the memory broker is answered without a task
#: (commands._publish_now, policy.check_now) unless a subscribe hook must be asked: the
#: same rules must hold there, with no publish hook and with only the subscribe hook.
PUBLISH_CELLS = [
    pytest.param(channel, who, rule, outcomes["publish"], id=f"{rule}-{who}")
    for rule, channel, who, outcomes in MATRIX
]


@pytest.fixture(scope="module", params=["no-hooks", "subscribe-hook-only"])
def quick_env(request: pytest.FixtureRequest) -> Iterator[tuple[Env, bool]]:
    herald = Herald(settings())
    calls: list[tuple[str, str, str]] = []
    with_hook = request.param == "subscribe-hook-only"
    if with_hook:

        @herald.on_subscribe
        async def team_members_only(ctx: ClientContext, channel: str) -> None:
            calls.append(("subscribe", ctx.user, channel))
            if channel.startswith("team:") and ctx.user != "alice":
                raise PermissionDeniedError("not a member of this team")

    server = serve_seeded(herald)
    try:
        yield Env(server, calls), with_hook
    finally:
        server.stop()


@pytest.mark.parametrize(("channel", "who", "rule", "expected"), PUBLISH_CELLS)
async def test_publish_cell_without_publish_hooks(
    quick_env: tuple[Env, bool],
    clients: list[ProtocolClient],
    channel: str,
    who: str,
    rule: str,
    expected: Outcome,
) -> None:
    env, with_subscribe_hook = quick_env
    if rule == "on_publish" or (rule == "on_subscribe" and not with_subscribe_hook):
        expected = OK  # the hook that refused is not there
    client = await open_client(env, who)
    clients.append(client)
    assert await attempt(env, client, who, "publish", channel) == expected


# ---------------------------------------------------------------- rules beyond the cells


async def test_on_subscribe_hook_runs_for_reads_of_unsubscribed_channels(
    policy_env: Env, clients: list[ProtocolClient]
) -> None:
    """A read of a channel the client is not subscribed to runs the subscribe hooks (the
    hook decides whether it could subscribe); a subscriber's reads do not run them again.
    The proxy's backend is asked exactly as often."""
    env = policy_env
    client = await open_client(env, "alice")
    clients.append(client)
    env.hook_calls.clear()
    assert "result" in await client.call("history", channel="team:blue")
    assert env.hook_calls == [("subscribe", "alice", "team:blue")]
    assert channel_error(await client.call("subscribe", channels=[{"channel": "team:blue"}])) is None
    assert len(env.hook_calls) == 2
    for op in ("history", "presence", "presence_stats"):
        assert "result" in await client.call(op, channel="team:blue")
    assert "result" in await client.call("publish", channel="team:blue", data=1)
    assert len(env.hook_calls) == 2


async def test_history_limit_is_clamped_everywhere(env: Env, clients: list[ProtocolClient]) -> None:
    """max_history_limit bounds history (protocol and HTTP API: the same code) and recovery:
    a gap longer than the limit is answered recovered: false, with nothing sent."""
    channel = "open:long"
    for n in range(MAX_HISTORY + 3):
        assert (
            await asyncio.to_thread(api, env.server, "POST", "/api/publish", {"channel": channel, "data": n})
        )[0] == 200
    top, epoch = await top_of(env, channel)
    client = await open_client(env, "alice")
    clients.append(client)
    reply = await client.call("history", channel=channel, limit=100)
    assert len(reply["result"]["publications"]) == MAX_HISTORY
    reply = await client.call("history", channel=channel)
    assert len(reply["result"]["publications"]) == MAX_HISTORY
    status, body = await api_history(env, channel, "&limit=100")
    assert status == 200 and len(body["publications"]) == MAX_HISTORY
    # A gap of more than the limit: not recovered.
    reply = await client.call(
        "subscribe", channels=[{"channel": channel, "since": {"offset": 0, "epoch": epoch}}]
    )
    result = reply["result"]["channels"][0]
    assert result["recovered"] is False and result["publications"] == [] and result["offset"] == top
    await client.call("unsubscribe", channels=[channel])
    # A gap of exactly the limit: recovered, every publication.
    since = {"offset": top - MAX_HISTORY, "epoch": epoch}
    reply = await client.call("subscribe", channels=[{"channel": channel, "since": since}])
    result = reply["result"]["channels"][0]
    assert result["recovered"] is True
    assert [p["offset"] for p in result["publications"]] == list(range(top - MAX_HISTORY + 1, top + 1))


async def test_stale_epoch_is_refused_or_not_recovered(env: Env, clients: list[ProtocolClient]) -> None:
    channel = "open:epoch"
    top, epoch = await top_of(env, channel)
    stale = {"offset": top, "epoch": "stale-" + epoch}
    client = await open_client(env, "alice")
    clients.append(client)
    reply = await client.call("history", channel=channel, since=stale)
    assert reply["error"]["code"] == ErrorCode.UNRECOVERABLE_POSITION
    status, body = await api_history(env, channel, f"&since_offset={top}&since_epoch=stale-{epoch}")
    assert status == 409 and body["detail"]["code"] == ErrorCode.UNRECOVERABLE_POSITION
    reply = await client.call("subscribe", channels=[{"channel": channel, "since": stale}])
    result = reply["result"]["channels"][0]
    assert result["recovered"] is False and result["publications"] == []
    assert result["epoch"] == epoch and result["offset"] == top
    # The current epoch at the top: recovered, nothing missed.
    await client.call("unsubscribe", channels=[channel])
    reply = await client.call(
        "subscribe", channels=[{"channel": channel, "since": {"offset": top, "epoch": epoch}}]
    )
    assert reply["result"]["channels"][0]["recovered"] is True


async def test_http_api_is_trusted(env: Env) -> None:
    """An API-key holder reads history and presence of channels clients may not read."""
    for channel in ("nohist:room", "private:room", "dm:room#alice,bob", "team:red"):
        status, body = await api_history(env, channel)
        assert status == 200 and len(body["publications"]) >= 3, (channel, body)
        path = "/api/presence?" + urllib.parse.urlencode({"channel": channel})
        status, body = await asyncio.to_thread(api, env.server, "GET", path)
        assert status == 200 and "clients" in body
    status, body = await asyncio.to_thread(
        api, env.server, "POST", "/api/publish", {"channel": "nopub:room", "data": "backend"}
    )
    assert status == 200 and body["offset"] >= 4


async def test_rpc_names_no_channel(env: Env, clients: list[ProtocolClient]) -> None:
    """RPC is not channel-scoped: every connected client may call; the handler decides."""
    for who, user in (("anonymous", ""), ("mallory", "mallory")):
        client = await open_client(env, who)
        clients.append(client)
        assert (await client.call("rpc", method="whoami"))["result"]["data"] == user


# ---------------------------------------------------------------- token kinds and expiry


async def test_subscription_token_cannot_connect(env: Env, clients: list[ProtocolClient]) -> None:
    client = await ProtocolClient.open(env.server.ws("/connect"), connect=False)
    clients.append(client)
    reply = await client.call("connect", token=sub_token("alice", "private:room"))
    assert reply["error"]["code"] == ErrorCode.UNAUTHORIZED
    # ... and a connection token is no subscription token.
    reply = await client.call("connect", token=token("alice"))
    assert reply["result"]["user"] == "alice"
    reply = await client.call("subscribe", channels=[{"channel": "private:room", "token": token("alice")}])
    assert channel_error(reply) == ErrorCode.UNAUTHORIZED


async def test_expired_subscription_token_ends_the_subscription(
    env: Env, clients: list[ProtocolClient]
) -> None:
    """At its token's exp the server pushes sub_refresh; without an answer within the
    grace period it pushes unsubscribe (112) and the client receives nothing more there."""
    channel = "private:short"
    client = await open_client(env, "alice")
    clients.append(client)
    expires = time.time() + 3  # int() below takes up to a second off
    short = jwt.encode(
        {"sub": "alice", "exp": int(expires), "channel": channel, "typ": "subscription"}, SECRET, "HS256"
    )
    assert (
        channel_error(await client.call("subscribe", channels=[{"channel": channel, "token": short}])) is None
    )
    push = await client.push("sub_refresh", timeout=10)
    assert push == {"type": "sub_refresh", "channel": channel, "grace": GRACE}
    assert time.time() >= int(expires) - 0.5
    push = await client.push("unsubscribe", timeout=GRACE + 5)
    assert push["channel"] == channel and push["code"] == ErrorCode.TOKEN_EXPIRED
    # The server forgot the subscription: no publication, a new subscribe is accepted.
    await asyncio.to_thread(api, env.server, "POST", "/api/publish", {"channel": channel, "data": "after"})
    assert "result" in await client.call("ping")
    assert not any(f.get("type") == "publication" for f in client.frames)
    fresh = sub_token("alice", channel)
    assert (
        channel_error(await client.call("subscribe", channels=[{"channel": channel, "token": fresh}])) is None
    )


async def test_sub_refresh_keeps_the_subscription(env: Env, clients: list[ProtocolClient]) -> None:
    channel = "private:refreshed"
    client = await open_client(env, "alice")
    clients.append(client)
    short = sub_token("alice", channel, exp_in=1.5)
    assert (
        channel_error(await client.call("subscribe", channels=[{"channel": channel, "token": short}])) is None
    )
    # Wrong answers are refused and change nothing.
    assert (
        await client.call("sub_refresh", channel="private:other", token=sub_token("alice", "private:other"))
    )["error"]["code"] == ErrorCode.NOT_SUBSCRIBED
    assert (await client.call("sub_refresh", channel=channel, token=token("alice")))["error"][
        "code"
    ] == ErrorCode.UNAUTHORIZED
    assert (await client.call("sub_refresh", channel=channel, token=sub_token("mallory", channel)))["error"][
        "code"
    ] == ErrorCode.PERMISSION_DENIED
    await client.push("sub_refresh", timeout=10)
    longer = sub_token("alice", channel, exp_in=600)
    reply = await client.call("sub_refresh", channel=channel, token=longer)
    assert reply["result"]["expires_at"] == jwt.decode(longer, options={"verify_signature": False})["exp"]
    await asyncio.to_thread(api, env.server, "POST", "/api/publish", {"channel": channel, "data": "kept"})
    publication = await client.push("publication")
    assert publication["data"] == "kept"
    assert not any(f.get("type") == "unsubscribe" for f in client.frames)


async def test_python_client_refreshes_subscription_tokens(env: Env) -> None:
    """herald.client.Client answers sub_refresh with its token callable and keeps receiving."""
    from herald.client import Client

    channel = "private:client"
    issued: list[float] = []

    def fresh() -> str:
        issued.append(time.time())
        return sub_token("alice", channel, exp_in=1.2)

    async with Client(env.server.ws("/connect"), token=token("alice")) as client:
        subscription = await client.subscribe(channel, token=fresh)
        # The first token, then two refreshes.
        await async_wait_for(lambda: len(issued) >= 3, timeout=10, what="two token refreshes")
        await asyncio.to_thread(
            api, env.server, "POST", "/api/publish", {"channel": channel, "data": "still"}
        )
        publication = await subscription.next(timeout=DEFAULT_TIMEOUT)
        assert publication.data == "still"
        assert client.subscription(channel) is subscription


# ---------------------------------------------------------------- the HTTP transports (issue 14)


async def open_emulated(env: Env, who: str) -> Any:
    """A session of the bidirectional emulation (HTTP stream + POSTs), connected as ``who``."""
    from .emulation_kit import RawSession

    connection_token, _ = CLIENTS[who]()
    session = await RawSession.open(env.server.http, connect=False)
    reply = await session.call("connect", **({"token": connection_token} if connection_token else {}))
    assert "result" in reply, reply
    return session


@pytest.mark.parametrize(("channel", "who", "op", "expected"), CELLS)
async def test_policy_cell_over_the_http_emulation(
    env: Env, channel: str, who: str, op: str, expected: Outcome
) -> None:
    """Every cell again over the emulation: the same command code, the same outcomes."""
    session = await open_emulated(env, who)
    try:
        assert await attempt(env, session, who, op, channel) == expected
    finally:
        await session.close()


SSE_CELLS = [
    pytest.param(channel, who, outcomes["subscribe"], id=f"{rule}-{who}")
    for rule, channel, who, outcomes in MATRIX
    # A stream has no per-channel subscription tokens: its grants come from the
    # connection token's `channels` claim (alice+grant).
    if CLIENTS[who]()[1] is None
]


@pytest.mark.parametrize("path", ["/sse", "/stream"])
@pytest.mark.parametrize(("channel", "who", "expected"), SSE_CELLS)
async def test_policy_cell_over_a_one_way_stream(
    env: Env, path: str, channel: str, who: str, expected: Outcome
) -> None:
    """Subscribing by opening a stream obeys the same rules: a refusal is an HTTP error
    whose body carries the protocol's error code (docs/transports.md)."""
    import httpx

    connection_token, _ = CLIENTS[who]()
    headers = {"Authorization": f"Bearer {connection_token}"} if connection_token else {}
    url = env.server.http + path + "?" + urllib.parse.urlencode({"channel": channel})
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=DEFAULT_TIMEOUT)) as http,
        http.stream("GET", url, headers=headers) as response,
    ):
        if response.status_code != 200:
            body = json.loads(await response.aread())
            assert expected != OK, body
            assert body["error"]["code"] == expected, body
            return
        assert expected == OK
        # The first event (SSE: its data line; NDJSON: its line) names the stream's channels.
        async for line in response.aiter_lines():
            if channel in line and ("subscribed" in line or line.startswith("data:")):
                return
        raise AssertionError("the stream ended before its subscribed event")
