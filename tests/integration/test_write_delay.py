"""``write_delay``: fanned-out frames wait up to the delay so that several leave a
connection in one write; replies are not delayed (docs/configuration.md).

Checked from outside, on ``herald serve`` with its routes served natively and through
ASGI, and on an SSE stream: publications sent in separate HTTP requests (separate event
loop turns) arrive together, in one read, no earlier than the delay; a client's reply to
its own command comes at once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from bench.heap import masked_text

from ..helpers import ProtocolClient, ServerProcess, api_publish, raw_websocket, read_until

API_KEY = "delay-key"
DELAY = 1.0


@pytest.fixture(scope="module", params=["native", "asgi"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    env = {"HERALD_API_KEY": API_KEY, "HERALD_WRITE_DELAY": str(DELAY), "HERALD_DEMOS": "false"}
    if request.param == "asgi":
        env["HERALD_NATIVE_ROUTES"] = "false"
    process = ServerProcess(env=env).start()
    yield process
    process.stop()


def publish_three_and_read(server: ServerProcess, sock: socket.socket, channel: str) -> tuple[bytes, float]:
    """Publish 1, 2, 3 (three requests: three loop turns); the first read that carries
    the first one, and how long after the first publish it came."""
    started = time.monotonic()
    for n in (1, 2, 3):
        api_publish(server.http, API_KEY, channel, {"n": n})
    data = read_until(sock, b'{"n":1}')
    return data, time.monotonic() - started


def assert_together_after_the_delay(data: bytes, waited: float) -> None:
    """The three publications came in one read (one write), in order, after the delay."""
    positions = [data.find(b'{"n":%d}' % n) for n in (1, 2, 3)]
    assert -1 not in positions and positions == sorted(positions), data
    assert waited >= DELAY * 0.8, f"written after {waited:.3f} s, before the {DELAY} s delay"


def test_publications_wait_for_the_delay_and_leave_in_one_write(server: ServerProcess) -> None:
    sock = raw_websocket(server.port, "/connect")
    try:
        sock.sendall(masked_text('{"id":1,"type":"connect"}'))
        sock.sendall(masked_text('{"id":2,"type":"subscribe","channels":[{"channel":"chat:delay"}]}'))
        read_until(sock, b'"id":2')
        assert_together_after_the_delay(*publish_three_and_read(server, sock, "chat:delay"))
    finally:
        sock.close()


async def test_replies_are_not_delayed(server: ServerProcess) -> None:
    client = await ProtocolClient.open(server.ws("/connect"))
    try:
        await client.call("subscribe", channels=[{"channel": "chat:replies"}])
        started = time.monotonic()
        reply = await client.call("publish", channel="chat:replies", data={"n": 1})
        assert "result" in reply, reply
        assert time.monotonic() - started < DELAY / 2
        # Its own publication came with the reply (it was batched ahead of it).
        (own,) = await client.publications(1, timeout=DELAY / 2)
        assert own["data"] == {"n": 1}
        ping_started = time.monotonic()
        await client.call("ping")
        assert time.monotonic() - ping_started < DELAY / 2
    finally:
        await client.close()


def test_sse_chunks_wait_for_the_delay_and_leave_together(server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(
            f"GET /sse?channel=chat:sse HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        read_until(sock, b"\r\n\r\n")
        assert_together_after_the_delay(*publish_three_and_read(server, sock, "chat:sse"))
    finally:
        sock.close()
