"""Replies are bounded by bytes before they are built (issue 13, item 7).

A channel holds 70 publications of 60 KB (4.2 MB: more than a connection's 4 MiB
outbound bound).  ``history limit=100`` and ``subscribe`` with ``since`` must not
close the reader as a slow consumer (4001), the bundled client must not loop on
reconnects, a bystander keeps receiving in order, and the server's memory stays
bounded.  The server is a real ``herald serve`` subprocess, so its RSS is measurable.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herald.client import Client, RecoveryFailedEvent

from ..helpers import DEFAULT_TIMEOUT, ProtocolClient, ServerProcess

pytestmark = pytest.mark.asyncio

API_KEY = "bounds-key"
QUEUE_BYTES = 4 * 1024 * 1024
BUDGET = QUEUE_BYTES // 2  # herald.policy.reply_byte_budget
COUNT = 70
SIZE = 60_000
PAYLOAD = "x" * SIZE


@pytest.fixture(scope="module")
def big() -> Iterator[ServerProcess]:
    server = ServerProcess(env={"HERALD_API_KEY": API_KEY, "HERALD_DEMOS": "false"}).start()
    try:
        for channel in ("chat:big", "chat:multi1", "chat:multi2", "chat:multi3"):
            count = COUNT if channel == "chat:big" else 25
            for n in range(count):
                status, _ = api(
                    server, "POST", "/api/publish", {"channel": channel, "data": {"n": n, "p": PAYLOAD}}
                )
                assert status == 200
        yield server
    finally:
        server.stop()


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(server.http + path, method=method)
    request.add_header("X-API-Key", API_KEY)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, data, timeout=DEFAULT_TIMEOUT) as response:
        return response.status, json.loads(response.read())


async def top_of(server: ServerProcess, channel: str) -> tuple[int, str]:
    path = "/api/history?" + urllib.parse.urlencode({"channel": channel, "limit": 0})
    _, body = await asyncio.to_thread(api, server, "GET", path)
    return int(body["offset"]), str(body["epoch"])


def rss_kib(server: ServerProcess) -> int:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Bystander:
    """A client subscribed to chat:ticks that must get every tick, in order."""

    def __init__(self, server: ServerProcess, client: ProtocolClient) -> None:
        self.server = server
        self.client = client
        self.sent = 0

    async def tick(self) -> None:
        self.sent += 1
        await asyncio.to_thread(
            api, self.server, "POST", "/api/publish", {"channel": "chat:ticks", "data": self.sent}
        )
        push = await self.client.push("publication", timeout=DEFAULT_TIMEOUT)
        assert push["data"] == self.sent, push


async def open_bystander(server: ServerProcess) -> Bystander:
    client = await ProtocolClient.open(server.ws("/connect"), max_size=None)
    reply = await client.call("subscribe", channels=[{"channel": "chat:ticks"}])
    assert "error" not in reply["result"]["channels"][0]
    return Bystander(server, client)


def frame_size(frame: dict[str, Any]) -> int:
    return len(json.dumps(frame, separators=(",", ":")))


async def test_history_is_cut_at_the_budget_and_pages(big: ServerProcess) -> None:
    bystander = await open_bystander(big)
    reader = await ProtocolClient.open(big.ws("/connect"), max_size=None)
    try:
        top, epoch = await top_of(big, "chat:big")
        assert top == COUNT
        reply = await reader.call("history", channel="chat:big", limit=100, timeout=15)
        page = reply["result"]["publications"]
        # Cut at the budget: fewer than asked for, oldest first, and under the bound.
        assert 0 < len(page) < COUNT
        assert [p["offset"] for p in page] == list(range(1, len(page) + 1))
        assert frame_size(reply) <= BUDGET + 4096
        assert reply["result"]["offset"] == top
        await bystander.tick()
        # The client pages with since = the last offset it got, and gets everything.
        received = [p["offset"] for p in page]
        while received[-1] < top:
            reply = await reader.call(
                "history", channel="chat:big", limit=100, since={"offset": received[-1], "epoch": epoch}
            )
            chunk = reply["result"]["publications"]
            assert chunk and frame_size(reply) <= BUDGET + 4096
            assert all(p["data"]["p"] == PAYLOAD for p in chunk)
            received += [p["offset"] for p in chunk]
        assert received == list(range(1, top + 1))
        # Newest first is cut the same way.
        reply = await reader.call("history", channel="chat:big", limit=100, reverse=True)
        newest = [p["offset"] for p in reply["result"]["publications"]]
        assert 0 < len(newest) < COUNT and newest == list(range(top, top - len(newest), -1))
        assert not reader.closed.is_set()
        assert "result" in await reader.call("ping")
        await bystander.tick()
    finally:
        await reader.close()
        await bystander.client.close()


async def test_recovery_larger_than_the_budget_is_not_recovered(big: ServerProcess) -> None:
    bystander = await open_bystander(big)
    reader = await ProtocolClient.open(big.ws("/connect"), max_size=None)
    try:
        top, epoch = await top_of(big, "chat:big")
        reply = await reader.call(
            "subscribe",
            channels=[{"channel": "chat:big", "since": {"offset": 0, "epoch": epoch}}],
            timeout=15,
        )
        result = reply["result"]["channels"][0]
        assert result["recovered"] is False and result["publications"] == []
        assert result["offset"] == top and result["epoch"] == epoch
        await bystander.tick()
        # Still connected and subscribed: a live publication arrives.
        await asyncio.to_thread(
            api, big, "POST", "/api/publish", {"channel": "chat:big", "data": {"n": "live"}}
        )
        push = await reader.push("publication")
        assert push["offset"] == top + 1 and push["data"] == {"n": "live"}
        # A gap that fits is recovered whole.
        await reader.call("unsubscribe", channels=["chat:big"])
        reply = await reader.call(
            "subscribe", channels=[{"channel": "chat:big", "since": {"offset": top - 3, "epoch": epoch}}]
        )
        result = reply["result"]["channels"][0]
        assert result["recovered"] is True
        assert [p["offset"] for p in result["publications"]] == [top - 2, top - 1, top, top + 1]
    finally:
        await reader.close()
        await bystander.client.close()


async def test_multi_channel_subscribe_stays_under_the_bound(big: ServerProcess) -> None:
    """Three channels of 1.5 MB each: together over the budget, so the reply recovers
    what fits and answers recovered: false for the rest, in one reply under the bound."""
    reader = await ProtocolClient.open(big.ws("/connect"), max_size=None)
    try:
        items = []
        for channel in ("chat:multi1", "chat:multi2", "chat:multi3"):
            _, epoch = await top_of(big, channel)
            items.append({"channel": channel, "since": {"offset": 0, "epoch": epoch}})
        reply = await reader.call("subscribe", channels=items, timeout=15)
        results = reply["result"]["channels"]
        assert frame_size(reply) <= BUDGET + 4096
        recovered = [r["recovered"] for r in results]
        assert recovered[0] is True and False in recovered
        for result in results:
            offsets = [p["offset"] for p in result["publications"]]
            assert offsets == (list(range(1, 26)) if result["recovered"] else [])
        assert "result" in await reader.call("ping")
    finally:
        await reader.close()


async def test_single_publication_channels_do_not_overrun_a_spent_budget(big: ServerProcess) -> None:
    """A channel whose one missed publication does not fit what is left of the budget
    is answered recovered: false: "at least one publication" is for history paging,
    not for recovery (all or nothing, under one budget for the whole reply)."""
    channels = [f"chat:one{n}" for n in range(15)]  # 15 x 60 kB after chat:multi1's 1.5 MB
    for channel in channels:
        status, _ = await asyncio.to_thread(
            api, big, "POST", "/api/publish", {"channel": channel, "data": {"p": PAYLOAD}}
        )
        assert status == 200
    reader = await ProtocolClient.open(big.ws("/connect"), max_size=None)
    try:
        items = []
        for channel in ["chat:multi1", *channels]:
            _, epoch = await top_of(big, channel)
            items.append({"channel": channel, "since": {"offset": 0, "epoch": epoch}})
        reply = await reader.call("subscribe", channels=items, timeout=15)
        recovered = [r["recovered"] for r in reply["result"]["channels"]]
        assert recovered[0] is True and recovered[1] is True and recovered[-1] is False, recovered
        assert frame_size(reply) <= BUDGET + 4096
    finally:
        await reader.close()


async def test_bundled_client_does_not_loop_and_memory_stays_bounded(big: ServerProcess) -> None:
    """Eight concurrent clients recover from offset 0 and read 100 of history: none is
    disconnected (the bundled client connects once), the bystander keeps receiving, and
    the server's RSS grows by less than 64 MiB."""
    bystander = await open_bystander(big)
    _, epoch = await top_of(big, "chat:big")
    before = rss_kib(big)
    clients = [Client(big.ws("/connect"), max_size=None) for _ in range(8)]
    try:
        failed: list[RecoveryFailedEvent] = []
        for client in clients:
            client.on("recovery_failed", failed.append)
            await client.connect()

        async def heavy(client: Client) -> int:
            await client.subscribe("chat:big", since=(0, epoch))
            page = await client.history("chat:big", limit=100)
            return len(page.publications)

        sizes = await asyncio.wait_for(asyncio.gather(*(heavy(c) for c in clients)), 30)
        await bystander.tick()
        assert all(0 < size < COUNT for size in sizes), sizes
        for client in clients:
            await client.ping()
            assert client.connections == 1
        assert len(failed) == len(clients)
        grown = rss_kib(big) - before
        assert grown < 64 * 1024, f"server RSS grew by {grown} KiB"
    finally:
        for client in clients:
            await client.close()
        await bystander.client.close()


# ---------------------------------------------------------------- the bounded read itself


async def test_broker_reads_are_bounded_by_the_budget() -> None:
    """read_history pages the broker: it never asks for (nor holds) much more than the
    budget, and a recovery whose gap exceeds the limit stops after one small page."""
    from herald.brokers.base import PublishOptions, StreamPosition
    from herald.brokers.memory import MemoryBroker
    from herald.policy import publication_size, read_history

    broker = MemoryBroker()

    def ignore(message: Any) -> None:
        return None

    await broker.start(ignore)
    options = PublishOptions(history_size=1000)
    payload = json.dumps({"p": PAYLOAD}).encode()
    for _ in range(COUNT):
        await broker.publish("big", payload, options)
    returned: list[int] = []

    async def history(channel: str, **kwargs: Any) -> Any:
        result = await broker.history(channel, **kwargs)
        returned.append(len(result.publications))
        return result

    budget = 1024 * 1024
    read = await read_history(history, "big", since=None, limit=1000, byte_budget=budget)
    assert read.cut and 0 < len(read.publications) < COUNT
    assert read.size == sum(publication_size(p) for p in read.publications) <= budget
    assert [p.offset for p in read.publications] == list(range(1, len(read.publications) + 1))
    # Never more than one page beyond what fits.
    assert sum(returned) <= len(read.publications) + budget // SIZE + 1, returned
    returned.clear()
    epoch = read.position.epoch
    read = await read_history(
        history, "big", since=StreamPosition(0, epoch), limit=10, byte_budget=budget, whole=True
    )
    assert read.cut and read.publications == [] and sum(returned) <= 10
    # Within both bounds the read is whole and ends at the top.
    read = await read_history(
        history, "big", since=StreamPosition(COUNT - 3, epoch), limit=10, byte_budget=budget
    )
    assert not read.cut and [p.offset for p in read.publications] == [COUNT - 2, COUNT - 1, COUNT]
    await broker.close()


async def test_newest_first_reads_are_paged_too() -> None:
    """reverse=True walks pages down from the top: newest first, contiguous, bounded,
    stopping at ``since`` and at the oldest publication kept."""
    from herald.brokers.base import PublishOptions, StreamPosition
    from herald.brokers.memory import MemoryBroker
    from herald.policy import read_history

    broker = MemoryBroker()

    def ignore(message: Any) -> None:
        return None

    await broker.start(ignore)
    payload = json.dumps({"p": PAYLOAD}).encode()
    for _ in range(COUNT):
        await broker.publish("big", payload, PublishOptions(history_size=50))  # keeps 21..70
    returned: list[int] = []

    async def history(channel: str, **kwargs: Any) -> Any:
        result = await broker.history(channel, **kwargs)
        returned.append(len(result.publications))
        return result

    budget = 1024 * 1024
    read = await read_history(history, "big", since=None, limit=1000, reverse=True, byte_budget=budget)
    fits = len(read.publications)
    assert read.cut and 0 < fits < 50
    assert [p.offset for p in read.publications] == list(range(COUNT, COUNT - fits, -1))
    assert sum(returned) <= fits + budget // SIZE + 1, returned
    # Everything kept, when the budget allows: down to the oldest kept, no further.
    read = await read_history(history, "big", since=None, limit=1000, reverse=True, byte_budget=10**9)
    assert [p.offset for p in read.publications] == list(range(COUNT, 20, -1)) and not read.cut
    # Down to since (exclusive), and the limit.
    epoch = read.position.epoch
    read = await read_history(
        history, "big", since=StreamPosition(COUNT - 4, epoch), limit=10, reverse=True, byte_budget=budget
    )
    assert [p.offset for p in read.publications] == [COUNT, COUNT - 1, COUNT - 2, COUNT - 3]
    read = await read_history(history, "big", since=None, limit=3, reverse=True, byte_budget=budget)
    assert [p.offset for p in read.publications] == [COUNT, COUNT - 1, COUNT - 2]
    await broker.close()
