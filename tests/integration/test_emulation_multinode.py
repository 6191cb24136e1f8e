"""Bidirectional emulation across two nodes on a real Redis, behind a front proxy that
sends every POST to the other node than the one holding the session's stream (no
sticky sessions): subscribe, publish, presence, RPC and recovery still work.

Two kinds of cluster: two `herald serve` processes, and two uvicorn processes of a
library app (examples/chat_app.py, which has an RPC method) that includes Herald's router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from herald.client import Client
from herald.exceptions import ReplyError

from ..helpers import DEFAULT_TIMEOUT, ROOT, ServerProcess, http_get, wait_for
from ..servers import RedisServer, redis_server_fixture
from .emulation_kit import RawSession

pytestmark = pytest.mark.asyncio

API_KEY = "emulation-multinode-key"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


class LibraryNode(ServerProcess):
    """examples/chat_app.py under uvicorn, as a real subprocess."""

    def start(self, timeout: float = 20.0) -> LibraryNode:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "uvicorn", "examples.chat_app:app", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # The app serves no /healthz: any answer of its API means it is up.
                return http_get(self.http + "/api/info", timeout=1)[0] in (200, 401, 403, 404)
            except OSError:
                return False

        wait_for(ready, timeout, what="library app")
        return self


class OtherNodeFront:
    """A front proxy over two nodes: each TCP connection carries one request (the proxy
    asks the node to close after it); streams (``/emulation/connect``) alternate between
    the nodes, and every ``POST /emulation`` goes to the node that does NOT hold the
    session's stream (learnt from the stream's first frame), so that it must be routed
    through the broker."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.node_of_id: dict[str, int] = {}
        self.streams = [0, 0]
        self.posts = 0
        self.turn = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> OtherNodeFront:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
            length = next(
                (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0
            )
            body = await reader.readexactly(length) if length else b""
            stream = path.startswith("/emulation/connect")
            if path == "/emulation" and method == "POST":
                self.posts += 1
                session = str(json.loads(body).get("session", ""))
                holder = self.node_of_id.get(session.partition(".")[0])
                assert holder is not None, f"a POST for a session no stream opened: {session}"
                target = 1 - holder
            else:
                target = self.turn % 2
                self.turn += 1
            if stream:
                self.streams[target] += 1
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.ports[target])
            request_head = "\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode("latin-1")
            upstream_writer.write(request_head + body)
            await upstream_writer.drain()
            sniffed = b""
            try:
                while True:
                    chunk = await upstream_reader.read(65536)
                    if not chunk:
                        break
                    if stream and len(sniffed) < 4096:
                        sniffed += chunk
                        found = re.search(
                            rb'"type":"emulation","session":"[0-9a-f.]+","node":"([0-9a-f]+)"', sniffed
                        )
                        if found:
                            self.node_of_id[found.group(1).decode()] = target
                            sniffed = b"x" * 4096  # learnt: stop looking
                    writer.write(chunk)
                    await writer.drain()
            finally:
                upstream_writer.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


def _env(kind: str, redis_url: str) -> dict[str, str]:
    env = {"HERALD_BROKER": redis_url, "HERALD_API_KEY": API_KEY, "HERALD_LOG_LEVEL": "warning"}
    if kind == "serve":
        env["HERALD_DEMOS"] = "false"
    return env


@contextlib.asynccontextmanager
async def cluster(kind: str, redis_url: str) -> AsyncIterator[tuple[list[ServerProcess], OtherNodeFront]]:
    node_class = ServerProcess if kind == "serve" else LibraryNode
    nodes = [node_class(env=_env(kind, redis_url)) for _ in range(2)]
    front: OtherNodeFront | None = None
    try:
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        front = await OtherNodeFront([node.port for node in nodes]).start()
        yield nodes, front
    finally:
        if front is not None:
            await front.close()
        await asyncio.gather(*(asyncio.to_thread(node.kill) for node in nodes))


async def publish(base: str, channel: str, data: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        response = await http.post(
            base + "/api/publish", json={"channel": channel, "data": data}, headers={"X-API-Key": API_KEY}
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("kind", ["serve", "library"])
async def test_every_post_lands_on_the_other_node(kind: str, redis_server: RedisServer) -> None:
    channel = f"chat:emul-{kind}"
    async with cluster(kind, redis_server.url) as (nodes, front):
        reader = Client(front.ws("/connect"), name="reader", transport="http_stream")
        writer = Client(front.ws("/connect"), name="writer", transport="http_stream")
        await reader.connect()
        await writer.connect()
        try:
            assert front.streams == [1, 1]  # one stream on each node
            sub = await reader.subscribe(channel)
            sent = await writer.publish(channel, {"text": "across"})
            got = await asyncio.wait_for(anext(aiter(sub)), DEFAULT_TIMEOUT)
            assert got.offset == sent.offset and got.data["text"] == "across"
            assert set(await writer.presence(channel)) == {reader.client_id}

            if kind == "library":
                rolled = await writer.rpc("roll", {"sides": 20})
                assert rolled["sides"] == 20 and 1 <= rolled["value"] <= 20
            else:
                # `herald serve` registers no RPC method: the error comes back the same way.
                with pytest.raises(ReplyError) as refused:
                    await writer.rpc("roll", {"sides": 20})
                assert refused.value.code == 113

            # The reader's stream breaks: it reconnects through the front (a new session,
            # possibly on the other node) and recovers what was published meanwhile.
            link = reader._link
            assert link is not None
            link.ws.transport.abort()
            missed = [await publish(nodes[n % 2].http, channel, {"text": f"missed {n}"}) for n in range(3)]
            recovered = [await asyncio.wait_for(anext(aiter(sub)), DEFAULT_TIMEOUT) for _ in missed]
            assert [p.data["text"] for p in recovered] == ["missed 0", "missed 1", "missed 2"]
            assert [p.offset for p in recovered] == [m["offset"] for m in missed]
            assert reader.connections == 2
            after = await writer.publish(channel, {"text": "after"})
            assert (await asyncio.wait_for(anext(aiter(sub)), DEFAULT_TIMEOUT)).offset == after.offset
        finally:
            await reader.close()
            await writer.close()
        # Every command (connect, subscribe, publish, presence, rpc, pongs...) went up
        # through the node that did not hold the session's stream.
        assert front.posts >= 8
        assert sum(front.streams) == 3


async def test_cross_node_errors(redis_server: RedisServer) -> None:
    async with cluster("serve", redis_server.url) as (nodes, _front):
        raw = await RawSession.open(nodes[0].http, post_base=nodes[1].http)
        try:
            # A wrong secret is refused by the node holding the session, answered through
            # the node the POST reached.
            async with httpx.AsyncClient(timeout=10) as http:
                wrong = await http.post(
                    nodes[1].http + "/emulation", json=raw.body([{"id": 9, "type": "ping"}], secret="guess")
                )
                assert wrong.status_code == 403
                ended = await http.post(
                    nodes[1].http + "/emulation",
                    json=raw.body(
                        [{"id": 9, "type": "ping"}], session=raw.hello["node"] + ".0000000000000000"
                    ),
                )
                assert ended.status_code == 404
                # A node nobody runs never answers: 504 after the delivery timeout.
                nowhere = await http.post(
                    nodes[1].http + "/emulation",
                    json=raw.body([{"id": 9, "type": "ping"}], session="0123456789ab.0000000000000000"),
                )
                assert nowhere.status_code == 504
                assert nowhere.json()["detail"] == "the node holding the session did not answer"
            assert "result" in await raw.call("ping")
        finally:
            await raw.close()
