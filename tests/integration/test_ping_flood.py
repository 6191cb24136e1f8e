"""A client that floods WebSocket ping frames and never reads is read only as fast as it
reads the pongs.

uvicorn answers a ping inside its protocol, with no app involved: before Herald held
reading while the write buffer is full, a ping flood on the ASGI driver grew the
server's write buffer without limit (800 MB in seconds in a red-team run) and slowed
every other client.  Served every way a WebSocket reaches Herald: natively, through the
ASGI driver with and without the fast path, and on uvicorn's wsproto implementation.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from herald import Herald, Settings
from herald.server import create_app
from herald.transports.uvicorn import uvicorn_ws_protocol
from herald.transports.uvicorn_protocol import HeaderTimeoutHTTPProtocol

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, raw_websocket

pytestmark = pytest.mark.asyncio

#: Far more than the buffers between the flooder and a server that stops reading (the
#: flooder's send buffer, the server's receive buffer, the pongs in the server's send
#: buffer and transport); a server that reads on takes this in about two seconds.
FLOOD_BOUND = 48 * 1024 * 1024
#: Seconds the flooder's socket stays unwritable before the server counts as not reading.
STALLED = 1.0
PING = struct.pack("!BB", 0x89, 0x80 | 125) + b"\x00\x00\x00\x00" + b"p" * 125  # masked, zero key
#: A command among the pings: uvicorn resumes reading whenever the app takes a message.
PONG_COMMAND = b"\x81\x8f\x00\x00\x00\x00" + b'{"type":"pong"}'


@pytest.fixture(scope="module", params=["native", "asgi-fast", "asgi-queue", "asgi-wsproto"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    settings = Settings(
        demos=False,
        rate_limit=0,  # pings are not commands; the bound under test is the write buffer
        native_routes=request.param == "native",
        fast_path=request.param in ("native", "asgi-fast"),
        ws_impl="wsproto" if request.param == "asgi-wsproto" else "auto",
    )
    app = create_app(herald=Herald(settings))
    server = ThreadServer(
        app, ws=uvicorn_ws_protocol(settings.ws_impl, settings.fast_path), http=HeaderTimeoutHTTPProtocol
    ).start()
    try:
        yield server
    finally:
        server.stop()


def flood_pings(sock: socket.socket) -> int:
    """Write pings, never reading, until the socket stays unwritable for STALLED seconds
    (the server stopped reading) or FLOOD_BOUND bytes went out; the bytes written."""
    burst = (PING * 63 + PONG_COMMAND) * 8
    sent = 0
    sock.setblocking(False)
    while sent < FLOOD_BOUND:
        _, writable, _ = select.select([], [sock], [], STALLED)
        if not writable:
            return sent
        start = sent % len(burst)  # frames stay whole across partial sends
        try:
            sent += sock.send(burst[start:])
        except BlockingIOError:
            continue
    return sent


async def test_a_ping_flood_that_never_reads_is_held_back(server: ThreadServer) -> None:
    watcher = await ProtocolClient.open(server.ws("/connect"))
    assert "result" in await watcher.call("subscribe", channels=[{"channel": "news"}])
    publisher = await ProtocolClient.open(server.ws("/connect"))

    # Small buffers: little of the flood hides in them.
    sock = raw_websocket(server.port, "/connect", rcvbuf=2048, sndbuf=16384)
    try:
        sent = await asyncio.to_thread(flood_pings, sock)
        assert sent < FLOOD_BOUND, f"the server read {sent} bytes of pings from a client that reads no pong"

        # Everyone else is served meanwhile, at once.
        assert "result" in await publisher.call("publish", channel="news", data="still here")
        publication = await watcher.push("publication", timeout=DEFAULT_TIMEOUT)
        assert publication["data"] == "still here"
    finally:
        sock.close()
    await watcher.close()
    await publisher.close()
