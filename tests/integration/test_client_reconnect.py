"""The Python client's reconnect and recovery against real server processes.

* Socket cut (server keeps running, history intact): the client talks to the
  server through a TCP proxy written here; the proxy drops every connection and
  refuses new ones for a while, as a publisher keeps publishing over HTTP.  The
  client must reconnect and receive every publication exactly once, in order.
* Server restart (memory broker, history lost): the client reconnects and is
  told ``recovered: false`` with a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from herald.client import Client, ClientPublication, RecoveredEvent, RecoveryFailedEvent

from ..helpers import ServerProcess, free_port


class TcpProxy:
    """Forwards 127.0.0.1:port to an upstream port; can cut and refuse connections."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.refusing = False
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        """Abort every proxied connection (both sides see a reset, no close frame)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(server.port).start()
    yield proxy
    await proxy.close()


async def test_socket_cut_recovers_every_publication_once_in_order(
    server: ServerProcess, proxy: TcpProxy
) -> None:
    channel = f"chat:cut-{uuid.uuid4().hex[:8]}"
    total = 120
    client = Client(f"ws://127.0.0.1:{proxy.port}/connect", backoff_min=0.02, backoff_max=0.1, timeout=5)
    recovered: list[RecoveredEvent] = []
    client.on("recovered", recovered.append)
    await client.connect()
    sub = await client.subscribe(channel)
    published = 0
    progress = asyncio.Condition()

    async def publisher() -> None:
        nonlocal published
        async with httpx.AsyncClient(base_url=server.http, headers={"X-API-Key": "test-key"}) as api:
            for n in range(1, total + 1):
                reply = await api.post("/api/publish", json={"channel": channel, "data": {"n": n}})
                assert reply.status_code == 200, reply.text
                async with progress:
                    published = n
                    progress.notify_all()

    async def reached(count: int) -> None:
        async with progress:
            await asyncio.wait_for(progress.wait_for(lambda: published >= count), 10)

    received: list[ClientPublication] = []

    async def reader() -> None:
        while len(received) < total:
            received.append(await sub.next(timeout=10))

    reading = asyncio.create_task(reader())
    publishing = asyncio.create_task(publisher())
    try:
        for cut_at in (20, 60):
            await reached(cut_at)
            disconnected = asyncio.ensure_future(client.wait_for("disconnected", timeout=5))
            await asyncio.sleep(0)
            proxy.refusing = True
            proxy.cut()
            assert (await disconnected).reconnect
            # Publications keep coming while the client cannot get through.
            await reached(cut_at + 15)
            # Back through before the next cut: a cut while the client is still connecting
            # (the proxy opening its upstream) would miss that connection, and a client
            # that never got connected has nothing to report as "disconnected".
            back = asyncio.ensure_future(client.wait_for("recovered", timeout=10))
            await asyncio.sleep(0)
            proxy.refusing = False
            await back
        await asyncio.wait_for(asyncio.shield(publishing), 20)
        await asyncio.wait_for(asyncio.shield(reading), 20)
    finally:
        for task in (reading, publishing):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    assert [p.data["n"] for p in received] == list(range(1, total + 1))
    assert [p.offset for p in received] == list(range(1, total + 1))
    assert len({p.epoch for p in received}) == 1
    # Both reconnects resumed by offset; at least the 15 publications sent while the
    # proxy refused connections came from the subscribe replies.
    assert len(recovered) == 2 and all(e.missed >= 15 for e in recovered), recovered
    assert sub.recovered is True and client.connections == 3
    with pytest.raises(TimeoutError):  # nothing delivered twice
        await sub.next(timeout=0.3)
    await client.close()


@pytest.mark.slow  # two server start-ups per case
@pytest.mark.parametrize("how", ["kill", "terminate"])
async def test_server_restart_reports_recovery_failed(how: str) -> None:
    port = free_port()
    first = ServerProcess(port=port).start()
    second: ServerProcess | None = None
    client = Client(f"ws://127.0.0.1:{port}/connect", backoff_min=0.05, backoff_max=0.25, timeout=5)
    try:
        await client.connect()
        channel = f"chat:restart-{uuid.uuid4().hex[:8]}"
        sub = await client.subscribe(channel)
        for n in range(3):
            await client.publish(channel, n)
        before = [await sub.next(timeout=5) for _ in range(3)]
        old_epoch = before[0].epoch
        disconnected = asyncio.ensure_future(client.wait_for("disconnected", timeout=10))
        await asyncio.sleep(0)
        if how == "kill":
            await asyncio.to_thread(first.kill)
        else:  # graceful shutdown closes with 1012, which asks clients to reconnect
            await asyncio.to_thread(first.stop)
        gone = await disconnected
        assert gone.reconnect, gone
        assert gone.code == (1006 if how == "kill" else 1012)
        failed = asyncio.ensure_future(client.wait_for("recovery_failed", timeout=20))
        await asyncio.sleep(0)
        second = await asyncio.to_thread(ServerProcess(port=port).start)
        event: RecoveryFailedEvent = await failed
        assert event.channel == channel and event.epoch_changed
        assert event.previous.offset == 3 and event.previous.epoch == old_epoch
        assert sub.recovered is False
        assert sub.position is not None and sub.position.epoch != old_epoch
        # The new stream starts again at offset 1: it is delivered, not taken for a duplicate.
        position = await client.publish(channel, "fresh")
        pub = await sub.next(timeout=5)
        assert (pub.data, pub.offset, pub.epoch) == ("fresh", 1, position.epoch)
        assert client.connections == 2
    finally:
        await client.close()
        first.kill()
        if second is not None:
            second.stop()
