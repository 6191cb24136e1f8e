"""A Redis Cluster master killed and failed over to its replica, under the Redis broker.

The replica is promoted by the cluster itself (no one tells Herald): the channels of the
master's slots fail clearly until it is (121), then the nodes find the new master on
their own, for publishing and for their sharded Pub/Sub.  A promoted replica may lack
the last acknowledged writes (replication is asynchronous), so its streams start a new
epoch and the subscribers are told (docs/scaling.md, Rollbacks and Redis Cluster)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.base import PublishOptions, StreamGap, StreamPosition
from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.exceptions import BrokerUnavailableError
from herald.presence.redis import RedisPresenceManager

from ..helpers import async_until, async_wait_for
from ..servers import RedisClusterServers, redis_cluster_fixture
from .conformance import NodeEngines

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    yield from redis_cluster_fixture(masters=3, replicas=1)


async def test_a_master_failed_over_to_its_replica(cluster: RedisClusterServers) -> None:
    config = RedisBrokerConfig.from_url(
        f"{cluster.url}?prefix=t{secrets.token_hex(4)}&reconnect_max=0.5&connect_timeout=1"
    )
    brokers = [RedisBroker(config) for _ in range(2)]
    subscriber, publisher = (NodeEngines(broker, RedisPresenceManager(broker)) for broker in brokers)
    for node in (subscriber, publisher):
        await node.broker.start(node.handler)
    broker = brokers[1]
    history = PublishOptions(history_size=10, history_ttl=60)
    channel = "chat:failover"
    try:
        await subscriber.broker.subscribe(channel)
        told = await publisher.broker.publish(channel, b"1", history)
        await subscriber.wait_publications(channel, 1)
        victim = cluster.node_on(int(broker._master_of(broker.stream_key(channel)).port))
        # The replica holds publication 1: even so, a promoted run is not trusted.
        to_victim = aioredis.Redis(host="127.0.0.1", port=victim.port)
        try:
            assert await to_victim.execute_command("WAIT", 1, 30000) == 1
        finally:
            await to_victim.aclose()

        victim.kill()
        with pytest.raises(BrokerUnavailableError):
            await publisher.broker.publish(channel, b"lost", history)  # fails clearly, no hang
        answers: list[StreamPosition] = []

        async def published() -> bool:
            try:
                answers.append(await publisher.broker.publish(channel, b"2", history))
            except BrokerUnavailableError:
                return False  # not failed over yet (node timeout 2 s, then the election)
            return True

        await async_until(published, 60, what="a publish on the promoted replica")
        assert answers[0].epoch != told.epoch and answers[0].offset == 1
        # The subscriber's node followed the slots to the new master and was told that
        # the stream it read is gone (its clients are closed with 4005 and resume).
        gap = await async_wait_for(
            lambda: next((m for m in subscriber.received if isinstance(m, StreamGap)), None),
            15,
            what="the StreamGap of the failed-over stream",
        )
        assert gap.channel == channel and gap.epoch_changed and gap.last == told
        assert gap.position.epoch == answers[0].epoch
        # Live delivery goes on from the gap's position: publication 2 came live when
        # the node was subscribed on the new master before it, else it is in the gap
        # (the clients read it from history when they resume).
        third = await publisher.broker.publish(channel, b"3", history)
        await async_wait_for(
            lambda: b"3" in [p.data for p in subscriber.publications(channel)], 15, what="publication 3, live"
        )
        after_gap = [b"2", b"3"][gap.position.offset :]
        assert [p.data for p in subscriber.publications(channel)] == [b"1", *after_gap]
        assert third == StreamPosition(2, answers[0].epoch)
        assert [p.data for p in (await publisher.broker.history(channel)).publications] == [b"2", b"3"]
    finally:
        for each in brokers:
            await each.close()
