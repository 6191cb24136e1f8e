"""Hostile HTTP and handshakes against real `herald serve` processes (issue 13, items 4, 8-10).

Every attack runs while a bystander streams: a protocol client subscribed to
``chat:bystander`` receives a numbered publication every 20 ms from a steady HTTP
publisher, and must end with every publication, in order, offsets without a gap,
none later than :data:`MAX_LATENCY`.

* API bodies: the key is checked before the body is read (an unauthenticated
  300 MiB POST gets 401 at once, the server does not grow); bodies over the limit
  get 413, declared or streamed; a trickling body is cut with 408.
* DNS rebinding: ``Host`` and ``Origin`` both ``rebind.evil.example:PORT`` are
  refused on ``/api/publish``, ``/admin/snapshot``, ``/admin/ws`` and ``/connect``
  on both serving drivers (native and ASGI); a configured non-loopback name gets
  no loopback trust.
* ``/connect`` with 100 query parameters; ``?%74oken=`` redacted from the logs; a
  JWT ``sub`` with a newline cannot forge a log line; ``/admin`` cannot be
  framed; ``/admin/ws`` counts against the per-IP limit; ``since_offset`` beyond
  any stream is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import websockets

from ..helpers import ProtocolClient, ServerProcess, async_until, async_wait_for, wait_for

API_KEY = "hostile-http-key"
SECRET = "hostile-http-secret-0123456789abcdef-0123456789abcdef-01234567"
PER_IP = 6
BODY_TIMEOUT = 1.5
#: The API body limit the servers run with: the default (64 KiB messages -> 1 MiB).
BODY_LIMIT = 1024 * 1024
MAX_LATENCY = 2.0
EVIL = "rebind.evil.example"
CONFIGURED = "app.example.com"  # a configured (allowed) name that is not loopback


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 300)}, SECRET, algorithm="HS256")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def keyed() -> Iterator[ServerProcess]:
    """An API key, a short body timeout, a per-IP limit, text logs (native driver)."""
    process = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": SECRET,
            "HERALD_API_BODY_TIMEOUT": str(BODY_TIMEOUT),
            "HERALD_MAX_CONNECTIONS_PER_IP": str(PER_IP),
            "HERALD_LOG_FORMAT": "text",
            "HERALD_LOG_LEVEL": "info",
            # The per-connection lines (with the handshake URL) are INFO only with it.
            "HERALD_ACCESS_LOG": "true",
        }
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="module", params=["native", "asgi"])
def open_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """No API key (loopback trust), one allowed non-loopback name, on either driver."""
    process = ServerProcess(
        env={
            "HERALD_TOKEN_SECRET": SECRET,
            "HERALD_ALLOWED_ORIGINS": f"https://{CONFIGURED}",
            "HERALD_NATIVE_ROUTES": "true" if request.param == "native" else "false",
            "HERALD_LOG_FORMAT": "json",
            "HERALD_LOG_LEVEL": "info",
            # The per-connection lines (with the handshake URL) are INFO only with it.
            "HERALD_ACCESS_LOG": "true",
        }
    ).start()
    yield process
    process.stop()


# ---------------------------------------------------------------- the bystander


class Bystander:
    """A subscriber receiving a steady numbered stream published over the HTTP API."""

    channel = "chat:bystander"

    def __init__(self, server: ServerProcess, headers: dict[str, str]) -> None:
        self.server = server
        self.headers = headers
        self.sent: dict[int, float] = {}
        self.stop = asyncio.Event()

    async def publish_steadily(self, http: httpx.AsyncClient) -> None:
        n = 0
        while not self.stop.is_set():
            self.sent[n] = time.monotonic()
            response = await http.post("/api/publish", json={"channel": self.channel, "data": {"n": n}})
            assert response.status_code == 200, response.text
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.02)

    @contextlib.asynccontextmanager
    async def streaming(self) -> AsyncIterator[Bystander]:
        client = await ProtocolClient.open(self.server.ws("/connect"))
        reply = await client.call("subscribe", channels=[{"channel": self.channel}])
        assert "error" not in reply["result"]["channels"][0], reply
        async with httpx.AsyncClient(base_url=self.server.http, headers=self.headers, timeout=10) as http:
            publisher = asyncio.create_task(self.publish_steadily(http))
            try:
                await async_wait_for(lambda: len(self.sent) >= 3, what="the stream started")
                yield self
                self.stop.set()
                await publisher
                # Every publication, in order, offsets without a gap, each in time.
                received = await client.publications(len(self.sent), timeout=10)
                numbers = [p["data"]["n"] for p in received]
                assert numbers == list(range(len(self.sent)))
                offsets = [p["offset"] for p in received]
                assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
            finally:
                self.stop.set()
                with contextlib.suppress(Exception):
                    await publisher
                await client.close()


@contextlib.asynccontextmanager
async def bystander(server: ServerProcess, headers: dict[str, str]) -> AsyncIterator[Bystander]:
    async with Bystander(server, headers).streaming() as stream:
        yield stream


KEY = {"X-API-Key": API_KEY}


# ---------------------------------------------------------------- raw HTTP


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP response (read until the declared length)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, headers, body


def _closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _post_head(port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def huge_body_then_push(port: int, headers: dict[str, str], declared: int) -> tuple[int, bytes, float, int]:
    """Declare a ``declared``-byte body, send its first 64 KiB, read the answer, then try
    to push the rest.  Returns the status, the body, the seconds to the answer and how
    many more bytes the server took before it was gone."""
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(_post_head(port, "/api/publish", {**headers, "Content-Length": str(declared)}))
        sock.sendall(b"x" * 65536)
        status, _, body = _read_response(sock, 5)
        elapsed = time.monotonic() - started
        pushed = 0
        sock.settimeout(5)
        chunk = b"x" * (1024 * 1024)
        with contextlib.suppress(OSError):
            while pushed < declared:
                sock.sendall(chunk)
                pushed += len(chunk)
        return status, body, elapsed, pushed


# ---------------------------------------------------------------- item 4: API bodies


async def test_unauthenticated_huge_body_is_refused_before_it_is_read(keyed: ServerProcess) -> None:
    assert keyed.proc is not None
    async with bystander(keyed, KEY):
        before = rss_kb(keyed.proc.pid)
        for headers in ({}, {"X-API-Key": "wrong"}):
            status, body, elapsed, pushed = await asyncio.to_thread(
                huge_body_then_push, keyed.port, headers, 300 * 1024 * 1024
            )
            assert status == 401, body
            assert json.loads(body) == {"detail": "missing or wrong API key"}
            assert elapsed < 2.0
            # The connection was closed: the 300 MiB were never taken in.
            assert pushed < 64 * 1024 * 1024, pushed
        growth = rss_kb(keyed.proc.pid) - before
        assert growth < 20 * 1024, f"server grew by {growth} kB"


async def test_authenticated_declared_oversize_body_gets_413_unread(keyed: ServerProcess) -> None:
    assert keyed.proc is not None
    async with bystander(keyed, KEY):
        before = rss_kb(keyed.proc.pid)
        status, body, elapsed, pushed = await asyncio.to_thread(
            huge_body_then_push, keyed.port, KEY, 300 * 1024 * 1024
        )
        assert status == 413, body
        assert (
            json.loads(body)["detail"] == f"request body larger than {BODY_LIMIT} bytes (max_api_body_bytes)"
        )
        assert elapsed < 2.0 and pushed < 64 * 1024 * 1024
        # Just under the limit is read (and refused for what it is: not JSON), not 413.
        async with httpx.AsyncClient(base_url=keyed.http, headers=KEY) as http:
            response = await http.post(
                "/api/publish", content=b"x" * (BODY_LIMIT - 10), headers={"content-type": "application/json"}
            )
            assert response.status_code == 422
        assert rss_kb(keyed.proc.pid) - before < 20 * 1024


def chunked_oversize(port: int) -> tuple[int, bytes]:
    """A chunked body (no Content-Length) one chunk past the limit, then silence."""
    piece = 64 * 1024
    with _connect(port) as sock:
        sock.sendall(_post_head(port, "/api/publish", {**KEY, "Transfer-Encoding": "chunked"}))
        for _ in range(BODY_LIMIT // piece + 1):
            sock.sendall(f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n")
        status, _, body = _read_response(sock, 5)
        assert _closed_by_server(sock)
        return status, body


async def test_authenticated_streamed_oversize_body_is_cut_at_the_limit(keyed: ServerProcess) -> None:
    async with bystander(keyed, KEY):
        status, body = await asyncio.to_thread(chunked_oversize, keyed.port)
        assert status == 413, body
        assert "max_api_body_bytes" in json.loads(body)["detail"]


def trickle(port: int) -> tuple[int, bytes, float]:
    """Declare 100 bytes and send one every 0.2 s until the server answers."""
    with _connect(port) as sock:
        sock.sendall(_post_head(port, "/api/publish", {**KEY, "Content-Length": "100"}))
        started = time.monotonic()
        sock.settimeout(0.2)
        while True:
            try:
                peek = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                sock.sendall(b"{")
                assert time.monotonic() - started < BODY_TIMEOUT + 3, "never cut"
                continue
            assert peek, "closed without a response"
            break
        status, _, body = _read_response(sock, 5)
        elapsed = time.monotonic() - started
        assert _closed_by_server(sock)
        return status, body, elapsed


async def test_trickling_body_is_cut_after_the_body_timeout(keyed: ServerProcess) -> None:
    async with bystander(keyed, KEY):
        status, body, elapsed = await asyncio.to_thread(trickle, keyed.port)
        assert status == 408, body
        assert (
            json.loads(body)["detail"]
            == f"request body not received within {BODY_TIMEOUT:g} s (api_body_timeout)"
        )
        assert BODY_TIMEOUT - 0.1 <= elapsed < BODY_TIMEOUT + 2


# ---------------------------------------------------------------- item 10: history bounds


async def test_history_since_offset_out_of_range_is_400(keyed: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=keyed.http, headers=KEY) as http:
        assert (await http.post("/api/publish", json={"channel": "chat:h", "data": 1})).status_code == 200
        for offset in (2**64, 2**64 + 5, 2**53, -1):
            response = await http.get("/api/history", params={"channel": "chat:h", "since_offset": offset})
            assert response.status_code == 400, (offset, response.text)
            assert response.json()["detail"]["code"] == 101
            assert "since_offset must be 0 to" in response.json()["detail"]["message"]
        response = await http.get("/api/history", params={"channel": "chat:h", "since_offset": 0})
        assert response.status_code == 200 and [p["data"] for p in response.json()["publications"]] == [1]


# ---------------------------------------------------------------- item 10: framing, per-IP


async def test_html_pages_cannot_be_framed(keyed: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=keyed.http) as http:
        for path in ("/admin", "/static/chat.html", "/asyncapi"):
            response = await http.get(path)
            assert response.status_code == 200, path
            assert response.headers["x-frame-options"] == "DENY", path
            assert response.headers["content-security-policy"] == "frame-ancestors 'none'", path
        # JSON is left alone.
        assert "x-frame-options" not in (await http.get("/healthz")).headers


async def test_admin_ws_counts_against_the_per_ip_limit(keyed: ServerProcess) -> None:
    admin_url = keyed.ws("/admin/ws")
    async with bystander(keyed, KEY):  # holds one of the PER_IP slots
        opened: list[websockets.ClientConnection] = []
        try:
            for _ in range(PER_IP - 1):
                ws = await websockets.connect(admin_url, open_timeout=5)
                await ws.send(json.dumps({"api_key": API_KEY}))
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "publication"
                opened.append(ws)
            # The limit is reached: one more admin page, or a client, is refused.
            for url in (admin_url, keyed.ws("/connect")):
                with pytest.raises(websockets.InvalidStatus) as info:
                    await websockets.connect(url, open_timeout=5)
                assert info.value.response.status_code == 403
        finally:
            for ws in opened:
                await ws.close()

        # The admin pages' slots come back when they leave.
        async def admitted() -> bool:
            try:
                ws = await websockets.connect(admin_url, open_timeout=5)
            except websockets.InvalidStatus:
                return False
            await ws.close()
            return True

        await async_until(admitted, timeout=5.0, what="the admin websocket admitted")


# ---------------------------------------------------------------- item 10: logs


async def test_percent_encoded_token_is_redacted_and_newlines_escaped(keyed: ServerProcess) -> None:
    secret_token = token("mallory\nFORGED 00:00:00 ERROR herald: forged line")
    url = keyed.ws("/connect") + "?%74oken=" + secret_token
    client = await ProtocolClient.open(url, connect=False)
    reply = await client.call("connect")
    # The percent-encoded name is read as `token`: the client is authenticated.
    assert reply["result"]["user"] == "mallory\nFORGED 00:00:00 ERROR herald: forged line"
    await client.close()
    wait_for(lambda: "mallory" in keyed.log(), 5, what="the disconnect logged")
    log = keyed.log()
    assert secret_token not in log and secret_token.split(".")[1] not in log
    assert "%74oken=***" in log
    # The newline in the user id is escaped: no line of the log starts with the forgery.
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert 'user="mallory\\nFORGED 00:00:00 ERROR herald: forged line"' in log


# ---------------------------------------------------------------- items 8, 9: both drivers


def raw_handshake(port: int, path: str, host: str, origin: str | None) -> int:
    """The HTTP status a WebSocket upgrade to ``path`` with these headers gets."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with _connect(port) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.settimeout(5)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk
            data += chunk
        return int(data.split(b" ", 2)[1])


async def test_dns_rebinding_is_refused_on_every_path(open_server: ServerProcess) -> None:
    port = open_server.port
    evil = f"{EVIL}:{port}"
    rebind = {"Host": evil, "Origin": f"http://{evil}"}
    async with bystander(open_server, {}) as stream, httpx.AsyncClient(base_url=open_server.http) as http:
        # The same requests under the loopback name are served (loopback trust, no key) ...
        own = await http.post("/api/publish", json={"channel": "chat:rebind", "data": "own"})
        assert own.status_code == 200
        assert (await http.get("/admin/snapshot")).status_code == 200
        # ... under the attacker's name they are refused before anything is done.
        response = await http.post(
            "/api/publish", json={"channel": stream.channel, "data": {"n": -1}}, headers=rebind
        )
        assert response.status_code == 400
        assert response.json() == {"detail": f"Host {EVIL} not allowed (set HERALD_ALLOWED_HOSTS)"}
        response = await http.get("/admin/snapshot", headers=rebind)
        assert response.status_code == 400
        assert "clients" not in response.text
        for path in ("/connect", "/admin/ws", "/ws", "/ws_json", "/ws_broadcast"):
            assert await asyncio.to_thread(raw_handshake, port, path, evil, f"http://{evil}") == 403, path
            # Without Origin (not a browser, but the name is still not ours).
            assert await asyncio.to_thread(raw_handshake, port, path, evil, None) == 403, path
            assert await asyncio.to_thread(raw_handshake, port, path, f"127.0.0.1:{port}", None) == 101, path
        # The refusals are counted as Host refusals in the metrics.
        metrics = (await http.get("/metrics")).text
        assert 'herald_handshakes_rejected_total{reason="host"}' in metrics
    # (the bystander's check: the forged publication {"n": -1} never reached it)


async def test_a_configured_name_gets_no_loopback_trust(open_server: ServerProcess) -> None:
    port = open_server.port
    named = {"Host": f"{CONFIGURED}:{port}", "Origin": f"https://{CONFIGURED}"}
    async with bystander(open_server, {}), httpx.AsyncClient(base_url=open_server.http) as http:
        # The name is allowed (it is an allowed origin's host) ...
        assert (await http.get("/healthz", headers=named)).status_code == 200
        assert await asyncio.to_thread(raw_handshake, port, "/connect", named["Host"], named["Origin"]) == 101
        # ... but a loopback peer using it is not trusted as local: no key, no API, no admin.
        response = await http.post("/api/publish", json={"channel": "chat:x", "data": 1}, headers=named)
        assert response.status_code == 403
        assert "loopback" in response.json()["detail"]
        snapshot = await http.get("/admin/snapshot", headers=named)
        assert snapshot.status_code == 403 and snapshot.json() == response.json()  # as the API answers
        # (the URL names the server by the configured name; the socket goes to loopback)
        async with websockets.connect(
            f"ws://{named['Host']}/admin/ws", host="127.0.0.1", port=port, origin=named["Origin"]
        ) as ws:
            await ws.send(json.dumps({}))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4501


async def test_connect_with_many_query_parameters(open_server: ServerProcess) -> None:
    filler = "&".join(f"p{i}={i}" for i in range(100))
    async with bystander(open_server, {}):
        for query in (f"{filler}&token={token('bob')}", f"token={token('bob')}&{filler}", filler):
            client = await ProtocolClient.open(open_server.ws("/connect") + "?" + query, connect=False)
            reply = await client.call("connect")
            assert "result" in reply, reply
            assert reply["result"].get("user", "") == ("" if query == filler else "bob")
            await client.close()
    assert "Traceback" not in open_server.log()
    assert "internal error" not in open_server.log()


def test_text_log_escapes_control_characters_in_message_and_fields() -> None:
    import logging

    from herald.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("herald", logging.INFO, __file__, 1, "hello %s", ("x\r\nFORGED line",), None)
    record.user = "eve\nFORGED\x1b[2J"
    record.reason = 'a "quoted" reason=x'
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "hello x\\r\\nFORGED line" in line
    assert "user=eve\\nFORGED\\x1b[2J " in line
    assert 'reason="a \\"quoted\\" reason=x"' in line
    # A traceback still spans lines, below the fields.
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    head, _, tail = TextFormatter().format(record).partition("\n")
    assert "user=" in head and tail.startswith("Traceback")
    # JSON lines escape by construction.
    assert "\n" not in JsonFormatter().format(record)


# ---------------------------------------------------------------- the Host rules, as pure functions


def test_host_names_are_parsed_strictly() -> None:
    from herald.hosts import host_name

    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("example.com.") == "example.com"
    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"
    for bad in ("", ":80", "a b", "example.com:x", "example.com:80:80", "[::1", "[::1]x", "ex/ample", "::1"):
        assert host_name(bad) is None, bad


def test_host_policy_rules() -> None:
    from herald.hosts import HostPolicy, trusts_loopback

    auto = HostPolicy(
        [], bind_host="127.0.0.1", allowed_origins=["https://app.example.com", "https://*.apps.io"]
    )
    loopback, network = "127.0.0.1", "10.0.0.5"
    for host in ("localhost:1", "a.localhost", "127.0.0.9:80", "[::1]:80", "app.example.com", "x.y.apps.io"):
        assert auto.refusal(host, loopback) is None, host
    for host in ("evil.example:80", "apps.io", "example.com", "app.example.com.evil.net"):
        for local in (loopback, network, "/run/herald.sock"):  # a name is refused on every interface
            assert (
                auto.refusal(host, local)
                == f"Host {host.split(':')[0]} not allowed (set HERALD_ALLOWED_HOSTS)"
            ), (host, local)
        assert auto.refusal(host, "testserver") is None  # no socket (Starlette's test client)
        assert auto.refusal(host, None) is None
    # An address literal cannot be rebound: Kubernetes probes by pod IP, `--host 0.0.0.0`.
    for host in ("10.0.0.5", "10.0.0.5:8000", "[2001:db8::1]:80"):
        assert auto.refusal(host, network) is None and auto.refusal(host, loopback) is None
    assert auto.refusal(None, loopback) is None and auto.refusal("", loopback) is None
    assert auto.refusal("bad host", network) == "malformed Host header"
    # An explicit list holds on every interface; a wildcard bind adds no name.
    explicit = HostPolicy(["chat.example.com", "*.corp.example"], bind_host="0.0.0.0")
    for local in (loopback, network):
        assert explicit.refusal("chat.example.com:443", local) is None
        assert explicit.refusal("a.corp.example", local) is None
        assert explicit.refusal("corp.example", local) is not None
        assert explicit.refusal("evil.example", local) is not None
        assert explicit.refusal("localhost", local) is None
    assert HostPolicy(["*"]).refusal("anything.example", loopback) is None
    assert HostPolicy([], allowed_origins=["*"]).refusal("anything.example", loopback) is None
    assert HostPolicy([], bind_host="10.0.0.5").refusal("10.0.0.5:8000", loopback) is None
    # Loopback trust: a loopback peer naming the server by a loopback name (or no Host).
    assert trusts_loopback("127.0.0.1", "localhost:8000") and trusts_loopback("::1", None)
    assert trusts_loopback("::ffff:127.0.0.1", "[::1]:80")
    assert not trusts_loopback("127.0.0.1", "app.example.com")
    assert not trusts_loopback("127.0.0.1", "bad host")
    assert not trusts_loopback("10.0.0.5", "localhost")
    assert not trusts_loopback(None, None)


def test_redaction_reads_keys_as_the_server_does() -> None:
    from herald.auth import redact_tokens
    from herald.logs import redact

    line = '"GET /connect?%74oken=a.b.c&TO%6Ben=d&x-api-key=k&access_token=t&monkey=m&tokens=n HTTP/1.1"'
    assert redact(line) == (
        '"GET /connect?%74oken=***&TO%6Ben=***&x-api-key=***&access_token=***&monkey=m&tokens=n HTTP/1.1"'
    )
    assert redact_tokens("/connect?a=1&%74%6f%6b%65%6e=secret") == "/connect?a=1&%74%6f%6b%65%6e=***"
    assert redact("no parameters here") == "no parameters here"
