"""The sharded Redis broker: placement, configuration, and one shard killed and restarted."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from herald.brokers.base import Publication, PublishOptions, StreamGap
from herald.brokers.redis import RedisBroker
from herald.brokers.sharded import ShardedRedisBroker, ShardedRedisConfig
from herald.config import Settings
from herald.engines import engines_for
from herald.exceptions import BrokerUnavailableError, ConfigError
from herald.presence.sharded import ShardedPresenceManager
from herald.urls import redact_url

from ..helpers import ROOT, async_until, async_wait_for
from ..servers import RedisServer
from .conformance import HISTORY, NodeEngines, info
from .sharding import channel_on, redis_shards_fixture, shards_url

NAMED = "redis://h1:6379/0?shard=a,redis://h2:6379/0?shard=b,redis://h3:6379/0?shard=c"


def _placement(url: str, channels: list[str]) -> dict[str, str]:
    """Channel -> the name of the shard that owns it, under the broker setting ``url``."""
    broker = ShardedRedisBroker(ShardedRedisConfig.from_url(url))
    return {ch: broker.names[broker.shards.index(broker.shard_for(ch))] for ch in channels}


CHANNELS = [f"chat:{n}" for n in range(3000)]


# ---------------------------------------------------------------- placement (no Redis needed)


def test_placement_is_fixed_by_shard_names_whatever_the_order_or_process() -> None:
    here = _placement(NAMED, CHANNELS)
    # Pinned: a new hash would move every deployment's channels on upgrade (and lose streams).
    assert [here[f"chat:{n}"] for n in range(8)] == ["c", "b", "c", "b", "a", "b", "a", "a"]
    reordered = ",".join(reversed(NAMED.split(",")))
    assert _placement(reordered, CHANNELS) == here
    # Another interpreter (another str hash seed) agrees.
    code = (
        "import json; from tests.brokers.test_sharded import _placement, CHANNELS, NAMED; "
        "print(json.dumps(_placement(NAMED, CHANNELS)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, timeout=60
    )
    assert json.loads(other.stdout) == here
    counts = {name: list(here.values()).count(name) for name in "abc"}
    assert all(800 < count < 1200 for count in counts.values()), counts


def test_a_shard_named_by_address_is_spelled_one_way() -> None:
    short = _placement("redis://H1,redis://h2:6379", CHANNELS[:200])
    assert short == _placement("redis://:pw@h1:6379/0,redis://h2/0?health_check_interval=5", CHANNELS[:200])
    assert set(short.values()) == {"h1:6379/0", "h2:6379/0"}


def test_adding_a_shard_moves_only_channels_to_it_and_removing_one_only_its_own() -> None:
    three = _placement(NAMED, CHANNELS)
    four = _placement(NAMED + ",redis://h4:6379/0?shard=d", CHANNELS)
    moved = [ch for ch in CHANNELS if four[ch] != three[ch]]
    assert {four[ch] for ch in moved} == {"d"}
    assert 0.18 < len(moved) / len(CHANNELS) < 0.32  # about 1/4
    two = _placement("redis://h1:6379/0?shard=a,redis://h3:6379/0?shard=c", CHANNELS)
    assert {three[ch] for ch in CHANNELS if two[ch] != three[ch]} == {"b"}


# ---------------------------------------------------------------- configuration


def test_shared_options_apply_to_every_shard_and_must_agree() -> None:
    config = ShardedRedisConfig.from_url("redis://a,redis://b?prefix=app&max_held=5,redis://c?prefix=app")
    assert {(s.config.prefix, s.config.max_held) for s in config.shards} == {("app", 5)}
    with pytest.raises(ConfigError, match="prefix must be the same on every shard"):
        ShardedRedisConfig.from_url("redis://a?prefix=one,redis://b?prefix=two")
    # Connection options stay with their URL; shard= is not passed to redis-py.
    config = ShardedRedisConfig.from_url("redis://:pw@a/2?shard=x,redis://b?health_check_interval=5")
    assert [s.config.url for s in config.shards] == ["redis://:pw@a/2", "redis://b?health_check_interval=5"]
    assert [s.name for s in config.shards] == ["x", "b:6379/0"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://a,redis://a:6379/0", "listed twice"),
        ("redis://a?shard=x,redis://b?shard=x", "listed twice"),
        ("redis://a:6379,b:6379", "give each shard its own URL"),
        ("redis://a,nats://b", "not a Redis URL"),
        ("redis://a,redis://b?shard=", "shard= takes one name"),
        ("redis://a,redis://b?bogus=1", "unknown Redis broker URL option 'bogus'"),
    ],
)
def test_bad_shard_lists_are_refused_at_settings_load(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(broker=url)


def test_a_toml_list_names_the_shards(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_text('broker = ["redis://:s1@a:6379/0", "redis://:s2@b:6379/0?prefix=app"]\n')
    settings = Settings.load(path)
    assert settings.broker == "redis://:s1@a:6379/0,redis://:s2@b:6379/0?prefix=app"
    assert redact_url(settings.broker) == "redis://***@a:6379/0,redis://***@b:6379/0?prefix=app"
    broker, presence = engines_for(settings)
    assert isinstance(broker, ShardedRedisBroker) and isinstance(presence, ShardedPresenceManager)
    assert [s.config.prefix for s in broker.shards] == ["app", "app"]
    single, _ = engines_for(Settings(broker="redis://a:6379/0"))
    assert type(single) is RedisBroker


# ---------------------------------------------------------------- real shards


@pytest.fixture
def redis_shards() -> Iterator[list[RedisServer]]:
    yield from redis_shards_fixture()


@pytest.mark.redis
async def test_channels_and_their_presence_live_on_their_own_shard(redis_shards: list[RedisServer]) -> None:
    config = ShardedRedisConfig.from_url(shards_url(redis_shards))
    broker = ShardedRedisBroker(config)
    presence = ShardedPresenceManager(broker)
    await broker.start(lambda message: None)
    clients = [aioredis.Redis.from_url(s.url, decode_responses=True) for s in redis_shards]
    try:
        channels = [f"chat:spread{n:02d}" for n in range(30)]  # none is a part of another
        for channel in channels:
            await broker.publish(channel, b"1", HISTORY)
            await presence.add(channel, info(), 60)
        keys = [{str(key) for key in await client.keys("*")} for client in clients]
        for channel in channels:
            owner = broker.shards.index(broker.shard_for(channel))
            # Its stream, and every other key naming it (meta, presence), on its shard only.
            stream = broker.shard_for(channel).stream_key(channel)
            assert [i for i, found in enumerate(keys) if stream in found] == [owner], channel
            named = [sorted(k for k in found if channel in k) for found in keys]
            assert [i for i, found in enumerate(named) if found] == [owner], (channel, named)
            assert any("presence" in k for k in named[owner]), named[owner]
        assert all(any(":stream:" in key for key in found) for found in keys), "a shard got no channel"
    finally:
        for client in clients:
            await client.aclose()
        await broker.close()


@pytest.mark.redis
async def test_a_killed_shard_fails_only_its_channels_and_reports_a_gap_on_return(
    redis_shards: list[RedisServer],
) -> None:
    url = shards_url(redis_shards)
    nodes: list[NodeEngines] = []
    for _ in range(2):
        broker = ShardedRedisBroker(ShardedRedisConfig.from_url(url))
        node = NodeEngines(broker, ShardedPresenceManager(broker))
        await broker.start(node.handler)
        nodes.append(node)
    listener, publisher = nodes
    assert isinstance(publisher.broker, ShardedRedisBroker)
    down = channel_on(url, 0)
    up = [channel_on(url, 1), channel_on(url, 2)]
    try:
        for channel in [down, *up]:
            await listener.broker.subscribe(channel)
            await publisher.broker.publish(channel, b'"before"', HISTORY)
            await listener.wait_publications(channel, 1)

        await asyncio.to_thread(redis_shards[0].kill)  # SIGKILL
        await async_wait_for(lambda: not listener.broker.shards[0].connected, 5, what="shard 0 down")  # type: ignore[attr-defined]
        for call in (
            publisher.broker.publish(down, b'"lost"', HISTORY),
            publisher.broker.history(down),
            publisher.presence.add(down, info(), 60),
            publisher.presence.presence(down),
        ):
            with pytest.raises(BrokerUnavailableError):
                await call
        # The other shards' channels deliver throughout, and the node stays ready.
        for n, channel in enumerate(up):
            await publisher.broker.publish(channel, b'"during"', HISTORY)
            await publisher.presence.add(channel, info(n), 60)
            assert (await publisher.broker.history(channel)).position.offset == 2
            await listener.wait_publications(channel, 2)
        assert await publisher.broker.ready()
        assert await publisher.broker.shards_ready() == [False, True, True]

        await asyncio.to_thread(redis_shards[0].start)  # same port, empty

        async def published() -> bool:
            try:
                await publisher.broker.publish(down, b'"after"', HISTORY)
            except BrokerUnavailableError:
                return False
            return True

        await async_until(published, 10, what="publishing on the restarted shard")

        def messages() -> list[Publication | StreamGap]:
            return [
                m for m in listener.received if isinstance(m, Publication | StreamGap) and m.channel == down
            ]

        await async_wait_for(lambda: any(isinstance(m, StreamGap) for m in messages()), 10, what="a gap")
        # The stream was lost with the shard: the listener is told before anything of the
        # new stream, which then follows (or the gap already covers it).
        received = messages()
        assert isinstance(received[0], Publication) and received[0].data == b'"before"'
        gap = received[1]
        assert isinstance(gap, StreamGap) and gap.epoch_changed, received
        assert all(isinstance(m, Publication) and m.epoch == gap.position.epoch for m in received[2:])
        assert [p.data for p in publisher.publications(down)] == []  # sanity: publisher never subscribed
        await publisher.broker.publish(down, b'"live"', PublishOptions())
        await async_wait_for(lambda: b'"live"' in {p.data for p in listener.publications(down)}, 5)
        for channel in up:
            assert [p.data for p in listener.publications(channel)] == [b'"before"', b'"during"']
            assert not any(isinstance(m, StreamGap) and m.channel == channel for m in listener.received)
        counters = listener.broker.counters()
        assert counters["reconnects"] >= 1 and counters["gaps_lost"] >= 1
    finally:
        for node in nodes:
            await node.broker.close()


@pytest.mark.redis
async def test_nodes_that_disagree_on_the_shard_list_are_found(
    redis_shards: list[RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling change of the shard list leaves nodes that place some channels on
    different shards (their publications to those channels never meet).  Each node
    records its list on every shard and finds the other's on a shard they share; nodes
    that agree find nothing, and a list gone from every shard stops being reported."""
    caplog.set_level(logging.ERROR, logger="herald.brokers.sharded")
    prefix = "prefix=placements"
    urls = [
        shards_url(redis_shards, prefix),
        shards_url(redis_shards, prefix),
        shards_url(redis_shards[:2], prefix),
    ]
    brokers = [ShardedRedisBroker(ShardedRedisConfig.from_url(url)) for url in urls]
    for broker in brokers:
        broker.placement_check_interval = 0.1  # each list kept 0.3 s
        await broker.start(lambda message: None)
    full, same, partial = brokers
    try:
        assert full.placement == same.placement != partial.placement
        # The order of the URLs changes no placement, so it is no disagreement.
        reordered = ShardedRedisBroker(ShardedRedisConfig.from_url(shards_url(redis_shards[::-1], prefix)))
        assert reordered.placement == full.placement
        await async_wait_for(
            lambda: all(b.placement_mismatches for b in brokers), 5, what="every node to find the other list"
        )
        for broker in brokers:
            await broker.check_placement()  # a list already reported is not counted again
            assert broker.counters()["placement_mismatches"] == 1
        assert full.foreign_placements == same.foreign_placements == {partial.placement}
        assert partial.foreign_placements == {full.placement}
        errors = [r.getMessage() for r in caplog.records if "other Redis shards" in r.getMessage()]
        assert len(errors) == 3 and all("same shard list" in error for error in errors)

        await partial.close()
        await async_wait_for(
            lambda: not full.foreign_placements and not same.foreign_placements,
            5,
            what="the other list to expire",
        )
        assert full.placement_mismatches == 1
    finally:
        for broker in brokers:
            await broker.close()
