"""Several real `herald serve` processes on one real Redis (or NATS): delivery, presence, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis

from ..helpers import ROOT, ProtocolClient, ServerProcess, async_until, http_get
from ..servers import NatsServer, RedisServer, nats_server_fixture, redis_server_fixture

API_KEY = "multinode-key"
SECRET = "multinode-secret-0123456789abcdef0123"
PRESENCE_TTL = 1.2


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


def _env(broker: str) -> dict[str, str]:
    return {
        "HERALD_BROKER": broker,
        "HERALD_API_KEY": API_KEY,
        "HERALD_TOKEN_SECRET": SECRET,
        "HERALD_PRESENCE_TTL": str(PRESENCE_TTL),
        "HERALD_LOG_LEVEL": "warning",
        "HERALD_DEMOS": "false",
    }


@contextlib.asynccontextmanager
async def _cluster(count: int, broker: str) -> AsyncIterator[list[ServerProcess]]:
    nodes = [ServerProcess(env=_env(broker)) for _ in range(count)]
    try:
        # Start them concurrently: each takes about a second to import and bind.
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(asyncio.to_thread(node.kill) for node in nodes))


def _api(node: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        node.http + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def api(node: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await asyncio.to_thread(_api, node, path, body)


async def readyz(node: ServerProcess) -> int:
    return (await asyncio.to_thread(http_get, node.http + "/readyz"))[0]


def token(user: str) -> str:
    return jwt.encode({"sub": user}, SECRET, algorithm="HS256")


async def connect(node: ServerProcess, user: str | None = None) -> ProtocolClient:
    client = await ProtocolClient.open(node.ws("/connect"), connect=False)
    fields = {"token": token(user)} if user else {}
    reply = await client.call("connect", **fields)
    assert "result" in reply, reply
    client.client_id = reply["result"]["client"]
    return client


async def subscribe(
    client: ProtocolClient, channel: str, since: dict[str, Any] | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"channel": channel}
    if since is not None:
        item["since"] = since
    reply = await client.call("subscribe", channels=[item])
    result: dict[str, Any] = reply["result"]["channels"][0]
    assert "error" not in result, result
    return result


async def subscribe_all(clients: list[ProtocolClient], channel: str) -> tuple[str, int]:
    """Subscribe every client; all must see one epoch.  Returns (epoch, highest offset seen)."""
    starts = [await subscribe(client, channel) for client in clients]
    epoch = starts[0]["epoch"]
    assert epoch and {s["epoch"] for s in starts} == {epoch}
    return epoch, max(s["offset"] for s in starts)


async def publish_from_all(
    clients: list[ProtocolClient], channel: str, per_client: int, base: int
) -> list[int]:
    """Every client publishes ``per_client`` times at once, through its own node; the offsets
    handed out must be exactly base+1 .. base+total.  Returns them sorted."""
    replies = await asyncio.gather(
        *(
            c.call("publish", channel=channel, data={"from": i, "n": n})
            for i, c in enumerate(clients)
            for n in range(per_client)
        )
    )
    assert all("result" in r for r in replies), replies
    published = sorted(r["result"]["offset"] for r in replies)
    assert published == list(range(base + 1, base + len(replies) + 1))
    return published


async def publications(client: ProtocolClient, count: int, timeout: float = 10) -> list[Any]:
    """The next ``count`` publications (settling probes are skipped)."""
    received: list[Any] = []
    while len(received) < count:
        frame = await client.push("publication", timeout)
        if not (isinstance(frame["data"], dict) and "probe" in frame["data"]):
            received.append(frame)
    return received


async def no_more_publications(client: ProtocolClient) -> None:
    """Nothing else arrives: a ping round trip flushes what the node had queued."""
    await client.call("ping")
    pending = []
    while not client.pushes.empty():
        pending.append(client.pushes.get_nowait())
    extra = [
        f
        for f in pending
        if f.get("type") == "publication" and not (isinstance(f["data"], dict) and "probe" in f["data"])
    ]
    assert extra == []


async def close_all(clients: list[ProtocolClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---------------------------------------------------------------- Redis


@pytest.mark.redis
@pytest.mark.slow
async def test_three_nodes_deliver_every_publication_once_in_order(
    redis_server: RedisServer,
) -> None:
    async with _cluster(3, redis_server.url) as nodes:
        channel = "chat:multinode"
        clients = [await connect(node, f"user-{i}") for i, node in enumerate(nodes * 2)]
        try:
            epoch, base = await subscribe_all(clients, channel)
            # Every client publishes at once, through its own node.
            per_client = 8
            published = await publish_from_all(clients, channel, per_client, base)
            total = len(published)

            for client in clients:
                received = await publications(client, total)
                assert [p["offset"] for p in received] == published
                assert {p["epoch"] for p in received} == {epoch}
                for i in range(len(clients)):
                    mine = [p["data"]["n"] for p in received if p["data"]["from"] == i]
                    assert mine == list(range(per_client))
                await no_more_publications(client)  # exactly once

            # Presence is the same seen from every node.
            expected = {c.client_id for c in clients}

            async def presence(client: ProtocolClient) -> set[str]:
                reply = await client.call("presence", channel=channel)
                return set(reply["result"]["clients"])

            for client in clients[:3]:  # one per node
                assert await presence(client) == expected
            stats = await clients[1].call("presence_stats", channel=channel)
            assert stats["result"] == {"num_clients": 6, "num_users": 6}

            # /api/disconnect on one node reaches a user connected to another node.
            victim = clients[5]  # on nodes[2]
            status, body = await api(nodes[0], "/api/disconnect", {"user": "user-5"})
            assert status == 200, body
            await asyncio.wait_for(victim.closed.wait(), 5)
            assert victim.ws.close_code == 4502  # FORCE_DISCONNECT
            assert not clients[0].closed.is_set()
        finally:
            await close_all(clients)


@pytest.mark.redis
@pytest.mark.slow
async def test_killed_node_clients_recover_elsewhere_and_presence_expires(
    redis_server: RedisServer,
) -> None:
    async with _cluster(3, redis_server.url) as nodes:
        a, b, c = nodes
        channel = "chat:failover"
        publisher = await connect(a, "publisher")
        watcher = await connect(a, "watcher")
        victim = await connect(c, "victim")
        try:
            await subscribe(watcher, channel)
            start = await subscribe(victim, channel)
            for n in range(5):
                await publisher.call("publish", channel=channel, data=n)
            seen = await publications(victim, 5)
            last = {"offset": seen[-1]["offset"], "epoch": seen[-1]["epoch"]}
            presence = await watcher.call("presence", channel=channel)
            assert victim.client_id in presence["result"]["clients"]

            c.kill()  # SIGKILL: no leave, no cleanup
            await asyncio.wait_for(victim.closed.wait(), 5)
            for n in range(5, 12):
                reply = await publisher.call("publish", channel=channel, data=n)
                assert "result" in reply, reply

            # The client reconnects to another node and resumes from its last offset.
            resumed = await connect(b, "victim")
            try:
                result = await subscribe(resumed, channel, since=last)
                assert result["recovered"] is True
                assert result["epoch"] == start["epoch"]
                missed = [p["data"] for p in result["publications"]]
                assert missed == list(range(5, 12))
                offsets = [p["offset"] for p in result["publications"]]
                assert offsets == list(range(last["offset"] + 1, last["offset"] + 8))
                # ...then live publications follow with no gap.
                await publisher.call("publish", channel=channel, data=12)
                [live] = await publications(resumed, 1)
                assert live["offset"] == offsets[-1] + 1 and live["data"] == 12

                # The dead node's presence entry expires within the TTL.
                async def gone() -> bool:
                    reply = await watcher.call("presence", channel=channel)
                    return victim.client_id not in reply["result"]["clients"]

                await async_until(gone, PRESENCE_TTL + 3, "presence to expire")
                reply = await watcher.call("presence", channel=channel)
                assert resumed.client_id in reply["result"]["clients"]
            finally:
                await resumed.close()
        finally:
            await close_all([publisher, watcher, victim])


@pytest.mark.redis
@pytest.mark.slow
async def test_redis_outage_and_empty_restart(redis_server: RedisServer) -> None:
    async with _cluster(2, redis_server.url) as nodes:
        a, b = nodes
        channel = "chat:outage"
        sub_a, sub_b = await connect(a, "sub-a"), await connect(b, "sub-b")
        publisher = await connect(a, "pub")
        try:
            await subscribe(sub_a, channel)
            old = await subscribe(sub_b, channel)
            for n in range(3):
                status, _ = await api(a, "/api/publish", {"channel": channel, "data": n})
                assert status == 200
            before = await publications(sub_b, 3)
            await publications(sub_a, 3)
            last = {"offset": before[-1]["offset"], "epoch": before[-1]["epoch"]}
            assert await readyz(a) == 200

            await asyncio.to_thread(redis_server.kill)
            try:
                # Publishes fail with clear errors; readiness reports the broker down.
                status, body = await api(a, "/api/publish", {"channel": channel, "data": "x"})
                assert status == 503 and "broker unavailable" in body["detail"]
                reply = await publisher.call("publish", channel=channel, data="x")
                assert reply["error"]["code"] == 121, reply
                # Reads that need the broker are 503 too, not 500.
                history = urllib.request.Request(
                    f"{a.http}/api/history?channel={channel}", headers={"X-API-Key": API_KEY}
                )
                with pytest.raises(urllib.error.HTTPError) as failed:
                    await asyncio.to_thread(urllib.request.urlopen, history, timeout=5)
                assert failed.value.code == 503
                for node in nodes:
                    await async_until(lambda n=node: _is(readyz(n), 503), 5)
                # Nodes stay up and keep their clients.
                assert (await sub_a.call("ping"))["result"] == {}
                assert (await sub_b.call("ping"))["result"] == {}
                assert not sub_a.closed.is_set() and not sub_b.closed.is_set()
            finally:
                await asyncio.to_thread(redis_server.start)  # same port, empty

            for node in nodes:
                await async_until(lambda n=node: _is(readyz(n), 200), 10)
            for node in nodes:
                assert node.proc is not None and node.proc.poll() is None

            # The stream was lost with Redis: each node finds a new epoch when it catches up
            # and closes its subscribers with 4005 (reconnect, resume, recovered: false)
            # instead of letting them continue past what they may have missed.
            for client in (sub_a, sub_b):
                disconnect = await client.push("disconnect", 10)
                assert disconnect["code"] == 4005 and disconnect["reconnect"] is True
                await asyncio.wait_for(client.closed.wait(), 5)
            await close_all([sub_a, sub_b])
            sub_a, sub_b = await connect(a, "sub-a"), await connect(b, "sub-b")
            for client in (sub_a, sub_b):
                result = await subscribe(client, channel, since=last)
                assert result["recovered"] is False and result["epoch"] != old["epoch"]

            # A client resuming from its old position is told so.
            fresh = await connect(b, "fresh")
            try:
                result = await subscribe(fresh, channel, since=last)
                assert result["recovered"] is False
                assert result["epoch"] != old["epoch"]
                # History now belongs to the new epoch.
                history = await fresh.call(
                    "history", channel=channel, since={"offset": 0, "epoch": old["epoch"]}
                )
                assert history["error"]["code"] == 119  # UNRECOVERABLE_POSITION
            finally:
                await fresh.close()

            # The nodes re-subscribed: live delivery works again across nodes, new epoch.
            status, body = await api(a, "/api/publish", {"channel": channel, "data": "after"})
            assert status == 200, body
            assert body["epoch"] != old["epoch"] and body["offset"] == 1
            for client in (sub_a, sub_b):
                [publication] = await publications(client, 1)
                assert publication["data"] == "after" and publication["offset"] == 1
                assert publication["epoch"] == body["epoch"]
            assert not sub_a.closed.is_set() and not sub_b.closed.is_set()
        finally:
            await close_all([sub_a, sub_b, publisher])


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def _true(value: bool) -> bool:
    return value


class _WorkerMap:
    """Which worker holds which client, as the workers themselves say it: every worker
    publishes its admin snapshot (its node id, its clients) on ``$admin`` through Redis,
    and one admin socket, on whichever worker, hears them all."""

    def __init__(self) -> None:
        self.node_of: dict[str, str] = {}  # client id -> node id
        self.changed = asyncio.Event()

    async def follow(self, websocket: Any) -> None:
        async for message in websocket:
            frame = json.loads(message)
            if frame.get("type") != "publication" or frame.get("channel") != "$admin":
                continue
            snapshot = frame["data"]
            for client in snapshot["clients"]:
                self.node_of[client["client"]] = snapshot["node"]
            self.changed.set()

    async def node(self, client_id: str, timeout: float) -> str:
        """The worker ``client_id`` is on, once a snapshot listed it."""
        async with asyncio.timeout(timeout):
            while client_id not in self.node_of:
                self.changed.clear()
                await self.changed.wait()
        return self.node_of[client_id]


def _scrape(node: ServerProcess) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(node.http + "/metrics")
    assert status == 200
    return [sample for family in text_string_to_metric_families(body.decode()) for sample in family.samples]


@pytest.mark.redis
@pytest.mark.slow
async def test_serve_workers_share_redis(redis_server: RedisServer) -> None:
    """Two workers share Redis, and /metrics adds up both, whichever answers the scrape.

    Clients connect until they sit on two different workers (the kernel may put many
    on one); each worker's own count is then below the total, so a scraped total equal
    to it proves the multiprocess aggregation.
    """
    import websockets

    node = ServerProcess(env=_env(redis_server.url), args=["--workers", "2"])
    await asyncio.to_thread(node.start)
    clients: list[ProtocolClient] = []
    workers = _WorkerMap()
    admin = follower = None
    try:
        admin = await websockets.connect(node.ws("/admin/ws"))
        await admin.send(json.dumps({"api_key": API_KEY}))
        follower = asyncio.create_task(workers.follow(admin))
        holders: set[str] = set()
        try:
            async with asyncio.timeout(60):
                while len(holders) < 2 or len(clients) < 4:
                    client = await connect(node)
                    clients.append(client)
                    await subscribe(client, "chat:workers")
                    holders.add(await workers.node(client.client_id, 15))
        except TimeoutError:
            raise AssertionError(f"{len(clients)} clients, all on workers {holders}") from None

        status, body = await api(node, "/api/publish", {"channel": "chat:workers", "data": 1})
        assert status == 200, body
        for client in clients:
            [publication] = await publications(client, 1)
            assert publication["offset"] == body["offset"]

        total = len(clients)
        per_worker = {
            holder: sum(1 for c in clients if workers.node_of[c.client_id] == holder) for holder in holders
        }
        assert all(0 < count < total for count in per_worker.values()), per_worker

        def aggregated() -> bool:
            samples = _scrape(node)

            def summed(name: str) -> float:
                return sum(s.value for s in samples if s.name == name and s.labels.get("route") == "connect")

            nodes = {s.labels["node"] for s in samples if s.name == "herald_node_info" and s.value == 1}
            return (
                holders <= nodes
                and summed("herald_connections_open") == total
                and summed("herald_connections_total") == total
            )

        # Several scrapes in a row, each answered by whichever worker accepts it.
        for _ in range(4):
            await async_until(lambda: _true_in_thread(aggregated), 10, "the scrape to add up both workers")
    finally:
        await close_all(clients)
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower
        if admin is not None:
            await admin.close()
        await asyncio.to_thread(node.stop)


async def _true_in_thread(check: Any) -> bool:
    return bool(await asyncio.to_thread(check))


def test_serve_refuses_workers_with_memory_broker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "herald", "serve", "--workers", "2", "--broker", "memory"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--workers > 1 needs a shared broker" in result.stderr
    assert "redis://" in result.stderr


# ---------------------------------------------------------------- NATS


@pytest.mark.nats
@pytest.mark.slow
async def test_three_nodes_on_nats_deliver_every_publication_once(
    nats_server: NatsServer,
) -> None:
    async with _cluster(3, nats_server.url) as nodes:
        channel = "chat:nats"
        clients = [await connect(node, f"user-{i}") for i, node in enumerate(nodes * 2)]
        try:
            for client in clients:
                result = await subscribe(client, channel)
                assert result["offset"] == 0 and result["epoch"] == ""
            # Core NATS may route a publisher's first messages by a stale interest cache for
            # a moment (see brokers/nats.py): probe until every client hears every node.
            await _settle_nats(nodes[:3], clients, channel)

            per_client = 6
            replies = await asyncio.gather(
                *(
                    c.call("publish", channel=channel, data={"from": i, "n": n})
                    for i, c in enumerate(clients)
                    for n in range(per_client)
                )
            )
            assert all("result" in r for r in replies), replies
            total = per_client * len(clients)
            for client in clients:
                received = await publications(client, total)
                for i in range(len(clients)):
                    mine = [p["data"]["n"] for p in received if p["data"]["from"] == i]
                    assert mine == list(range(per_client))  # each publisher's order is kept
                await no_more_publications(client)

            # Presence is replicated to every node (eventually: within a refresh period).
            expected = {c.client_id for c in clients}
            for client in clients[:3]:

                async def agrees(client: ProtocolClient = client) -> bool:
                    reply = await client.call("presence", channel=channel)
                    return set(reply["result"]["clients"]) == expected

                await async_until(agrees, PRESENCE_TTL + 3)

            # Resuming is answered honestly: there is no history on core NATS.
            late = await connect(nodes[1])
            try:
                result = await subscribe(late, channel, since={"offset": 3, "epoch": "x"})
                assert result["recovered"] is False
            finally:
                await late.close()
        finally:
            await close_all(clients)


async def _settle_nats(nodes: list[ServerProcess], clients: list[ProtocolClient], channel: str) -> None:
    heard: list[set[int]] = [set() for _ in clients]
    for _ in range(50):
        for index, node in enumerate(nodes):
            status, _ = await api(node, "/api/publish", {"channel": channel, "data": {"probe": index}})
            assert status == 200
        await asyncio.sleep(0.05)
        for i, client in enumerate(clients):
            while not client.pushes.empty():
                frame = client.pushes.get_nowait()
                if frame.get("type") == "publication":
                    heard[i].add(frame["data"]["probe"])
        if all(h == set(range(len(nodes))) for h in heard):
            break
    assert all(h == set(range(len(nodes))) for h in heard), heard
    # Probes still in flight are skipped by publications().


@pytest.fixture(scope="module")
def jetstream_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture(jetstream=True)


@pytest.mark.nats
@pytest.mark.slow
async def test_three_nodes_on_nats_jetstream_share_offsets_and_recover(
    jetstream_server: NatsServer,
) -> None:
    """With ``?jetstream=1`` NATS gives what Redis gives: one gap-free offset order, recovery."""
    async with _cluster(3, jetstream_server.url + "?jetstream=1") as nodes:
        channel = "chat:jetstream"
        clients = [await connect(node, f"user-{i}") for i, node in enumerate(nodes * 2)]
        try:
            epoch, base = await subscribe_all(clients, channel)
            published = await publish_from_all(clients, channel, 6, base)
            total = len(published)
            sequences = []
            for client in clients:
                received = await publications(client, total)
                assert [p["offset"] for p in received] == published  # offset order everywhere
                assert {p["epoch"] for p in received} == {epoch}
                sequences.append([(p["offset"], p["data"]["from"], p["data"]["n"]) for p in received])
                await no_more_publications(client)
            assert all(s == sequences[0] for s in sequences)

            # A client that saw up to the middle resumes on another node with no gap.
            middle = published[total // 2]
            late = await connect(nodes[2])
            try:
                result = await subscribe(late, channel, since={"offset": middle, "epoch": epoch})
                assert result["recovered"] is True and result["epoch"] == epoch
                assert [p["offset"] for p in result["publications"]] == published[total // 2 + 1 :]
                expected = [(f, n) for _, f, n in sequences[0][total // 2 + 1 :]]
                assert [(p["data"]["from"], p["data"]["n"]) for p in result["publications"]] == expected
                status, body = await api(nodes[0], "/api/publish", {"channel": channel, "data": "live"})
                assert status == 200 and body["offset"] == published[-1] + 1, body
                [live] = await publications(late, 1)
                assert live["offset"] == body["offset"] and live["data"] == "live"
            finally:
                await late.close()
        finally:
            await close_all(clients)


# ---------------------------------------------------------------- Redis: more faults


async def _redis(url: str, *command: str) -> Any:
    client = aioredis.Redis.from_url(url)
    try:
        return await client.execute_command(*command)
    finally:
        await client.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_one_node_link_drops_while_others_publish(redis_server: RedisServer) -> None:
    """Only node A loses Redis (its ACL user is switched off and its Pub/Sub link killed
    with ``CLIENT KILL TYPE pubsub``) while node B keeps publishing: when the link is
    back, A reads what it missed from the stream, and its client, which never
    reconnected, gets every publication exactly once, in order."""
    user, password = "herald-node-a", "node-a-secret"
    await _redis(redis_server.url, "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    url_a = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    a = ServerProcess(env=_env(url_a))
    b = ServerProcess(env=_env(redis_server.url))
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    channel = "chat:linkdrop"
    watcher = await connect(a, "watcher")
    try:
        start = await subscribe(watcher, channel)
        epoch = start["epoch"]

        async def publish(data: Any) -> int:
            status, body = await api(b, "/api/publish", {"channel": channel, "data": data})
            assert status == 200, body
            return int(body["offset"])

        before = [await publish(n) for n in range(3)]
        assert [p["offset"] for p in await publications(watcher, 3)] == before

        # Cut node A's Pub/Sub link off: it cannot reconnect while its user is off.
        await _redis(redis_server.url, "ACL", "SETUSER", user, "off")
        await _redis(redis_server.url, "CLIENT", "KILL", "TYPE", "pubsub", "USER", user)
        await async_until(lambda: _is(readyz(a), 503), 5)
        missed = [await publish(n) for n in range(3, 7)]  # B is unaffected
        await _redis(redis_server.url, "ACL", "SETUSER", user, "on")
        # B keeps publishing while A comes back and catches up.
        stop = asyncio.Event()
        later: list[int] = []

        async def keep_publishing() -> None:
            # Paced and capped within the channel's history (100): a publisher faster than
            # A's reconnect would trim what A must read back, and the gap would be lost.
            n = 7
            while not stop.is_set() and len(later) < 60:
                later.append(await publish(n))
                n += 1
                await asyncio.sleep(0.005)

        publisher = asyncio.create_task(keep_publishing())
        try:
            await async_until(lambda: _is(readyz(a), 200), 10)
            await async_until(lambda: _true(len(later) >= 5), 10)
        finally:
            stop.set()
            await publisher
        received = await publications(watcher, len(missed) + len(later))
        # Every publication once, in order, the missed ones first, without reconnecting.
        assert [p["offset"] for p in received] == [*missed, *later]
        assert [p["data"] for p in received] == list(range(3, 7 + len(later)))
        assert {p["epoch"] for p in received} == {epoch}
        assert not watcher.closed.is_set()
        final = await publish(7 + len(later))
        [live] = await publications(watcher, 1)
        assert live["offset"] == final == later[-1] + 1
        await no_more_publications(watcher)
    finally:
        await watcher.close()
        await asyncio.gather(asyncio.to_thread(a.kill), asyncio.to_thread(b.kill))
        with contextlib.suppress(Exception):
            await _redis(redis_server.url, "ACL", "DELUSER", user)


@pytest.mark.redis
@pytest.mark.slow
async def test_link_gap_history_cannot_fill_closes_subscribers_with_4005(
    redis_server: RedisServer,
) -> None:
    """A's link is down while B publishes more than the namespace keeps (history_size 2):
    A cannot fill the gap, so its subscriber is closed with 4005 (reconnect allowed)
    before anything past the gap reaches it, and resuming tells it ``recovered: false``."""
    user, password = "herald-node-gap", "node-gap-secret"
    await _redis(redis_server.url, "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    namespaces = json.dumps({"short": {"history_size": 2, "history_ttl": 60}})
    url_a = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    a = ServerProcess(env={**_env(url_a), "HERALD_NAMESPACES": namespaces})
    b = ServerProcess(env={**_env(redis_server.url), "HERALD_NAMESPACES": namespaces})
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    channel = "short:gap"
    watcher = await connect(a, "watcher")
    resumed: ProtocolClient | None = None
    try:
        epoch = (await subscribe(watcher, channel))["epoch"]

        async def publish(data: Any) -> int:
            status, body = await api(b, "/api/publish", {"channel": channel, "data": data})
            assert status == 200, body
            return int(body["offset"])

        before = [await publish(n) for n in range(2)]
        assert [p["offset"] for p in await publications(watcher, 2)] == before

        await _redis(redis_server.url, "ACL", "SETUSER", user, "off")
        await _redis(redis_server.url, "CLIENT", "KILL", "TYPE", "pubsub", "USER", user)
        await async_until(lambda: _is(readyz(a), 503), 5)
        missed = [await publish(n) for n in range(2, 7)]  # the stream keeps the last 2 only
        await _redis(redis_server.url, "ACL", "SETUSER", user, "on")

        disconnect = await watcher.push("disconnect", 10)
        assert disconnect["code"] == 4005 and disconnect["reconnect"] is True
        await asyncio.wait_for(watcher.closed.wait(), 5)
        assert watcher.ws.close_code == 4005
        # Nothing past the gap was delivered before the close.
        assert [f for f in watcher.frames if f.get("type") == "publication"][2:] == []

        resumed = await connect(a, "watcher")
        result = await subscribe(resumed, channel, since={"offset": before[-1], "epoch": epoch})
        assert result["recovered"] is False and result["offset"] == missed[-1]
        final = await publish(7)
        [live] = await publications(resumed, 1)
        assert live["offset"] == final == missed[-1] + 1
    finally:
        await close_all([c for c in (watcher, resumed) if c is not None])
        await asyncio.gather(asyncio.to_thread(a.kill), asyncio.to_thread(b.kill))
        with contextlib.suppress(Exception):
            await _redis(redis_server.url, "ACL", "DELUSER", user)


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    yield from redis_server_fixture(persistent=True)


@pytest.mark.redis
@pytest.mark.slow
async def test_redis_restart_with_its_data_loses_nothing(persistent_redis: RedisServer) -> None:
    """Redis killed and restarted with its append-only file: same epoch, no gap, recovered."""
    async with _cluster(2, persistent_redis.url) as nodes:
        a, b = nodes
        channel = "chat:persistent"
        sub_a, sub_b = await connect(a, "sub-a"), await connect(b, "sub-b")
        try:
            start = await subscribe(sub_a, channel)
            await subscribe(sub_b, channel)
            for n in range(3):
                status, body = await api(a, "/api/publish", {"channel": channel, "data": n})
                assert status == 200, body
            seen = await publications(sub_b, 3)
            await publications(sub_a, 3)
            last = {"offset": seen[-1]["offset"], "epoch": seen[-1]["epoch"]}

            await asyncio.to_thread(persistent_redis.kill)
            try:
                status, body = await api(b, "/api/publish", {"channel": channel, "data": "x"})
                assert status == 503, body  # refused, so it is not part of the stream
            finally:
                await asyncio.to_thread(persistent_redis.start)  # same port, same directory
            for node in nodes:
                await async_until(lambda n=node: _is(readyz(n), 200), 10)

            # A client that was away resumes: everything is still there, same epoch.
            status, body = await api(b, "/api/publish", {"channel": channel, "data": 3})
            assert status == 200 and body["epoch"] == start["epoch"], body
            assert body["offset"] == last["offset"] + 1  # no gap
            resumed = await connect(b, "resumed")
            try:
                result = await subscribe(resumed, channel, since=last)
                assert result["recovered"] is True and result["epoch"] == start["epoch"]
                assert [p["data"] for p in result["publications"]] == [3]
                history = await resumed.call(
                    "history", channel=channel, since={"offset": 0, "epoch": start["epoch"]}
                )
                assert [p["data"] for p in history["result"]["publications"]] == [0, 1, 2, 3]
            finally:
                await resumed.close()
            # The clients that stayed connected get the live publication, in order.
            for client in (sub_a, sub_b):
                [publication] = await publications(client, 1)
                assert publication["offset"] == last["offset"] + 1
                assert publication["epoch"] == start["epoch"]
        finally:
            await close_all([sub_a, sub_b])
