"""The Redis broker's batching: script calls of one moment go out as one pipeline
(:mod:`herald.brokers.redis_batch`), subscribes of one turn as one SUBSCRIBE.

Real redis-server.  Batches are counted by the batcher itself (``batches``,
``largest``) and subscribes by Redis (``INFO commandstats``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from herald.brokers import redis_batch
from herald.brokers.base import ClientInfo, PresenceEvent, Publication, PublishOptions, StreamPosition
from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.brokers.redis_batch import ScriptBatcher
from herald.exceptions import BrokerError, BrokerUnavailableError

from ..helpers import async_until, async_wait_for
from ..servers import RedisServer, redis_server_fixture

pytestmark = pytest.mark.redis

OPTIONS = PublishOptions(history_size=100, history_ttl=60)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture
async def broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(RedisBrokerConfig(url=redis_server.url, prefix=f"b{secrets.token_hex(4)}"))
    await b.start(lambda message: None)
    await b.history("warm-up", limit=0)  # the first script call has Redis's run checked
    yield b
    await b.close()


async def _commands(url: str, name: str) -> int:
    admin = aioredis.Redis.from_url(url)
    try:
        stats = await admin.info("commandstats")
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
    finally:
        await admin.aclose()


async def test_calls_of_one_moment_share_one_pipeline_in_call_order(broker: RedisBroker) -> None:
    before = broker._batcher.batches
    positions = await asyncio.gather(*(broker.publish("room", b'{"n":%d}' % i, OPTIONS) for i in range(50)))
    # In the order the calls were made: offsets 1..50 (one channel, one pipeline).
    assert [p.offset for p in positions] == list(range(1, 51))
    assert broker._batcher.batches - before == 1
    history = await broker.history("room")
    assert [p.data for p in history.publications] == [b'{"n":%d}' % i for i in range(50)]


async def test_batches_are_bounded_and_keep_each_channels_order(broker: RedisBroker) -> None:
    broker._batcher.max_batch = 4
    before = broker._batcher.batches
    calls = [broker.publish(f"ch{i % 3}", b"%d" % i, OPTIONS) for i in range(30)]
    positions = await asyncio.gather(*calls)
    assert broker._batcher.batches - before == 8  # ceil(30 / 4)
    assert broker._batcher.largest == 4
    for channel in range(3):
        # Each channel's publications got increasing offsets in the order they were made.
        assert [positions[i].offset for i in range(channel, 30, 3)] == list(range(1, 11))


async def test_a_failing_call_fails_only_its_caller(broker: RedisBroker, redis_server: RedisServer) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.set(broker.meta_key("broken"), "not a hash")  # the script meets WRONGTYPE
    finally:
        await admin.aclose()
    before = broker._batcher.batches
    results = await asyncio.gather(
        broker.publish("fine", b"1", OPTIONS),
        broker.publish("broken", b"x", OPTIONS),
        broker.publish("fine", b"2", OPTIONS),
        broker.history("fine", limit=0),
        return_exceptions=True,
    )
    assert broker._batcher.batches - before == 1
    assert isinstance(results[1], BrokerError) and not isinstance(results[1], BrokerUnavailableError)
    assert "WRONGTYPE" in str(results[1])
    assert results[0] == StreamPosition(1, results[0].epoch)  # type: ignore[union-attr]
    assert results[2] == StreamPosition(2, results[0].epoch)  # type: ignore[union-attr]
    assert results[3].position == StreamPosition(2, results[0].epoch)  # type: ignore[union-attr]


async def test_scripts_flushed_from_redis_are_loaded_again(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    await broker.publish("a", b"1", OPTIONS)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    positions = await asyncio.gather(*(broker.publish("a", b"%d" % i, OPTIONS) for i in range(2, 6)))
    assert [p.offset for p in positions] == [2, 3, 4, 5]
    assert (await broker.history("a", limit=0)).position.offset == 5


async def test_a_redis_restart_mid_batch_fails_each_caller_as_unavailable() -> None:
    server = RedisServer()
    server.start()
    broker = RedisBroker(RedisBrokerConfig(url=server.url, prefix="restart", command_timeout=10))
    try:
        await broker.start(lambda message: None)
        epoch = (await broker.publish("r", b"0", OPTIONS)).epoch
        admin = aioredis.Redis.from_url(server.url)
        try:
            # Redis holds every client's commands: the batch is sent and waits for replies.
            await admin.execute_command("CLIENT", "PAUSE", "20000", "ALL")
        finally:
            await admin.aclose()
        before = broker._batcher.batches
        calls = [asyncio.ensure_future(broker.publish("r", b"%d" % i, OPTIONS)) for i in range(1, 6)]
        calls.append(asyncio.ensure_future(broker.history("r", limit=0)))
        await async_wait_for(lambda: broker._batcher.batches > before, what="the batch sent")
        assert not any(call.done() for call in calls)
        server.kill()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(r, BrokerUnavailableError) for r in results), results
        # Redis back (empty, no scripts): the next calls work again.
        server.start()
        position = await broker.publish("r", b"after", OPTIONS)
        assert position.offset == 1 and position.epoch != epoch
    finally:
        await broker.close()
        server.cleanup()


async def test_a_caller_cancelled_before_the_send_is_left_out(broker: RedisBroker) -> None:
    first = asyncio.ensure_future(broker.publish("c", b"1", OPTIONS))
    second = asyncio.ensure_future(broker.publish("c", b"2", OPTIONS))
    await asyncio.sleep(0)  # both queued, not sent yet
    first.cancel()
    assert (await second).offset == 1
    assert [p.data for p in (await broker.history("c")).publications] == [b"2"]


async def test_closing_fails_calls_not_sent(redis_server: RedisServer) -> None:
    broker = RedisBroker(RedisBrokerConfig(url=redis_server.url, prefix=f"b{secrets.token_hex(4)}"))
    await broker.start(lambda message: None)
    call = asyncio.ensure_future(broker.publish("x", b"1", OPTIONS))
    await asyncio.sleep(0)
    await broker.close()
    with pytest.raises(BrokerUnavailableError):
        await call


async def test_subscribes_of_one_turn_go_in_one_command(redis_server: RedisServer) -> None:
    received: list[Publication] = []
    broker = RedisBroker(RedisBrokerConfig(url=redis_server.url, prefix=f"b{secrets.token_hex(4)}"))
    await broker.start(lambda m: received.append(m) if isinstance(m, Publication) else None)
    try:
        names = [f"s{i}" for i in range(20)]
        await broker.publish("s3", b"before", OPTIONS)
        await async_wait_for(lambda: broker.connected, what="the link up")
        before = await _commands(redis_server.url, "subscribe")
        await asyncio.gather(*(broker.subscribe(n) for n in names))
        assert await _commands(redis_server.url, "subscribe") - before == 1
        # Positions were read after the confirmation: what follows is delivered, what
        # came before is not.
        await asyncio.gather(*(broker.publish(n, b"after", OPTIONS) for n in names))
        await async_wait_for(lambda: len(received) == 20, what="20 deliveries")
        assert sorted(m.channel for m in received) == sorted(names)
        assert {m.channel: m.offset for m in received}["s3"] == 2
    finally:
        await broker.close()


async def test_events_and_publications_keep_their_order(redis_server: RedisServer) -> None:
    received: list[Publication | PresenceEvent] = []
    broker = RedisBroker(RedisBrokerConfig(url=redis_server.url, prefix=f"b{secrets.token_hex(4)}"))
    await broker.start(lambda m: received.append(m) if isinstance(m, Publication | PresenceEvent) else None)
    try:
        await broker.subscribe("ev")
        before = broker._batcher.batches
        join = PresenceEvent("ev", "join", ClientInfo("c1", "u1"))
        await asyncio.gather(
            broker.publish("ev", b"1", OPTIONS),
            broker.publish_event(join),
            broker.publish("ev", b"2", OPTIONS),
        )
        assert broker._batcher.batches - before == 1
        await async_wait_for(lambda: len(received) == 3, what="3 messages")
        assert [m.data if isinstance(m, Publication) else m.kind for m in received] == [b"1", "join", b"2"]
    finally:
        await broker.close()


async def _client_ids(url: str) -> set[int]:
    admin = aioredis.Redis.from_url(url)
    try:
        return {int(c["id"]) for c in await admin.client_list()}
    finally:
        await admin.aclose()


async def test_batches_share_one_connection_of_their_own(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    batcher = broker._batcher
    pool = broker.client.connection_pool
    first = await batcher.execute("CLIENT", "ID")
    # Every batch goes on it, and it is none of the pool's (no checkout per batch).
    assert [await batcher.execute("CLIENT", "ID") for _ in range(3)] == [first] * 3
    assert not pool._in_use_connections
    assert (await broker.client.ping()) is True  # other commands use the pool
    assert not pool._in_use_connections
    assert first in await _client_ids(redis_server.url)
    # No socket timeout of its own (redis-py would wrap each send in a task): the batch's
    # deadline is the pool's socket timeout.
    used_pool, connection = await batcher._connection()
    assert used_pool is pool and connection.socket_timeout is None
    assert pool.connection_kwargs["socket_timeout"] == broker.config.command_timeout


async def test_a_batch_that_outlives_the_socket_timeout_fails_and_the_next_one_works(
    redis_server: RedisServer,
) -> None:
    broker = RedisBroker(
        RedisBrokerConfig(url=redis_server.url, prefix=f"b{secrets.token_hex(4)}", command_timeout=0.3)
    )
    await broker.start(lambda message: None)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.publish("slow", b"0", OPTIONS)
        # Redis holds the batch's replies past the deadline.
        await admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        with pytest.raises((BrokerUnavailableError, BrokerError)):
            await asyncio.wait_for(broker.publish("slow", b"1", OPTIONS), 0.9)
        await admin.execute_command("CLIENT", "UNPAUSE")
        # The timed-out connection was dropped (its reply could reach the next batch):
        # the next batch reads its own reply.
        assert (await broker.history("slow", limit=0)).position.offset in (1, 2)
        position = await broker.publish("slow", b"2", OPTIONS)
        assert position.offset == (await broker.history("slow", limit=0)).position.offset
    finally:
        await admin.aclose()
        await broker.close()


async def test_the_batches_connection_follows_the_client_and_closes(redis_server: RedisServer) -> None:
    clients = [aioredis.Redis.from_url(redis_server.url), aioredis.Redis.from_url(redis_server.url)]
    current = [clients[0]]
    batcher = ScriptBatcher(lambda: current[0])
    try:
        first = await batcher.execute("CLIENT", "ID")
        # The client was replaced: the next batch goes on a connection made like the new
        # client's, and the old one is closed.
        current[0] = clients[1]
        second = await batcher.execute("CLIENT", "ID")
        assert second != first

        async def gone(client_id: int) -> bool:
            return client_id not in await _client_ids(redis_server.url)

        await async_until(lambda: gone(first), what="the first connection closed")
        assert second in await _client_ids(redis_server.url)
        await batcher.close()
        await async_until(lambda: gone(second), what="the batches' connection closed")
    finally:
        for client in clients:
            await client.aclose()


async def test_a_batch_after_the_kept_connection_dropped_reconnects(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    batcher = broker._batcher
    first = await batcher.execute("CLIENT", "ID")
    _, connection = await batcher._connection()
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.client_kill_filter(_id=first)
    finally:
        await admin.aclose()
    # Until the node has read the end of the stream (a batch sent before that would fail:
    # nothing is sent twice).
    await async_until(connection.can_read, what="the kill seen")
    # Closed by Redis while idle: the next batch sees it closed and connects again first.
    position = await broker.publish("after-kill", b"1", OPTIONS)
    assert position.offset == 1
    assert await batcher.execute("CLIENT", "ID") != first


class ReplyCutter:
    """A TCP proxy to Redis that, once armed, cuts the first connection that sends an
    ``EVALSHA`` as soon as Redis answers it: the script ran, its reply is lost."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.cut = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        doomed = asyncio.Event()

        async def up() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"EVALSHA" in data:
                    self.armed = False
                    doomed.set()
                upstream_w.write(data)
                await upstream_w.drain()

        async def down() -> None:
            while data := await upstream_r.read(65536):
                if doomed.is_set():
                    self.cut += 1
                    break
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        client_w.close()
        upstream_w.close()


async def test_a_batch_whose_reply_was_lost_is_not_sent_again(redis_server: RedisServer) -> None:
    proxy = ReplyCutter(redis_server.port)
    await proxy.start()
    prefix = f"b{secrets.token_hex(4)}"
    broker = RedisBroker(RedisBrokerConfig(url=f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix))
    await broker.start(lambda message: None)
    direct = RedisBroker(RedisBrokerConfig(url=redis_server.url, prefix=prefix))
    await direct.start(lambda message: None)
    try:
        assert (await broker.publish("cut", b"0", OPTIONS)).offset == 1
        proxy.armed = True
        # Redis ran the script; the node cannot know: it must fail the call, not publish
        # it a second time behind the caller's back.
        with pytest.raises(BrokerUnavailableError):
            await broker.publish("cut", b"1", OPTIONS)
        assert proxy.cut == 1
        history = await direct.history("cut")
        assert [p.data for p in history.publications] == [b"0", b"1"]
        # The next batch goes on a new connection and works.
        assert (await broker.publish("cut", b"2", OPTIONS)).offset == 3
    finally:
        await broker.close()
        await direct.close()
        await proxy.close()


def test_commands_are_packed_in_the_redis_protocol_with_or_without_hiredis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ("EVALSHA", "é", 3, b"\x00\r\n", memoryview(b"mv"), 1.5)
    expected = (
        b"*6\r\n$7\r\nEVALSHA\r\n$2\r\n\xc3\xa9\r\n$1\r\n3\r\n$3\r\n\x00\r\n\r\n$2\r\nmv\r\n$3\r\n1.5\r\n"
    )
    assert redis_batch._pack(args) == expected
    # What hiredis refuses goes through the Python packer, as it did before hiredis.
    assert redis_batch._pack(("SET", True)) == b"*2\r\n$3\r\nSET\r\n$4\r\nTrue\r\n"
    monkeypatch.setattr(redis_batch, "_c_pack", None)
    assert redis_batch._pack(args) == expected


def test_batch_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        ScriptBatcher(lambda: aioredis.Redis(), max_batch=0)
