"""Idempotent publish over real sockets: the HTTP API, the protocol, the Python client
and the CLI against a real `herald serve`; two `herald serve` nodes racing one key on a
real Redis (and NATS JetStream); core NATS refusing the key with a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from herald.client import Client
from herald.codes import ErrorCode

from ..helpers import ProtocolClient, ServerProcess
from ..servers import NatsServer, RedisServer, nats_server_fixture, redis_server_fixture
from .test_cli import run

API_KEY = "idem-key"
WINDOW = 1.0
TIMEOUT = 10.0


def _env(**extra: str) -> dict[str, str]:
    return {
        "HERALD_API_KEY": API_KEY,
        "HERALD_IDEMPOTENCY_WINDOW": str(WINDOW),
        "HERALD_LOG_LEVEL": "warning",
        "HERALD_DEMOS": "false",
        **extra,
    }


@pytest.fixture(scope="module")
def node() -> Iterator[ServerProcess]:
    """One `herald serve` on the memory broker with a one-second idempotency window."""
    process = ServerProcess(env=_env()).start()
    yield process
    process.stop()


@contextlib.asynccontextmanager
async def http(node: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.http, headers={"X-API-Key": API_KEY}, timeout=TIMEOUT) as c:
        yield c


def channel() -> str:
    return f"chat:idem-{uuid.uuid4().hex[:8]}"


async def listener(node: ServerProcess, name: str) -> ProtocolClient:
    client = await ProtocolClient.open(node.ws("/connect"))
    reply = await client.call("subscribe", channels=[{"channel": name}])
    assert "error" not in reply["result"]["channels"][0], reply
    return client


async def only_publications(client: ProtocolClient, marker_offset: int) -> list[dict[str, Any]]:
    """Publications up to and including the marker at ``marker_offset`` (published last)."""
    received: list[dict[str, Any]] = []
    while not received or received[-1]["offset"] < marker_offset:
        received.append(await client.push("publication", TIMEOUT))
    return received


# ---------------------------------------------------------------- HTTP API


async def test_http_publish_retried_with_a_key_publishes_once(node: ServerProcess) -> None:
    name = channel()
    watcher = await listener(node, name)
    async with http(node) as api:
        body = {"channel": name, "data": {"order": 42}, "idempotency_key": "order-42"}
        first = await api.post("/api/publish", json=body)
        retry = await api.post("/api/publish", json={**body, "data": {"order": "changed"}})
        other_key = await api.post("/api/publish", json={**body, "idempotency_key": "order-43"})
        marker = await api.post("/api/publish", json={"channel": name, "data": "marker"})
        history = await api.get("/api/history", params={"channel": name})
    assert first.status_code == retry.status_code == 200, (first.text, retry.text)
    # The retry's answer is the original's, byte for byte.
    assert retry.json() == first.json() and first.json()["offset"] == 1
    assert other_key.json()["offset"] == 2
    assert marker.json() == {"offset": 3, "epoch": first.json()["epoch"]}
    received = await only_publications(watcher, 3)
    assert [(p["offset"], p["data"]) for p in received] == [
        (1, {"order": 42}),
        (2, {"order": 42}),
        (3, "marker"),
    ]
    assert [p["data"] for p in history.json()["publications"]] == [{"order": 42}, {"order": 42}, "marker"]
    await watcher.close()


async def test_http_broadcast_key_covers_each_channel_once(node: ServerProcess) -> None:
    a, b, c = channel(), channel(), channel()
    async with http(node) as api:
        first = await api.post(
            "/api/broadcast", json={"channels": [a, b], "data": 1, "idempotency_key": "b-1"}
        )
        # A retry that also names a new channel publishes there, and only there.
        retry = await api.post(
            "/api/broadcast", json={"channels": [b, a, c], "data": 1, "idempotency_key": "b-1"}
        )
        tops = [
            (await api.get("/api/history", params={"channel": x, "limit": 0})).json()["offset"]
            for x in (a, b, c)
        ]
    by_channel = {item["channel"]: item for item in first.json()["results"]}
    again = {item["channel"]: item for item in retry.json()["results"]}
    assert again[a] == by_channel[a] and again[b] == by_channel[b]
    assert by_channel[a]["offset"] == by_channel[b]["offset"] == again[c]["offset"] == 1
    assert tops == [1, 1, 1]


@pytest.mark.parametrize(
    "key",
    ["", "x" * 129, "has space", "tab\tkey", "caf\u00e9", 42],
    ids=["empty", "too-long", "space", "control", "non-ascii", "not-a-string"],
)
async def test_http_refuses_a_bad_key_and_publishes_nothing(node: ServerProcess, key: Any) -> None:
    name = channel()
    async with http(node) as api:
        response = await api.post("/api/publish", json={"channel": name, "data": 1, "idempotency_key": key})
        broadcast = await api.post(
            "/api/broadcast", json={"channels": [name], "data": 1, "idempotency_key": key}
        )
        top = (await api.get("/api/history", params={"channel": name, "limit": 0})).json()["offset"]
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "idempotency_key"]
    assert broadcast.status_code == 422
    assert top == 0


async def test_http_accepts_the_longest_key(node: ServerProcess) -> None:
    name, key = channel(), "~" * 64 + "!" * 64
    async with http(node) as api:
        first = await api.post("/api/publish", json={"channel": name, "data": 1, "idempotency_key": key})
        retry = await api.post("/api/publish", json={"channel": name, "data": 2, "idempotency_key": key})
    assert first.status_code == 200 and retry.json() == first.json()


async def test_a_key_publishes_again_after_the_window(node: ServerProcess) -> None:
    name = channel()
    async with http(node) as api:
        body = {"channel": name, "data": 1, "idempotency_key": "short-lived"}
        first = (await api.post("/api/publish", json=body)).json()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:
            answer = (await api.post("/api/publish", json=body)).json()
            if answer != first:
                break
            assert loop.time() < deadline, "the key was never forgotten"
            await asyncio.sleep(0.1)
        elapsed = loop.time() - (deadline - TIMEOUT)
    assert answer["offset"] == 2
    assert elapsed >= WINDOW * 0.8  # remembered for (about) the configured window


# ---------------------------------------------------------------- protocol, client, CLI


async def test_protocol_publish_retried_with_a_key_publishes_once(node: ServerProcess) -> None:
    name = channel()
    watcher = await listener(node, name)
    publisher = await ProtocolClient.open(node.ws("/connect"))
    first = await publisher.call("publish", channel=name, data={"n": 1}, idempotency_key="cmd-1")
    retry = await publisher.call("publish", channel=name, data={"n": 1}, idempotency_key="cmd-1")
    marker = await publisher.call("publish", channel=name, data="marker")
    assert first["result"] == retry["result"] == {"offset": 1, "epoch": first["result"]["epoch"]}
    assert marker["result"]["offset"] == 2
    received = await only_publications(watcher, 2)
    assert [p["data"] for p in received] == [{"n": 1}, "marker"]
    # A bad key is a bad request (101) naming the field; nothing is published.
    bad = await publisher.call("publish", channel=name, data=1, idempotency_key="no spaces")
    assert bad["error"]["code"] == ErrorCode.BAD_REQUEST
    assert "idempotency_key" in bad["error"]["message"]
    again = await publisher.call("publish", channel=name, data="after")
    assert again["result"]["offset"] == 3
    await publisher.close()
    await watcher.close()


async def test_python_client_publish_with_a_key(node: ServerProcess) -> None:
    name = channel()
    async with Client(node.ws("/connect")) as client:
        first = await client.publish(name, {"n": 1}, idempotency_key="client-1")
        retry = await client.publish(name, {"n": 1}, idempotency_key="client-1")
        plain = await client.publish(name, {"n": 2})
    assert retry == first and first.offset == 1
    assert plain.offset == 2


async def test_cli_publish_with_an_idempotency_key(node: ServerProcess) -> None:
    name = channel()
    api = ("--url", node.http, "--api-key", API_KEY)
    first, retry = await asyncio.gather(
        run("publish", name, '{"n": 1}', "--idempotency-key", "cli-1", *api, "--json"),
        run("publish", name, '{"n": 1}', "--idempotency-key", "cli-1", *api, "--json"),
    )
    assert first[0] == retry[0] == 0, (first, retry)
    assert json.loads(first[1]) == json.loads(retry[1])
    assert json.loads(first[1])["offset"] == 1
    code, _, err = await run("publish", name, "1", "--idempotency-key", "bad key", *api)
    assert code != 0 and "idempotency_key" in err and "Traceback" not in err


# ---------------------------------------------------------------- two nodes, one key


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


@contextlib.asynccontextmanager
async def cluster(broker: str) -> AsyncIterator[list[ServerProcess]]:
    nodes = [ServerProcess(env=_env(HERALD_BROKER=broker, HERALD_IDEMPOTENCY_WINDOW="300")) for _ in range(2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(n.start) for n in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))


async def _race_one_key_through_two_nodes(nodes: list[ServerProcess]) -> None:
    name = channel()
    watchers = [await listener(n, name) for n in nodes]
    body = {"channel": name, "data": {"order": 7}, "idempotency_key": "outbox:7"}
    async with http(nodes[0]) as first, http(nodes[1]) as second:
        replies = await asyncio.gather(
            *(api.post("/api/publish", json=body) for _ in range(5) for api in (first, second))
        )
        assert [r.status_code for r in replies] == [200] * 10, [r.text for r in replies]
        answers = {json.dumps(r.json(), sort_keys=True) for r in replies}
        assert len(answers) == 1, answers
        assert replies[0].json()["offset"] == 1
        marker = await second.post("/api/publish", json={"channel": name, "data": "marker"})
        assert marker.json()["offset"] == 2
        history = (await first.get("/api/history", params={"channel": name})).json()
    assert [p["data"] for p in history["publications"]] == [{"order": 7}, "marker"]
    for watcher in watchers:
        received = await only_publications(watcher, 2)
        assert [(p["offset"], p["data"]) for p in received] == [(1, {"order": 7}), (2, "marker")]
        await watcher.close()


@pytest.mark.redis
async def test_two_nodes_on_redis_racing_one_key_publish_once(redis_server: RedisServer) -> None:
    async with cluster(redis_server.url + f"?prefix=idem{uuid.uuid4().hex[:6]}") as nodes:
        await _race_one_key_through_two_nodes(nodes)


@pytest.mark.nats
async def test_two_nodes_on_jetstream_racing_one_key_publish_once(jetstream_server: NatsServer) -> None:
    async with cluster(jetstream_server.url + f"?jetstream=1&prefix=idem{uuid.uuid4().hex[:6]}") as nodes:
        await _race_one_key_through_two_nodes(nodes)


@pytest.mark.nats
async def test_core_nats_refuses_a_key_clearly(nats_server: NatsServer) -> None:
    process = ServerProcess(env=_env(HERALD_BROKER=nats_server.url))
    await asyncio.to_thread(process.start)
    try:
        name = channel()
        async with http(process) as api:
            refused = await api.post(
                "/api/publish", json={"channel": name, "data": 1, "idempotency_key": "k"}
            )
            broadcast = await api.post(
                "/api/broadcast", json={"channels": [name], "data": 1, "idempotency_key": "k"}
            )
            plain = await api.post("/api/publish", json={"channel": name, "data": 1})
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"]["code"] == ErrorCode.NOT_AVAILABLE
        assert "jetstream" in refused.json()["detail"]["message"].lower()
        assert broadcast.json()["results"][0]["error"]["code"] == ErrorCode.NOT_AVAILABLE
        assert plain.status_code == 200
        client = await ProtocolClient.open(process.ws("/connect"))
        reply = await client.call("publish", channel=name, data=1, idempotency_key="k")
        assert reply["error"]["code"] == ErrorCode.NOT_AVAILABLE
        assert "idempotency_key" in reply["error"]["message"]
        await client.close()
    finally:
        await asyncio.to_thread(process.stop)
