"""The `herald` client commands as real subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import httpx

from herald import Settings
from herald.client import Client

from ..helpers import ROOT, ServerProcess, ThreadServer, free_port

# A safety net, not a wait target: `herald` starts in ~1 s, but the test machine may be loaded.
TIMEOUT = 60.0


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HERALD_API_KEY", "HERALD_URL")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def run(*args: str, stdin: str | None = None, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "herald",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(**env),
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else b""), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Interactive:
    """`herald connect ...` with a pipe on stdin and stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str) -> Interactive:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "herald",
            "connect",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
            cwd=ROOT,
        )
        return cls(proc)

    async def line(self, predicate: Any = None) -> str:
        """The next stdout line (matching ``predicate``), within the timeout."""
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
            if not raw:
                assert self.proc.stderr is not None
                err = await self.proc.stderr.read()
                raise AssertionError(f"output ended; stderr: {err.decode()}; seen: {self.lines}")
            text = raw.decode().rstrip("\n")
            self.lines.append(text)
            if predicate is None or predicate(text):
                return text

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((text + "\n").encode())
        await self.proc.stdin.drain()

    async def finish(self) -> tuple[int, str, str]:
        """Close stdin (EOF) and wait for a clean exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        out, err = await asyncio.wait_for(self.proc.communicate(), TIMEOUT)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def test_connect_raw_mode_like_wscat(server: ServerProcess) -> None:
    cli = await Interactive.start(server.ws("/ws"))
    try:
        assert (await cli.line()).startswith("Connected to ")
        await cli.send("hello there")
        assert await cli.line() == "< Message text was: hello there"
        await cli.send('{"a": 1}')
        assert await cli.line() == '< Message text was: {"a": 1}'
        code, out, err = await cli.finish()
    finally:
        cli.kill()
    assert code == 0, err
    assert "Disconnected (1000)" in out
    assert "Traceback" not in err


async def test_connect_raw_mode_piped_input_gets_replies(server: ServerProcess) -> None:
    code, out, err = await run("connect", server.ws("/ws_json"), stdin='{"x": [1, 2]}\n')
    assert code == 0, err
    replies = [json.loads(line[2:]) for line in out.splitlines() if line.startswith("< ")]
    assert replies == [{"message": "Received JSON data", "data": {"x": [1, 2]}}]


async def test_connect_protocol_mode(server: ServerProcess) -> None:
    channel = f"chat:cli-{uuid.uuid4().hex[:8]}"
    cli = await Interactive.start(server.ws("/connect"), "--channel", channel, "--json")
    try:
        subscribed = json.loads(await cli.line(lambda t: '"subscribed"' in t))
        assert subscribed["channel"] == channel and subscribed["offset"] == 0
        # A publication from elsewhere (the HTTP API) is printed.
        async with httpx.AsyncClient(headers={"X-API-Key": "test-key"}) as api:
            reply = await api.post(
                server.http + "/api/publish", json={"channel": channel, "data": {"text": "hi"}}
            )
        assert reply.status_code == 200
        pub = json.loads(await cli.line(lambda t: '"publication"' in t))
        assert (pub["channel"], pub["offset"], pub["data"]) == (channel, 1, {"text": "hi"})
        # A typed line is published: JSON when it parses, else as a string.
        await cli.send('{"typed": true}')
        pub = json.loads(await cli.line(lambda t: '"publication"' in t))
        assert (pub["offset"], pub["data"]) == (2, {"typed": True})
        await cli.send("just words")
        pub = json.loads(await cli.line(lambda t: '"publication"' in t))
        assert (pub["offset"], pub["data"]) == (3, "just words")
        code, _out, err = await cli.finish()
    finally:
        cli.kill()
    assert code == 0, err
    assert "Traceback" not in err


async def test_connect_protocol_mode_human_output_and_joins(server: ServerProcess) -> None:
    channel = f"chat:cli-{uuid.uuid4().hex[:8]}"
    cli = await Interactive.start(server.ws("/connect"), "-c", channel)
    try:
        await cli.line(lambda t: t.startswith(f"* subscribed to {channel}"))
        async with Client(server.ws("/connect")) as other:
            await other.subscribe(channel)
            joined = await cli.line(lambda t: "joined" in t and other.client_id in t)
            assert joined == f"[{channel}] + anonymous joined ({other.client_id})"
            await other.publish(channel, {"n": 1})
            line = await cli.line(lambda t: t.startswith(f"[{channel}] #"))
            assert line == f'[{channel}] #1 {other.client_id}: {{"n":1}}'
        left = await cli.line(lambda t: "left" in t)
        assert left == f"[{channel}] - anonymous left ({other.client_id})"
        code, _out, err = await cli.finish()
    finally:
        cli.kill()
    assert code == 0, err


async def test_connect_errors_are_one_line(server: ServerProcess) -> None:
    raw, subscribe, protocol = await asyncio.gather(
        run("connect", f"ws://127.0.0.1:{free_port()}/ws"),
        run("connect", server.ws("/connect"), "--channel", "nosuchns:x"),
        run("connect", f"ws://127.0.0.1:{free_port()}/connect", "--channel", "chat:x", "--timeout", "1"),
    )
    code, _out, err = raw
    assert code == 1 and err.startswith("herald: cannot connect to ")
    code, _out, err = subscribe
    assert code == 1
    assert err.startswith("herald: cannot subscribe to nosuchns:x: unknown namespace")
    code, _out, err = protocol
    assert code == 1 and "connection refused" in err
    for _code, _out, err in (raw, subscribe, protocol):
        assert "Traceback" not in err and len(err.splitlines()) == 1, err


async def test_publish_then_history(server: ServerProcess) -> None:
    channel = f"chat:cli-{uuid.uuid4().hex[:8]}"
    api = ("--url", server.http, "--api-key", "test-key")
    code, out, err = await run("publish", channel, '{"text": "first"}', *api, "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["channel"] == channel and first["offset"] == 1
    code, out, err = await run("publish", channel, "second words", *api)
    assert code == 0, err
    assert out.strip() == f"published to {channel} at offset 2 (epoch {first['epoch']})"

    # Independent reads run side by side (each `herald` process takes ~1 s to start).
    as_json, human, since, newest = await asyncio.gather(
        run("history", channel, *api, "--json"),
        run("history", channel, *api),
        run("history", channel, *api, "--json", "--since-offset", "1", "--since-epoch", first["epoch"]),
        # The key can come from the environment too.
        run(
            "history",
            channel,
            "--url",
            server.http,
            "--json",
            "--limit",
            "1",
            "--reverse",
            HERALD_API_KEY="test-key",
        ),
    )
    code, out, err = as_json
    assert code == 0, err
    items = [json.loads(line) for line in out.splitlines()]
    assert [(p["offset"], p["data"]) for p in items] == [(1, {"text": "first"}), (2, "second words")]
    assert all(p["epoch"] == first["epoch"] and p["channel"] == channel for p in items)
    code, out, err = human
    assert code == 0, err
    assert out.splitlines() == [
        '#1  server  {"text":"first"}',
        '#2  server  "second words"',
        f"(2 publication(s); stream at offset 2, epoch {first['epoch']})",
    ]
    code, out, err = since
    assert code == 0, err
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [2]
    code, out, err = newest
    assert code == 0, err
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [2]


async def test_presence(server: ServerProcess) -> None:
    channel = f"chat:cli-{uuid.uuid4().hex[:8]}"
    api = ("--url", server.http, "--api-key", "test-key")
    async with Client(server.ws("/connect"), name="watcher") as client:
        await client.subscribe(channel)
        code, out, err = await run("presence", channel, *api, "--json")
        assert code == 0, err
        [entry] = [json.loads(line) for line in out.splitlines()]
        assert entry["client"] == client.client_id and entry["channel"] == channel
        code, out, err = await run("presence", channel, *api)
        assert code == 0, err
        assert out.splitlines()[0] == f"{channel}: 1 client(s)"
        assert client.client_id in out
        code, out, err = await run("presence", channel, *api, "--stats", "--json")
        assert code == 0, err
        # An anonymous client is a client but no user (docs/http-api.md, issue #17 item 9).
        assert json.loads(out) == {"channel": channel, "num_clients": 1, "num_users": 0}


async def test_http_errors_are_clear(server: ServerProcess) -> None:
    bad_key, unreachable, unknown, usage = await asyncio.gather(
        run("publish", "chat:x", "1", "--url", server.http, "--api-key", "wrong"),
        run("publish", "chat:x", "1", "--url", f"http://127.0.0.1:{free_port()}"),
        run("history", "nosuchns:x", "--url", server.http, "--api-key", "test-key"),
        run("history", "chat:x", "--since-epoch", "abc", "--url", server.http),
    )
    code, out, err = bad_key
    assert code == 1 and out == ""
    assert err == "herald: missing or wrong API key (HTTP 401); pass --api-key or set HERALD_API_KEY\n"
    code, _out, err = unreachable
    assert code == 1
    assert err.startswith("herald: cannot reach http://127.0.0.1:") and "connection refused" in err
    code, _out, err = unknown
    assert code == 1 and "unknown namespace" in err and "HTTP 404" in err
    code, _out, err = usage
    assert code == 2 and "--since-epoch needs --since-offset" in err
    for _code, _out, err in (bad_key, unreachable, unknown, usage):
        assert "Traceback" not in err and len(err.splitlines()) == 1


async def test_walkthrough_resume_with_since(server: ServerProcess) -> None:
    """docs/protocol.md's walk-through: two CLI sessions, publish with HTTP, presence changes,
    one leaves, more is published, it comes back with --since and sees exactly what it missed."""
    channel = f"chat:walk-{uuid.uuid4().hex[:8]}"
    first = await Interactive.start(server.ws("/connect"), "--channel", channel, "--json")
    second = await Interactive.start(server.ws("/connect"), "--channel", channel, "--json")
    try:
        start = json.loads(await first.line(lambda t: '"subscribed"' in t))
        await second.line(lambda t: '"subscribed"' in t)
        async with httpx.AsyncClient(headers={"X-API-Key": "test-key"}) as api:

            async def publish(n: int) -> int:
                reply = await api.post(
                    server.http + "/api/publish", json={"channel": channel, "data": {"n": n}}
                )
                assert reply.status_code == 200
                return int(reply.json()["offset"])

            async def presence_count() -> int:
                reply = await api.get(server.http + "/api/presence", params={"channel": channel})
                return len(reply.json()["clients"])

            assert await presence_count() == 2
            last = await publish(1)
            seen = json.loads(await second.line(lambda t: '"publication"' in t))
            assert seen["offset"] == last
            code, _out, err = await second.finish()
            assert code == 0, err
            for _ in range(100):
                if await presence_count() == 1:
                    break
                await asyncio.sleep(0.05)
            assert await presence_count() == 1
            missed = [await publish(n) for n in (2, 3, 4)]
            resumed = await Interactive.start(
                server.ws("/connect"), "--channel", channel, "--json", "--since", f"{last}:{start['epoch']}"
            )
            try:
                replayed = [json.loads(await resumed.line(lambda t: '"publication"' in t)) for _ in missed]
                assert [p["offset"] for p in replayed] == missed
                assert [p["data"] for p in replayed] == [{"n": 2}, {"n": 3}, {"n": 4}]
                live = await publish(5)
                assert json.loads(await resumed.line(lambda t: '"publication"' in t))["offset"] == live
                await resumed.finish()
            finally:
                resumed.kill()
        code, _out, err = await first.finish()
        assert code == 0, err
    finally:
        first.kill()
        second.kill()


async def test_publish_to_an_app_without_the_http_api_says_so() -> None:
    from fastapi import FastAPI

    from herald import Herald

    # An app that mounts the WebSocket routes at the root and the HTTP API under /rt only.
    herald = Herald(Settings(demos=False))
    app = FastAPI(lifespan=herald.lifespan)
    app.include_router(herald.router)
    app.include_router(herald.api_router, prefix="/rt")
    server = ThreadServer(app).start()
    try:
        missing, prefixed = await asyncio.gather(
            run("publish", "news", "1", "--url", server.http),
            run("publish", "news", "1", "--url", server.http + "/rt", "--json"),
        )
    finally:
        server.stop()
    code, out, err = missing
    assert code == 1 and out == ""
    assert err.startswith(f"herald: no Herald HTTP API at {server.http}/api ")
    assert "answered HTTP 404" in err and "--url" in err and "Not Found (HTTP 404)" not in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    # The suggestion works: the base URL the app mounts the API under.
    code, out, err = prefixed
    assert code == 0, err
    assert json.loads(out)["offset"] == 1


async def test_connect_since_an_offset_ahead_of_the_stream_says_so(server: ServerProcess) -> None:
    channel = f"chat:ahead-{uuid.uuid4().hex[:8]}"
    async with Client(server.ws("/connect")) as publisher:
        for n in range(5):
            top = await publisher.publish(channel, n)
    assert top.offset == 5
    ahead, gap = await asyncio.gather(
        run("connect", server.ws("/connect"), "-c", channel, "--since", f"99:{top.epoch}", stdin=""),
        run(
            "connect", server.ws("/connect"), "-c", channel, "--since", f"2:{top.epoch}x", "--json", stdin=""
        ),
    )
    code, out, err = ahead
    assert code == 0, err
    assert (
        f"* {channel}: could not recover missed publications (offset 99 is ahead of the stream, "
        "which is at offset 5: nothing was published there yet; check the offset given to --since)"
    ) in out.splitlines()
    assert "history no longer covers the gap" not in out
    code, out, err = gap
    assert code == 0, err
    [failed] = [json.loads(line) for line in out.splitlines() if '"recovery_failed"' in line]
    assert (failed["reason"], failed["offset"], failed["epoch"]) == ("epoch_changed", 5, top.epoch)
