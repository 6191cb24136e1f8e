"""The Redis broker writes a channel's keys only when it is published to, and those of a
namespace without history expire (issue 13, item 6), on a redis-server the test owns."""

from __future__ import annotations

import secrets
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers.base import PublishOptions, StreamPosition
from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.exceptions import BrokerUnavailableError

from ..helpers import async_until
from ..servers import RedisServer, redis_server_fixture, require

pytestmark = pytest.mark.redis

NO_HISTORY = PublishOptions()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _broker(url: str, **config: object) -> RedisBroker:
    broker = RedisBroker(RedisBrokerConfig(url=url, prefix=f"t{secrets.token_hex(4)}", **config))  # type: ignore[arg-type]
    await broker.start(lambda message: None)
    return broker


async def _keys(redis: aioredis.Redis, prefix: str) -> list[str]:
    return sorted([key.decode() async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)])


async def test_reads_of_unpublished_channels_write_no_keys(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    broker = await _broker(redis_server.url)
    prefix = broker.config.prefix
    try:
        positions = [(await broker.history(f"chat:{i}", limit=0)).position for i in range(1500)]
        positions += [(await broker.history(f"chat:{i}")).position for i in range(1500, 3000)]
        for channel in ("chat:a", "chat:b"):
            await broker.subscribe(channel)  # a subscribe reads the position too
        # No key per channel: only the epoch buckets' hashes (at most 16384 in all).
        keys = await _keys(redis, prefix)
        assert keys and all(k.startswith(f"{prefix}:epochs:{{b") for k in keys), keys[:5]
        assert all(p.offset == 0 and p.epoch for p in positions)
        told = (await broker.history("chat:a", limit=0)).position
        assert (await broker.history("chat:a", limit=0)).position == told
        # The first publication continues the position a reader was told.
        assert await broker.publish("chat:a", b"1", PublishOptions(history_size=5)) == StreamPosition(
            1, told.epoch
        )
        recovered = await broker.history("chat:a", since=told)
        assert [p.data for p in recovered.publications] == [b"1"]
    finally:
        await broker.close()


async def test_history_less_meta_keys_expire_after_stream_meta_ttl(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    default = await _broker(redis_server.url)
    short = await _broker(redis_server.url, stream_meta_ttl=30)
    forever = await _broker(redis_server.url, stream_meta_ttl=0)
    try:
        assert default.config.stream_meta_ttl == 3600
        for broker, bound in ((default, 3600_000), (short, 30_000)):
            for i in range(20):
                await broker.publish(f"news:{i}", b"x", NO_HISTORY)
            keys = await _keys(redis, broker.config.prefix)
            metas = [key for key in keys if ":meta:" in key]
            assert len(metas) == 20 and not [key for key in keys if ":stream:" in key]
            for key in metas:
                ttl = await redis.pttl(key)
                assert bound - 5_000 < ttl <= bound, (key, ttl)
        await forever.publish("news:kept", b"x", NO_HISTORY)
        assert await redis.pttl(forever.meta_key("news:kept")) == -1
        # A namespace that keeps history with a TTL: both keys live as long as the history.
        await short.publish("chat:h", b"x", PublishOptions(history_size=5, history_ttl=7))
        assert 0 < await redis.pttl(short.meta_key("chat:h")) <= 7000
        assert 0 < await redis.pttl(short.stream_key("chat:h")) <= 7000
    finally:
        for broker in (default, short, forever):
            await broker.close()


async def test_a_lost_stream_never_reads_as_an_earlier_empty_epoch(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    broker = await _broker(redis_server.url)
    try:
        told = (await broker.history("chat:c", limit=0)).position
        first = await broker.publish("chat:c", b"1", PublishOptions(history_size=5))
        assert first == StreamPosition(1, told.epoch)
        await redis.delete(broker.meta_key("chat:c"), broker.stream_key("chat:c"))  # as a TTL would
        after_loss = (await broker.history("chat:c", limit=0)).position
        assert after_loss.offset == 0 and after_loss.epoch != told.epoch
        await broker.publish("chat:c", b"2", PublishOptions(history_size=5))
        await redis.flushall()  # the generations go too: the incarnation changes
        after_flush = (await broker.history("chat:c", limit=0)).position
        assert after_flush.epoch not in (told.epoch, after_loss.epoch)
    finally:
        await broker.close()


async def test_a_restarted_redis_never_reproduces_an_empty_epoch() -> None:
    """A snapshot or AOF restores the generations; the run id of the new Redis process
    still makes every empty epoch new, so a rolled-back creation cannot repeat one."""
    require("redis-server")
    server = RedisServer(persistent=True)
    server.start()
    broker = await _broker(server.url)
    try:
        before = (await broker.history("chat:d", limit=0)).position
        server.restart()  # kill -9; the append-only file brings every key back
        after = None
        for _ in range(50):  # the pool reconnects on its next command
            try:
                after = (await broker.history("chat:d", limit=0)).position
                break
            except Exception:
                continue
        assert after is not None and after.offset == 0
        assert after.epoch != before.epoch
        assert after.epoch.split(".")[1] == before.epoch.split(".")[1]  # same generation restored
    finally:
        await broker.close()
        server.cleanup()


async def test_a_replica_promoted_before_it_had_every_write_never_repeats_an_offset() -> None:
    """Replication is asynchronous: a replica promoted after its master died may lack the
    last acknowledged publications, and its copy of the stream is stamped by a master
    that kept every write.  A promoted run (``second_repl_offset`` set) never counts as
    keeping every write, however it is configured (here: append-only, fsync always, as
    its master), so the stream starts a new epoch instead of handing out an offset the
    clients already hold for another publication (docs/scaling.md, Rollbacks)."""
    require("redis-server")
    master, replica = RedisServer(persistent=True), RedisServer(persistent=True)
    master.start()
    replica.start()
    config = RedisBrokerConfig(url=master.url, prefix=f"t{secrets.token_hex(4)}")
    history = PublishOptions(history_size=10, history_ttl=60)
    on_master = RedisBroker(config)
    await on_master.start(lambda message: None)
    on_replica = RedisBroker(RedisBrokerConfig(url=replica.url, prefix=config.prefix))
    to_master = aioredis.Redis.from_url(master.url)
    to_replica = aioredis.Redis.from_url(replica.url)
    try:
        await to_replica.execute_command("REPLICAOF", "127.0.0.1", str(master.port))

        async def linked() -> bool:
            return (await to_replica.info("replication")).get("master_link_status") == "up"

        # A full sync (fork, snapshot, load): seconds on a busy machine.
        await async_until(linked, 60, what="the replica's link to its master")
        for data in (b"1", b"2"):
            told = await on_master.publish("chat:p", data, history)
        assert await to_master.execute_command("WAIT", 1, 30000) == 1  # the replica has 1 and 2
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGSTOP)  # it lags from here
        lost = await on_master.publish("chat:p", b"3", history)
        assert lost == StreamPosition(3, told.epoch)  # acknowledged by a master that fsyncs
        master.kill()
        replica.proc.send_signal(signal.SIGCONT)
        await to_replica.execute_command("REPLICAOF", "NO", "ONE")  # the failover

        await on_replica.start(lambda message: None)
        top = (await on_replica.history("chat:p", limit=0)).position
        assert top.epoch != told.epoch and top.offset == 0  # not (2, epoch): 3 would come again
        assert await on_replica.publish("chat:p", b"4", history) == StreamPosition(1, top.epoch)
    finally:
        for client in (to_master, to_replica):
            await client.aclose()
        for broker in (on_master, on_replica):
            await broker.close()
        if replica.proc is not None and replica.running:
            replica.proc.send_signal(signal.SIGCONT)
        for server in (master, replica):
            server.cleanup()


EVERYSEC = ["--appendfsync", "everysec"]


@pytest.mark.parametrize(
    ("before", "after", "continued"),
    [
        ([], [], True),  # keeps every acknowledged write: the stream goes on
        (EVERYSEC, EVERYSEC, False),  # a crash of the machine could lose the last second
        (["--rename-command", "CONFIG", ""], [], False),  # appendfsync cannot be read: cannot tell
        (["--appendonly", "no"], ["--appendonly", "no"], False),  # snapshots only (the one taken below)
        (EVERYSEC, [], False),  # the run that wrote the stream made no promise
    ],
    ids=["fsync-always", "fsync-everysec", "config-refused", "rdb-only", "everysec-then-always"],
)
async def test_a_stream_outlives_a_redis_restart_in_its_epoch_only_when_every_write_is_kept(
    before: list[str], after: list[str], continued: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``SAVE``, kill -9 and restart.  Nothing is written after the snapshot and the
    process's writes reach the append-only file either way (only a crash of the machine
    loses what was not fsynced), so every case comes back with the stream whole: what
    differs is whether Redis *promised* to keep every write, and only then is the epoch
    continued (docs/scaling.md, Rollbacks)."""
    require("redis-server")
    server = RedisServer(persistent=True, extra=before)  # append-only, fsync always, then ``before``
    server.start()
    broker = await _broker(server.url)
    history = PublishOptions(history_size=10, history_ttl=60)
    try:
        told = await broker.publish("chat:r", b"1", history)
        direct = aioredis.Redis.from_url(server.url)
        try:
            await direct.save()
        finally:
            await direct.aclose()
        server.extra = after
        server.restart()
        answers: list[StreamPosition] = []

        async def published() -> bool:
            try:
                answers.append(await broker.publish("chat:r", b"2", history))
            except BrokerUnavailableError:
                return False  # the pool has not reconnected yet
            return True

        await async_until(published, what="a publish after the restart")
        if continued:
            assert answers == [StreamPosition(2, told.epoch)]
        else:
            assert answers[0].epoch != told.epoch and answers[0].offset == 1
        refused = "refused CONFIG GET appendfsync" in caplog.text
        assert refused == ("CONFIG" in before)
    finally:
        await broker.close()
        server.cleanup()
