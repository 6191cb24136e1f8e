"""The chat demo in real Chromium behind a proxy that refuses WebSocket upgrades: herald.js
falls back to the bidirectional emulation over HTTP by itself, two people chat with
presence, and a cut of every connection is survived with the missed messages recovered."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from typing import Any

import pytest

from ..helpers import ServerProcess
from .conftest import api
from .test_chat import message_texts, wait_message, wait_people

pytestmark = pytest.mark.browser


class NoWebSocketProxy:
    """An HTTP proxy (asyncio, in its own thread) that answers 403 to every WebSocket
    upgrade, as some corporate proxies do, and forwards everything else, one request per
    connection.  ``cut()`` drops every connection and refuses new ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refused_upgrades = 0
        self.forwarded: list[str] = []
        self.forwarding = True
        self._open: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        # The loop is made and run in the proxy's thread only (the test's thread drives
        # Playwright's own loop).
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        assert self._started.wait(5), "the proxy did not start"

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stop.wait()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            if not self.forwarding:
                return
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            names = {
                line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip().lower()
                for line in lines[1:]
                if ":" in line
            }
            if names.get("upgrade") == "websocket":
                self.refused_upgrades += 1
                writer.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: close\r\n\r\nforbidden"
                )
                await writer.drain()
                return
            self.forwarded.append(lines[0])
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._open.update((writer, upstream))
            kept = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
            upstream.write("\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1"))
            await asyncio.gather(self._pump(reader, upstream), self._pump(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self._open.discard(side)
                    side.close()

    async def _pump(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
        if target.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                target.write_eof()

    def _drop_all(self) -> None:
        self.forwarding = False
        for side in list(self._open):
            side.transport.abort()
        self._open.clear()

    def cut(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._drop_all)

    def restore(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(setattr, self, "forwarding", True)

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self.cut()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def test_chat_with_websocket_blocked_falls_back_and_survives_a_cut(
    herald_server: ServerProcess, new_page: Any
) -> None:
    room = "nows-" + secrets.token_hex(3)
    channel = f"chat:{room}"
    proxy = NoWebSocketProxy(herald_server.port)
    try:
        pages = {}
        for name in ("Ada", "Bob"):
            page = new_page()
            page.goto(f"{proxy.http}/static/chat.html?name={name}&room={room}&join=1")
            page.wait_for_selector("body[data-ready=true]")
            # The WebSocket was refused: the client said so and moved to HTTP streaming.
            assert page.evaluate("heraldClient.transport") == "http_stream"
            pages[name] = page
        ada, bob = pages["Ada"], pages["Bob"]
        assert proxy.refused_upgrades >= 2
        assert any(line.startswith("POST /emulation/connect") for line in proxy.forwarded)
        wait_people(ada, ["Ada", "Bob"])
        wait_people(bob, ["Ada", "Bob"])

        ada.fill("#text", "Hello over plain HTTP")
        ada.press("#text", "Enter")
        wait_message(bob, "Hello over plain HTTP")
        bob.fill("#text", "Loud and clear")
        bob.press("#text", "Enter")
        # Both pages show both messages (pages show what their subscription delivered, their
        # own messages too), so what they recover below is exactly the three they miss.
        for page in (ada, bob):
            wait_message(page, "Hello over plain HTTP")
            wait_message(page, "Loud and clear")

        # Every connection is cut: both pages notice, and reconnect once the network is back.
        proxy.cut()
        for page in (ada, bob):
            page.wait_for_selector("#banner:not([hidden])")
        missed = [f"missed {i}" for i in range(1, 4)]
        for text in missed:
            api(herald_server, "/api/publish", {"channel": channel, "data": {"name": "bot", "text": text}})
        assert message_texts(ada)[-1] == "Loud and clear"  # offline: nothing arrived yet
        proxy.restore()
        for page in (ada, bob):
            page.wait_for_selector("#banner", state="hidden", timeout=20_000)
            wait_message(page, "missed 3")
            assert page.evaluate("heraldClient.transport") in ("http_stream", "sse")
        # Missed messages arrived once each, in order, through recovery.
        expected = ["Hello over plain HTTP", "Loud and clear", *missed]
        for page in (ada, bob):
            assert message_texts(page) == expected
            offsets = page.eval_on_selector_all(
                "#messages li[data-offset]", "nodes => nodes.map(n => Number(n.dataset.offset))"
            )
            assert offsets == sorted(set(offsets)), offsets
            assert page.evaluate("document.body.dataset.recovered") == "3"
        # Presence came back with the new sessions, and the chat goes on.
        wait_people(ada, ["Ada", "Bob"])
        wait_people(bob, ["Ada", "Bob"])
        bob.fill("#text", "Back again")
        bob.press("#text", "Enter")
        wait_message(ada, "Back again")
        assert proxy.refused_upgrades >= 2
    finally:
        proxy.close()


CLIENT_RUN = """async ({ channel, transports }) => {
  const { HeraldClient } = await import('/static/herald.js');
  const client = new HeraldClient({ name: "emulated", transports });
  const tried = [];
  const changes = [];
  const disconnects = [];
  client.on("connecting", ({ transport }) => tried.push(transport));
  client.on("transport", (detail) => changes.push(detail));
  client.on("disconnected", ({ code }) => disconnects.push(code));
  const info = await client.connect();
  const got = [];
  await client.subscribe(channel, { onPublication: (p) => got.push([p.offset, p.data]) });
  const positions = [];
  for (const n of [1, 2, 3]) positions.push((await client.publish(channel, { n })).offset);
  while (got.length < 3) await new Promise((r) => setTimeout(r, 10));
  const presence = await client.presence(channel);
  const history = await client.history(channel, { limit: 3 });
  let rpcError = null;
  try { await client.rpc("no.such.method", {}); } catch (err) { rpcError = err.code; }
  // The server pings every second and drops a client whose pong is late by 1 s: the
  // pongs go up in POSTs, so three quiet seconds must pass without a disconnect.
  await new Promise((r) => setTimeout(r, 3000));
  await client.ping();
  const transport = client.transport;
  const lost = disconnects.slice();
  client.close();
  return { info, got, positions, presence: Object.keys(presence), history: history.publications.length,
           rpcError, tried, changes, disconnects: lost, transport };
}"""


@pytest.mark.parametrize("transport", ["http_stream", "sse"])
def test_js_client_speaks_the_protocol_over_each_emulated_transport(
    herald_server: ServerProcess, new_page: Any, transport: str
) -> None:
    page = new_page()
    page.goto(herald_server.http + "/static/index.html")
    channel = "chat:js-emul-" + secrets.token_hex(3)
    result = page.evaluate(CLIENT_RUN, {"channel": channel, "transports": [transport]})
    assert result["transport"] == transport
    assert result["tried"] == [transport]
    assert result["changes"] == [{"transport": transport, "previous": None}]
    assert [offset for offset, _ in result["got"]] == result["positions"]
    assert [data for _, data in result["got"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert result["presence"] == [result["info"]["client"]]
    assert result["history"] == 3
    assert result["rpcError"] == 113
    assert result["disconnects"] == []  # pongs arrived: no 4002, no reconnect


def test_js_client_falls_back_in_the_order_given(herald_server: ServerProcess, new_page: Any) -> None:
    proxy = NoWebSocketProxy(herald_server.port)
    try:
        page = new_page()
        page.goto(proxy.http + "/static/index.html")
        channel = "chat:js-order-" + secrets.token_hex(3)
        result = page.evaluate(
            CLIENT_RUN, {"channel": channel, "transports": ["websocket", "sse", "http_stream"]}
        )
        assert result["tried"] == ["websocket", "sse"]  # refused upgrade, then the next one at once
        assert result["transport"] == "sse"
        assert result["changes"] == [{"transport": "sse", "previous": None}]
        assert proxy.refused_upgrades == 1
        assert result["disconnects"] == [1006]  # the refused WebSocket
    finally:
        proxy.close()
