"""Slow-loris and floods against a real `herald serve` process.

* clients that open TCP and never finish their request headers are closed after
  ``HERALD_HTTP_HEADER_TIMEOUT``;
* a client that completes the WebSocket handshake, subscribes, and never reads is
  disconnected as a slow consumer (its queue is bounded);
* a connection flood from one IP is cut at ``HERALD_MAX_CONNECTIONS_PER_IP``;

and meanwhile other clients are served and the server's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from ..helpers import ProtocolClient, ServerProcess, wait_for

PER_IP = 20
API_KEY = "slowloris-key"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_DEMOS": "false",
            "HERALD_HTTP_HEADER_TIMEOUT": "1",
            "HERALD_MAX_CONNECTIONS_PER_IP": str(PER_IP),
            "HERALD_MAX_QUEUE_MESSAGES": "64",
            "HERALD_MAX_QUEUE_BYTES": "262144",
            "HERALD_LOG_LEVEL": "warning",
        }
    ).start()
    yield process
    process.stop()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def peer_closed(sock: socket.socket) -> bool:
    """Non-blocking: True once the server has closed (EOF or reset)."""
    try:
        data = sock.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b""


async def test_half_open_handshakes_are_closed_and_others_served(server: ServerProcess) -> None:
    assert server.proc is not None
    before = rss_kb(server.proc.pid)
    lorises: list[socket.socket] = []
    for i in range(150):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        # Headers that never end: no blank line, ever.
        sock.sendall(f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-{i}: ".encode())
        lorises.append(sock)
    try:
        # Served meanwhile: a protocol client connects, subscribes and pings.
        client = await ProtocolClient.open(server.ws("/connect"))
        assert "result" in await client.call("ping")
        await client.close()
        # Every half-open connection is closed by the header timeout (1 s).
        wait_for(lambda: all(peer_closed(s) for s in lorises), 10, what="slow-loris sockets closed")
        assert rss_kb(server.proc.pid) - before < 50_000
    finally:
        for sock in lorises:
            sock.close()


def _masked_text(payload: bytes) -> bytes:
    """One masked client text frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    head = bytes([0x81])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _raw_subscriber(port: int, channel: str) -> socket.socket:
    """A WebSocket client that handshakes, connects, subscribes, and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    sock.sendall(_masked_text(b'{"id":1,"type":"connect"}'))
    sub = json.dumps({"id": 2, "type": "subscribe", "channels": [{"channel": channel}]})
    sock.sendall(_masked_text(sub.encode()))
    return sock


def test_a_kept_alive_connection_cannot_dribble_its_next_request(server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = b""
        while not response.endswith(b'{"status":"ok"}'):
            response += sock.recv(4096)
        assert response.startswith(b"HTTP/1.1 200")
        # The connection is kept alive; a next request starts and its headers never end.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        # The header timeout (1 s here) runs from that first byte; uvicorn's keep-alive
        # timer alone would take 5 s.  Trickle a byte every 0.2 s meanwhile.
        while not peer_closed(sock):
            assert time.monotonic() - started < 4, "not closed by the header timeout"
            with contextlib.suppress(OSError):
                sock.sendall(b"a")
            time.sleep(0.2)
        assert time.monotonic() - started >= 0.9


async def test_client_that_never_reads_is_cut_and_bystander_complete(server: ServerProcess) -> None:
    assert server.proc is not None
    channel = "chat:firehose"
    bystander = await ProtocolClient.open(server.ws("/connect"))
    reply = await bystander.call("subscribe", channels=[{"channel": channel}])
    assert "error" not in reply["result"]["channels"][0]
    stuck = _raw_subscriber(server.port, channel)
    try:
        before = rss_kb(server.proc.pid)
        blob = "x" * 16000
        count = 300  # ~4.8 MB: far more than the stuck client's queue and socket buffers
        async with httpx.AsyncClient(base_url=server.http, headers={"X-API-Key": API_KEY}) as http:
            for n in range(count):
                response = await http.post(
                    "/api/publish", json={"channel": channel, "data": {"n": n, "blob": blob}}
                )
                assert response.status_code == 200
                if n % 25 == 0:  # the bystander keeps up; it must not be what gets cut
                    await asyncio.sleep(0)
        got = [p["data"]["n"] for p in await bystander.publications(count, timeout=20)]
        assert got == list(range(count))
        growth = rss_kb(server.proc.pid) - before
        assert growth < 60_000, f"server grew by {growth} kB"
        # The stuck client was disconnected: reading now drains what was in flight and
        # ends with a close frame 4001 (slow consumer) or a reset.
        stuck.settimeout(10)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := stuck.recv(65536):
                data += chunk
        # A close frame with 4001 "slow consumer" ends the stream (or, when even the close
        # frame could not be written, a reset cut it short of everything published).
        closed_4001 = b"\x88\x0f\x0f\xa1slow consumer" in data[-64:]
        assert closed_4001 or len(data) < count * len(blob), data[-64:]
    finally:
        stuck.close()
        await bystander.close()


async def test_connection_flood_from_one_ip(server: ServerProcess) -> None:
    opened: list[websockets.ClientConnection] = []
    refused = 0
    try:
        for _ in range(PER_IP + 15):
            try:
                opened.append(await websockets.connect(server.ws("/connect"), open_timeout=5))
            except websockets.InvalidStatus as exc:
                assert exc.response.status_code == 403
                refused += 1
        assert len(opened) == PER_IP and refused == 15
        # HTTP is still served while the WebSocket limit is reached.
        async with httpx.AsyncClient(base_url=server.http) as http:
            assert (await http.get("/healthz")).status_code == 200
    finally:
        for ws in opened:
            await ws.close()
    # Slots come back once the flood is gone.
    deadline = time.monotonic() + 5
    while True:
        try:
            ws = await websockets.connect(server.ws("/connect"), open_timeout=5)
            await ws.close()
            return
        except websockets.InvalidStatus:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
