"""What long-lived state costs the cyclic garbage collector (issue 19).

A full collection walks every object the collector tracks.  With 10,000 connections,
50,000 presence entries and a full history in 2,000 channels, a node held ~600,000
tracked objects and each full collection stalled the loop for 100-200 ms (S5 with the
namespaces as shipped failed its latency bound at 400 publications/s).  History and
presence entries are now plain tuples of strings and numbers, which the collector stops
tracking, and an idle connection creates its rarely used parts on first use.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from bench.heap import masked_text, open_client

from herald.brokers.base import ClientInfo, PublishOptions, StreamPosition
from herald.brokers.memory import MemoryBroker
from herald.codes import ErrorCode
from herald.config import Settings
from herald.exceptions import CommandError
from herald.hooks import ExpiresAt
from herald.presence.memory import MemoryPresenceManager
from herald.server import create_app
from herald.transports.uvicorn import HeraldWebSocketProtocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from .helpers import ThreadServer, raw_websocket, read_until, wait_for


def handshake_deadlines() -> int:
    """Handshake deadline timers alive in this process (their bound callbacks)."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if getattr(getattr(o, "__func__", None), "__name__", "") == "_handshake_deadline"
    )


def tracked() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_history_entries_are_not_tracked_by_the_collector() -> None:
    broker = MemoryBroker()
    options = PublishOptions(history_size=500, history_ttl=600.0, info=ClientInfo("c1", "u1", None))

    async def run() -> int:
        await broker.publish("chat:warm", b"0", options)
        before = tracked()
        for channel in ("chat:a", "chat:b"):
            for n in range(1000):
                await broker.publish(channel, b"%d" % n, options)
        return tracked() - before

    added = asyncio.run(run())
    # 1,000 entries kept (500 per channel); a stream and its deque per channel are tracked.
    assert added < 50, f"{added} objects tracked for 1,000 history entries"

    async def read() -> None:
        epoch = (await broker.history("chat:a", limit=0)).position.epoch
        result = await broker.history("chat:a", since=StreamPosition(990, epoch))
        assert [p.offset for p in result.publications] == list(range(991, 1001))
        assert all(p.info == ClientInfo("c1", "u1", None) for p in result.publications)
        assert [p.data for p in result.publications] == [b"%d" % n for n in range(990, 1000)]
        newest = await broker.history("chat:b", limit=2, reverse=True)
        assert [(p.channel, p.offset, p.epoch) for p in newest.publications] == [
            ("chat:b", 1000, newest.position.epoch),
            ("chat:b", 999, newest.position.epoch),
        ]
        # A publication from the HTTP API has no publisher.
        await broker.publish("chat:c", b"1", PublishOptions(history_size=10, history_ttl=600.0))
        (anonymous,) = (await broker.history("chat:c")).publications
        assert (anonymous.data, anonymous.info) == (b"1", None)

    asyncio.run(read())


def test_presence_entries_are_not_tracked_by_the_collector() -> None:
    presence = MemoryPresenceManager()

    async def run() -> int:
        await presence.add("room:warm", ClientInfo("w", "u", None), 60.0)
        before = tracked()
        for n in range(2000):
            await presence.add(f"room:{n % 10}", ClientInfo(f"c{n}", f"u{n % 7}", None), 60.0)
        await presence.refresh(
            "room:0", [ClientInfo(f"c{n}", f"u{n % 7}", None) for n in range(0, 2000, 10)], 60.0
        )
        return tracked() - before

    added = asyncio.run(run())
    assert added < 20, f"{added} objects tracked for 2,000 presence entries"
    members = asyncio.run(presence.presence("room:3"))
    assert len(members) == 200
    assert members["c3"] == ClientInfo("c3", "u3", None)


@pytest.fixture
def native_server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    """``herald serve``'s app and protocol classes in this process; ``native_routes`` from
    indirect parametrization (default: served natively)."""
    native = getattr(request, "param", True)
    app = create_app(Settings(demos=False, metrics=False, admin=False, native_routes=native))
    server = ThreadServer(
        app, http=HeaderTimeoutHTTPProtocol, ws=HeraldWebSocketProtocol, lifespan="on"
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_an_idle_protocol_connection_holds_few_tracked_objects(native_server: ThreadServer) -> None:
    """Connected and subscribed to one channel: about 15 tracked objects (it was 26)."""
    warm = [open_client(native_server.port, "/connect") for _ in range(10)]
    gc.collect()
    before = Counter(type(o).__qualname__ for o in gc.get_objects())
    count = 200
    clients = [open_client(native_server.port, "/connect") for _ in range(count)]
    try:
        assert handshake_deadlines() == 0  # dropped at connect (see the next test); collects
        after = Counter(type(o).__qualname__ for o in gc.get_objects())
        grown = after - before
        per_connection = (sum(grown.values()) - count) / count  # minus the client's own socket
        # Created on first use only: token timers, the strike bucket, command-id and RPC sets.
        # (A few of any type may come from elsewhere in this process meanwhile: another
        # test's threads, the loop.  One per connection more would be ``count`` more.)
        for lazy in ("TokenExpiry", "set"):
            assert grown[lazy] <= count + count // 10, (lazy, grown[lazy])
        assert grown["TokenBucket"] == count  # the command bucket only
        assert grown["tuple"] < count  # the parsed request headers are not kept
        assert per_connection <= 18, (
            f"{per_connection:.1f} tracked objects per connection: {grown.most_common(12)}"
        )
    finally:
        for sock in clients + warm:
            sock.close()


def connected_client(port: int) -> socket.socket:
    """A /connect client that sends ``connect`` and nothing else."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:  # a client sends no frame before the 101 (RFC 6455)
        received += sock.recv(4096)
    sock.sendall(masked_text('{"id":1,"type":"connect"}'))
    while b'"id":1' not in received:
        received += sock.recv(4096)
    return sock


@pytest.mark.parametrize("native_server", [True, False], ids=["native", "asgi"], indirect=True)
def test_the_handshake_deadline_is_dropped_once_connected(native_server: ThreadServer) -> None:
    """A client that connects and then only listens holds no timer (handshake_timeout is
    10 s: one left behind would still be alive)."""
    clients = [connected_client(native_server.port) for _ in range(20)]
    try:
        wait_for(lambda: handshake_deadlines() == 0, what="handshake deadlines dropped")
        # One that has not sent its connect yet still has its deadline.
        with socket.create_connection(("127.0.0.1", native_server.port)) as pending:
            key = base64.b64encode(os.urandom(16)).decode()
            pending.sendall(
                f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1:{native_server.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert b" 101 " in pending.recv(4096)
            wait_for(lambda: handshake_deadlines() == 1, what="the unconnected client's deadline")
    finally:
        for sock in clients:
            sock.close()


# ---------------------------------------------------------------- connections that end


def _masked_close() -> bytes:
    mask = os.urandom(4)
    payload = (1000).to_bytes(2, "big")
    return bytes((0x88, 0x82)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _close_and_wait(sock: socket.socket) -> None:
    """The closing handshake from the client's side: close frame, the echo, then EOF."""
    sock.sendall(_masked_close())
    sock.settimeout(10)
    while sock.recv(4096):
        pass
    sock.close()


def _subscribed(port: int) -> socket.socket:
    sock = raw_websocket(port, "/connect")
    sock.sendall(masked_text('{"id":1,"type":"connect"}'))
    sock.sendall(masked_text('{"id":2,"type":"subscribe","channels":[{"channel":"chat:gc"}]}'))
    read_until(sock, b'"id":2')
    return sock


def _flow(name: str, port: int, native: bool = True) -> None:
    if name == "subscribed, closed by the client":
        _close_and_wait(_subscribed(port))
    elif name == "subscribed, socket dropped":
        _subscribed(port).close()  # no close frame: the server sees the socket end (1006)
    elif name == "malformed frames":
        sock = _subscribed(port)
        sock.sendall(masked_text("not json"))
        sock.sendall(masked_text('{"id":3,"type":"nope"}'))
        read_until(sock, b'"id":3')
        _close_and_wait(sock)
    elif name == "closed by the server":
        sock = _subscribed(port)
        # A frame over max_message_size (64 KiB): the server closes with 1009.
        size = 70_000
        sock.sendall(bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big") + os.urandom(4) + bytes(size))
        # The server's close frame: 1009 natively; under the ASGI driver uvicorn's parser
        # reads the payload first (the mask repeated: 1007 unless it happens to be UTF-8).
        read_until(sock, b"\x03\xf1message larger" if native else b"\x88")
        _close_and_wait(sock)  # the client's echo, then the server closes the socket
    elif name == "/ws_broadcast":
        _close_and_wait(raw_websocket(port, "/ws_broadcast"))
    elif name == "/ws_json":
        sock = raw_websocket(port, "/ws_json")
        sock.sendall(masked_text("{bad"))
        read_until(sock, b"malformed JSON")
        _close_and_wait(sock)
    else:
        raise AssertionError(name)


def _all_gone(server: ThreadServer) -> bool:
    """No connection open (uvicorn's set: natively served ones leave it at connection_lost)
    and no session cleanup running."""
    state = server.server.server_state
    return not state.connections and not state.tasks


@pytest.mark.parametrize("native_server", [True, False], ids=["native", "asgi"], indirect=True)
@pytest.mark.parametrize(
    "flow",
    [
        "subscribed, closed by the client",
        "subscribed, socket dropped",
        "malformed frames",
        "closed by the server",
        "/ws_broadcast",
        "/ws_json",
    ],
)
def test_an_ended_connection_leaves_nothing_for_the_cyclic_collector(
    native_server: ThreadServer, flow: str, request: pytest.FixtureRequest
) -> None:
    """A connection that ends is freed by reference counting, at once.

    Each of these held a whole connection (protocol, session, transport: ~18 objects, and
    ~25 more for uvicorn's HTTP protocol at every upgrade) until the cyclic collector
    walked every live connection to find it: the protocol and its session pointed at each
    other; uvicorn's HTTP protocol and its parser did; a malformed frame's error was kept
    in the frame that caught it, which its traceback held.  Under the ASGI driver the
    connection's scope held uvicorn's protocol, which held the scope (~55 objects).
    """
    native = request.node.callspec.params["native_server"]
    count = 30
    found = _found_in_cycles(native_server, count, lambda: _flow(flow, native_server.port, native))
    assert found < count, f"{found} objects in cycles after {count} connections ({flow})"


def _found_in_cycles(server: ThreadServer, count: int, one: Callable[[], None]) -> int:
    """Objects the cyclic collector finds after ``count`` runs of ``one`` (each a
    connection that ends), with the collector off meanwhile; three runs warm up first."""
    for _ in range(3):  # first-use caches, lazily built types
        one()
    wait_for(lambda: _all_gone(server), what="the warm-up connections gone")
    gc.collect()
    gc.disable()
    try:
        for _ in range(count):
            one()
        wait_for(lambda: _all_gone(server), what="every connection gone")
        return gc.collect()
    finally:
        gc.enable()


def _stream_and_drop(port: int, path: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    if path == "/emulation/connect":
        # An emulated /connect session, its first commands riding on the stream request.
        body = b'{"commands":[{"id":1,"type":"connect"},{"id":2,"type":"subscribe","channels":[{"channel":"lobby"}]}]}'
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        read_until(sock, b'"id":2')
    else:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        read_until(sock, b'"type":"subscribed"')
    sock.close()  # the client goes away; the server ends the stream


@pytest.mark.parametrize("path", ["/sse?channel=lobby", "/stream?channel=lobby", "/emulation/connect"])
def test_an_ended_stream_leaves_nothing_for_the_cyclic_collector(
    native_server: ThreadServer, path: str
) -> None:
    """An SSE, HTTP-streaming or emulated session's response that ended is freed by
    reference counting.  A stream's heartbeat timer's callback was a closure that
    scheduled itself, holding itself (and the stream's transport, connection and
    uvicorn's request cycle: ~58 objects) in a cycle; an emulated session and its socket
    held each other (~60)."""
    count = 20
    found = _found_in_cycles(native_server, count, lambda: _stream_and_drop(native_server.port, path))
    assert found < count, f"{found} objects in cycles after {count} streams ({path})"


def test_a_connection_closed_by_a_refused_refresh_leaves_nothing_for_the_cyclic_collector() -> None:
    """The refresh hook's refusal ends the connection (4004); the error did not stay in a
    local of the coroutine that awaited the hook (its traceback holds that frame)."""
    app = create_app(Settings(demos=False, metrics=False, admin=False))
    node = app.state.herald.node

    async def until_soon(ctx: object) -> ExpiresAt:
        return ExpiresAt(time.time() + 0.2)

    async def refuse(ctx: object) -> None:
        raise CommandError(ErrorCode.PERMISSION_DENIED, "no more")

    node.add_hook("connect", until_soon)
    node.add_hook("refresh", refuse)
    server = ThreadServer(
        app, http=HeaderTimeoutHTTPProtocol, ws=HeraldWebSocketProtocol, lifespan="on"
    ).start()

    def refused_clients(count: int) -> None:
        socks = [raw_websocket(server.port, "/connect") for _ in range(count)]
        for sock in socks:
            sock.sendall(masked_text('{"id":1,"type":"connect"}'))
        for sock in socks:
            read_until(sock, b"refresh refused: no more")  # the close frame's reason (4004)
            _close_and_wait(sock)

    try:
        refused_clients(2)
        wait_for(lambda: _all_gone(server), what="the warm-up connections gone")
        gc.collect()
        count = 10
        gc.disable()
        try:
            refused_clients(count)
            wait_for(lambda: _all_gone(server), what="every connection gone")
            found = gc.collect()
        finally:
            gc.enable()
    finally:
        server.stop()
    assert found < count, f"{found} objects in cycles after {count} refused refreshes"
