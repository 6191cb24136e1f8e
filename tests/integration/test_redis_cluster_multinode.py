"""Real `herald serve` nodes on a real 3-master Redis Cluster (issue 16, item 2): the
multi-node delivery and recovery tests of test_multinode on the cluster, and one master
killed -9 and restarted under live nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, cast

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from ..helpers import async_until
from ..servers import RedisClusterServers, RedisServer, redis_cluster_fixture
from .test_multinode import (
    _cluster,
    _is,
    api,
    close_all,
    connect,
    publications,
    readyz,
    subscribe,
)
from .test_multinode import (
    test_killed_node_clients_recover_elsewhere_and_presence_expires as _recovery_test,
)
from .test_multinode import (
    test_three_nodes_deliver_every_publication_once_in_order as _delivery_test,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    yield from redis_cluster_fixture()


def _as_server(cluster: RedisClusterServers) -> RedisServer:
    # The shared tests use only the server's ``url``: here the cluster's.
    return cast(RedisServer, cluster)


async def test_three_nodes_on_a_cluster_deliver_every_publication_once_in_order(
    cluster: RedisClusterServers,
) -> None:
    await _delivery_test(_as_server(cluster))


async def test_killed_node_clients_recover_elsewhere_on_a_cluster(cluster: RedisClusterServers) -> None:
    await _recovery_test(_as_server(cluster))


async def _channels_by_master(cluster: RedisClusterServers, victim_port: int) -> tuple[str, str]:
    """A channel whose keys live on the master at ``victim_port``, and one elsewhere."""
    from herald.brokers.redis import RedisBroker, RedisBrokerConfig

    broker = RedisBroker(RedisBrokerConfig.from_url(cluster.url))
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in cluster.nodes])
    try:
        await client.initialize()
        found: dict[bool, str] = {}
        for i in range(1000):
            channel = f"chat:shard{i}"
            node = client.get_node_from_key(broker.stream_key(channel))
            assert node is not None
            found.setdefault(int(node.port) == victim_port, channel)
            if len(found) == 2:
                return found[True], found[False]
    finally:
        await client.aclose()
    raise AssertionError("no channels on two masters")


async def test_a_master_killed_fails_only_its_channels_and_its_subscribers_resume(
    cluster: RedisClusterServers,
) -> None:
    master = cluster.nodes[1]
    victim, other = await _channels_by_master(cluster, master.port)
    async with _cluster(2, cluster.url) as nodes:
        a, b = nodes
        subscribers = {name: await connect(b, f"sub-{name}") for name in (victim, other)}
        clients: list[Any] = list(subscribers.values())
        try:
            old = {}
            for channel, client in subscribers.items():
                old[channel] = await subscribe(client, channel)
                status, _ = await api(a, "/api/publish", {"channel": channel, "data": 1})
                assert status == 200
                await publications(client, 1)

            await asyncio.to_thread(master.kill)
            try:
                # Its channels fail clearly; the others keep working; the nodes stay ready.
                status, body = await api(a, "/api/publish", {"channel": victim, "data": "x"})
                assert status == 503 and "broker unavailable" in body["detail"], body
                status, body = await api(a, "/api/publish", {"channel": other, "data": 2})
                assert status == 200, body
                [live] = await publications(subscribers[other], 1)
                assert live["data"] == 2 and live["offset"] == 2
                assert await readyz(a) == 200 and await readyz(b) == 200
            finally:
                await asyncio.to_thread(master.start)  # same port and cluster config, empty
                await asyncio.to_thread(cluster.wait_ok)

            # The victim's stream was lost with the master: its subscriber is closed with
            # 4005 and resumes with recovered: false in a new epoch; the other one is untouched.
            client = subscribers[victim]
            disconnect = await client.push("disconnect", 15)
            assert disconnect["code"] == 4005 and disconnect["reconnect"] is True
            resumed = await connect(b, "sub-again")
            clients.append(resumed)
            result = await subscribe(resumed, victim, since={"offset": 1, "epoch": old[victim]["epoch"]})
            assert result["recovered"] is False and result["epoch"] != old[victim]["epoch"]

            async def published() -> bool:
                status, _ = await api(a, "/api/publish", {"channel": victim, "data": "after"})
                return status == 200

            await async_until(published, 10, "a publish on the restarted master")
            [after] = await publications(resumed, 1)
            assert after["data"] == "after" and after["offset"] == 1
            assert not subscribers[other].closed.is_set()
            status, _ = await api(a, "/api/publish", {"channel": other, "data": 3})
            assert status == 200
            [live] = await publications(subscribers[other], 1)
            assert live["offset"] == 3
            assert await _is(readyz(a), 200)
        finally:
            await close_all(clients)
