"""Every frame a real server sends matches the exported schema, and so does every command it accepts.

One `herald serve` process (API key, JWT secret, fast pings); clients exercise every command
type, the error paths and every push (publication, join, leave, ping, refresh, disconnect via
``POST /api/disconnect``).  Each received frame is checked against
``docs/schema/protocol.schema.json`` (``$defs/ServerFrame``), each accepted command against
``$defs/ClientFrame``; the tutorial endpoints are checked against ``/asyncapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import websockets
from jsonschema import Draft202012Validator

from herald.codes import CloseCode, ErrorCode

from .. import wire_schema
from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ServerProcess, async_wait_for, http_get

pytestmark = pytest.mark.asyncio

SECRET = "wire-schema-secret-of-at-least-32-bytes"
API_KEY = "test-key"


@pytest.fixture(scope="module")
def wire_server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": SECRET,
            "HERALD_PING_INTERVAL": "0.3",
            "HERALD_DEMOS": "false",
        }
    ).start()
    yield process
    process.stop()


def token(user: str, expires_in: float | None = None) -> str:
    claims: dict[str, Any] = {"sub": user}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    return jwt.encode(claims, SECRET, algorithm="HS256")


def post_json(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=DEFAULT_TIMEOUT) as response:
        return response.status, json.loads(response.read())


async def connected(server: ServerProcess, user: str, **claims: Any) -> ProtocolClient:
    client = await ProtocolClient.open(server.ws("/connect"), connect=False, subprotocols=["herald.v1"])
    reply = await client.call("connect", token=token(user, **claims), name=f"wire-{user}")
    assert reply["result"]["user"] == user, reply
    client.client_id = reply["result"]["client"]
    return client


def error_code(reply: dict[str, Any]) -> int:
    assert "error" in reply, reply
    return int(reply["error"]["code"])


async def frame_where(client: ProtocolClient, predicate: Any, what: str) -> dict[str, Any]:
    found: dict[str, Any] = await async_wait_for(
        lambda: next((f for f in client.frames if predicate(f)), None), DEFAULT_TIMEOUT, what
    )
    return found


def kind_of(frame: dict[str, Any]) -> str:
    """``reply:<type>``, ``error:<type>`` or ``push:<type>``."""
    if "id" in frame:
        return f"{'error' if frame.get('error') else 'reply'}:{frame.get('type')}"
    return f"push:{frame['type']}"


async def test_every_server_frame_matches_the_schema(wire_server: ServerProcess) -> None:
    server = wire_server
    server_frame = wire_schema.validator("ServerFrame")
    alice = await connected(server, "alice")
    bob = await connected(server, "bob")
    anonymous = await ProtocolClient.open(server.ws("/connect"), connect=False)
    clients = [alice, bob, anonymous]
    try:
        # -- before connect, then connect, then connect again
        assert error_code(await anonymous.call("ping")) == ErrorCode.NOT_CONNECTED
        assert "result" in await anonymous.call("connect")
        assert error_code(await anonymous.call("connect")) == ErrorCode.ALREADY_CONNECTED

        # -- subscribe: success and per-channel errors; join pushes
        sub = await alice.call("subscribe", channels=[{"channel": "chat:wire"}])
        assert sub["result"]["channels"][0]["recoverable"] is True
        mixed = await bob.call(
            "subscribe",
            channels=[
                {"channel": "chat:wire"},
                {"channel": "bad channel!"},
                {"channel": "nope:x"},
                {"channel": "chat:dm#carol"},
            ],
        )
        results = mixed["result"]["channels"]
        assert "error" not in results[0] or results[0]["error"] is None
        assert [r["error"]["code"] for r in results[1:]] == [
            ErrorCode.INVALID_CHANNEL,
            ErrorCode.UNKNOWN_NAMESPACE,
            ErrorCode.PERMISSION_DENIED,
        ]
        again = await alice.call("subscribe", channels=[{"channel": "chat:wire"}])
        assert again["result"]["channels"][0]["error"]["code"] == ErrorCode.ALREADY_SUBSCRIBED
        await frame_where(
            alice, lambda f: f.get("type") == "join" and f["info"]["user"] == "bob", "bob's join"
        )

        # -- publish (publication pushes to both), refused publish
        published = await bob.call("publish", channel="chat:wire", data={"text": "hi", "n": [1, None]})
        position = published["result"]
        for client in (alice, bob):
            publication = await client.push("publication")
            assert publication["offset"] == position["offset"]
            assert publication["info"]["user"] == "bob"
        denied = await alice.call("publish", channel="dashboard:cpu", data=1)
        assert error_code(denied) == ErrorCode.PERMISSION_DENIED

        # -- history, recovery, presence
        history = await alice.call("history", channel="chat:wire", limit=10, reverse=True)
        assert history["result"]["publications"][0]["data"] == {"text": "hi", "n": [1, None]}
        stale = await alice.call(
            "history", channel="chat:wire", since={"offset": 0, "epoch": "not-the-epoch"}
        )
        assert error_code(stale) == ErrorCode.UNRECOVERABLE_POSITION
        resumed = await anonymous.call(
            "subscribe",
            channels=[{"channel": "chat:wire", "since": {"offset": 0, "epoch": position["epoch"]}}],
        )
        assert resumed["result"]["channels"][0]["recovered"] is True
        presence = await alice.call("presence", channel="chat:wire")
        assert {info["user"] for info in presence["result"]["clients"].values()} >= {"alice", "bob"}
        stats = await alice.call("presence_stats", channel="chat:wire")
        assert stats["result"]["num_users"] >= 2
        off = await alice.call("presence", channel="dashboard:cpu")
        assert error_code(off) == ErrorCode.NOT_AVAILABLE

        # -- rpc, ping, refresh
        assert error_code(await alice.call("rpc", method="nope", params=[1])) == ErrorCode.METHOD_NOT_FOUND
        assert (await alice.call("ping"))["result"] == {}
        refreshed = await alice.call("refresh", token=token("alice", expires_in=3600))
        assert refreshed["result"]["expires_at"] is not None
        assert error_code(await alice.call("refresh", token=token("mallory"))) == ErrorCode.UNAUTHORIZED

        # -- undecodable frames: error replies with and without an id
        await alice.send_raw("{bad json")
        await alice.send_raw('{"id": 77, "type": "bogus"}')
        await alice.send_raw('{"id": 78, "type": "ping", "extra": 1}')
        # The type is echoed when it is a command type (78: a ping with a bad field).
        for wanted, kind in ((None, None), (77, None), (78, "ping")):
            frame = await frame_where(
                alice, lambda f, w=wanted: "error" in f and f.get("id") == w, f"error reply {wanted}"
            )
            assert frame["type"] == kind

        # -- unsubscribe (leave push), unsubscribe again
        assert (await bob.call("unsubscribe", channels=["chat:wire"]))["result"] == {
            "channels": ["chat:wire"]
        }
        await frame_where(
            alice, lambda f: f.get("type") == "leave" and f["info"]["user"] == "bob", "bob's leave"
        )
        assert error_code(await bob.call("unsubscribe", channels=["chat:wire"])) == ErrorCode.NOT_SUBSCRIBED

        # -- server pushes: ping (answered by ProtocolClient), refresh when a token expires
        await frame_where(alice, lambda f: f == {"type": "ping"}, "server ping")
        carol = await connected(server, "carol", expires_in=1)
        clients.append(carol)
        refresh_push = await carol.push("refresh", timeout=DEFAULT_TIMEOUT)
        assert refresh_push["grace"] > 0
        assert "result" in await carol.call("refresh", token=token("carol", expires_in=3600))

        # -- disconnect through the HTTP API
        status, body = await asyncio.to_thread(
            post_json,
            server.http + "/api/disconnect",
            {"user": "alice", "reason": "schema test"},
            {"X-API-Key": API_KEY},
        )
        assert status == 200 and body["disconnected"] == 1
        disconnect = await alice.push("disconnect")
        assert disconnect == {
            "type": "disconnect",
            "code": CloseCode.FORCE_DISCONNECT,
            "reason": "schema test",
            "reconnect": False,
        }
        await asyncio.wait_for(alice.closed.wait(), DEFAULT_TIMEOUT)
    finally:
        for client in clients:
            await client.close()

    # Every frame the server sent is a ServerFrame (the autouse conftest check sees the same
    # frames through ProtocolClient; this says it explicitly and checks coverage).
    seen: set[str] = set()
    for client in clients:
        for frame in client.frames:
            errors = list(server_frame.iter_errors(frame))
            assert not errors, (frame, errors[0].message)
            seen.add(kind_of(frame))
    replies = {
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "presence",
        "presence_stats",
        "history",
        "ping",
        "refresh",
    }
    wanted = {f"reply:{kind}" for kind in replies}
    wanted |= {f"error:{kind}" for kind in ("rpc", "publish", "history", "connect", "refresh")}
    wanted |= {"error:None"}
    wanted |= {f"push:{kind}" for kind in ("publication", "join", "leave", "ping", "refresh", "disconnect")}
    assert wanted <= seen, sorted(wanted - seen)


async def test_tutorial_frames_match_the_asyncapi_document(wire_server: ServerProcess) -> None:
    status, body = await asyncio.to_thread(http_get, wire_server.http + "/asyncapi.json")
    assert status == 200
    doc = json.loads(body)

    def validator(message: str) -> Draft202012Validator:
        payload = doc["components"]["messages"][message]["payload"]
        return Draft202012Validator({**payload, "components": doc["components"]})

    async with websockets.connect(wire_server.ws("/ws")) as ws:
        await ws.send("hello")
        validator("ws.out").validate(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT))
    async with websockets.connect(wire_server.ws("/ws_json")) as ws:
        await ws.send('{"a": [1, 2]}')
        validator("ws_json.out").validate(json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)))
        await ws.send("{not json")
        validator("ws_json.out").validate(json.loads(await asyncio.wait_for(ws.recv(), DEFAULT_TIMEOUT)))
    async with (
        websockets.connect(wire_server.ws("/ws_broadcast")) as sender,
        websockets.connect(wire_server.ws("/ws_broadcast")) as receiver,
    ):
        # Both are registered once a message from one reaches the other.
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while True:
            await sender.send("ping?")
            try:
                text = await asyncio.wait_for(receiver.recv(), 0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "broadcast never arrived"
        validator("ws_broadcast.out").validate(text)
