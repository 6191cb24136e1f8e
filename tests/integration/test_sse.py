"""``GET /sse`` and ``GET /stream`` over real sockets, on both serving paths.

Every test runs against ``herald serve`` (a subprocess: the native driver's server)
and against a plain FastAPI app that includes ``Herald.router``, under plain uvicorn
in a thread.  Clients are httpx streams (what ``curl -N`` does) and raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI

from herald import Herald
from herald.config import NamespaceOptions, Settings

from ..helpers import DEFAULT_TIMEOUT, ServerProcess, ThreadServer, api_publish

pytestmark = pytest.mark.asyncio

SECRET = "sse-test-secret-0123456789abcdef-0123456789abcdef"
API_KEY = "sse-test-key"
MAX_QUEUE_BYTES = 128 * 1024
MAX_PER_IP = 30
NAMESPACES = {
    "": {},
    "news": {},
    "live": {"history_size": 0},
    "private": {"private": True},
}


def token(sub: str, *, exp_in: float = 300, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in), **claims}, SECRET, algorithm="HS256")


@dataclass
class Target:
    """One serving path: its base URL and how to read its stream counters."""

    kind: str
    http: str
    process: ServerProcess | None = None
    herald: Herald | None = None

    def counts(self, label: str) -> tuple[int, dict[int, int]]:
        """(open streams, close code -> count) of route ``label``."""
        if self.herald is not None:
            stats = self.herald.node.stats.route(label)
            return stats.open, dict(stats.close_codes)
        status, body = get(self.http + "/metrics")
        assert status == 200
        text = body.decode()
        open_match = re.search(rf'herald_connections_open{{route="{label}"}} ([0-9.e+]+)', text)
        codes = {
            int(code): int(float(value))
            for code, value in re.findall(
                rf'herald_disconnects_total{{code="(\d+)",route="{label}"}} ([0-9.e+]+)', text
            )
        }
        return int(float(open_match[1])) if open_match else 0, codes


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=DEFAULT_TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def publish(target: Target, channel: str, data: Any) -> dict[str, Any]:
    return api_publish(target.http, API_KEY, channel, data)


def settings() -> Settings:
    return Settings(
        token_secret=SECRET,
        api_key=API_KEY,
        demos=False,
        ping_interval=0.3,
        max_queue_bytes=MAX_QUEUE_BYTES,
        max_connections_per_ip=MAX_PER_IP,
        namespaces={name: NamespaceOptions(**options) for name, options in NAMESPACES.items()},
    )


@pytest.fixture(scope="module", params=["serve", "fastapi"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "serve":
        process = ServerProcess(
            env={
                "HERALD_TOKEN_SECRET": SECRET,
                "HERALD_API_KEY": API_KEY,
                "HERALD_DEMOS": "false",
                "HERALD_PING_INTERVAL": "0.3",
                "HERALD_MAX_QUEUE_BYTES": str(MAX_QUEUE_BYTES),
                "HERALD_MAX_CONNECTIONS_PER_IP": str(MAX_PER_IP),
                "HERALD_NAMESPACES": json.dumps(NAMESPACES),
                "HERALD_LOG_LEVEL": "warning",
            }
        ).start()
        yield Target("serve", process.http, process=process)
        process.stop()
        return
    herald = Herald(settings())
    app = FastAPI(lifespan=herald.lifespan)
    app.include_router(herald.router)
    app.include_router(herald.api_router)
    server = ThreadServer(app).start()
    yield Target("fastapi", server.http, herald=herald)
    server.stop()


# ---------------------------------------------------------------- a curl-like client


@dataclass
class Event:
    event: str
    data: dict[str, Any]
    id: str | None


class Stream:
    """An open ``/sse`` (or ``/stream``) response, read event by event."""

    def __init__(self, response: httpx.Response, ndjson: bool) -> None:
        self.response = response
        self.ndjson = ndjson
        self.lines = response.aiter_lines()
        self.comments = 0
        self.retry: int | None = None

    async def next(self, timeout: float = DEFAULT_TIMEOUT) -> Event:
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Event:
        fields: dict[str, str] = {}
        async for line in self.lines:
            if self.ndjson:
                if not line:
                    self.comments += 1  # a heartbeat
                    continue
                value = json.loads(line)
                kind = value["type"]
                return Event("message" if kind == "publication" else kind, value, value.get("id"))
            if line.startswith(":"):
                self.comments += 1
                continue
            if not line:
                if "data" in fields:
                    return Event(fields.get("event", "message"), json.loads(fields["data"]), fields.get("id"))
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "retry":
                self.retry = int(value)
            else:
                fields[name] = value
        raise EOFError("the stream ended")

    async def until(self, event: str, timeout: float = DEFAULT_TIMEOUT) -> Event:
        async def find() -> Event:
            while True:
                found = await self._next()
                if found.event == event:
                    return found

        return await asyncio.wait_for(find(), timeout)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as http:
        yield http


class open_stream:
    """``async with open_stream(http, target, "/sse?channel=news:a") as stream``."""

    def __init__(
        self, http: httpx.AsyncClient, target: Target, path: str, headers: dict[str, str] | None = None
    ):
        self.http = http
        self.url = target.http + path
        self.headers = headers or {}
        self.ndjson = path.startswith("/stream")

    async def __aenter__(self) -> Stream:
        self.context = self.http.stream("GET", self.url, headers=self.headers)
        response = await self.context.__aenter__()
        assert response.status_code == 200, (response.status_code, await response.aread())
        return Stream(response, self.ndjson)

    async def __aexit__(self, *exc: object) -> None:
        await self.context.__aexit__(*exc)


async def refused(
    http: httpx.AsyncClient, target: Target, path: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    response = await http.get(target.http + path, headers=headers)
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return response.status_code, body["error"]


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait for ``predicate()`` (polled) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def no_open_streams(target: Target) -> None:
    await until(
        lambda: target.counts("sse")[0] == 0 and target.counts("http_stream")[0] == 0,
        what="every stream closed on the server",
    )


# ---------------------------------------------------------------- delivery


@pytest.mark.parametrize("path", ["/sse", "/stream"])
async def test_stream_delivers_publications_with_ids(
    target: Target, client: httpx.AsyncClient, path: str
) -> None:
    channel = f"news:deliver-{path[1:]}"
    async with open_stream(client, target, f"{path}?channel={channel}") as stream:
        assert stream.response.headers["content-type"].startswith(
            "text/event-stream" if path == "/sse" else "application/x-ndjson"
        )
        subscribed = await stream.next()
        assert subscribed.event == "subscribed"
        assert [c["channel"] for c in subscribed.data["channels"]] == [channel]
        assert subscribed.id is not None
        if path == "/sse":
            assert stream.retry == 1000
        for n in range(5):
            publish(target, channel, {"n": n})
        ids = set()
        for n in range(5):
            event = await stream.next()
            assert event.event == "message"
            assert event.data["type"] == "publication"
            assert event.data["channel"] == channel
            assert event.data["data"] == {"n": n}
            assert event.id is not None and event.id.startswith("1.")
            ids.add(event.id)
        assert len(ids) == 5  # every id names a new position


async def test_heartbeats_are_comments_and_counted_route(target: Target, client: httpx.AsyncClient) -> None:
    before = target.counts("sse")[0]
    async with open_stream(client, target, "/sse?channel=news:heartbeat") as stream:
        await stream.next()
        assert target.counts("sse")[0] == before + 1
        start = stream.comments
        # ping_interval is 0.3 s: a silent stream gets heartbeats, never events.
        with pytest.raises(TimeoutError):
            await stream.next(timeout=1.0)
        assert stream.comments - start >= 2
    await no_open_streams(target)


# ---------------------------------------------------------------- resumption


async def test_last_event_id_resumes_every_channel(target: Target, client: httpx.AsyncClient) -> None:
    a, b = "news:resume-a", "news:resume-b"
    path = f"/sse?channel={a}&channel={b}"
    async with open_stream(client, target, path) as stream:
        await stream.next()
        publish(target, a, "a1")
        event = await stream.next()
        assert event.data["data"] == "a1"
        last_id = event.id
    assert last_id is not None
    # Missed while disconnected, on both channels.
    for data in ("a2", "a3"):
        publish(target, a, data)
    for data in ("b1", "b2"):
        publish(target, b, data)
    async with open_stream(client, target, path, {"Last-Event-ID": last_id}) as stream:
        subscribed = await stream.next()
        assert [c["recovered"] for c in subscribed.data["channels"]] == [True, True]
        recovery = await stream.next()
        assert recovery.event == "recovery"
        assert recovery.data == {
            "type": "recovery",
            "last_event_id": "accepted",
            "recovered": {a: True, b: True},
        }
        got = [(await stream.next()).data for _ in range(4)]
        assert [(p["channel"], p["data"]) for p in got] == [(a, "a2"), (a, "a3"), (b, "b1"), (b, "b2")]
        publish(target, b, "b3")
        live = await stream.next()
        assert live.data["data"] == "b3"
        last_id = live.id
    # The id after the resumed stream resumes again, with nothing missed.
    async with open_stream(client, target, path, {"Last-Event-ID": last_id or ""}) as stream:
        await stream.next()
        recovery = await stream.next()
        assert recovery.data["recovered"] == {a: True, b: True}
        publish(target, a, "a4")
        assert (await stream.next()).data["data"] == "a4"  # not a2, a3 again


async def test_resume_with_an_unrecoverable_channel_says_which(
    target: Target, client: httpx.AsyncClient
) -> None:
    kept, lost = "news:mixed", "live:mixed"  # `live` keeps no history
    path = f"/stream?channel={kept}&channel={lost}"
    async with open_stream(client, target, path) as stream:
        last_id = (await stream.next()).id
    publish(target, kept, "k1")
    publish(target, lost, "l1")
    async with open_stream(client, target, path, {"Last-Event-ID": last_id or ""}) as stream:
        subscribed = await stream.next()
        assert {c["channel"]: c["recovered"] for c in subscribed.data["channels"]} == {
            kept: True,
            lost: False,
        }
        recovery = await stream.next()
        assert recovery.event == "recovery"
        assert recovery.data["recovered"] == {kept: True, lost: False}
        first = await stream.next()
        assert (first.data["channel"], first.data["data"]) == (kept, "k1")
        publish(target, lost, "l2")
        live = await stream.next()
        assert (live.data["channel"], live.data["data"]) == (lost, "l2")


def _other_digest(event_id: str) -> str:
    version, tag, digests, entries = event_id.split(".")
    forged = "AAAAAAAA" if digests.split("~")[0] != "AAAAAAAA" else "BBBBBBBB"
    return f"{version}.{tag}.{forged}.{entries}"


@pytest.mark.parametrize(
    "garbage",
    ["garbage", "1.00000000.AAAAAAAA.0", "1." + "9" * 9000, "1.x.y.z", "", "1.tag.AAAAAAAA.-1"],
)
async def test_garbled_last_event_id_is_no_position(
    target: Target, client: httpx.AsyncClient, garbage: str
) -> None:
    channel = "news:garbled"
    publish(target, channel, "before")
    headers = {"Last-Event-ID": garbage} if garbage else {}
    query = "" if garbage else "&last_event_id=%00%01"
    async with open_stream(client, target, f"/sse?channel={channel}{query}", headers) as stream:
        subscribed = await stream.next()
        assert subscribed.data["channels"][0]["recovered"] is None
        recovery = await stream.next()
        assert recovery.data == {
            "type": "recovery",
            "last_event_id": "invalid",
            "recovered": {channel: False},
        }
        publish(target, channel, "after")
        assert (await stream.next()).data["data"] == "after"  # nothing replayed, live works


async def test_an_id_of_another_stream_epoch_is_not_recovered(
    target: Target, client: httpx.AsyncClient
) -> None:
    channel = "news:epoch"
    async with open_stream(client, target, f"/sse?channel={channel}") as stream:
        last_id = (await stream.next()).id
    assert last_id is not None
    publish(target, channel, "missed")
    # Same channel list, another epoch: the id is accepted, the channel not recovered.
    async with open_stream(
        client, target, f"/sse?channel={channel}", {"Last-Event-ID": _other_digest(last_id)}
    ) as s:
        subscribed = await s.next()
        assert subscribed.data["channels"][0]["recovered"] is False
        assert (await s.next()).data == {
            "type": "recovery",
            "last_event_id": "accepted",
            "recovered": {channel: False},
        }
    # An id of another channel list is not this stream's.
    async with open_stream(
        client, target, f"/sse?channel={channel}&channel=news:x", {"Last-Event-ID": last_id}
    ) as s:
        await s.next()
        assert (await s.next()).data["last_event_id"] == "invalid"


# ---------------------------------------------------------------- policy


async def test_policy_refusals_are_documented_http_errors(target: Target, client: httpx.AsyncClient) -> None:
    status, error = await refused(client, target, "/sse?channel=private:room")
    assert (status, error["code"]) == (403, 110)
    status, error = await refused(client, target, "/sse?channel=nowhere:room")
    assert (status, error["code"]) == (404, 107)
    status, error = await refused(client, target, "/sse?channel=bad%20name")
    assert (status, error["code"]) == (400, 106)
    status, error = await refused(client, target, "/sse")
    assert (status, error["code"]) == (400, 101)
    expired = token("alice", exp_in=-60, channels=["private:room"])
    status, error = await refused(client, target, f"/sse?channel=private:room&token={expired}")
    assert (status, error["code"]) == (401, 112)
    status, error = await refused(client, target, "/sse?channel=news:a", authorization="Bearer not-a-token")
    assert (status, error["code"]) == (401, 111)
    status, error = await refused(client, target, "/sse?channel=news:a", origin="https://evil.example")
    assert status == 403 and error["code"] == 110 and "origin" in error["message"]
    # A foreign Host: herald serve's HTTP guard answers 400 before any route; an app
    # without that guard gets the stream's own admission refusal.
    response = await client.get(target.http + "/sse?channel=news:a", headers={"host": "rebind.evil.example"})
    if target.kind == "serve":
        assert response.status_code == 400
    else:
        assert response.status_code == 403 and response.json()["error"]["code"] == 110
    many = "&".join(f"channel=news:c{n}" for n in range(129))  # max_subscriptions is 128
    status, error = await refused(client, target, f"/stream?{many}")
    assert (status, error["code"]) == (429, 115)
    response = await client.post(target.http + "/sse?channel=news:a")
    assert response.status_code == 405 and response.json()["error"]["code"] == 101
    await no_open_streams(target)


@pytest.mark.parametrize("where", ["query", "cookie", "bearer"])
async def test_token_grants_a_private_channel(target: Target, client: httpx.AsyncClient, where: str) -> None:
    granted = token("alice", channels=["private:room"])
    path, headers = "/sse?channel=private:room", {}
    if where == "query":
        path += f"&token={granted}"
    elif where == "cookie":
        headers["cookie"] = f"herald_token={granted}"
    else:
        headers["authorization"] = f"Bearer {granted}"
    async with open_stream(client, target, path, headers) as stream:
        subscribed = await stream.next()
        assert subscribed.data["user"] == "alice"
        publish(target, "private:room", where)
        assert (await stream.next()).data["data"] == where
    # Another user's token does not grant the room.
    other = token("mallory", channels=["news:*"])
    status, error = await refused(client, target, f"/sse?channel=private:room&token={other}")
    assert (status, error["code"]) == (403, 110)


async def test_channels_from_the_token_claim(target: Target, client: httpx.AsyncClient) -> None:
    claim = token("bob", channels=["news:claimed-1", "news:*", "news:claimed-2"])
    async with open_stream(client, target, "/stream", {"authorization": f"Bearer {claim}"}) as stream:
        subscribed = await stream.next()
        assert [c["channel"] for c in subscribed.data["channels"]] == ["news:claimed-1", "news:claimed-2"]


async def test_server_disconnect_is_an_event_then_the_end(target: Target, client: httpx.AsyncClient) -> None:
    user = f"carol-{target.kind}"
    async with open_stream(client, target, f"/sse?channel=news:kick&token={token(user)}") as stream:
        await stream.next()
        request = urllib.request.Request(
            target.http + "/api/disconnect",
            data=json.dumps({"user": user}).encode(),
            headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
            method="POST",
        )
        await asyncio.to_thread(urllib.request.urlopen, request, None, DEFAULT_TIMEOUT)
        event = await stream.until("disconnect")
        assert event.data["type"] == "disconnect" and event.data["code"] >= 4000
        with pytest.raises(EOFError):
            await stream.next()


# ---------------------------------------------------------------- bounds


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_client_that_never_reads_is_cut_and_memory_stays_bounded(target: Target) -> None:
    _, codes = target.counts("sse")
    cut_before = codes.get(4001, 0)
    host, port = target.http.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /sse?channel=live:flood HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    pid = target.process.proc.pid if target.process is not None and target.process.proc else None
    rss_before = _rss_kib(pid) if pid else 0
    payload = "x" * 60_000
    published = 0
    try:
        await until(lambda: target.counts("sse")[0] >= 1, what="the stream opened")
        # 400 x 60 kB = 24 MB for a client whose queue bound is 128 KiB: cut long before.
        while published < 400 and target.counts("sse")[1].get(4001, 0) == cut_before:
            await asyncio.to_thread(publish, target, "live:flood", payload)
            published += 1
        # The end is counted once the closing event could not be written (1 s) and the
        # connection was dropped.
        await until(lambda: target.counts("sse")[1].get(4001, 0) == cut_before + 1, what="the cut (4001)")
        for _ in range(100):  # publications after the cut reach nobody
            await asyncio.to_thread(publish, target, "live:flood", payload)
        if pid:
            grown_mib = (_rss_kib(pid) - rss_before) / 1024
            assert grown_mib < 16, f"the server grew {grown_mib:.1f} MiB"
        await no_open_streams(target)
        # The server ended the connection: reading reaches its end (or a reset).
        sock.settimeout(DEFAULT_TIMEOUT)
        with pytest.raises((ConnectionResetError, EOFError)):
            while sock.recv(65536):
                pass
            raise EOFError
    finally:
        sock.close()


async def test_reconnect_flood_leaves_nothing_behind(target: Target, client: httpx.AsyncClient) -> None:
    await no_open_streams(target)

    async def once(n: int) -> None:
        async with open_stream(client, target, f"/sse?channel=news:flood{n % 7}") as stream:
            assert (await stream.next()).event == "subscribed"

    for start in range(0, 200, 20):
        await asyncio.gather(*(once(n) for n in range(start, start + 20)))
    await no_open_streams(target)
    # The per-IP limit counts streams and is released by each: fill it, refuse one more,
    # and after they close a new one is admitted again.
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=httpx.Limits(max_connections=100)) as many:
        streams = [open_stream(many, target, "/sse?channel=news:held") for _ in range(MAX_PER_IP)]
        opened = [await s.__aenter__() for s in streams]
        try:
            for stream in opened:
                await stream.next()
            status, error = await refused(many, target, "/sse?channel=news:held")
            assert status == 403 and "too many connections" in error["message"]
        finally:
            for s in streams:
                await s.__aexit__(None, None, None)
    await no_open_streams(target)
    async with open_stream(client, target, "/sse?channel=news:held") as stream:
        assert (await stream.next()).event == "subscribed"


async def test_an_allowed_origin_may_read_the_stream(target: Target, client: httpx.AsyncClient) -> None:
    async with open_stream(client, target, "/sse?channel=news:cors", {"origin": target.http}) as stream:
        headers = stream.response.headers
        assert headers["access-control-allow-origin"] == target.http
        assert headers["access-control-allow-credentials"] == "true"
        assert headers["cache-control"].startswith("no-cache")
        assert (await stream.next()).event == "subscribed"
    async with open_stream(client, target, "/sse?channel=news:cors") as stream:
        assert "access-control-allow-origin" not in stream.response.headers


async def test_head_answers_the_head_of_a_stream_without_opening_one(
    target: Target, client: httpx.AsyncClient
) -> None:
    response = await client.head(target.http + "/sse?channel=news:head")
    if target.kind == "serve":
        # herald serve answers HEAD wherever GET is answered (its HeadAsGet middleware).
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
    else:
        assert response.status_code == 405
    assert response.content == b""
    await no_open_streams(target)  # a stream opened for the HEAD would stay open here


class _Flag(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_slow_consumer_gets_the_4001_event_when_it_reads_again(target: Target) -> None:
    warning = "slow consumer (4001)"
    flag = _Flag(warning)  # the FastAPI app logs in this process
    logging.getLogger("herald.connection").addHandler(flag)
    process = target.process
    logged_before = process.log().count(warning) if process is not None else 0

    def cut() -> bool:
        if process is not None:  # herald serve: its log file
            return process.log().count(warning) > logged_before
        return flag.event.is_set()

    host, port = target.http.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        sock.sendall(f"GET /sse?channel=live:slow HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await until(lambda: target.counts("sse")[0] >= 1, what="the stream opened")
        payload = "y" * 60_000
        for _ in range(400):
            await asyncio.to_thread(publish, target, "live:slow", payload)
            if cut():
                break
        assert cut(), "never cut"
        # Read again at once: the server writes the closing event, then ends the response.
        sock.settimeout(DEFAULT_TIMEOUT)
        received = bytearray()
        while chunk := await asyncio.to_thread(sock.recv, 1 << 20):
            received += chunk
        text = received.decode(errors="replace")
        last = text.rstrip().rsplit("event: ", 1)[1]
        assert last.startswith("disconnect\r\n") or last.startswith("disconnect\n")
        assert '"code":4001' in last and '"reason":"slow consumer"' in last
        assert text.endswith("0\r\n\r\n")  # the response ended properly
    finally:
        logging.getLogger("herald.connection").removeHandler(flag)
        sock.close()


async def test_head_on_the_emulation_stream_opens_no_session(
    target: Target, client: httpx.AsyncClient
) -> None:
    """A HEAD (an uptime checker) on /emulation/connect gets the stream's head; no session
    is opened, so nothing waits for a handshake timeout."""
    response = await client.head(target.http + "/emulation/connect")
    # Starlette answers HEAD on GET routes too, so both apps answer it.
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""
    assert target.counts("emulation")[0] == 0
    assert sum(target.counts("emulation")[1].values()) == 0  # none opened and ended either
