"""The example app in examples/chat_app.py, served by a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import pytest
from examples import chat_app

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ThreadServer, async_wait_for

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def example() -> Iterator[ThreadServer]:
    server = ThreadServer(chat_app.app).start()
    yield server
    server.stop()


async def test_route_publishes_to_subscribers(example: ThreadServer) -> None:
    client = await ProtocolClient.open(example.ws("/connect"))
    try:
        await client.call("subscribe", channels=[{"channel": "orders:new"}])
        request = urllib.request.Request(
            example.http + "/orders",
            data=json.dumps({"item": "book", "quantity": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        response = await asyncio.to_thread(urllib.request.urlopen, request, timeout=DEFAULT_TIMEOUT)
        with response:
            body = json.loads(response.read())
        push = await client.push("publication")
        assert push["data"] == {"item": "book", "quantity": 2}
        assert push["offset"] == body["offset"]
        # Clients may not publish in `orders`.
        refused = await client.call("publish", channel="orders:new", data={"item": "free"})
        assert refused["error"]["code"] == 110
    finally:
        await client.close()


async def test_typed_rpc(example: ThreadServer) -> None:
    client = await ProtocolClient.open(example.ws("/connect"))
    try:
        reply = await client.call("rpc", method="roll", params={"sides": 20})
        assert reply["result"]["data"]["sides"] == 20
        assert 1 <= reply["result"]["data"]["value"] <= 20
        default = await client.call("rpc", method="roll", params={})
        assert default["result"]["data"]["sides"] == 6
        invalid = await client.call("rpc", method="roll", params={"sides": 1})
        assert invalid["error"]["code"] == 114 and "sides" in invalid["error"]["message"]
        wrong_type = await client.call("rpc", method="roll", params={"sides": "many"})
        assert wrong_type["error"]["code"] == 114
    finally:
        await client.close()


async def test_hooks_authenticate_authorize_and_transform(example: ThreadServer) -> None:
    alice = await ProtocolClient.open(
        example.ws("/connect"), additional_headers={"Cookie": "session=s3cret-alice"}
    )
    admin = await ProtocolClient.open(
        example.ws("/connect"), additional_headers={"Cookie": "session=s3cret-admin"}
    )
    try:
        connect_users = [
            f["result"]["user"] for c in (alice, admin) for f in c.frames if f.get("type") == "connect"
        ]
        assert connect_users == ["alice", "admin"]
        denied = await alice.call("subscribe", channels=[{"channel": "chat:admin-room"}])
        assert denied["result"]["channels"][0]["error"] == {"code": 110, "message": "admins only"}
        allowed = await admin.call(
            "subscribe", channels=[{"channel": "chat:admin-room"}, {"channel": "chat:lobby"}]
        )
        assert all("error" not in item for item in allowed["result"]["channels"])
        await alice.call("subscribe", channels=[{"channel": "chat:lobby"}])
        sent = await alice.call("publish", channel="chat:lobby", data={"text": "  hello  "})
        assert "result" in sent
        push = await admin.push("publication")
        assert push["data"] == {"text": "hello", "by": "alice"}
        empty = await alice.call("publish", channel="chat:lobby", data={"text": "   "})
        assert empty["error"]["code"] == 110
        client_id = alice.client_id
        await alice.close()
        await async_wait_for(
            lambda: any(c == client_id for c, _ in chat_app.disconnects), what="disconnect hook"
        )
    finally:
        await admin.close()


async def test_tutorial_endpoints_are_mounted_too(example: ThreadServer) -> None:
    import websockets

    async with websockets.connect(example.ws("/ws")) as ws:
        await ws.send("hi")
        assert await ws.recv() == "Message text was: hi"
