"""The conformance suite against the Redis broker on a real 3-master Redis Cluster, and a
master killed -9 and restarted: its channels fail clearly, the others keep working, and
its subscribers get the documented epoch change (issue 16, item 2)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError

from herald.brokers.base import ClientInfo, PresenceEvent, PublishOptions, StreamGap, StreamPosition
from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.config import Settings
from herald.exceptions import BrokerUnavailableError, ConfigError
from herald.presence.redis import RedisPresenceManager

from ..helpers import async_wait_for
from ..servers import RedisClusterServers, redis_cluster_fixture
from .conformance import BrokerConformance, Engine, NodeEngines

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    yield from redis_cluster_fixture()


async def _on_every_master(cluster: RedisClusterServers, *command: object) -> list[object]:
    answers = []
    for node in cluster.nodes:
        if node.running:
            client = aioredis.Redis(host="127.0.0.1", port=node.port)
            try:
                answers.append(await client.execute_command(*command))
            finally:
                await client.aclose()
    return answers


async def cut_links(cluster: RedisClusterServers, broker: RedisBroker) -> None:
    """Every master closes ``broker``'s Pub/Sub connections (CLIENT KILL by address)."""
    connections = broker.pubsub_connections()
    killed = 0
    for pubsub in connections:
        writer = pubsub.connection._writer  # type: ignore[attr-defined]
        host, port = writer.get_extra_info("sockname")[:2]
        answers = await _on_every_master(cluster, "CLIENT", "KILL", "ADDR", f"{host}:{port}")
        killed += sum(int(answer) for answer in answers if isinstance(answer, int))
    assert connections and killed == len(connections)
    await async_wait_for(lambda: not broker.connected, 5, what="the links to drop")


def _config(cluster: RedisClusterServers, options: str = "") -> RedisBrokerConfig:
    # A prefix per test: tests never see each other's keys.
    return RedisBrokerConfig.from_url(f"{cluster.url}?prefix=t{secrets.token_hex(4)}{options}")


class TestRedisClusterBroker(BrokerConformance):
    @pytest.fixture
    async def engine(self, cluster: RedisClusterServers) -> AsyncIterator[Engine]:
        config = _config(cluster)

        def make() -> tuple[RedisBroker, RedisPresenceManager]:
            broker = RedisBroker(config)
            return broker, RedisPresenceManager(broker)

        async def lose_data() -> None:
            await _on_every_master(cluster, "FLUSHALL")

        @contextlib.asynccontextmanager
        async def cut_link(node: NodeEngines) -> AsyncIterator[None]:
            assert isinstance(node.broker, RedisBroker)
            await cut_links(cluster, node.broker)
            yield

        engine = Engine(make, lose_data, miss=cut_link)
        yield engine
        await engine.close()


# ---------------------------------------------------------------- one master killed -9


def _channels_on_two_masters(
    cluster: RedisClusterServers, broker: RedisBroker, index: int
) -> tuple[str, str]:
    """A channel whose master is ``cluster.nodes[index]`` and one on another master."""
    found: dict[bool, str] = {}
    for i in range(1000):
        channel = f"chat:{i}"
        on_victim = int(broker._master_of(broker.stream_key(channel)).port) == cluster.nodes[index].port
        found.setdefault(on_victim, channel)
        if len(found) == 2:
            return found[True], found[False]
    raise AssertionError("no channels found on two masters")


@pytest.mark.slow
async def test_a_master_killed_fails_only_its_channels_then_reports_the_lost_stream(
    cluster: RedisClusterServers,
) -> None:
    config = _config(cluster, "&reconnect_max=0.5&connect_timeout=1")
    brokers = [RedisBroker(config) for _ in range(2)]
    subscriber, publisher = (NodeEngines(broker, RedisPresenceManager(broker)) for broker in brokers)
    for node in (subscriber, publisher):
        await node.broker.start(node.handler)
    broker = brokers[1]  # the publisher's
    index = 0  # the victim master
    try:
        victim, other = _channels_on_two_masters(cluster, broker, index)
        history = PublishOptions(history_size=10, history_ttl=60)
        for channel in (victim, other):
            await subscriber.broker.subscribe(channel)
            await publisher.broker.publish(channel, b"1", history)
            await subscriber.wait_publications(channel, 1)
        before = subscriber.publications(victim)[-1]
        # The rollback guard checked each master's run on its own.
        masters = {name: broker._master_of(broker.stream_key(name)).name for name in (victim, other)}
        runs = dict(broker._runs)
        checks = dict(broker._run_checks)
        assert len({runs[masters[victim]][0], runs[masters[other]][0]}) == 2

        cluster.nodes[index].kill()  # SIGKILL; no persistence: it comes back empty
        # Its channels fail clearly (not hang); the others keep working, live.
        with pytest.raises(BrokerUnavailableError):
            await publisher.broker.publish(victim, b"2", history)
        with pytest.raises(BrokerUnavailableError):
            await publisher.broker.history(victim)
        assert (await publisher.broker.publish(other, b"2", history)).offset == 2
        assert [p.data for p in await subscriber.wait_publications(other, 2)] == [b"1", b"2"]
        assert await publisher.broker.ready()  # a master down fails only its own channels

        cluster.nodes[index].start()
        cluster.wait_ok()
        # The subscriber reconnects to the master and reads the victim's stream: lost with
        # the master's data, so its epoch changed, which it is told (never a silent skip).
        gap = await async_wait_for(
            lambda: next(
                (m for m in subscriber.received if isinstance(m, StreamGap) and m.channel == victim), None
            ),
            15,
            what="the StreamGap of the lost stream",
        )
        assert gap.epoch_changed and gap.last == StreamPosition(1, before.epoch)
        assert gap.position.epoch != before.epoch
        position = await publisher.broker.publish(victim, b"3", history)
        assert position.epoch != before.epoch
        await async_wait_for(
            lambda: b"3" in [p.data for p in subscriber.publications(victim)], 10, what="publication 3"
        )
        assert [p.data for p in subscriber.publications(victim)] == [b"1", b"3"]
        assert not [m for m in subscriber.received if isinstance(m, StreamGap) and m.channel == other]
        # The restarted master's new run was checked; the other master was not checked again.
        assert broker._runs[masters[victim]][0] != runs[masters[victim]][0]
        assert broker._runs[masters[other]] == runs[masters[other]]
        assert broker._run_checks[masters[other]] is checks[masters[other]]
    finally:
        for each in brokers:
            await each.close()
        if not cluster.nodes[index].running:
            cluster.nodes[index].start()
        cluster.wait_ok()


def lose_first_reply(monkeypatch: pytest.MonkeyPatch, command: str) -> list[object]:
    """From now on, the first ``command`` any cluster node runs has its reply lost after
    Redis ran it (as when the link breaks in between).  Returns the lost replies (one at
    most); ``monkeypatch.undo()`` ends it."""
    sent = ClusterNode.execute_command
    lost: list[object] = []

    async def reply_lost(node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        reply = await sent(node, *args, **kwargs)
        if args[0] == command and not lost:
            lost.append(reply)
            raise RedisConnectionError("the reply was lost")
        return reply

    monkeypatch.setattr(ClusterNode, "execute_command", reply_lost)
    return lost


async def test_a_publish_whose_reply_was_lost_is_not_sent_again(
    cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the script and the reply never came back (the link broke in between):
    the broker fails the call rather than let redis-py send it again, which would
    publish twice what the caller is told once."""
    broker = RedisBroker(_config(cluster))
    await broker.start(lambda message: None)
    history = PublishOptions(history_size=10, history_ttl=60)
    try:
        assert (await broker.publish("lost", b"0", history)).offset == 1
        lost = lose_first_reply(monkeypatch, "EVALSHA")
        with pytest.raises(BrokerUnavailableError):
            await broker.publish("lost", b"1", history)
        assert len(lost) == 1  # it ran once
        monkeypatch.undo()
        assert [p.data for p in (await broker.history("lost")).publications] == [b"0", b"1"]
        # The next call finds the masters again and works.
        assert (await broker.publish("lost", b"2", history)).offset == 3
    finally:
        await broker.close()


async def test_a_presence_event_whose_reply_was_lost_is_not_pushed_twice(
    cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a publish: an SPUBLISH that Redis ran but whose reply was lost fails, and
    is not sent again (redis-py's resend would push the join to every node twice)."""
    broker = RedisBroker(_config(cluster))
    node = NodeEngines(broker, RedisPresenceManager(broker))
    await node.broker.start(node.handler)

    def event(kind: str, user: str) -> PresenceEvent:
        return PresenceEvent("room", kind, ClientInfo(f"c-{user}", user))

    try:
        await node.broker.subscribe("room")
        lost = lose_first_reply(monkeypatch, "SPUBLISH")
        with pytest.raises(BrokerUnavailableError):
            await node.broker.publish_event(event("join", "lost"))
        assert lost == [1]  # Redis pushed it, to the one subscribed node
        monkeypatch.undo()
        # Same shard channel, same connection: a resent join would arrive before this leave.
        await node.broker.publish_event(event("leave", "marker"))
        await async_wait_for(lambda: len(node.events("room")) >= 2, 10, what="the marker event")
        assert node.events("room") == [event("join", "lost"), event("leave", "marker")]
    finally:
        await node.broker.close()


async def test_scripts_flushed_from_the_masters_are_loaded_again(cluster: RedisClusterServers) -> None:
    broker = RedisBroker(_config(cluster))
    await broker.start(lambda message: None)
    history = PublishOptions(history_size=10, history_ttl=60)
    try:
        assert (await broker.publish("flushed", b"0", history)).offset == 1
        await _on_every_master(cluster, "SCRIPT", "FLUSH")
        assert (await broker.publish("flushed", b"1", history)).offset == 2
        assert [p.data for p in (await broker.history("flushed")).publications] == [b"0", b"1"]
    finally:
        await broker.close()


# ---------------------------------------------------------------- the URL


def test_cluster_urls_parse_and_bad_ones_are_refused_clearly() -> None:
    config = RedisBrokerConfig.from_url(
        "rediss+cluster://u:pw@a:7000,[::1]:7001/0?prefix=app&connect_timeout=1"
    )
    assert config.cluster and config.prefix == "app" and config.connect_timeout == 1
    assert config.cluster_seeds() == [("a", 7000), ("::1", 7001)]
    assert config.node_url("10.0.0.9", 7002) == "rediss://u:pw@10.0.0.9:7002/0"
    assert not RedisBrokerConfig.from_url("redis://a:6379/0").cluster
    for url, error in [
        ("redis+cluster://", "needs seed nodes"),
        ("redis+cluster://a", "expected host:port"),
        ("redis+cluster://a:1,b:x", "expected host:port"),
        ("redis+cluster://a:1/3", "only database 0"),
        ("redis+cluster://a:1?prefix=x{y}", "may not contain"),
        ("redis+cluster://a:1?bogus=1", "unknown Redis broker URL option 'bogus'"),
    ]:
        with pytest.raises(ConfigError, match=error):
            RedisBrokerConfig.from_url(url)
    with pytest.raises(ValueError, match="broker"):
        Settings(broker="redis+cluster://a:1/2")


# ---------------------------------------------------------------- a slot moves to another master


async def _move_slot(cluster: RedisClusterServers, key: str, source: int, target: int) -> None:
    """Migrate ``key``'s slot (and its keys) from the master at port ``source`` to the one
    at ``target``, as a resharding does: Redis then drops the slot's sharded subscriptions."""
    ports = [node.port for node in cluster.nodes]
    clients = {port: aioredis.Redis(host="127.0.0.1", port=port) for port in ports}
    try:
        slot = int(await clients[source].execute_command("CLUSTER", "KEYSLOT", key))
        ids = {port: (await clients[port].execute_command("CLUSTER", "MYID")).decode() for port in ports}
        await clients[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await clients[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        keys = await clients[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert keys
        await clients[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in ports:
            await clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for client in clients.values():
            await client.aclose()


async def test_a_channel_whose_slot_moves_follows_it_to_the_new_master(cluster: RedisClusterServers) -> None:
    config = _config(cluster, "&reconnect_max=0.5")
    brokers = [RedisBroker(config) for _ in range(2)]
    subscriber, publisher = (NodeEngines(broker, RedisPresenceManager(broker)) for broker in brokers)
    for node in (subscriber, publisher):
        await node.broker.start(node.handler)
    broker = brokers[0]
    try:
        channel = "chat:moving"
        history = PublishOptions(history_size=10, history_ttl=60)
        await subscriber.broker.subscribe(channel)
        await publisher.broker.publish(channel, b"1", history)
        [first] = await subscriber.wait_publications(channel, 1)
        owner = int(broker._master_of(broker.stream_key(channel)).port)
        target = next(node.port for node in cluster.nodes if node.port != owner)

        await _move_slot(cluster, broker.stream_key(channel), owner, target)
        # The subscriber is told its subscription is gone, finds the new master and
        # subscribes there; the stream moved with a master of another run that is not
        # durable, so it starts a new epoch, which the subscriber is told.
        gap = await async_wait_for(
            lambda: next((m for m in subscriber.received if isinstance(m, StreamGap)), None),
            10,
            what="the StreamGap after the move",
        )
        assert gap.epoch_changed and gap.last == StreamPosition(1, first.epoch)
        await async_wait_for(
            lambda: (
                int(broker._master_of(broker.stream_key(channel)).port) == target
                and broker._routes.get(channel) == broker._master_of(broker.stream_key(channel)).name
            ),
            10,
            what="the channel routed to its new master",
        )
        # Live publications now come through the new master's connection.
        position = await publisher.broker.publish(channel, b"2", history)
        assert position.epoch != first.epoch
        await async_wait_for(lambda: b"2" in [p.data for p in subscriber.publications(channel)], 10, what="2")
        assert [p.data for p in subscriber.publications(channel)] == [b"1", b"2"]
    finally:
        for each in brokers:
            await each.close()
