"""The fast path (transports/fastpath.py) keeps every delivery guarantee.

Real uvicorn servers on free ports run with Herald's WebSocket protocol class,
as ``herald serve`` does; clients are real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest
import websockets
from fastapi import FastAPI, WebSocket
from websockets.frames import Frame, Opcode

from herald.config import Settings
from herald.server import create_app
from herald.transports.fastapi import StarletteTransport
from herald.transports.fastpath import (
    FastTransport,
    HeraldWebSocketProtocol,
    frame_text,
    framed,
    uvicorn_ws_protocol,
)

from .helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, async_wait_for

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
    assert uvicorn_ws_protocol("websockets-sansio", False) == "websockets-sansio"
    assert uvicorn_ws_protocol("wsproto", True) == "wsproto"


# ------------------------------------------------------------------ real servers


async def test_publications_in_order_with_offsets_on_the_fast_path() -> None:
    app = _app()
    with serving(app) as server:
        subscriber = await ProtocolClient.open(server.ws("/connect"))
        publisher = await ProtocolClient.open(server.ws("/connect"))
        try:
            reply = await subscriber.call("subscribe", channels=[{"channel": CHANNEL}])
            assert "error" not in reply["result"]["channels"][0], reply
            connections = _server_connections(app)
            assert connections and all(
                isinstance(c.transport, FastTransport)  # type: ignore[attr-defined]
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
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
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
                assert all(type(t) is StarletteTransport for t in transports)
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
async def test_slow_consumer_is_disconnected_with_4001_within_the_bound() -> None:
    bound = 64 * 1024
    app = _app(max_queue_bytes=bound, max_queue_messages=1000)
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
            assert isinstance(transport, FastTransport)
            protocol = transport._protocol
            payload = "p" * 4000
            highest = 0
            for i in range(1500):  # 6 MB: far past the stuck peer's socket buffers and the bound
                await sender.send(f"{i} {payload}")
                assert (
                    await asyncio.wait_for(receiver.recv(), DEFAULT_TIMEOUT) == f"New message: {i} {payload}"
                )
                if not protocol.transport.is_closing():
                    highest = max(highest, protocol.transport.get_write_buffer_size())
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
