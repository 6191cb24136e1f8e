"""Hub and node with the memory broker and recording transports: fan-out, cleanup."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from herald.brokers.base import ClientInfo, Publication
from herald.brokers.memory import MemoryBroker
from herald.codes import CloseCode
from herald.commands import CommandHandler, render_publication
from herald.config import Settings
from herald.connection import Connection
from herald.context import AsgiHandshake, ClientContext
from herald.demos import DEMO_NAMESPACES
from herald.hub import Hub
from herald.node import PINGS_PER_TURN, Node, heartbeat_tick

from .helpers import async_wait_for
from .recording import RecordingTransport

pytestmark = pytest.mark.asyncio


class Client:
    """A protocol client wired to a node through a recording transport."""

    def __init__(self, node: Node, name: str, **queue: int) -> None:
        self.transport = RecordingTransport()
        self.connection = Connection(self.transport, name, renderer=render_publication, **queue)  # type: ignore[arg-type]
        self.handler = CommandHandler(node, self.connection, AsgiHandshake({}))
        self.connection.start()
        self.ids = 0

    async def call(self, kind: str, **fields: object) -> dict[str, object]:
        self.ids += 1
        await self.handler.handle_text(json.dumps({"id": self.ids, "type": kind, **fields}))
        await async_wait_for(lambda: any(f.get("id") == self.ids for f in self.frames()))
        return next(f for f in self.frames() if f.get("id") == self.ids)

    def frames(self) -> list[dict[str, object]]:
        return [json.loads(f) for f in self.transport.frames]

    def publications(self, channel: str | None = None) -> list[dict[str, object]]:
        return [
            f for f in self.frames() if f.get("type") == "publication" and channel in (None, f["channel"])
        ]


@pytest.fixture
async def node() -> Node:
    settings = Settings(ping_interval=0, presence_ttl=60, namespaces=DEMO_NAMESPACES)
    node = Node(settings)
    await node.start()
    yield node  # type: ignore[misc]
    await node.close()


async def connected(node: Node, name: str, **queue: int) -> Client:
    client = Client(node, name, **queue)
    reply = await client.call("connect")
    assert "result" in reply
    return client


async def test_fan_out_keeps_per_channel_order_for_every_subscriber(node: Node) -> None:
    clients = [await connected(node, f"c{i}") for i in range(5)]
    for client in clients:
        await client.call("subscribe", channels=[{"channel": "chat:a"}, {"channel": "chat:b"}])
    for i in range(50):
        await node.publish("chat:a", {"n": i})
        await node.publish("chat:b", {"n": i})
    for client in clients:
        await async_wait_for(lambda c=client: len(c.publications()) == 100)  # type: ignore[misc]
        for channel in ("chat:a", "chat:b"):
            pubs = client.publications(channel)
            assert [p["data"] for p in pubs] == [{"n": i} for i in range(50)]
            assert [p["offset"] for p in pubs] == list(range(1, 51))


async def test_fan_out_encodes_once_per_publication(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = [await connected(node, f"c{i}") for i in range(10)]
    for client in clients:
        await client.call("subscribe", channels=[{"channel": "chat:x"}])
    calls = 0
    original = clients[0].connection.renderer

    def counting(publication):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(publication)

    for client in clients:
        client.connection.renderer = counting
    await node.publish("chat:x", "hello")
    assert calls == 1
    for client in clients:
        await async_wait_for(lambda c=client: len(c.publications()) == 1)  # type: ignore[misc]


async def test_fan_out_renders_once_per_renderer_and_never_mixes_them() -> None:
    # Subscribers with two renderers, interleaved (protocol clients and tutorial
    # broadcast clients can share a channel): each gets its own renderer's frame.
    hub = Hub()
    calls: list[str] = []

    def rendering(name: str) -> Callable[[Publication], str]:
        def render(publication: Publication) -> str:
            calls.append(name)
            return f"{name}:{publication.offset}"

        return render

    renderers = [rendering("a"), rendering("b")]
    transports = [RecordingTransport() for _ in range(6)]
    for i, transport in enumerate(transports):
        connection = Connection(transport, f"c{i}", renderer=renderers[i % 2])  # type: ignore[arg-type]
        connection.start()
        hub.add(connection)
        hub.subscribe("room", connection)
    assert hub.fan_out(Publication("room", 7, "e", b"1")) == 6
    assert sorted(calls) == ["a", "b"]
    await async_wait_for(lambda: all(t.frames for t in transports))
    assert [t.frames for t in transports] == [["a:7"], ["b:7"]] * 3


async def test_slow_consumer_is_disconnected_and_others_unaffected(node: Node) -> None:
    healthy = await connected(node, "healthy")
    slow = await connected(node, "slow", max_queue_messages=5)
    for client in (healthy, slow):
        await client.call("subscribe", channels=[{"channel": "chat:s"}])
    slow.transport.block()
    for i in range(30):
        await node.publish("chat:s", i)
    assert slow.connection.close_code == CloseCode.SLOW_CONSUMER
    await async_wait_for(lambda: len(healthy.publications()) == 30)
    # The slow one is out of the fan-out once its handler cleans up.
    await slow.handler.close()
    assert node.hub.subscriber_count("chat:s") == 1


async def test_unsubscribe_during_fan_out(node: Node) -> None:
    """A subscriber removed by a send in the middle of a fan-out does not break the loop."""
    first = await connected(node, "first", max_queue_messages=2)
    others = [await connected(node, f"o{i}") for i in range(3)]
    for client in (first, *others):
        await client.call("subscribe", channels=[{"channel": "chat:u"}])
    await async_wait_for(lambda: first.connection.queued == (0, 0))
    first.transport.block()
    first.connection.send("fill")  # the writer takes this one and blocks
    await asyncio.sleep(0)
    first.connection.send("fill2")
    first.connection.send("fill3")
    await node.publish("chat:u", "boom")  # overflows `first` mid fan-out
    assert first.connection.close_code == CloseCode.SLOW_CONSUMER
    for client in others:
        await async_wait_for(lambda c=client: len(c.publications()) == 1)  # type: ignore[misc]


async def test_disconnect_cleans_up_everything(node: Node) -> None:
    watcher = await connected(node, "watcher")
    await watcher.call("subscribe", channels=[{"channel": "chat:c"}])
    leaving = await connected(node, "leaving")
    await leaving.call("subscribe", channels=[{"channel": "chat:c"}, {"channel": "chat:only-me"}])
    assert set(await node.presence_of("chat:c")) == {"watcher", "leaving"}
    assert "chat:only-me" in node.broker.channels()
    leaving.connection.peer_closed(1000)
    await leaving.handler.close()
    await leaving.connection.stop()
    assert set(await node.presence_of("chat:c")) == {"watcher"}
    assert await node.presence_of("chat:only-me") == {}
    assert node.hub.get("leaving") is None
    assert node.hub.subscriber_count("chat:c") == 1
    assert "chat:only-me" not in node.broker.channels()  # the node-level subscription was released
    assert "chat:c" in node.broker.channels()
    leave = [f for f in watcher.frames() if f.get("type") == "leave"]
    assert leave and leave[-1]["info"]["client"] == "leaving"  # type: ignore[index]
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "herald-writer-leaving" and not t.done()]
    assert tasks == []


async def test_broker_subscribes_once_per_channel(node: Node) -> None:
    calls: list[str] = []
    original = node.broker.subscribe

    async def counting(channel: str) -> None:
        calls.append(channel)
        await original(channel)

    node.broker.subscribe = counting  # type: ignore[method-assign]
    clients = [await connected(node, f"c{i}") for i in range(4)]
    await asyncio.gather(*(c.call("subscribe", channels=[{"channel": "chat:once"}]) for c in clients))
    assert calls == ["chat:once"]


async def test_publisher_info_is_attached(node: Node) -> None:
    client = await connected(node, "pub")
    await client.call("subscribe", channels=[{"channel": "chat:i"}])
    await client.call("publish", channel="chat:i", data={"t": 1})
    await node.publish("chat:i", {"t": 2}, info=ClientInfo("server", "system"))
    await async_wait_for(lambda: len(client.publications()) == 2)
    first, second = client.publications()
    assert first["info"] == {"client": "pub", "user": "", "info": None}
    assert second["info"] == {"client": "server", "user": "system", "info": None}


class Point(BaseModel):
    x: int


async def test_rpc_handler_signatures(node: Node) -> None:
    node.add_rpc("none", lambda: "none")
    node.add_rpc("params_only", lambda params: params)

    async def ctx_only(ctx: ClientContext) -> str:
        return ctx.client

    async def typed(point: Point, ctx: ClientContext) -> dict[str, int | str]:
        return {"x": point.x, "client": ctx.client}

    async def reversed_order(ctx: ClientContext, point: Point) -> int:
        return point.x * 2

    node.add_rpc("ctx_only", ctx_only)
    node.add_rpc("typed", typed)
    node.add_rpc("reversed", reversed_order)
    client = await connected(node, "caller")

    async def call(method: str, params: object) -> object:
        reply = await client.call("rpc", method=method, params=params)
        return reply.get("result", reply.get("error"))

    assert await call("none", None) == {"data": "none"}
    assert await call("params_only", [1, 2]) == {"data": [1, 2]}
    assert await call("ctx_only", None) == {"data": "caller"}
    assert await call("typed", {"x": 3}) == {"data": {"x": 3, "client": "caller"}}
    assert await call("reversed", {"x": 4}) == {"data": 8}
    error = await call("typed", {"x": "three"})
    assert isinstance(error, dict) and error["code"] == 114 and error["message"].startswith("x:")
    with pytest.raises(TypeError):
        node.add_rpc("bad", lambda a, b: None)


async def test_disconnect_hook_runs_only_for_connected_clients(node: Node) -> None:
    seen: list[str] = []
    node.add_hook("disconnect", lambda ctx, code, reason: seen.append(ctx.client))
    never = Client(node, "never-connected")
    await never.handler.close()
    client = await connected(node, "was-connected")
    await client.handler.close()
    assert seen == ["was-connected"]


class LaggingBroker(MemoryBroker):
    """A memory broker whose fan-out runs behind a reader task, as Redis Pub/Sub does: a
    publication is in history before it reaches the node."""

    def __init__(self) -> None:
        super().__init__()
        self.lag: asyncio.Queue[Any] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None

    async def start(self, handler: Any) -> None:
        await super().start(handler)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.lag.get()
            await asyncio.sleep(0.02)
            MemoryBroker._fan_out(self, message)

    def _fan_out(self, message: Any) -> None:
        self.lag.put_nowait(message)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await super().close()


@pytest.mark.parametrize("with_since", [True, False])
async def test_no_duplicate_when_live_delivery_lags_behind_history(with_since: bool) -> None:
    node = Node(Settings(ping_interval=0, namespaces=DEMO_NAMESPACES), broker=LaggingBroker())
    await node.start()
    try:
        first = await connected(node, "first")
        await first.call("subscribe", channels=[{"channel": "chat:lag"}])  # the node is subscribed
        epoch = (await node.history("chat:lag", limit=0)).position.epoch
        await node.publish("chat:lag", 1)  # in history now; its live copy is still on its way
        late = await connected(node, "late")
        item: dict[str, Any] = {"channel": "chat:lag"}
        if with_since:
            item["since"] = {"offset": 0, "epoch": epoch}
        reply = await late.call("subscribe", channels=[item])
        result = reply["result"]["channels"][0]  # type: ignore[index]
        assert result["offset"] == 1
        await node.publish("chat:lag", 2)
        await async_wait_for(lambda: len(first.publications()) == 2)
        await async_wait_for(lambda: any(p["offset"] == 2 for p in late.publications()))
        live = [p["offset"] for p in late.publications()]
        recovered = [p["offset"] for p in result["publications"]]
        # Offset 1 is in the reply (with since) or before the reported position (without):
        # either way it must not come again as a live push.
        assert recovered == ([1] if with_since else [])
        assert live == [2]
    finally:
        await node.close()


async def test_a_failing_subscribe_hook_fails_only_its_channel(node: Node) -> None:
    def hook(ctx: ClientContext, channel: str) -> None:
        if channel == "chat:broken":
            raise ValueError("bug in the app's hook")

    node.add_hook("subscribe", hook)
    client = await connected(node, "c")
    reply = await client.call("subscribe", channels=[{"channel": "chat:fine"}, {"channel": "chat:broken"}])
    items = reply["result"]["channels"]  # type: ignore[index]
    assert "error" not in items[0]
    assert items[1]["error"] == {"code": 100, "message": "internal error"}
    assert await node.presence_of("chat:fine")
    assert node.hub.subscriber_count("chat:broken") == 0


@pytest.mark.parametrize(
    ("settings", "tick"),
    [
        ({}, 2.5),  # shipped: a quarter of handshake_timeout (10 s), not every second
        ({"ping_interval": 0.2}, 0.05),  # tests' short pings: never below 50 ms
        ({"ping_interval": 1.0, "idle_timeout": 0.6}, 0.15),
        ({"ping_interval": 120.0, "handshake_timeout": 60.0}, 5.0),  # at most 5 s late
        ({"ping_interval": 0}, 2.5),
        ({"pong_timeout": 2.0}, 1.0),  # a ping is never later than the client tolerates
        ({"ping_interval": 0, "pong_timeout": 2.0}, 2.5),  # no pings: pong_timeout is moot
    ],
)
async def test_liveness_walk_runs_a_quarter_of_the_shortest_period(
    settings: dict[str, float], tick: float
) -> None:
    assert heartbeat_tick(Settings(**settings)) == pytest.approx(tick)


async def test_the_liveness_walk_lets_the_loop_turn_between_small_batches_of_pings() -> None:
    """Pings due together (clients that connected together) go out a few dozen per loop
    turn: each is a write(), and a thousand in one turn held the loop ~40 ms."""
    node = Node(Settings(ping_interval=0.2, pong_timeout=5.0, namespaces=DEMO_NAMESPACES))
    await node.start()
    try:
        clients = [await connected(node, f"c{i}") for i in range(5 * PINGS_PER_TURN)]
        start = max(client.connection.last_ping for client in clients)
        pinged_by_turn: list[int] = []
        while not pinged_by_turn or pinged_by_turn[-1] < len(clients):
            pinged_by_turn.append(sum(client.connection.last_ping > start for client in clients))
            assert len(pinged_by_turn) < 200_000, "the pings never all went out"
            await asyncio.sleep(0)  # one loop turn
        per_turn = [b - a for a, b in itertools.pairwise(pinged_by_turn)]
        assert 0 < max(per_turn) <= PINGS_PER_TURN
        for client in clients:  # and each got its ping
            await async_wait_for(lambda c=client: any(f.get("type") == "ping" for f in c.frames()))  # type: ignore[misc]
    finally:
        await node.close()
