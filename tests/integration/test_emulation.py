"""Bidirectional emulation on one node, over real sockets, on both serving paths (a
`herald serve` process and a library FastAPI app that includes Herald's router): the
protocol works, and hostile input gets its documented answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from herald import Herald, Settings
from herald.client import Client
from herald.demos import DEMO_NAMESPACES

from ..helpers import DEFAULT_TIMEOUT, ServerProcess, ThreadServer, async_until
from .emulation_kit import RawSession, metric

pytestmark = pytest.mark.asyncio

API_KEY = "emulation-key"
#: Small bounds, so that floods and slow readers reach them quickly.
LIMITS = {
    "max_queue_bytes": 64 * 1024,
    "rate_limit": 50.0,
    "rate_limit_burst": 100,
    "rate_limit_strikes": 5,
    "max_message_size": 16 * 1024,
}


@pytest.fixture(scope="module")
def serve_node() -> Iterator[ServerProcess]:
    env = {f"HERALD_{key.upper()}": str(value) for key, value in LIMITS.items()}
    server = ServerProcess(env={**env, "HERALD_API_KEY": API_KEY, "HERALD_LOG_LEVEL": "warning"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def library_node() -> Iterator[ThreadServer]:
    """A FastAPI app of its own that includes Herald's router: the emulation comes with it."""
    settings = Settings(api_key=API_KEY, namespaces=dict(DEMO_NAMESPACES), **LIMITS)  # type: ignore[arg-type]
    herald = Herald(settings)
    app = FastAPI(lifespan=herald.lifespan)
    app.include_router(herald.router)
    app.include_router(herald.api_router)

    @herald.on_subscribe
    async def hold(ctx: Any, channel: str) -> None:
        if channel == "chat:slowhook":
            await asyncio.sleep(3)  # keeps the session busy: its next commands queue up

    @herald.rpc("add")
    async def add(params: dict[str, int]) -> int:
        return params["a"] + params["b"]

    server = ThreadServer(app).start()
    server.herald = herald  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(params=["serve", "library"])
def node(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_node")


async def publish(base: str, channel: str, data: Any) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            base + "/api/publish", json={"channel": channel, "data": data}, headers={"X-API-Key": API_KEY}
        )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result


async def emulation_counts(node: Any) -> tuple[int, dict[int, int]]:
    """Sessions accepted on the ``emulation`` route, and how they ended (close code ->
    count): from /metrics on `herald serve`, from the node's counters in the library app."""
    herald = getattr(node, "herald", None)
    if herald is not None:
        stats = herald.node.stats.route("emulation")
        return stats.accepted, dict(stats.close_codes)
    async with httpx.AsyncClient() as http:
        text = (await http.get(node.http + "/metrics")).text
    codes = {
        code: int(metric(text, "herald_disconnects_total", route="emulation", code=str(code)))
        for code in (1006, 4001, 4504)
    }
    return int(metric(text, "herald_connections_total", route="emulation")), codes


@pytest.fixture
async def raw(node: Any) -> AsyncIterator[RawSession]:
    session = await RawSession.open(node.http)
    yield session
    await session.close()


# ---------------------------------------------------------------- the protocol


async def test_python_client_over_http_stream_subscribes_publishes_and_recovers(node: Any) -> None:
    channel = "chat:emulated"
    reader = Client(node.ws("/connect"), name="reader", transport="http_stream")
    writer = Client(node.ws("/connect"), name="writer", transport="http_stream")
    await reader.connect()
    await writer.connect()
    try:
        sub = await reader.subscribe(channel)
        position = await writer.publish(channel, {"n": 1})
        first = await asyncio.wait_for(anext(aiter(sub)), DEFAULT_TIMEOUT)
        assert first.data == {"n": 1} and first.offset == position.offset
        presence = await reader.presence(channel)
        assert set(presence) == {reader.client_id}
        history = await writer.history(channel, limit=10)
        assert [p.data for p in history.publications][-1] == {"n": 1}

        # A cut of the stream: the client reconnects (a new session) and recovers what it missed.
        link = reader._link
        assert link is not None
        link.ws.transport.abort()
        missed = [await publish(node.http, channel, {"n": n}) for n in (2, 3, 4)]
        got = [await asyncio.wait_for(anext(aiter(sub)), DEFAULT_TIMEOUT) for _ in missed]
        assert [p.data for p in got] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert [p.offset for p in got] == [m["offset"] for m in missed]
        assert reader.connections == 2
    finally:
        await reader.close()
        await writer.close()
    accepted, _ = await emulation_counts(node)
    assert accepted >= 3


async def test_rpc_and_errors_come_back_on_the_stream(library_node: ThreadServer) -> None:
    client = Client(library_node.ws("/connect"), transport="http_stream")
    await client.connect()
    try:
        assert await client.rpc("add", {"a": 2, "b": 3}) == 5
    finally:
        await client.close()
    raw = await RawSession.open(library_node.http)
    try:
        missing = await raw.call("rpc", method="nope")
        assert missing["error"]["code"] == 113  # method not found, as on a WebSocket
        malformed = await raw.call("subscribe", channels="not-a-list")
        assert malformed["error"]["code"] == 101
    finally:
        await raw.close()


async def test_first_commands_may_ride_on_the_stream_request(node: Any) -> None:
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        body = {
            "commands": [
                {"id": 1, "type": "connect"},
                {"id": 2, "type": "subscribe", "channels": [{"channel": "chat:first"}]},
            ]
        }
        async with http.stream("POST", node.http + "/emulation/connect", json=body) as response:
            frames = []
            async for line in response.aiter_lines():
                if line.strip():
                    frames.append(json.loads(line))
                if len(frames) == 3:
                    break
    assert frames[0]["type"] == "emulation"
    assert frames[1]["id"] == 1 and "client" in frames[1]["result"]
    assert frames[2]["id"] == 2 and frames[2]["result"]["channels"][0]["channel"] == "chat:first"


async def test_sse_framing_for_event_source(node: Any) -> None:
    async with (
        httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http,
        http.stream("GET", node.http + "/emulation/connect") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                hello = json.loads(line[len("data: ") :])
                break
    assert hello["type"] == "emulation" and hello["session"].startswith(hello["node"] + ".")


async def test_session_ends_when_its_stream_is_closed(node: Any) -> None:
    raw = await RawSession.open(node.http)
    await raw.call("subscribe", channels=[{"channel": "chat:leaving"}])
    body = raw.body([{"type": "ping", "id": 99}])
    await raw.close()
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:

        async def gone() -> bool:
            return (await http.post(node.http + "/emulation", json=body)).status_code == 404

        await async_until(gone, what="the session ends with its stream")


# ---------------------------------------------------------------- hostile input


async def post(node: Any, body: Any, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        if isinstance(body, bytes):
            return await http.post(node.http + "/emulation", content=body, **kwargs)
        return await http.post(node.http + "/emulation", json=body, **kwargs)


async def test_unknown_session_is_404(node: Any, raw: RawSession) -> None:
    ping = [{"id": 1, "type": "ping"}]
    for session in ("nope", raw.hello["node"] + ".0123456789abcdef", raw.session + "0"):
        response = await post(node, {"session": session, "secret": raw.secret, "commands": ping})
        assert response.status_code == 404, session
        assert response.json()["detail"] == "unknown or ended session"


async def test_wrong_secret_is_403_and_injects_nothing(node: Any, raw: RawSession) -> None:
    injected = [{"id": 77, "type": "subscribe", "channels": [{"channel": "chat:injected"}]}]
    for secret in ("", "x", raw.secret[:-1], raw.secret + "x"):
        response = await post(node, raw.body(injected, secret=secret))
        assert response.status_code == 403
        assert response.json()["detail"] == "wrong session secret"
    # The session never ran the command: it has no subscription, and its next command works.
    reply = await raw.call("presence", channel="chat:injected")
    assert reply["result"]["clients"] == {}
    assert raw.frames.empty()


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"not json", 400, "the body is not JSON"),
        (b"[1, 2]", 400, "the body must be a JSON object"),
        ({"session": 1, "secret": "s", "commands": []}, 400, "session and secret must be strings"),
        (
            {"session": "s", "secret": "s", "commands": "ping"},
            400,
            "commands must be a list of command objects",
        ),
        ({"session": "s", "secret": "s", "commands": [1]}, 400, "commands must be a list of command objects"),
        ({"session": "s", "secret": "s", "commands": []}, 400, "no commands"),
        (
            {"session": "s", "secret": "s", "commands": [{"type": "ping"}] * 101},
            413,
            "more than 100 commands",
        ),
        (
            {"session": "s", "secret": "s", "commands": [{"type": "publish", "data": "x" * 17000}]},
            413,
            "max_message_size",
        ),
    ],
)
async def test_malformed_posts_are_refused(node: Any, body: Any, status: int, detail: str) -> None:
    response = await post(node, body)
    assert response.status_code == status
    assert detail in response.json()["detail"]


def huge_body(port: int, path: str, *, chunked: bool) -> tuple[int, bytes, int]:
    """POST a body over the limit (300 MiB declared, or chunked without end): returns the
    status, the answer's body, and how many bytes the server took before it was gone."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {300 * 1024 * 1024}"
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{length}\r\n\r\n".encode())
        piece = b"x" * 65536
        pushed = 0
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data and pushed < 64 * 1024 * 1024:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
                pushed += len(piece)
                sock.settimeout(0.01)
                with contextlib.suppress(TimeoutError):
                    data += sock.recv(65536)
        sock.settimeout(5)
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body, pushed


@pytest.mark.parametrize("path", ["/emulation", "/emulation/connect"])
@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "streamed"])
async def test_huge_post_body_is_refused_unread(node: Any, raw: RawSession, path: str, chunked: bool) -> None:
    status, body, pushed = await asyncio.to_thread(huge_body, node.port, path, chunked=chunked)
    assert status == 413, body
    assert "larger than" in json.loads(body)["detail"]
    assert pushed < 16 * 1024 * 1024  # refused at the limit (1 MiB), not read to the end
    # A session on the same node is untouched.
    assert "result" in await raw.call("ping")


async def test_a_foreign_origin_may_neither_open_nor_post(node: Any, raw: RawSession) -> None:
    evil = {"Origin": "http://evil.example"}
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        opened = await http.post(node.http + "/emulation/connect", headers=evil)
        assert opened.status_code == 403
        posted = await http.post(
            node.http + "/emulation", json=raw.body([{"type": "ping", "id": 5}]), headers=evil
        )
        assert posted.status_code == 403


async def test_command_flood_is_rate_limited_then_closed(node: Any, raw: RawSession) -> None:
    statuses: set[int] = set()
    pings = [{"type": "ping", "id": n} for n in range(100)]
    for _ in range(40):
        statuses.add(await raw.post(pings))
        if raw.ended.is_set():
            break
    notice = await raw.push("disconnect")
    assert notice["code"] == 4504 and notice["reconnect"] is False
    await asyncio.wait_for(raw.ended.wait(), DEFAULT_TIMEOUT)
    assert statuses <= {204, 429, 404}, statuses
    assert await raw.post([{"type": "ping", "id": 1}]) == 404
    assert (await emulation_counts(node))[1].get(4504, 0) >= 1


async def test_too_many_pending_commands_is_429(library_node: ThreadServer) -> None:
    """Commands wait for the session in a bounded queue: while a subscribe hook holds the
    session, 1000 commands are queued and the next POST is refused with 429."""
    raw = await RawSession.open(library_node.http)
    try:
        assert (
            await raw.post([{"id": 500, "type": "subscribe", "channels": [{"channel": "chat:slowhook"}]}])
            == 204
        )
        pings = [{"type": "ping", "id": 1000 + n} for n in range(100)]
        statuses = [await raw.post(pings) for _ in range(11)]
        assert statuses == [204] * 10 + [429], statuses
        async with httpx.AsyncClient() as http:
            refused = await http.post(library_node.http + "/emulation", json=raw.body(pings[:1]))
        assert refused.json()["detail"] == "too many commands waiting for this session"
    finally:
        await raw.close()


async def test_a_stream_that_is_never_read_is_cut_as_a_slow_consumer(node: Any) -> None:
    """A client opens a stream and stops reading: its queue bound (64 KiB here) is reached
    and the session is closed 4001; its commands then find no session."""
    host, port = node.http.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect, so that the window the client offers stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps(
        {
            "commands": [
                {"id": 1, "type": "connect"},
                {"id": 2, "type": "subscribe", "channels": [{"channel": "chat:slow"}]},
            ]
        }
    ).encode()
    sock.sendall(
        b"POST /emulation/connect HTTP/1.1\r\nHost: "
        + f"{host}:{port}".encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    received = b""
    while b'"secret"' not in received or b"}" not in received.split(b'"secret"', 1)[1]:
        chunk = await asyncio.to_thread(sock.recv, 4096)
        assert chunk, received
        received += chunk
    head, _, body_start = received.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    session = json.loads(body_start.split("\r\n")[1])
    assert session["type"] == "emulation"
    try:
        async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
            before = (await emulation_counts(node))[1].get(4001, 0)

            async def cut() -> bool:
                await asyncio.gather(*(publish(node.http, "chat:slow", "z" * 12000) for _ in range(20)))
                response = await http.post(
                    node.http + "/emulation",
                    json={
                        "session": session["session"],
                        "secret": session["secret"],
                        "commands": [{"type": "pong"}],
                    },
                )
                return response.status_code == 404

            await async_until(cut, timeout=30, what="the reader that never reads is cut")

            # The session leaves the table first; its end is counted once its stream is
            # closed (a moment later on a busy machine).
            async def counted() -> bool:
                return (await emulation_counts(node))[1].get(4001, 0) > before

            await async_until(counted, timeout=5, what="the 4001 end counted")
            assert (await emulation_counts(node))[1].get(4001, 0) == before + 1
    finally:
        sock.close()


async def test_herald_connect_over_http_stream(serve_node: ServerProcess) -> None:
    from .test_cli import Interactive, run

    channel = "chat:cli-emulated"
    before, _ = await emulation_counts(serve_node)
    cli = await Interactive.start(
        serve_node.http + "/connect", "--channel", channel, "--json", "--transport", "http_stream"
    )
    try:
        subscribed = json.loads(await cli.line(lambda t: '"subscribed"' in t))
        assert subscribed["channel"] == channel
        await publish(serve_node.http, channel, {"text": "to the cli"})
        pub = json.loads(await cli.line(lambda t: '"publication"' in t))
        assert pub["data"] == {"text": "to the cli"}
        await cli.send('{"typed": true}')  # published through a POST
        pub = json.loads(await cli.line(lambda t: '"publication"' in t))
        assert pub["data"] == {"typed": True}
        code, _out, err = await cli.finish()
    finally:
        cli.kill()
    assert code == 0, err
    accepted, _ = await emulation_counts(serve_node)
    assert accepted == before + 1  # one emulated session, not a WebSocket
    # Raw mode is WebSocket only: a clear usage error, no traceback.
    code, _out, err = await run("connect", serve_node.ws("/ws"), "--transport", "http_stream")
    assert code == 2 and err.strip() == "herald: --transport http_stream needs protocol mode (--channel)"
