"""Herald's own WebSocket protocol (transports/native.py) on real servers.

Framing conformance is checked by Autobahn (tests/conformance) and, without it, by the
frame reader's byte-level tests (tests/test_wsframes.py); the routes' behaviour by the
tutorial, channels and hostile-input suites, which run on ``herald serve`` and so on this
protocol.  These tests cover what is particular to it: which routes it serves, the
handshake's refusals, keepalive, proxy headers, shutdown, and the frame rules' close
codes on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from fastapi import FastAPI, WebSocket
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from herald import Herald
from herald.config import Settings
from herald.context import ClientContext
from herald.server import create_app
from herald.transports.native import _Keepalive
from herald.transports.uvicorn import (
    FRAGMENTS_ENV,
    AsgiWebSocketProtocol,
    BoundedSansIOProtocol,
    BoundedWSProtocol,
    HeraldWebSocketProtocol,
    fragment_limit,
    uvicorn_ws_protocol,
)
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from .helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, async_wait_for, read_until
from .test_wsframes import client_frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


#: The two ways an upgrade reaches the native protocol: from a connection's first bytes
#: (``herald serve``'s HTTP protocol hands it over, HeraldWebSocketProtocol.take_upgrade),
#: or through uvicorn's HTTP parser (any other uvicorn setup, and requests the first
#: way leaves to it).  Tests of the handshake run both.
ENTRIES = {"first-bytes": HeaderTimeoutHTTPProtocol, "uvicorn-parser": "httptools"}
by_entry = pytest.mark.parametrize("http", list(ENTRIES.values()), ids=list(ENTRIES))


@contextlib.contextmanager
def serving(app: FastAPI, http: Any = HeaderTimeoutHTTPProtocol, **config: Any) -> Iterator[ThreadServer]:
    server = ThreadServer(app, ws=HeraldWebSocketProtocol, http=http, **config).start()
    try:
        yield server
    finally:
        server.stop()


def protocol_kinds(server: ThreadServer) -> list[type]:
    return [type(c) for c in list(server.server.server_state.connections)]


def raw_handshake(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[bytes, socket.socket]:
    """Send an upgrade request by hand; returns the response head and the socket."""
    fields = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v) + "\r\n"
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head, sock


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", exactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", exactly(8))[0]
    return first & 0x0F, exactly(length)


def masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + body


@by_entry
async def test_create_app_serves_its_routes_natively_and_others_through_asgi(http: Any) -> None:
    app = create_app(Settings())

    @app.websocket("/plain")
    async def plain(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:  # until the client leaves (WebSocketDisconnect)
            await websocket.send_text(await websocket.receive_text())

    with serving(app, http) as server:
        async with websockets.connect(server.ws("/ws")) as ws:
            await ws.send("a")
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "Message text was: a"
            assert protocol_kinds(server) == [HeraldWebSocketProtocol]
        async with websockets.connect(server.ws("/plain")) as ws:
            await ws.send("b")
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "b"
            assert AsgiWebSocketProtocol in protocol_kinds(server)


@by_entry
async def test_a_library_app_serves_natively_the_routes_it_declares_at_their_prefix(http: Any) -> None:
    herald = Herald(Settings())
    app = FastAPI(lifespan=herald.lifespan)
    app.include_router(herald.router, prefix="/rt")
    herald.serve_natively(app, {"/rt/ws": "tutorial_echo"})
    with serving(app, http) as server:
        # Declared: native from the first handshake.  Not declared: ASGI, every time (no
        # path is learned), with the same replies.
        for path, expected in (("/rt/ws", HeraldWebSocketProtocol), ("/rt/ws_json", AsgiWebSocketProtocol)):
            for _ in range(2):
                async with websockets.connect(server.ws(path)) as ws:
                    await ws.send('"x"')
                    reply = await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)
                    assert reply in ('Message text was: "x"', '{"message":"Received JSON data","data":"x"}')
                    assert protocol_kinds(server) == [expected]


class _SeenByMiddleware:
    def __init__(self, app: Any, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            self.seen.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.mark.parametrize("native_routes", [True, False])
async def test_native_routes_bypass_asgi_middleware_unless_turned_off(native_routes: bool) -> None:
    seen: list[str] = []
    app = create_app(Settings(native_routes=native_routes))
    app.add_middleware(_SeenByMiddleware, seen=seen)
    with serving(app) as server:
        async with websockets.connect(server.ws("/ws")) as ws:
            await ws.send("x")
            await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)
            kind = HeraldWebSocketProtocol if native_routes else AsgiWebSocketProtocol
            assert protocol_kinds(server) == [kind]
    assert seen == ([] if native_routes else ["/ws"])


@pytest.mark.parametrize(
    ("headers", "status", "expect"),
    [
        ({"Sec-WebSocket-Version": "8"}, b"426", b"sec-websocket-version: 13"),
        ({"Sec-WebSocket-Key": "not-base64!"}, b"400", b"Sec-WebSocket-Key"),
        ({"Sec-WebSocket-Key": ""}, b"400", b"Sec-WebSocket-Key"),
        ({"Origin": "http://evil.example"}, b"403", b""),
    ],
)
@by_entry
async def test_bad_handshakes_get_an_http_error(
    headers: dict[str, str], status: bytes, expect: bytes, http: Any
) -> None:
    with serving(create_app(Settings()), http) as server:
        head, sock = await asyncio.to_thread(raw_handshake, server.port, "/connect", headers)
        with sock:
            assert head.split(b" ")[1] == status, head
            rest = await asyncio.to_thread(sock.recv, 4096)
            assert expect in head + rest
            # And the server closes the socket.
            assert await asyncio.to_thread(sock.recv, 4096) == b""


@pytest.fixture
def parser_upgrades(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The targets of the upgrades uvicorn's HTTP parser handed over, in order."""
    seen: list[str] = []
    original = HttpToolsProtocol.handle_websocket_upgrade

    def counting(self: HttpToolsProtocol) -> None:
        seen.append(self.url.decode())
        original(self)

    monkeypatch.setattr(HttpToolsProtocol, "handle_websocket_upgrade", counting)
    return seen


def raw_request(port: int, *parts: bytes) -> bytes:
    """Send ``parts`` (one ``sendall`` each) and read until the response head is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts:
            sock.sendall(part)
        return read_until(sock, b"\r\n\r\n")


UPGRADE = (
    b"GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_herald_serve_takes_a_native_upgrade_from_the_first_bytes_and_leaves_the_rest_to_uvicorn(
    parser_upgrades: list[str],
) -> None:
    app = create_app(Settings())

    @app.websocket("/plain")
    async def plain(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("plain")
        await websocket.close()

    with serving(app) as server:  # herald serve's HTTP protocol
        port = server.port
        accepted = await asyncio.to_thread(raw_request, port, UPGRADE)
        assert accepted.startswith(b"HTTP/1.1 101") and parser_upgrades == []
        async with websockets.connect(server.ws("/ws")) as ws:
            await ws.send("a")
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "Message text was: a"
        assert parser_upgrades == []
        # Declined, and served as before: through uvicorn's parser, to the same answer.
        with_body = UPGRADE.replace(b"Host:", b"Content-Length: 0\r\nHost:")
        assert await asyncio.to_thread(raw_request, port, with_body) == accepted
        assert parser_upgrades == ["/connect"]
        async with websockets.connect(server.ws("/plain")) as ws:  # not a native route
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "plain"
        assert parser_upgrades == ["/connect", "/plain"]
        # Not an upgrade (no "upgrade" in Connection): a plain request for the ASGI app,
        # which has no HTTP route there.
        plain_get = UPGRADE.replace(b"Connection: Upgrade", b"Connection: keep-alive")
        assert (await asyncio.to_thread(raw_request, port, plain_get)).startswith(b"HTTP/1.1 404")
        # Malformed: uvicorn's 400.
        malformed = UPGRADE.replace(b"Host: 127.0.0.1", b"Host 127.0.0.1")
        assert (await asyncio.to_thread(raw_request, port, malformed)).startswith(b"HTTP/1.1 400")
        # A head in two writes is upgraded (by whichever path gets it whole).
        split = await asyncio.to_thread(raw_request, port, UPGRADE[:40], UPGRADE[40:])
        assert split == accepted
        assert parser_upgrades[:2] == ["/connect", "/plain"] and len(parser_upgrades) <= 3


async def test_ping_is_answered_with_the_same_payload() -> None:
    with serving(create_app(Settings())) as server:
        head, sock = await asyncio.to_thread(raw_handshake, server.port, "/ws")
        with sock:
            assert head.startswith(b"HTTP/1.1 101")
            sock.sendall(masked(0x9, b"are you there"))
            assert await asyncio.to_thread(read_frame, sock) == (0xA, b"are you there")


async def test_keepalive_closes_a_silent_peer_and_keeps_an_answering_one() -> None:
    with serving(create_app(Settings()), ws_ping_interval=0.2, ws_ping_timeout=0.2) as server:
        head, silent = await asyncio.to_thread(raw_handshake, server.port, "/ws")
        answering = await websockets.connect(server.ws("/ws"))  # answers pings by itself
        with silent:
            assert head.startswith(b"HTTP/1.1 101")
            frames = []
            while not frames or frames[-1][0] != 0x8:
                frames.append(await asyncio.to_thread(read_frame, silent))
            assert frames[0] == (0x9, b"")  # pinged first
            assert struct.unpack("!H", frames[-1][1][:2])[0] == 1011
            assert b"keepalive" in frames[-1][1]
        # The silent peer needed several sweeps to be closed; the answering one is still served.
        await answering.send("still here")
        assert await asyncio.wait_for(answering.recv(), DEFAULT_TIMEOUT) == "Message text was: still here"
        await answering.close()


class _Looked:
    """Stands for a connection in the keepalive's groups; counts its looks."""

    def __init__(self) -> None:
        self.keepalive_group = 0
        self.looks = 0

    def keepalive_tick(self) -> None:
        self.looks += 1


def test_the_keepalive_looks_at_each_connection_once_per_interval_a_group_per_tick() -> None:
    """A sweep's pings are spread over the interval (a ping is a write(): 10,000 in one
    callback held the loop ~100 ms), and every connection is still looked at once."""
    loop = asyncio.new_event_loop()
    try:
        keepalive = _Keepalive(loop, 10.0)
        assert len(keepalive.groups) == 20 and keepalive.tick == 0.5
        members = [_Looked() for _ in range(1000)]  # opened together, as in a storm
        for ws in members:
            keepalive.add(ws)  # type: ignore[arg-type]
        gone = members[::7]
        for ws in gone:
            keepalive.discard(ws)  # type: ignore[arg-type]
            keepalive.discard(ws)  # type: ignore[arg-type]  # twice: counted once
        assert keepalive.size == 1000 - len(gone)
        per_tick = []
        for _ in range(len(keepalive.groups)):
            before = sum(ws.looks for ws in members)
            keepalive.sweep()
            per_tick.append(sum(ws.looks for ws in members) - before)
        assert sum(per_tick) == keepalive.size
        assert max(per_tick) <= 1000 // 20
        assert {ws.looks for ws in members if ws not in gone} == {1}
        assert {ws.looks for ws in gone} == {0}
        assert keepalive.timer is not None  # the next interval is under way
        for ws in members:
            keepalive.discard(ws)  # type: ignore[arg-type]
        keepalive.sweep()
        assert keepalive.size == 0 and keepalive.timer is None  # stops when empty
        # A short interval: one group, every connection at each tick (as before).
        assert len(_Keepalive(loop, 0.2).groups) == 1
        assert len(_Keepalive(loop, 600.0).groups) == 64
    finally:
        loop.close()


@pytest.mark.parametrize("native", [True, False], ids=["native", "asgi-driver"])
@pytest.mark.parametrize("protocol_pings", [True, False], ids=["protocol-pings", "no-protocol-pings"])
async def test_a_protocol_client_gets_websocket_pings_only_without_protocol_pings(
    protocol_pings: bool, native: bool
) -> None:
    """/connect's own pings (with a pong deadline) make the WebSocket keepalive's pings
    redundant: a protocol client gets them only when protocol pings are off, served
    natively or through the ASGI driver (uvicorn's own keepalive, stopped by Herald)."""
    settings = Settings(ping_interval=30.0 if protocol_pings else 0, native_routes=native)
    with serving(create_app(settings), ws_ping_interval=0.2, ws_ping_timeout=0.2) as server:
        head, client = await asyncio.to_thread(raw_handshake, server.port, "/connect")
        with client:
            assert head.startswith(b"HTTP/1.1 101")
            client.sendall(masked(0x1, b'{"id":1,"type":"connect"}'))
            opcode, reply = await asyncio.to_thread(read_frame, client)
            assert opcode == 0x1 and b'"id":1' in reply
            # A silent /ws peer on the same keepalive: pinged at one sweep, closed at the
            # next.  Once it is closed, any ping for the protocol client was written too.
            head, silent = await asyncio.to_thread(raw_handshake, server.port, "/ws")
            with silent:
                assert head.startswith(b"HTTP/1.1 101")
                frames = [await asyncio.to_thread(read_frame, silent)]
                while frames[-1][0] != 0x8:
                    frames.append(await asyncio.to_thread(read_frame, silent))
                assert frames[0][0] == 0x9
            if protocol_pings:
                client.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    await asyncio.to_thread(read_frame, client)
            else:
                opcode, payload = await asyncio.to_thread(read_frame, client)
                # uvicorn's keepalive pings carry 4 random bytes; the native driver's none.
                assert opcode == 0x9 and len(payload) == (0 if native else 4)


@by_entry
async def test_forwarded_client_address_counts_for_the_per_ip_limit(http: Any) -> None:
    app = create_app(Settings(max_connections_per_ip=1))
    with serving(app, http) as server:
        # Loopback is a trusted proxy by default (uvicorn's forwarded_allow_ips).
        first, a = await asyncio.to_thread(
            raw_handshake, server.port, "/ws", {"X-Forwarded-For": "203.0.113.5"}
        )
        second, b = await asyncio.to_thread(
            raw_handshake, server.port, "/ws", {"X-Forwarded-For": "203.0.113.5"}
        )
        other, c = await asyncio.to_thread(
            raw_handshake, server.port, "/ws", {"X-Forwarded-For": "203.0.113.6"}
        )
        with a, b, c:
            assert first.startswith(b"HTTP/1.1 101")
            assert second.startswith(b"HTTP/1.1 403")
            assert other.startswith(b"HTTP/1.1 101")


async def test_clients_get_1012_when_the_server_stops() -> None:
    server = ThreadServer(create_app(Settings()), ws=HeraldWebSocketProtocol).start()
    ws = await websockets.connect(server.ws("/ws"))
    try:
        await asyncio.to_thread(server.stop)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)
        assert ws.close_code == 1012
    finally:
        await ws.close()


async def test_a_busy_connection_stops_being_read_until_its_messages_are_handled() -> None:
    # A publisher floods /ws_broadcast faster than its messages are handled: reading pauses
    # (the inbox is bounded) and every message still arrives, in order.  The receiver reads
    # in this test's thread, under the GIL with the server: a queue bound that lets it lag.
    app = create_app(Settings(rate_limit=0, max_queue_messages=10_000))
    with serving(app) as server:
        sender = await websockets.connect(server.ws("/ws_broadcast"))
        receiver = await websockets.connect(server.ws("/ws_broadcast"), max_queue=None)
        try:
            await async_wait_for(lambda: len(list(app.state.herald.node.hub.connections())) == 2)
            count = 2000
            for i in range(count):
                await sender.send(str(i))
            got = [await asyncio.wait_for(receiver.recv(), DEFAULT_TIMEOUT) for _ in range(count)]
            assert got == [f"New message: {i}" for i in range(count)]
        finally:
            await sender.close()
            await receiver.close()


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        # A text message that ends inside a character (its last fragment decoded as final).
        ([client_frame(0x1, b"ab\xe2", fin=False), client_frame(0x0, b"\x82")], 1007, b"UTF-8"),
        # Reserved bit 1 (permessage-deflate's) without an extension.
        ([client_frame(0x1, b"hi", rsv=0x40)], 1002, b"reserved bits"),
        # A new data frame inside a fragmented message.
        ([client_frame(0x1, b"a", fin=False), client_frame(0x1, b"b")], 1002, b"new message"),
        # One frame more than max_message_fragments (3 here).
        (
            [client_frame(0x1, b"a", fin=False), *[client_frame(0x0, b"", fin=False)] * 3],
            1009,
            b"message in more than 3 fragments",
        ),
    ],
)
async def test_frame_rules_close_the_connection_with_their_code(
    frames: list[bytes], code: int, reason: bytes
) -> None:
    with serving(create_app(Settings(max_message_fragments=3))) as server:
        head, sock = await asyncio.to_thread(raw_handshake, server.port, "/ws")
        with sock:
            assert head.startswith(b"HTTP/1.1 101")
            sock.sendall(b"".join(frames))
            # The first frame back is the close frame: nothing was echoed.
            opcode, payload = await asyncio.to_thread(read_frame, sock)
            assert opcode == 0x8, payload
            assert struct.unpack("!H", payload[:2])[0] == code
            assert reason in payload[2:]


async def test_a_fragmented_message_within_the_bounds_is_echoed_whole() -> None:
    with serving(create_app(Settings(max_message_fragments=3))) as server:
        head, sock = await asyncio.to_thread(raw_handshake, server.port, "/ws")
        with sock:
            assert head.startswith(b"HTTP/1.1 101")
            euro = "€".encode()
            sock.sendall(
                client_frame(0x1, b"ab" + euro[:1], fin=False)
                + client_frame(0x0, euro[1:2], fin=False)
                + client_frame(0x0, euro[2:] + b"!")
            )
            assert await asyncio.to_thread(read_frame, sock) == (0x1, "Message text was: ab€!".encode())


@pytest.mark.parametrize(
    ("value", "limit"), [(None, 4096), ("100", 100), ("1", 1), ("0", 4096), ("-5", 4096), ("many", 4096)]
)
def test_asgi_protocols_read_their_fragment_bound_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, limit: int
) -> None:
    if value is None:
        monkeypatch.delenv(FRAGMENTS_ENV, raising=False)
    else:
        monkeypatch.setenv(FRAGMENTS_ENV, value)
    assert fragment_limit() == limit


@pytest.mark.parametrize(
    ("ws_impl", "fast_path", "expected"),
    [
        ("websockets-sansio", True, HeraldWebSocketProtocol),
        ("auto", True, HeraldWebSocketProtocol),
        ("websockets-sansio", False, BoundedSansIOProtocol),
        ("auto", False, BoundedSansIOProtocol),
        ("wsproto", True, BoundedWSProtocol),
        ("wsproto", False, BoundedWSProtocol),
        # websockets' legacy protocol bounds fragments itself (4096 per message).
        ("websockets", True, "websockets"),
    ],
)
def test_herald_serve_runs_a_bounded_protocol_for_every_implementation(
    ws_impl: str, fast_path: bool, expected: object
) -> None:
    assert uvicorn_ws_protocol(ws_impl, fast_path) == expected


@pytest.mark.parametrize("native_routes", [True, False], ids=["native", "asgi-driver"])
@by_entry
async def test_hooks_see_the_same_handshake_on_both_drivers(native_routes: bool, http: Any) -> None:
    herald = Herald(Settings(native_routes=native_routes))
    seen: dict[str, Any] = {}

    @herald.on_connect
    async def look(ctx: ClientContext) -> None:
        seen.update(
            header=ctx.header("x-who"),
            query=ctx.query("room"),
            cookie=ctx.cookie("s"),
            ip=ctx.client_ip,
            path=ctx.scope["path"],
            subprotocols=list(ctx.handshake.subprotocols),
        )

    app = create_app(herald=herald)
    with serving(app, http) as server:
        client = await ProtocolClient.open(
            server.ws("/connect?room=r%201&x=y"),
            additional_headers={"X-Who": "ada", "Cookie": "s=abc; t=1"},
            subprotocols=["other", "herald.v1"],
        )
        try:
            assert client.ws.subprotocol == "herald.v1"
            assert protocol_kinds(server) == [
                HeraldWebSocketProtocol if native_routes else AsgiWebSocketProtocol
            ]
        finally:
            await client.close()
    assert seen == {
        "header": "ada",
        "query": "r 1",
        "cookie": "abc",
        "ip": "127.0.0.1",
        "path": "/connect",
        "subprotocols": ["other", "herald.v1"],
    }
