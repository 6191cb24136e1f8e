"""Test helpers: real servers on free ports, real WebSocket clients, waits with timeouts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection

from herald.demos import DEMO_NAMESPACES

from .wire_schema import record_exchange, record_server_frame

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 5.0
#: ``HERALD_NAMESPACES`` for a server process whose tests use the demo namespaces.
DEMO_NAMESPACES_JSON = json.dumps({name: options.model_dump() for name, options in DEMO_NAMESPACES.items()})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value (or raise after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


async def async_wait_for(predicate: Any, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def async_until(check: Any, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> None:
    """Await ``check()`` (a coroutine function returning a truth value) until it is true,
    or raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


def read_until(sock: socket.socket, marker: bytes, received: bytes = b"", timeout: float = 10.0) -> bytes:
    """Read from a blocking socket until ``marker`` arrived (everything read so far)."""
    sock.settimeout(timeout)
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {marker!r}: {received!r}")
        received += chunk
    return received


def raw_websocket(port: int, path: str, *, rcvbuf: int = 0, sndbuf: int = 0) -> socket.socket:
    """A plain socket that completed a WebSocket handshake on ``path`` (frames are the
    caller's: see bench.heap.masked_text).  ``rcvbuf``/``sndbuf``: socket buffer sizes,
    set before connecting (so that the window the client offers stays that small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = read_until(sock, b"\r\n\r\n")
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    return sock


def api_publish(http_url: str, api_key: str, channel: str, data: Any) -> dict[str, Any]:
    """``POST /api/publish`` (blocking); the JSON answer.  Raises on any status but 200."""
    request = urllib.request.Request(
        http_url + "/api/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"X-API-Key": api_key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=DEFAULT_TIMEOUT) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ServerProcess:
    """``herald serve`` (or any ``python -m`` target) as a real subprocess on a free port."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
        # The tests' channels live in the demo namespaces (chat, dashboard, game), also
        # when a test turns the demos off; a test's own HERALD_NAMESPACES wins.
        base = {"PYTHONUNBUFFERED": "1", "HERALD_NAMESPACES": DEMO_NAMESPACES_JSON}
        self.env = {**os.environ, **base, **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(f"/tmp/herald-test-server-{self.port}.log")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "herald", "serve", "--port", str(self.port), *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http_get(self.http + "/healthz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, what="server /healthz")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class ThreadServer:
    """A uvicorn server in a background thread, serving any ASGI app (for in-process apps)."""

    def __init__(self, app: Any, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def start(self) -> ThreadServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, what="uvicorn start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def running_server(
    env: dict[str, str] | None = None, args: list[str] | None = None
) -> Iterator[ServerProcess]:
    server = ServerProcess(env, args).start()
    try:
        yield server
    finally:
        server.stop()


class ProtocolClient:
    """A minimal protocol v1 client for tests: commands with auto ids, pushes collected."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.ws = websocket
        self.ids = itertools.count(1)
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.frames: list[dict[str, Any]] = []
        self.sent: dict[int, dict[str, Any]] = {}  # commands awaiting their reply
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, connect: bool = True, **kwargs: Any) -> ProtocolClient:
        websocket = await websockets.connect(url, open_timeout=DEFAULT_TIMEOUT, **kwargs)
        client = cls(websocket)
        if connect:
            reply = await client.call("connect")
            assert "result" in reply, reply
            client.client_id = reply["result"]["client"]
        return client

    client_id: str = ""

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                frame = json.loads(message)
                self.frames.append(frame)
                # The contract: every server frame must match docs/schema/protocol.schema.json.
                record_server_frame(frame)
                future = self.replies.pop(frame["id"], None) if frame.get("id") is not None else None
                if future is not None:
                    sent = self.sent.pop(frame["id"], None)
                    if sent is not None:
                        record_exchange(sent, frame)
                    future.set_result(frame)
                elif frame.get("type") == "ping":
                    # The server may be closing meanwhile (a ping and then a disconnect push
                    # in one turn): the pong fails, and the frames already received must
                    # still be read.
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await self.ws.send('{"type":"pong"}')
                else:
                    await self.pushes.put(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def call(self, kind: str, timeout: float = DEFAULT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        command_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[command_id] = future
        command = {"id": command_id, "type": kind, **fields}
        self.sent[command_id] = command
        await self.ws.send(json.dumps(command))
        return await asyncio.wait_for(future, timeout)

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send(text)

    async def push(self, kind: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Next push (of ``kind``, skipping others)."""
        while True:
            frame = await asyncio.wait_for(self.pushes.get(), timeout)
            if kind is None or frame.get("type") == kind:
                return frame

    async def publications(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        return [await self.push("publication", timeout) for _ in range(count)]

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)


@contextlib.asynccontextmanager
async def numbered_stream(http_url: str, api_key: str, interval: float = 0.01) -> AsyncIterator[list[int]]:
    """Publish {"n": 0, "t": ...}, {"n": 1, ...} (``t``: time.monotonic() at publish) to
    ``feed:stream`` through the HTTP API every ``interval`` seconds until exit.  Yields the
    numbers published so far."""
    import httpx

    sent: list[int] = []
    stop = asyncio.Event()

    async def publisher() -> None:
        async with httpx.AsyncClient(base_url=http_url, headers={"X-API-Key": api_key}) as http:
            n = 0
            while not stop.is_set():
                body = {"channel": "feed:stream", "data": {"n": n, "t": time.monotonic()}}
                response = await http.post("/api/publish", json=body)
                assert response.status_code == 200, response.text
                sent.append(n)
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)

    task = asyncio.create_task(publisher())
    try:
        yield sent
    finally:
        stop.set()
        await task
