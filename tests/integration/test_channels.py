"""Channels over protocol v1 against a real server: recovery, presence, history, the HTTP API."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ServerProcess, http_get

pytestmark = pytest.mark.asyncio


def api(
    server: ServerProcess, method: str, path: str, body: Any = None, key: str | None = "test-key"
) -> tuple[int, Any]:
    request = urllib.request.Request(server.http + path, method=method)
    if key is not None:
        request.add_header("X-API-Key", key)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, data, timeout=DEFAULT_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def test_publish_subscribe_between_clients(server: ServerProcess) -> None:
    alice = await ProtocolClient.open(server.ws("/connect"), subprotocols=["herald.v1"])
    bob = await ProtocolClient.open(server.ws("/connect"))
    try:
        assert alice.ws.subprotocol == "herald.v1"
        reply = await alice.call("subscribe", channels=[{"channel": "chat:pubsub"}])
        item = reply["result"]["channels"][0]
        assert item["channel"] == "chat:pubsub" and item["recoverable"] is True and item["epoch"]
        published = await bob.call("publish", channel="chat:pubsub", data={"text": "hi"})
        assert published["result"]["offset"] == item["offset"] + 1
        push = await alice.push("publication")
        assert push["data"] == {"text": "hi"}
        assert push["offset"] == published["result"]["offset"]
        assert push["epoch"] == item["epoch"]
        assert push["info"]["client"] == bob.client_id
    finally:
        await alice.close()
        await bob.close()


async def test_every_command_gets_exactly_one_reply(server: ServerProcess) -> None:
    client = await ProtocolClient.open(server.ws("/connect"))
    try:
        await client.call("subscribe", channels=[{"channel": "chat:one"}])
        replies = [
            await client.call("ping"),
            await client.call("publish", channel="chat:one", data=1),
            await client.call("presence", channel="chat:one"),
            await client.call("presence_stats", channel="chat:one"),
            await client.call("history", channel="chat:one"),
            await client.call("unsubscribe", channels=["chat:one"]),
            await client.call("unsubscribe", channels=["chat:one"]),  # error: not subscribed
            await client.call("publish", channel="nope:x", data=1),  # error: unknown namespace
            await client.call("rpc", method="missing"),  # error: method not found
        ]
        assert [("result" in r, r.get("error", {}).get("code")) for r in replies] == [
            (True, None),
            (True, None),
            (True, None),
            (True, None),
            (True, None),
            (True, None),
            (False, 109),
            (False, 107),
            (False, 113),
        ]
        ids = [frame["id"] for frame in client.frames if frame.get("id") is not None]
        assert len(ids) == len(set(ids))  # exactly one reply each
    finally:
        await client.close()


async def test_errors_keep_the_connection_open(server: ServerProcess) -> None:
    client = await ProtocolClient.open(server.ws("/connect"), connect=False)
    try:
        early = await client.call("subscribe", channels=[{"channel": "chat:x"}])
        assert early["error"]["code"] == 103  # not connected
        await client.send_raw("{not json")
        await client.send_raw('{"id": 77, "type": "warp"}')
        connect = await client.call("connect")
        assert "result" in connect
        bad_channel = await client.call("subscribe", channels=[{"channel": "chat:bad name"}])
        assert bad_channel["result"]["channels"][0]["error"]["code"] == 106
        again = await client.call("connect")
        assert again["error"]["code"] == 104
        errors = [f for f in client.frames if "error" in f and f.get("id") in (None, 77)]
        assert [e["error"]["code"] for e in errors] == [101, 102]
        assert (await client.call("ping"))["result"] == {}
    finally:
        await client.close()


async def test_presence_and_join_leave_with_several_clients(server: ServerProcess) -> None:
    channel = "chat:presence"
    watcher = await ProtocolClient.open(server.ws("/connect"))
    others = [await ProtocolClient.open(server.ws("/connect")) for _ in range(3)]
    try:
        await watcher.call("subscribe", channels=[{"channel": channel}])
        assert (await watcher.push("join"))["info"]["client"] == watcher.client_id
        for other in others:
            await other.call("subscribe", channels=[{"channel": channel}])
            assert (await watcher.push("join"))["info"]["client"] == other.client_id
        presence = await watcher.call("presence", channel=channel)
        assert set(presence["result"]["clients"]) == {watcher.client_id, *(o.client_id for o in others)}
        stats = await watcher.call("presence_stats", channel=channel)
        assert stats["result"]["num_clients"] == 4
        await others[0].call("unsubscribe", channels=[channel])
        assert (await watcher.push("leave"))["info"]["client"] == others[0].client_id
        await others[1].close()  # disconnect counts as leaving
        assert (await watcher.push("leave"))["info"]["client"] == others[1].client_id
        presence = await watcher.call("presence", channel=channel)
        assert set(presence["result"]["clients"]) == {watcher.client_id, others[2].client_id}
        status, body = api(server, "GET", f"/api/presence?channel={channel}")
        assert status == 200 and set(body["clients"]) == set(presence["result"]["clients"])
    finally:
        for client in (watcher, *others):
            await client.close()


async def test_history_paging(server: ServerProcess) -> None:
    channel = "chat:paging"
    client = await ProtocolClient.open(server.ws("/connect"))
    try:
        for i in range(25):
            await client.call("publish", channel=channel, data=i)
        page = await client.call("history", channel=channel, limit=10)
        result = page["result"]
        assert [p["data"] for p in result["publications"]] == list(range(10))
        epoch, top = result["epoch"], result["offset"]
        assert top == 25
        seen = [p["data"] for p in result["publications"]]
        last = result["publications"][-1]["offset"]
        while True:
            page = await client.call(
                "history", channel=channel, limit=10, since={"offset": last, "epoch": epoch}
            )
            publications = page["result"]["publications"]
            if not publications:
                break
            seen += [p["data"] for p in publications]
            last = publications[-1]["offset"]
        assert seen == list(range(25))
        newest = await client.call("history", channel=channel, limit=3, reverse=True)
        assert [p["data"] for p in newest["result"]["publications"]] == [24, 23, 22]
        wrong_epoch = await client.call("history", channel=channel, since={"offset": 3, "epoch": "other"})
        assert wrong_epoch["error"]["code"] == 119
        status, body = api(server, "GET", f"/api/history?channel={channel}&limit=2&reverse=true")
        assert status == 200 and [p["data"] for p in body["publications"]] == [24, 23]
    finally:
        await client.close()


async def test_recovery_races_live_publications(server: ServerProcess) -> None:
    """Reconnect with `since` while a publisher keeps publishing: no gap, no duplicate, order kept."""
    channel = "chat:race"
    publisher = await ProtocolClient.open(server.ws("/connect"))
    stop = asyncio.Event()
    published: list[int] = []

    async def publish_forever() -> None:
        n = 0
        while not stop.is_set():
            reply = await publisher.call("publish", channel=channel, data=n)
            published.append(reply["result"]["offset"])
            n += 1

    task = asyncio.create_task(publish_forever())
    try:
        subscriber = await ProtocolClient.open(server.ws("/connect"))
        reply = await subscriber.call("subscribe", channels=[{"channel": channel}])
        epoch = reply["result"]["channels"][0]["epoch"]
        received: list[int] = []
        for _trial in range(15):
            # Receive a few live publications, then drop the connection mid-stream.
            for push in await subscriber.publications(3):
                received.append(push["offset"])
            await subscriber.close()
            await asyncio.sleep(0.01)  # let publications pile up while disconnected
            subscriber = await ProtocolClient.open(server.ws("/connect"))
            reply = await subscriber.call(
                "subscribe",
                channels=[{"channel": channel, "since": {"offset": received[-1], "epoch": epoch}}],
            )
            item = reply["result"]["channels"][0]
            assert item["recovered"] is True, item
            received.extend(p["offset"] for p in item["publications"])
        for push in await subscriber.publications(3):
            received.append(push["offset"])
        await subscriber.close()
        first = received[0]
        assert received == list(range(first, first + len(received))), "gap, duplicate or reordering"
    finally:
        stop.set()
        await task
        await publisher.close()


async def test_recovery_reports_false_when_history_cannot_cover() -> None:
    server = ServerProcess(env={"HERALD_NAMESPACES": json.dumps({"tiny": {"history_size": 3}})}).start()
    client = await ProtocolClient.open(server.ws("/connect"))
    try:
        reply = await client.call("subscribe", channels=[{"channel": "tiny:room"}])
        epoch = reply["result"]["channels"][0]["epoch"]
        for i in range(10):
            await client.call("publish", channel="tiny:room", data=i)
        await client.call("unsubscribe", channels=["tiny:room"])
        gap = await client.call(
            "subscribe", channels=[{"channel": "tiny:room", "since": {"offset": 2, "epoch": epoch}}]
        )
        item = gap["result"]["channels"][0]
        assert item["recovered"] is False and item["publications"] == [] and item["offset"] == 10
        await client.call("unsubscribe", channels=["tiny:room"])
        covered = await client.call(
            "subscribe", channels=[{"channel": "tiny:room", "since": {"offset": 7, "epoch": epoch}}]
        )
        item = covered["result"]["channels"][0]
        assert item["recovered"] is True and [p["data"] for p in item["publications"]] == [7, 8, 9]
        await client.call("unsubscribe", channels=["tiny:room"])
        for since in ({"offset": 5, "epoch": "not-the-epoch"}, {"offset": 999, "epoch": epoch}):
            forged = await client.call("subscribe", channels=[{"channel": "tiny:room", "since": since}])
            assert forged["result"]["channels"][0]["recovered"] is False
            await client.call("unsubscribe", channels=["tiny:room"])
    finally:
        await client.close()
        server.stop()


async def test_http_api_with_and_without_key(server: ServerProcess) -> None:
    subscriber = await ProtocolClient.open(server.ws("/connect"))
    try:
        await subscriber.call("subscribe", channels=[{"channel": "chat:api"}])
        status, body = api(server, "POST", "/api/publish", {"channel": "chat:api", "data": {"from": "http"}})
        assert status == 200 and body["offset"] >= 1 and body["epoch"]
        assert (await subscriber.push("publication"))["data"] == {"from": "http"}
        status, body = api(
            server, "POST", "/api/broadcast", {"channels": ["chat:api", "chat:api2", "bad name"], "data": 5}
        )
        assert status == 200
        assert [r.get("error", {}) and r["error"]["code"] for r in body["results"]] == [None, None, 106]
        assert (await subscriber.push("publication"))["data"] == 5
        status, body = api(server, "GET", "/api/channels")
        assert status == 200 and body["channels"].get("chat:api") == 1
        assert api(server, "POST", "/api/publish", {"channel": "chat:api", "data": 1}, key=None)[0] == 401
        assert api(server, "POST", "/api/publish", {"channel": "chat:api", "data": 1}, key="wrong")[0] == 401
        assert api(server, "POST", "/api/publish", {"channel": "nope:x", "data": 1})[0] == 404
        assert api(server, "POST", "/api/publish", {"data": 1})[0] == 422
        status, body = api(server, "POST", "/api/disconnect", {"user": "nobody"})
        assert status == 200 and body["disconnected"] == 0
        status, spec = http_get(server.http + "/openapi.json")
        assert status == 200 and b"/api/publish" in spec
    finally:
        await subscriber.close()


async def test_api_without_key_answers_only_loopback() -> None:
    """Without HERALD_API_KEY the API serves loopback clients only.  A remote client is
    simulated the way it arrives behind a local reverse proxy: from loopback, with
    X-Forwarded-For naming it (uvicorn trusts 127.0.0.1 for that header by default)."""
    server = ServerProcess().start()
    try:
        assert api(server, "POST", "/api/publish", {"channel": "chat:x", "data": 1}, key=None)[0] == 200
        request = urllib.request.Request(
            server.http + "/api/publish",
            data=json.dumps({"channel": "chat:x", "data": 1}).encode(),
            headers={"Content-Type": "application/json", "X-Forwarded-For": "203.0.113.7"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=DEFAULT_TIMEOUT)
        assert refused.value.code == 403
        assert b"HERALD_API_KEY" in refused.value.read()
    finally:
        server.stop()


async def test_heartbeats_close_silent_peers_and_idle_connections() -> None:
    server = ServerProcess(
        env={"HERALD_PING_INTERVAL": "0.3", "HERALD_PONG_TIMEOUT": "0.3", "HERALD_IDLE_TIMEOUT": "1.0"}
    ).start()
    try:
        # A client that answers pings stays connected past several intervals while subscribed.
        lively = await ProtocolClient.open(server.ws("/connect"))
        await lively.call("subscribe", channels=[{"channel": "chat:hb"}])
        # A client that never answers: raw websocket, no pong.
        import websockets

        silent = await websockets.connect(server.ws("/connect"))
        await silent.send(json.dumps({"id": 1, "type": "connect"}))
        frames = []
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                frames.append(json.loads(await asyncio.wait_for(silent.recv(), DEFAULT_TIMEOUT)))
        assert {"type": "ping"} in frames
        assert silent.close_code == 4002
        # An idle client (answers pings but has no subscription and sends no command) is closed with 4003.
        idle = await ProtocolClient.open(server.ws("/connect"))
        await asyncio.wait_for(idle.closed.wait(), DEFAULT_TIMEOUT)
        assert idle.ws.close_code == 4003
        disconnect = [f for f in idle.frames if f.get("type") == "disconnect"]
        assert disconnect == [
            {"type": "disconnect", "code": 4003, "reason": "idle timeout", "reconnect": True}
        ]
        # Meanwhile the lively one is still fine.
        assert not lively.closed.is_set()
        assert (await lively.call("ping"))["result"] == {}
        await lively.close()
    finally:
        server.stop()
