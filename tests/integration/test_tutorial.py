"""The tutorial's three endpoints against a real `herald serve` process."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..helpers import DEFAULT_TIMEOUT, ServerProcess, async_wait_for, http_get

pytestmark = pytest.mark.asyncio


async def _closed_with(ws: websockets.ClientConnection) -> tuple[int | None, str]:
    """Wait for the server's close; protocol clients first get a disconnect push with the same code."""
    pushes = []
    with pytest.raises(ConnectionClosed):
        while True:
            pushes.append(json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)))
    await asyncio.wait_for(ws.wait_closed(), DEFAULT_TIMEOUT)
    assert ws.close_code is not None
    for push in pushes:
        assert push["type"] == "disconnect" and push["code"] == ws.close_code, push
    return ws.close_code, ws.close_reason or ""


async def test_echo_replies_exactly(server: ServerProcess) -> None:
    async with websockets.connect(server.ws("/ws")) as ws:
        for text in ["hello", "", "ünïcødé ✓", "x" * 1000]:
            await ws.send(text)
            assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == f"Message text was: {text}"


async def test_json_replies_exactly(server: ServerProcess) -> None:
    async with websockets.connect(server.ws("/ws_json")) as ws:
        for value in [{"a": 1, "b": [1, 2, None]}, [1, "two"], "text", 42, None, True]:
            await ws.send(json.dumps(value))
            reply = json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT))
            assert reply == {"message": "Received JSON data", "data": value}


@pytest.mark.parametrize("bad", ["{bad", "", "[1,", "{'single': 1}", "nan-ish"])
async def test_json_malformed_gets_error_frame_then_1007(server: ServerProcess, bad: str) -> None:
    async with websockets.connect(server.ws("/ws_json")) as ws:
        await ws.send(bad)
        error = json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT))
        assert error["error"]["code"] == 1007
        assert error["error"]["message"].startswith("malformed JSON")
        code, reason = await _closed_with(ws)
        assert (code, reason) == (1007, "malformed JSON")
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("path", ["/ws", "/ws_json", "/ws_broadcast", "/connect"])
async def test_binary_frame_closes_1003(server: ServerProcess, path: str) -> None:
    async with websockets.connect(server.ws(path)) as ws:
        await ws.send(b"\x00\x01binary")
        code, reason = await _closed_with(ws)
        assert code == 1003
        assert "binary" in reason


@pytest.mark.parametrize("path", ["/ws", "/ws_json", "/ws_broadcast", "/connect"])
async def test_oversized_frame_closes_1009(server: ServerProcess, path: str) -> None:
    async with websockets.connect(server.ws(path), max_size=None) as ws:
        await ws.send("x" * (64 * 1024 + 1))
        code, _ = await _closed_with(ws)
        assert code == 1009
    # Exactly at the limit is fine.
    async with websockets.connect(server.ws("/ws"), max_size=None) as ws:
        limit_text = "y" * (64 * 1024 - len("Message text was: "))
        await ws.send(limit_text)
        assert (await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)).endswith("y")


@pytest.mark.parametrize("path", ["/ws", "/ws_json", "/ws_broadcast"])
async def test_invalid_utf8_closes_1007(server: ServerProcess, path: str) -> None:
    async with websockets.connect(server.ws(path)) as ws:
        await ws.send(b"\xff\xfe", text=True)
        code, _ = await _closed_with(ws)
        assert code == 1007
    await async_wait_for(lambda: "invalid utf-8" in server.log().lower(), what="logged")
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("path", ["/ws", "/ws_json", "/ws_broadcast", "/connect"])
async def test_foreign_origin_refused_before_accept(server: ServerProcess, path: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(server.ws(path), origin="http://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    await async_wait_for(
        lambda: "origin http://evil.example not allowed" in server.log(), what="logged reason"
    )
    # Same origin and no origin are accepted.
    async with websockets.connect(server.ws(path), origin=f"http://127.0.0.1:{server.port}") as ws:  # type: ignore[arg-type]
        assert ws.response is not None and ws.response.status_code == 101
    async with websockets.connect(server.ws(path)) as ws:
        assert ws.response is not None and ws.response.status_code == 101


async def test_configured_origin_allowed() -> None:
    server = ServerProcess(
        env={"HERALD_ALLOWED_ORIGINS": "https://app.example.com,https://*.corp.example"}
    ).start()
    try:
        for origin in ["https://app.example.com", "https://x.corp.example", "https://a.b.corp.example"]:
            async with websockets.connect(server.ws("/ws"), origin=origin) as ws:  # type: ignore[arg-type]
                await ws.send("ok")
                assert await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT) == "Message text was: ok"
        for origin in ["https://evil.example.com", "http://app.example.com", "https://corp.example.evil"]:
            with pytest.raises(InvalidStatus):
                await websockets.connect(server.ws("/ws"), origin=origin)  # type: ignore[arg-type]
    finally:
        server.stop()


async def test_broadcast_reaches_every_other_client_exactly_once(server: ServerProcess) -> None:
    clients = [await websockets.connect(server.ws("/ws_broadcast")) for _ in range(5)]
    try:
        # Make sure all five are registered: each sends a hello that the others must see.
        for index, sender in enumerate(clients):
            await sender.send(f"m{index}")
        received: dict[int, list[str]] = {i: [] for i in range(len(clients))}

        async def collect(i: int) -> None:
            while len(received[i]) < len(clients) - 1:
                received[i].append(await asyncio.wait_for(clients[i].recv(), DEFAULT_TIMEOUT))

        await asyncio.gather(*(collect(i) for i in range(len(clients))))
        for i, messages in received.items():
            expected = sorted(f"New message: m{j}" for j in range(len(clients)) if j != i)
            assert sorted(messages) == expected
        # Nothing more arrives: in particular, no client got its own message.
        for ws in clients:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)
    finally:
        for ws in clients:
            await ws.close()


def _raw_handshake(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert b" 101 " in response.split(b"\r\n")[0]
    return sock


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


async def test_broadcast_survives_vanished_client(server: ServerProcess) -> None:
    """A client that disappears without a close frame is removed; the others keep getting everything."""
    sender = await websockets.connect(server.ws("/ws_broadcast"))
    receiver = await websockets.connect(server.ws("/ws_broadcast"))
    vanishing = _raw_handshake(server.port, "/ws_broadcast")
    try:
        vanishing.sendall(_masked_text_frame("hello from the doomed"))
        assert (
            await asyncio.wait_for(receiver.recv(), DEFAULT_TIMEOUT) == "New message: hello from the doomed"
        )
        assert await asyncio.wait_for(sender.recv(), DEFAULT_TIMEOUT) == "New message: hello from the doomed"
        # Vanish: RST, no close frame.
        vanishing.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        vanishing.close()
        for i in range(50):
            await sender.send(f"after {i}")
        for i in range(50):
            assert await asyncio.wait_for(receiver.recv(), DEFAULT_TIMEOUT) == f"New message: after {i}"
    finally:
        await sender.close()
        await receiver.close()
    assert "Traceback" not in server.log()


async def test_broadcast_client_that_stops_reading_does_not_delay_others() -> None:
    """A peer that never reads fills its bounded queue, is disconnected as a slow consumer, and the
    others receive every message promptly meanwhile."""
    server = ServerProcess(
        env={"HERALD_MAX_QUEUE_MESSAGES": "50", "HERALD_MAX_QUEUE_BYTES": "262144"}
    ).start()
    stuck = _raw_handshake(server.port, "/ws_broadcast")
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sender = await websockets.connect(server.ws("/ws_broadcast"))
    receiver = await websockets.connect(server.ws("/ws_broadcast"), max_queue=None)
    try:
        payload = "p" * 16000
        count = 400  # 6.4 MB: far beyond the stuck peer's socket buffers and its queue bound
        started = time.monotonic()
        slowest = 0.0
        for i in range(count):
            sent_at = time.monotonic()
            await sender.send(f"{i} {payload}")
            # A healthy reader gets each message promptly, whatever the stuck peer does.
            assert await asyncio.wait_for(receiver.recv(), DEFAULT_TIMEOUT) == f"New message: {i} {payload}"
            slowest = max(slowest, time.monotonic() - sent_at)
        assert slowest < 2.0, slowest
        assert time.monotonic() - started < 60
        # The stuck peer gets dropped: its socket is closed by the server.
        stuck.settimeout(0.5)

        def stuck_closed() -> bool:
            try:
                while True:
                    chunk = stuck.recv(1 << 20)
                    if not chunk:
                        return True
            except TimeoutError:
                return False
            except OSError:
                return True

        await async_wait_for(lambda: stuck_closed(), timeout=30, what="stuck client dropped")
    finally:
        stuck.close()
        await sender.close()
        await receiver.close()
        server.stop()
    assert "slow consumer" in server.log() or "4001" in server.log()


async def test_broadcast_clients_are_removed_on_disconnect(server: ServerProcess) -> None:
    assert http_get(server.http + "/healthz")[0] == 200
    for _ in range(3):
        ws = await websockets.connect(server.ws("/ws_broadcast"))
        await ws.close()
    observer = await websockets.connect(server.ws("/ws_broadcast"))
    sender = await websockets.connect(server.ws("/ws_broadcast"))
    try:
        await sender.send("ping all")
        assert await asyncio.wait_for(observer.recv(), DEFAULT_TIMEOUT) == "New message: ping all"
    finally:
        await observer.close()
        await sender.close()


async def test_shutdown_closes_tutorial_sockets_with_1012_or_1001() -> None:
    import signal

    server = ServerProcess().start()
    clients = [await websockets.connect(server.ws(path)) for path in ("/ws", "/ws_json", "/ws_broadcast")]
    try:
        await clients[0].send("still here")
        assert await asyncio.wait_for(clients[0].recv(), DEFAULT_TIMEOUT) == "Message text was: still here"
        server.signal(signal.SIGTERM)
        for ws in clients:
            await asyncio.wait_for(ws.wait_closed(), DEFAULT_TIMEOUT)
            assert ws.close_code in (1001, 1012)
        # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit.
        assert server.wait(15) in (0, -signal.SIGTERM)
    finally:
        server.kill()
    assert "Traceback" not in server.log()


async def test_broadcast_flood_is_metered() -> None:
    server = ServerProcess(
        env={"HERALD_RATE_LIMIT": "5", "HERALD_RATE_LIMIT_BURST": "5", "HERALD_RATE_LIMIT_STRIKES": "3"}
    ).start()
    try:
        flooder = await websockets.connect(server.ws("/ws_broadcast"))
        bystander = await websockets.connect(server.ws("/ws_broadcast"))
        for i in range(100):
            try:
                await flooder.send(f"spam {i}")
            except ConnectionClosed:
                break
        replies = []
        with pytest.raises(ConnectionClosed):
            while True:
                replies.append(await asyncio.wait_for(flooder.recv(), DEFAULT_TIMEOUT))
        assert flooder.close_code == 4504
        assert "Error: rate limit exceeded, message dropped" in replies
        received = []
        with pytest.raises(TimeoutError):
            while True:
                received.append(await asyncio.wait_for(bystander.recv(), 0.5))
        # The burst got through, in order; the rest was dropped, not fanned out.
        assert 1 <= len(received) <= 10
        assert received == [f"New message: spam {i}" for i in range(len(received))]
        await bystander.close()
    finally:
        server.stop()
