"""The fast path (transports/fastpath.py) keeps every delivery guarantee.

Real uvicorn servers on free ports run with Herald's WebSocket protocol class,
as ``herald serve`` does; clients are real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
import websockets
from fastapi import FastAPI, WebSocket
from websockets.frames import Frame, Opcode

from herald.codes import CloseCode
from herald.config import Settings
from herald.connection import Connection
from herald.server import create_app
from herald.transports.asgi import AsgiSocket
from herald.transports.fastpath import frame_text, framed
from herald.transports.uvicorn import (
    BoundedSansIOProtocol,
    FastAsgiSocket,
    HeraldWebSocketProtocol,
    uvicorn_ws_protocol,
)
from herald.tutorial import render_broadcast

from .helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, async_wait_for
from .recording import RecordingTransport

CHANNEL = "fast:one"
NAMESPACES = {"fast": {"presence": False, "join_leave": False, "history_size": 1000}}


def _app(**settings: object) -> FastAPI:
    app = create_app(Settings(namespaces=NAMESPACES, rate_limit=0, **settings))  # type: ignore[arg-type]

    @app.websocket("/plain")
    async def plain(websocket: WebSocket) -> None:
        # An ordinary ASGI route beside Herald's: must keep working with the protocol class.
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"plain: {text}")

    return app


@contextlib.contextmanager
def serving(app: FastAPI, ws: object = HeraldWebSocketProtocol) -> Iterator[ThreadServer]:
    server = ThreadServer(app, ws=ws).start()
    try:
        yield server
    finally:
        server.stop()


def _server_connections(app: FastAPI) -> list[object]:
    return list(app.state.herald.node.hub.connections())


# ------------------------------------------------------------------ framing (pure)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frame_text_matches_websockets_serializer(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert frame_text(payload) == expected


def test_framed_reuses_the_frame_for_the_same_text_object() -> None:
    text = "x" * 300
    first = framed(text)
    assert framed(text) is first
    other = "y" * 300
    assert framed(other) == frame_text(other.encode())


def test_uvicorn_ws_protocol_choice() -> None:
    assert uvicorn_ws_protocol("websockets-sansio", True) is HeraldWebSocketProtocol
    assert uvicorn_ws_protocol("auto", True) is HeraldWebSocketProtocol
    # Without the fast path, uvicorn's own class with Herald's fragment bound (the other
    # implementations: tests/test_native.py).
    assert uvicorn_ws_protocol("websockets-sansio", False) is BoundedSansIOProtocol


# ------------------------------------------------------------------ real servers


def _socket_of(transport: object) -> asyncio.Transport:
    """The asyncio transport under a connection's fast transport (native or ASGI)."""
    if isinstance(transport, HeraldWebSocketProtocol):
        return transport.transport
    assert isinstance(transport, FastAsgiSocket)
    return transport._protocol.transport


TRANSPORT_KINDS = pytest.mark.parametrize(
    ("native", "kind"), [(True, HeraldWebSocketProtocol), (False, FastAsgiSocket)], ids=["native", "asgi"]
)


@TRANSPORT_KINDS
async def test_publications_in_order_with_offsets_on_the_fast_path(native: bool, kind: type) -> None:
    app = _app(native_routes=native)
    with serving(app) as server:
        subscriber = await ProtocolClient.open(server.ws("/connect"))
        publisher = await ProtocolClient.open(server.ws("/connect"))
        try:
            reply = await subscriber.call("subscribe", channels=[{"channel": CHANNEL}])
            assert "error" not in reply["result"]["channels"][0], reply
            connections = _server_connections(app)
            assert connections and all(
                type(c.transport) is kind  # type: ignore[attr-defined]
                for c in connections
            )
            count = 300
            for i in range(count):
                await publisher.send_raw(
                    f'{{"id":{1000 + i},"type":"publish","channel":"{CHANNEL}","data":{{"n":{i}}}}}'
                )
            publications = await subscriber.publications(count)
            assert [p["data"]["n"] for p in publications] == list(range(count))
            offsets = [p["offset"] for p in publications]
            assert offsets == list(range(offsets[0], offsets[0] + count))
            assert len({p["epoch"] for p in publications}) == 1
        finally:
            await subscriber.close()
            await publisher.close()


async def test_ordinary_asgi_routes_work_with_the_protocol_class() -> None:
    app = _app()
    with serving(app) as server:
        async with websockets.connect(server.ws("/plain")) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "plain: hello"
        async with websockets.connect(server.ws("/ws")) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "Message text was: hi"
        # An HTTP route on the same server.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), DEFAULT_TIMEOUT)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200")


async def test_plain_uvicorn_and_fast_path_off_use_asgi_sends() -> None:
    for app, ws in ((_app(), "websockets-sansio"), (_app(fast_path=False), HeraldWebSocketProtocol)):
        with serving(app, ws) as server:
            a = await websockets.connect(server.ws("/ws_broadcast"))
            b = await websockets.connect(server.ws("/ws_broadcast"))
            try:
                await async_wait_for(lambda app=app: len(_server_connections(app)) == 2)
                transports = [c.transport for c in _server_connections(app)]  # type: ignore[attr-defined]
                assert all(type(t) is AsgiSocket for t in transports)
                await a.send("ping")
                assert await asyncio.wait_for(b.recv(), DEFAULT_TIMEOUT) == "New message: ping"
            finally:
                await a.close()
                await b.close()


def _raw_handshake(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


class _FrameWalker:
    """Walks server frames as bytes arrive; remembers the close frame's code."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.close_code: int | None = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        stream = self.buffer
        i = 0
        while self.close_code is None and i + 2 <= len(stream):
            opcode, length = stream[i] & 0x0F, stream[i + 1] & 0x7F
            head = 2
            if length == 126:
                if i + 4 > len(stream):
                    break
                length, head = struct.unpack("!H", stream[i + 2 : i + 4])[0], 4
            elif length == 127:
                if i + 10 > len(stream):
                    break
                length, head = struct.unpack("!Q", stream[i + 2 : i + 10])[0], 10
            if i + head + length > len(stream):
                break
            if opcode == 8:
                self.close_code = int(struct.unpack("!H", stream[i + head : i + head + 2])[0])
            i += head + length
        del stream[:i]


@pytest.mark.slow
@TRANSPORT_KINDS
async def test_slow_consumer_is_disconnected_with_4001_within_the_bound(native: bool, kind: type) -> None:
    bound = 64 * 1024
    app = _app(max_queue_bytes=bound, max_queue_messages=1000, native_routes=native)
    with serving(app) as server:
        stuck = await asyncio.to_thread(_raw_handshake, server.port, "/ws_broadcast")
        sender = await websockets.connect(server.ws("/ws_broadcast"))
        receiver = await websockets.connect(server.ws("/ws_broadcast"), max_queue=None)
        try:
            await async_wait_for(lambda: len(_server_connections(app)) == 3)
            stuck_connection = next(
                c
                for c in _server_connections(app)
                if c.remote.endswith(f":{stuck.getsockname()[1]}")  # type: ignore[attr-defined]
            )
            transport = stuck_connection.transport  # type: ignore[attr-defined]
            assert type(transport) is kind
            socket_transport = _socket_of(transport)
            payload = "p" * 4000
            highest = 0
            for i in range(1500):  # 6 MB: far past the stuck peer's socket buffers and the bound
                await sender.send(f"{i} {payload}")
                assert (
                    await asyncio.wait_for(receiver.recv(), DEFAULT_TIMEOUT) == f"New message: {i} {payload}"
                )
                if not socket_transport.is_closing():
                    highest = max(highest, socket_transport.get_write_buffer_size())
            assert stuck_connection.close_code == 4001  # type: ignore[attr-defined]
            # The memory held for the stuck peer never went past the bound (plus the close frame).
            assert highest <= bound
            # Reading now, the peer finds the close frame with 4001 after what was buffered.
            stuck.settimeout(DEFAULT_TIMEOUT)

            def read_close_code() -> int | None:
                # A 4 KiB receive window would trickle the kernel's megabytes in tiny steps.
                stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                walker = _FrameWalker()
                while walker.close_code is None:
                    try:
                        chunk = stuck.recv(1 << 20)
                    except OSError:
                        break
                    if not chunk:
                        break
                    walker.feed(chunk)
                return walker.close_code

            code = await asyncio.to_thread(read_close_code)
            # Normally the close frame arrives; if it could not be written within 2 s the
            # server aborted the TCP connection instead (also a disconnect, without a code).
            assert code in (4001, None)
        finally:
            stuck.close()
            await sender.close()
            await receiver.close()


# ------------------------------------------------------------------ batching (in-process)


class _Wire:
    """Everything that leaves one fake connection, in order: raw writes and ASGI sends."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []
        self.buffered = 0  # what the fake socket reports as its write buffer

    # asyncio transport side
    def write(self, data: bytes) -> None:
        self.log.append(("write", data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    # ASGI side (Starlette's websocket.send)
    async def send(self, message: dict[str, object]) -> None:
        self.log.append(("asgi", message["text"]))


class _Protocol:
    """The attributes of uvicorn's protocol that the fast path reads."""

    def __init__(self, wire: _Wire) -> None:
        self.transport = wire
        self.loop = asyncio.get_running_loop()
        self.handshake_complete = True
        self.close_sent = False
        self.disconnected = False


def _fast(wire: _Wire) -> tuple[FastAsgiSocket, _Protocol]:
    protocol = _Protocol(wire)
    return FastAsgiSocket({"type": "websocket"}, wire.send, protocol), protocol  # type: ignore[arg-type]


async def test_frames_of_one_loop_turn_leave_in_one_write() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    for text in ("a", "b", "c"):
        assert transport.write_nowait(text, 1 << 20, 100) is True
    assert wire.log == []  # nothing is written before the end of this turn
    await async_wait_for(lambda: wire.log != [])
    assert wire.log == [("write", frame_text(b"a") + frame_text(b"b") + frame_text(b"c"))]


async def test_an_asgi_send_writes_the_waiting_batch_first() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    assert transport.write_nowait("first", 1 << 20, 100) is True
    await transport.send("second")
    assert wire.log == [("write", frame_text(b"first")), ("asgi", "second")]


async def test_the_bounds_count_the_batch_and_the_socket_buffer() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    frame_size = len(frame_text(b"x" * 100))
    # Bytes: the socket already holds 1000 bytes; room for two more frames.
    wire.buffered = 1000
    bound = 1000 + 2 * frame_size
    assert transport.write_nowait("x" * 100, bound, 100) is True
    assert transport.write_nowait("x" * 100, bound, 100) is True
    assert transport.write_nowait("x" * 100, bound, 100) is False
    transport.flush()
    # Frames: the buffer never emptied, so the written frames count against the bound.
    assert transport.write_nowait("y", 1 << 20, 3) is True
    assert transport.write_nowait("y", 1 << 20, 3) is False
    # Once the socket drained, the count starts again.
    transport.flush()
    wire.buffered = 0
    assert transport.write_nowait("z", 1 << 20, 3) is True


async def test_nothing_is_written_after_the_close_frame() -> None:
    wire = _Wire()
    transport, protocol = _fast(wire)
    assert transport.write_nowait("late", 1 << 20, 100) is True
    protocol.close_sent = True  # e.g. the peer closed and uvicorn answered in this turn
    transport.flush()
    assert wire.log == []
    assert transport.write_nowait("later", 1 << 20, 100) is None  # the caller queues (and drops) it


# ------------------------------------------------------------------ write delay (in-process)

DELAY = 0.3


async def _turns(count: int = 3) -> None:
    """Let the event loop go round ``count`` times (end-of-turn flushes run)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_delayed_frames_of_several_turns_leave_in_one_write_after_the_delay() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert transport.write_nowait("a", 1 << 20, 100, DELAY) is True
    await _turns()
    assert transport.write_nowait("b", 1 << 20, 100, DELAY) is True
    await _turns()
    assert wire.log == []  # not at the end of either turn: they wait for the delay
    await async_wait_for(lambda: wire.log != [])
    waited = loop.time() - started
    assert wire.log == [("write", frame_text(b"a") + frame_text(b"b"))]
    # The first frame waited the delay (the timer's), not a turn, and not much longer.
    assert DELAY * 0.9 <= waited < DELAY + 1.0, waited


async def test_a_reply_takes_the_waiting_frames_with_it_at_the_end_of_its_turn() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    assert transport.write_nowait("pub1", 1 << 20, 100, DELAY) is True
    assert transport.write_nowait("pub2", 1 << 20, 100, DELAY) is True
    await _turns()
    assert wire.log == []
    assert transport.write_nowait("reply", 1 << 20, 100) is True  # no delay: a reply
    assert wire.log == []  # still batched until the end of this turn
    await _turns()
    assert wire.log == [("write", frame_text(b"pub1") + frame_text(b"pub2") + frame_text(b"reply"))]
    # The delay's timer then finds nothing left to write.
    flusher = transport._flusher
    await async_wait_for(lambda: flusher._timer is None, what="the delay's timer fired")
    assert len(wire.log) == 1


async def test_a_frame_after_a_reply_waits_for_the_delay_again() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    assert transport.write_nowait("reply", 1 << 20, 100) is True
    await _turns()
    assert wire.log == [("write", frame_text(b"reply"))]
    assert transport.write_nowait("pub", 1 << 20, 100, DELAY) is True
    await _turns()
    assert len(wire.log) == 1  # the new batch waits for the delay, not the turn
    await async_wait_for(lambda: len(wire.log) == 2)
    assert wire.log[1] == ("write", frame_text(b"pub"))


async def test_an_asgi_send_or_close_writes_the_delayed_batch_first() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    assert transport.write_nowait("first", 1 << 20, 100, DELAY) is True
    await transport.send("second")
    assert wire.log == [("write", frame_text(b"first")), ("asgi", "second")]


async def test_the_bounds_count_the_frames_waiting_for_the_delay() -> None:
    wire = _Wire()
    transport, _ = _fast(wire)
    assert transport.write_nowait("x", 1 << 20, 3, DELAY) is True
    await _turns()
    assert transport.write_nowait("x", 1 << 20, 3, DELAY) is True
    await _turns()
    assert transport.write_nowait("x", 1 << 20, 3, DELAY) is True
    assert transport.write_nowait("x", 1 << 20, 3, DELAY) is False  # a slow consumer now
    assert transport.unwritten() == (3, 3 * len(frame_text(b"x")))


async def test_each_delayed_batch_waits_at_most_its_own_delay() -> None:
    slow_wire, quick_wire = _Wire(), _Wire()
    slow, _ = _fast(slow_wire)
    quick, _ = _fast(quick_wire)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert slow.write_nowait("slow", 1 << 20, 100, 5.0) is True
    assert quick.write_nowait("quick", 1 << 20, 100, 0.05) is True
    await async_wait_for(lambda: quick_wire.log != [])
    # The shorter delay re-armed the shared timer; the other batch left with it (early
    # is allowed, late is not).
    assert loop.time() - started < 2.0
    assert slow_wire.log == [("write", frame_text(b"slow"))]


class _RefusingTransport(RecordingTransport):
    """A transport with a fast path that is unusable while ``usable`` is False."""

    def __init__(self) -> None:
        super().__init__()
        self.usable = False
        self.direct: list[str] = []

    def write_nowait(self, frame: str, max_bytes: int, max_messages: int, delay: float = 0.0) -> bool | None:
        if not self.usable:
            return None
        self.direct.append(frame)
        self.frames.append(frame)
        return True


def _sending(connection: Connection, way: str) -> Callable[[str], object]:
    """A frame handed over as a reply (send) or as a channel's frame (deliver)."""
    if way == "send":
        return connection.send
    return lambda frame: connection.deliver("room", None, frame)


@pytest.mark.parametrize("way", ["send", "deliver"])
async def test_lazy_writer_delivers_refused_frames_in_order(way: str) -> None:
    transport = _RefusingTransport()
    connection = Connection(transport, "c1", renderer=render_broadcast)  # type: ignore[arg-type]
    connection.start()
    hand = _sending(connection, way)
    assert connection._writer is None  # no task until one is needed
    transport.block()  # the first queued frame is stuck in the writer's send
    hand("a")  # fast path refused: queued, the writer starts
    assert connection._writer is not None
    transport.usable = True
    hand("a2")  # "a" waits in the queue (the writer has not run yet): "a2" must not overtake it
    await async_wait_for(lambda: connection._writing)
    transport.unblock()
    await async_wait_for(lambda: connection.queued == (0, 0) and not connection._writing)
    transport.usable = False
    transport.block()
    hand("b")  # refused again: the writer takes it and is stuck writing it
    await async_wait_for(lambda: connection._writing and connection.queued == (0, 0))
    transport.usable = True
    hand("b2")  # the queue is empty, but "b" is still being written: "b2" must wait
    transport.unblock()
    await async_wait_for(lambda: connection.queued == (0, 0) and not connection._writing)
    hand("c")  # nothing queued or being written: the fast path again
    assert transport.frames == ["a", "a2", "b", "b2", "c"]
    assert transport.direct == ["c"]
    connection.close(1000, "bye", push=False)
    hand("after")  # nothing follows a close
    assert await connection.wait_closed(DEFAULT_TIMEOUT)
    assert transport.closed == (1000, "bye")
    assert "after" not in transport.frames


async def test_a_connection_that_never_queued_closes_through_a_late_writer() -> None:
    transport = _RefusingTransport()
    transport.usable = True
    connection = Connection(transport, "c1", renderer=render_broadcast)  # type: ignore[arg-type]
    connection.start()
    assert connection.send("only")
    assert connection._writer is None
    connection.close(CloseCode.SERVICE_RESTART, "restart")
    assert await connection.wait_closed(DEFAULT_TIMEOUT)
    assert transport.frames[0] == "only" and '"disconnect"' in transport.frames[1]
    assert transport.closed == (CloseCode.SERVICE_RESTART, "restart")


# ------------------------------------------------------------------ lazy writer (real server)


async def test_idle_subscribers_have_no_writer_and_still_close_cleanly() -> None:
    app = _app()

    @app.post("/test/close-all")
    async def close_all() -> dict[str, int]:
        connections = _server_connections(app)
        for connection in connections:
            connection.close(CloseCode.SERVICE_RESTART, "test restart")  # type: ignore[attr-defined]
        return {"closed": len(connections)}

    with serving(app) as server:
        client = await ProtocolClient.open(server.ws("/connect"))
        reply = await client.call("subscribe", channels=[{"channel": CHANNEL}])
        assert "error" not in reply["result"]["channels"][0], reply
        [connection] = _server_connections(app)
        # The connect and subscribe replies went out on the fast path: no task was needed.
        assert connection._writer is None  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /test/close-all HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        response = await asyncio.wait_for(reader.read(), DEFAULT_TIMEOUT)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200"), response
        push = await client.push("disconnect")
        assert push["code"] == CloseCode.SERVICE_RESTART and push["reconnect"] is True
        await asyncio.wait_for(client.closed.wait(), DEFAULT_TIMEOUT)
        assert client.ws.close_code == CloseCode.SERVICE_RESTART
