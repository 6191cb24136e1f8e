"""/metrics on a real `herald serve`: scraped and parsed with prometheus_client's parser."""

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
from prometheus_client.parser import text_string_to_metric_families

from .helpers import ProtocolClient, ServerProcess, http_get

API_KEY = "metrics-key"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": "metrics-secret-" + "x" * 32,
            # Small queues: a client that stops reading soon overflows its queue.
            "HERALD_MAX_QUEUE_BYTES": "65536",
            "HERALD_DEMOS": "false",
        }
    ).start()
    yield process
    process.stop()


def scrape(server: ServerProcess) -> Samples:
    status, body = http_get(server.http + "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_metric(
    server: ServerProcess, name: str, predicate: object, timeout: float = 5.0, **labels: str
) -> Samples:
    """Scrape until ``predicate(value)`` holds (counters are copied at scrape time, but
    connection cleanup runs after the socket closes)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, server)
        current = value(samples, name, **labels)
        if predicate(current):  # type: ignore[operator]
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {current}")
        await asyncio.sleep(0.05)


def api_post(server: ServerProcess, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        server.http + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


async def test_connections_messages_publications(metrics_server: ServerProcess) -> None:
    before = await asyncio.to_thread(scrape, metrics_server)
    alice = await ProtocolClient.open(metrics_server.ws("/connect"))
    bob = await ProtocolClient.open(metrics_server.ws("/connect"))
    for client in (alice, bob):
        reply = await client.call("subscribe", channels=[{"channel": "chat:metrics"}])
        assert "error" not in reply["result"]["channels"][0]
    for n in range(3):
        assert "result" in await alice.call("publish", channel="chat:metrics", data={"n": n})
    await bob.publications(3)
    await asyncio.to_thread(api_post, metrics_server, "/api/publish", {"channel": "game:m", "data": 1})

    after = await asyncio.to_thread(scrape, metrics_server)
    connect = {"route": "connect"}
    assert (
        value(after, "herald_connections_total", **connect)
        - value(before, "herald_connections_total", **connect)
        == 2
    )
    assert (
        value(after, "herald_connections_open", **connect)
        == value(before, "herald_connections_open", **connect) + 2
    )
    assert value(after, "herald_subscriptions") >= 2
    assert value(after, "herald_channels") >= 1
    published = value(after, "herald_publications_total", namespace="chat") - value(
        before, "herald_publications_total", namespace="chat"
    )
    assert published == 3
    assert value(after, "herald_publications_total", namespace="game") >= 1
    # connect x2, subscribe x2, publish x3 at least (pongs may add more).
    grew_in = value(after, "herald_messages_in_total", **connect) - value(
        before, "herald_messages_in_total", **connect
    )
    assert grew_in >= 7
    assert value(after, "herald_bytes_in_total", **connect) > value(
        before, "herald_bytes_in_total", **connect
    )
    # Both clients got 3 publications and their replies.
    grew_out = value(after, "herald_messages_out_total", **connect) - value(
        before, "herald_messages_out_total", **connect
    )
    assert grew_out >= 13
    assert value(after, "herald_bytes_out_total", **connect) > value(
        before, "herald_bytes_out_total", **connect
    )
    assert value(after, "herald_deliveries_total") - value(before, "herald_deliveries_total") == 6
    latency = value(after, "herald_broker_publish_seconds_count") - value(
        before, "herald_broker_publish_seconds_count"
    )
    assert latency == 4
    assert value(after, "herald_broker_publish_seconds_bucket", le="+Inf") >= 4

    await alice.close()
    await bob.close()
    await wait_metric(
        metrics_server,
        "herald_disconnects_total",
        lambda v: v >= value(before, "herald_disconnects_total", route="connect", code="1000") + 2,
        route="connect",
        code="1000",
    )
    final = await wait_metric(
        metrics_server,
        "herald_connections_open",
        lambda v: v == value(before, "herald_connections_open", **connect),
        **connect,
    )
    assert value(final, "herald_node_info", broker="memory", version="0.1.0", node=_node(final)) == 1


def _node(samples: Samples) -> str:
    for name, labels in samples:
        if name == "herald_node_info":
            return dict(labels)["node"]
    raise AssertionError("no herald_node_info")


async def test_refused_handshakes_are_counted_by_reason(metrics_server: ServerProcess) -> None:
    before = await asyncio.to_thread(scrape, metrics_server)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(metrics_server.ws("/connect"), origin="http://evil.example")
    assert refused.value.response.status_code == 403

    client = await ProtocolClient.open(metrics_server.ws("/connect"), connect=False)
    bad = jwt.encode({"sub": "mallory"}, "not-the-secret-" + "y" * 32, algorithm="HS256")
    reply = await client.call("connect", token=bad)
    assert reply["error"]["code"] == 111
    await client.close()

    after = await asyncio.to_thread(scrape, metrics_server)
    for reason in ("origin", "auth"):
        grew = value(after, "herald_handshakes_rejected_total", reason=reason) - value(
            before, "herald_handshakes_rejected_total", reason=reason
        )
        assert grew == 1, reason


async def test_slow_consumer_disconnect_is_counted(metrics_server: ServerProcess) -> None:
    before = await asyncio.to_thread(scrape, metrics_server)
    # A client that stops reading: websockets pauses the socket once one message is unread,
    # then the kernel buffers fill and the server's bounded queue overflows.
    websocket = await websockets.connect(metrics_server.ws("/connect"), max_queue=1)
    await websocket.send(json.dumps({"id": 1, "type": "connect"}))
    await websocket.send(json.dumps({"id": 2, "type": "subscribe", "channels": [{"channel": "chat:slow"}]}))
    big = "x" * 60_000
    target = value(before, "herald_slow_consumer_disconnects_total") + 1
    for _ in range(60):
        await asyncio.to_thread(
            api_post, metrics_server, "/api/broadcast", {"channels": ["chat:slow"] * 10, "data": big}
        )
        samples = await asyncio.to_thread(scrape, metrics_server)
        if value(samples, "herald_slow_consumer_disconnects_total") >= target:
            break
    after = await wait_metric(metrics_server, "herald_slow_consumer_disconnects_total", lambda v: v == target)
    grew = value(after, "herald_disconnects_total", route="connect", code="4001") - value(
        before, "herald_disconnects_total", route="connect", code="4001"
    )
    assert grew == 1
    # The client, reading again, finds the connection closed.
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(websocket.recv(), 5)
    await websocket.close()


async def test_recovery_outcomes(metrics_server: ServerProcess) -> None:
    before = await asyncio.to_thread(scrape, metrics_server)
    publisher = await ProtocolClient.open(metrics_server.ws("/connect"))
    first = await publisher.call("publish", channel="chat:recover", data=1)
    position = first["result"]
    await publisher.call("publish", channel="chat:recover", data=2)

    client = await ProtocolClient.open(metrics_server.ws("/connect"))
    since = {"offset": position["offset"], "epoch": position["epoch"]}
    reply = await client.call("subscribe", channels=[{"channel": "chat:recover", "since": since}])
    assert reply["result"]["channels"][0]["recovered"] is True
    wrong = {"offset": 1, "epoch": "not-this-epoch"}
    reply = await client.call("subscribe", channels=[{"channel": "chat:other", "since": wrong}])
    assert reply["result"]["channels"][0]["recovered"] is False
    await client.close()
    await publisher.close()

    after = await asyncio.to_thread(scrape, metrics_server)
    for outcome in ("true", "false"):
        grew = value(after, "herald_recoveries_total", recovered=outcome) - value(
            before, "herald_recoveries_total", recovered=outcome
        )
        assert grew == 1, outcome


class _Transport:
    async def send(self, frame: str) -> None:
        return None

    async def close(self, code: int, reason: str) -> None:
        return None


async def test_node_stats_feed_the_metrics_named_for_them() -> None:
    """In process: each NodeStats field lands in its documented metric (deliveries are
    not frames), broker gaps and broker events are exported."""
    from herald.brokers.memory import MemoryBroker
    from herald.config import Settings
    from herald.connection import Connection
    from herald.demos import DEMO_NAMESPACES
    from herald.metrics import Metrics
    from herald.node import Node

    broker = MemoryBroker()
    node = Node(Settings(ping_interval=0, namespaces=DEMO_NAMESPACES), broker=broker)
    metrics = Metrics(node)
    await node.start()
    try:
        subscribers = [Connection(_Transport(), f"c{i}", renderer=lambda p: "x") for i in range(3)]
        for connection in subscribers:
            node.hub.subscribe("chat:gap", connection)
        await node.ensure_broker_subscription("chat:gap")
        await node.publish("chat:gap", 1)  # one publication, three deliveries
        broker.drop_hook = lambda publication: True
        await node.publish("chat:gap", 2)  # missed by this node: a gap, subscribers closed
        broker.handler_errors = 2  # as if the node's handler had failed twice
        node.stats.route("connect").frames_in, node.stats.route("ws").bytes_in = 5, 50

        samples: Samples = {}
        for family in text_string_to_metric_families(metrics.render().decode()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        assert node.stats.deliveries == 3
        assert value(samples, "herald_deliveries_total") == 3
        assert value(samples, "herald_publications_total", namespace="chat") == 2
        assert value(samples, "herald_stream_gaps_total") == 1
        assert all(c.is_closing for c in subscribers)
        assert value(samples, "herald_broker_events_total", event="handler_errors") == 2
        assert value(samples, "herald_messages_in_total", route="connect") == 5
        assert value(samples, "herald_bytes_in_total", route="ws") == 50
        assert value(samples, "herald_bytes_in_total", route="connect") == 0
        assert node.stats.as_dict()["stream_gaps"] == 1
    finally:
        await node.close()


def test_route_labels_are_a_fixed_set_with_other_for_the_rest() -> None:
    from herald.stats import ROUTE_LABELS, NodeStats

    stats = NodeStats()
    assert set(stats.routes) == set(ROUTE_LABELS)
    assert stats.route("connect") is stats.routes["connect"]
    assert stats.route("long_poll") is stats.routes["other"]
    assert stats.route("/connect") is stats.routes["other"]  # names, never paths


class _Socket:
    client_ip = "192.0.2.1"

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    def send_now(self, message: str | bytes) -> None:
        self.sent.append(message)


async def test_route_counters_add_up_per_label_and_in_total() -> None:
    """In process: a session of a route without a name of its own counts under ``other``;
    the open connections' output counts until they end, then stays in the totals."""
    from herald.config import Settings
    from herald.connection import Connection
    from herald.metrics import Metrics
    from herald.node import Node
    from herald.sessions import EchoSession, RouteSession
    from herald.stats import ROUTE_LABELS

    class Unnamed(RouteSession):
        __slots__ = ()

        def on_text(self, text: str) -> None:
            self.send_now(text.upper())

    node = Node(Settings(ping_interval=0))
    metrics = Metrics(node)

    def samples() -> Samples:
        found: Samples = {}
        for family in text_string_to_metric_families(metrics.render().decode()):
            for sample in family.samples:
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return found

    fresh = samples()
    for label in ROUTE_LABELS:  # every route shows at 0 before its first client
        assert (("herald_connections_open", frozenset({("route", label)}))) in fresh
        assert value(fresh, "herald_messages_in_total", route=label) == 0

    socket: Any = _Socket()
    unnamed, echo = Unnamed(node, socket), EchoSession(node, socket)
    unnamed.message("abc")
    echo.message("hello")
    echo.message("again")
    connection = unnamed.count_output(Connection(_Transport(), "c1", renderer=lambda p: "x"))
    connection.frames_out, connection.bytes_out = 3, 30

    during = samples()
    assert value(during, "herald_connections_open", route="other") == 1
    assert value(during, "herald_connections_open", route="ws") == 1
    assert value(during, "herald_messages_in_total", route="other") == 1
    assert value(during, "herald_bytes_in_total", route="other") == 3
    assert value(during, "herald_messages_in_total", route="ws") == 2
    assert value(during, "herald_bytes_in_total", route="ws") == len("hello") + len("again")
    # "ABC" written by the session, and the open connection's 3 frames.
    assert value(during, "herald_messages_out_total", route="other") == 1 + 3
    assert value(during, "herald_bytes_out_total", route="other") == 3 + 30
    assert value(during, "herald_messages_out_total", route="ws") == 2
    assert socket.sent == ["ABC", "Message text was: hello", "Message text was: again"]

    unnamed.finish(4001, connection)
    echo.lost(1006, "", True)
    connection.frames_out += 100  # after its end: no longer read
    after = samples()
    assert value(after, "herald_connections_open", route="other") == 0
    assert value(after, "herald_connections_total", route="other") == 1
    assert value(after, "herald_disconnects_total", route="other", code="4001") == 1
    assert value(after, "herald_disconnects_total", route="ws", code="1006") == 1
    assert value(after, "herald_messages_out_total", route="other") == 4
    total_in = sum(v for (name, _), v in after.items() if name == "herald_messages_in_total")
    assert total_in == 3
    assert node.stats.as_dict()["frames_in"] == 3
    assert node.stats.as_dict()["connections"] == 2
