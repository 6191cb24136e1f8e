"""Real `herald serve` nodes on a broker sharded over three real redis-servers.

The multi-node tests of test_multinode.py run unchanged against the sharded broker
setting; then one shard is killed -9 and restarted under two nodes.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ..brokers.sharding import channel_on, redis_shards_fixture, shards_url
from ..helpers import async_until
from ..servers import RedisServer
from . import test_multinode as multinode

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def redis_shards() -> Iterator[list[RedisServer]]:
    yield from redis_shards_fixture()


@dataclass
class _Broker:
    """What test_multinode's tests use of their ``redis_server``: the broker setting."""

    url: str


async def test_three_nodes_on_three_shards_deliver_every_publication_once_in_order(
    redis_shards: list[RedisServer],
) -> None:
    await multinode.test_three_nodes_deliver_every_publication_once_in_order(
        _Broker(shards_url(redis_shards))  # type: ignore[arg-type]
    )


async def test_killed_node_clients_recover_elsewhere_on_three_shards(redis_shards: list[RedisServer]) -> None:
    await multinode.test_killed_node_clients_recover_elsewhere_and_presence_expires(
        _Broker(shards_url(redis_shards))  # type: ignore[arg-type]
    )


async def test_a_killed_shard_fails_only_its_channels(redis_shards: list[RedisServer]) -> None:
    url = shards_url(redis_shards)
    down, up = channel_on(url, 0), channel_on(url, 1)
    async with multinode._cluster(2, url) as (a, b):
        publisher = await multinode.connect(a, "pub")
        # One client per channel: a 4005 closes a whole connection.
        subscribers = {
            channel: [await multinode.connect(node, f"sub-{n}") for n, node in enumerate((a, b))]
            for channel in (down, up)
        }
        clients = [publisher, *subscribers[down], *subscribers[up]]
        try:
            starts = {}
            for channel, subs in subscribers.items():
                starts[channel], _ = await multinode.subscribe_all(subs, channel)
                await publisher.call("publish", channel=channel, data="before")
                for sub in subs:
                    await multinode.publications(sub, 1)

            await asyncio.to_thread(redis_shards[0].kill)  # SIGKILL
            try:

                async def refused() -> bool:
                    reply = await publisher.call("publish", channel=down, data="x")
                    return bool(reply.get("error", {}).get("code") == 121)  # BROKER_UNAVAILABLE

                await async_until(refused, 5, what="publishing on the dead shard to fail")
                status, body = await multinode.api(a, "/api/publish", {"channel": down, "data": "x"})
                assert status == 503 and "broker unavailable" in body["detail"]
                history = urllib.request.Request(
                    f"{a.http}/api/history?channel={down}", headers={"X-API-Key": multinode.API_KEY}
                )
                with pytest.raises(urllib.error.HTTPError) as failed:
                    await asyncio.to_thread(urllib.request.urlopen, history, timeout=5)
                assert failed.value.code == 503
                # The other shard's channel works throughout, and both nodes stay ready.
                reply = await publisher.call("publish", channel=up, data="during")
                assert "result" in reply, reply
                for sub in subscribers[up]:
                    [publication] = await multinode.publications(sub, 1)
                    assert publication["data"] == "during"
                presence = await subscribers[up][0].call("presence", channel=up)
                assert set(presence["result"]["clients"]) == {c.client_id for c in subscribers[up]}
                assert [await multinode.readyz(node) for node in (a, b)] == [200, 200]
            finally:
                await asyncio.to_thread(redis_shards[0].start)  # same port, empty

            # The dead shard's stream is lost: its subscribers are closed with 4005 (reconnect,
            # resume, recovered: false); the other shard's are untouched.
            for sub in subscribers[down]:
                disconnect = await sub.push("disconnect", 10)
                assert disconnect["code"] == 4005 and disconnect["reconnect"] is True
            resumed = await multinode.connect(b, "resumed")
            clients.append(resumed)
            result = await multinode.subscribe(resumed, down, since={"offset": 1, "epoch": starts[down]})
            assert result["recovered"] is False and result["epoch"] != starts[down]
            reply = await publisher.call("publish", channel=up, data="after")
            assert reply["result"]["epoch"] == starts[up]
            for sub in subscribers[up]:
                [publication] = await multinode.publications(sub, 1)
                assert publication["data"] == "after" and not sub.closed.is_set()
        finally:
            await multinode.close_all(clients)
