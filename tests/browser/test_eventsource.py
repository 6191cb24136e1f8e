"""A plain browser ``EventSource`` on ``/sse``, in real Chromium, through a TCP proxy
that cuts the connection: after the browser's own reconnect (with ``Last-Event-ID``)
every publication missed meanwhile arrives once, in order.  No Herald code runs in
the page."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ..helpers import ServerProcess
from .conftest import api


class AsyncTcpProxy:
    """An asyncio TCP proxy in its own thread (the sync Playwright API owns this one).

    ``cut()`` aborts every proxied connection, both ways, and makes new ones fail at
    once (accepted, then reset) until ``restore()``: a network failure, as the browser
    sees it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blocked = False
        self.accepted = 0  # connections forwarded to the server
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def cut(self) -> None:
        self.blocked = True
        self._loop.call_soon_threadsafe(self._abort_all)

    def restore(self) -> None:
        self.blocked = False

    def close(self) -> None:
        self.cut()

        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def async_proxy(herald_server: ServerProcess) -> Iterator[AsyncTcpProxy]:
    proxy = AsyncTcpProxy(herald_server.port)
    yield proxy
    proxy.close()


OPEN_EVENT_SOURCE = """(path) => {
    window.got = [];
    window.events = [];
    const source = new EventSource(path);
    window.source = source;
    source.onopen = () => window.events.push('open');
    source.onerror = () => window.events.push('error');
    source.onmessage = (e) => window.got.push({data: JSON.parse(e.data).data, id: e.lastEventId});
    source.addEventListener('subscribed', () => window.events.push('subscribed'));
    source.addEventListener('recovery', (e) => window.events.push('recovery ' + e.data));
}"""


def publish(server: ServerProcess, channel: str, values: range) -> None:
    for value in values:
        api(server, "/api/publish", {"channel": channel, "data": value})


def test_event_source_resumes_gap_free_after_a_cut(
    herald_server: ServerProcess, async_proxy: AsyncTcpProxy, new_page: Any
) -> None:
    channel = "chat:eventsource"
    page = new_page()
    # Loaded through the proxy: the page's origin is the proxy's, as behind a real one.
    page.goto(async_proxy.http + "/healthz")
    page.evaluate(OPEN_EVENT_SOURCE, f"/sse?channel={channel}")
    page.wait_for_function("window.events.includes('subscribed')")

    publish(herald_server, channel, range(1, 4))
    page.wait_for_function("window.got.length === 3")

    async_proxy.cut()
    page.wait_for_function("window.events.includes('error')")
    # Published while the browser cannot reach the server.
    publish(herald_server, channel, range(4, 7))
    async_proxy.restore()

    # The browser reconnects by itself, sending the last id it saw.
    page.wait_for_function("window.got.length >= 6", timeout=15_000)
    publish(herald_server, channel, range(7, 9))
    page.wait_for_function("window.got.length >= 8")

    got = page.evaluate("window.got")
    assert [item["data"] for item in got] == list(range(1, 9))  # each once, in order
    assert len({item["id"] for item in got}) == 8
    events = page.evaluate("window.events")
    recoveries = [e for e in events if e.startswith("recovery ")]
    assert len(recoveries) == 1
    assert '"last_event_id":"accepted"' in recoveries[0]
    assert f'"recovered":{{"{channel}":true}}' in recoveries[0]
    assert async_proxy.accepted >= 2  # the second stream came through the proxy too
    assert page.evaluate("window.source.readyState") == 1  # OPEN
    page.evaluate("window.source.close()")
