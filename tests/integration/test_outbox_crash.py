"""The outbox's promise under fire: two `herald serve` nodes on one Redis consume one table
while writers commit (and roll back) 10,000 rows, and one node is killed -9 and
restarted twice: once after publishing a batch and before committing it (the other node
must publish those rows again, recognised by their keys), once at a random point of a
batch.  Every committed row is published exactly once, each channel in commit order, and
no rolled-back row ever is.

How the test knows the commit order: each writing transaction, after its outbox rows,
bumps a per-channel counter row (``UPDATE ... RETURNING n``).  The counter's row lock
is held until the transaction ends, so transactions that wrote a channel got its
numbers 1, 2, 3, ... in the order they committed, and a rolled-back one gave its
number back.  Each transaction also writes its own data first, so it takes a
transaction id (and a sequence position) before it knows when it will commit: an
outbox that ordered by either would fail here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from herald.brokers.redis import RedisBroker, RedisBrokerConfig
from herald.outbox import outbox_ddl, write_asyncpg

from ..helpers import ProtocolClient, ServerProcess, http_get
from ..pg import PostgresServer, postgres_server_fixture
from ..servers import RedisServer, redis_server_fixture

TABLE = "herald_outbox"
CHANNELS = [f"orders:{n}" for n in range(6)]
ROWS = 10_000
WRITERS = 4
ROLLBACK_RATE = 0.15
NAMESPACES = json.dumps({"": {}, "orders": {"history_size": 100_000, "history_ttl": 0, "presence": False}})


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_fixture()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    yield from postgres_server_fixture()


class Writers:
    """Application writers: random-sized transactions over random channels, some rolled back.

    Records what they did: the rows of each committed transaction, and the rolled-back
    transactions.  ``pause()`` lets every transaction in progress end and starts no new
    one until ``resume()``.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.committed: dict[int, list[tuple[str, int]]] = {}
        self.rolled_back: set[int] = set()
        self.committed_rows = 0
        self.rolled_back_rows = 0
        self._tags = itertools.count(1)
        self._go = asyncio.Event()
        self._go.set()
        self._idle = 0
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, count: int) -> None:
        self._tasks = [asyncio.create_task(self._write()) for _ in range(count)]

    def check(self) -> None:
        failed = [task.exception() for task in self._tasks if task.done()]
        assert not failed, failed

    async def pause(self) -> None:
        self._go.clear()
        while self._idle < len(self._tasks):
            self.check()
            await asyncio.sleep(0.01)

    def resume(self) -> None:
        self._go.set()

    async def stop(self) -> None:
        self._stop = True
        self._go.set()
        await asyncio.gather(*self._tasks)

    async def _write(self) -> None:
        rng = random.Random()
        connection = await asyncpg.connect(self.dsn)
        try:
            while True:
                if not self._go.is_set():
                    self._idle += 1
                    await self._go.wait()
                    self._idle -= 1
                if self._stop:
                    return
                await self._transaction(connection, rng)
        finally:
            await connection.close()

    async def _transaction(self, connection: asyncpg.Connection, rng: random.Random) -> None:
        tag = next(self._tags)
        size = rng.randint(1, 30)
        # Sorted by channel (stable): two transactions lock their channels in the same
        # order, so they cannot deadlock (docs/backends.md).
        rows = sorted(((rng.choice(CHANNELS), i) for i in range(size)), key=lambda r: r[0])
        transaction = connection.transaction()
        await transaction.start()
        try:
            # The application's own data first: the transaction takes its id now.
            await connection.execute("INSERT INTO app_orders (txn) VALUES ($1)", tag)
            for channel, i in rows:
                await write_asyncpg(connection, channel, {"txn": tag, "i": i}, table=TABLE)
            for channel in sorted({channel for channel, _ in rows}):
                n = await connection.fetchval(
                    "UPDATE commit_order SET n = n + 1 WHERE channel = $1 RETURNING n", channel
                )
                await connection.execute(
                    "INSERT INTO commits (channel, n, txn) VALUES ($1, $2, $3)", channel, n, tag
                )
            if rng.random() < 0.1:
                await connection.execute("SELECT pg_sleep(0.005)")  # hold the channels a while
        except BaseException:
            await transaction.rollback()
            raise
        await self._end(transaction, tag, rows, rng.random() >= ROLLBACK_RATE)

    async def _end(self, transaction: Any, tag: int, rows: list[tuple[str, int]], commit: bool) -> None:
        if commit:
            await transaction.commit()
            self.committed[tag] = rows
            self.committed_rows += len(rows)
        else:
            await transaction.rollback()
            self.rolled_back.add(tag)
            self.rolled_back_rows += len(rows)


def metrics(server: ServerProcess) -> dict[str, float]:
    """The node's /metrics, by series (name with labels)."""
    status, body = http_get(server.http + "/metrics")
    assert status == 200
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line and not line.startswith("#")
    }


def recognised_repeats(server: ServerProcess) -> float:
    """Rows this node published that a killed node had published already: consumed rows
    the broker recognised by their idempotency key (consumed, yet no new publication)."""
    values = metrics(server)
    return values["herald_outbox_rows_consumed_total"] - values.get(
        'herald_publications_total{namespace="orders"}', 0.0
    )


async def in_batch(db: asyncpg.Connection, server: ServerProcess) -> bool:
    """Whether ``server``'s consumer is inside a batch, between two statements of its
    transaction: that is while it publishes."""
    assert server.proc is not None
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity "
            "WHERE state = 'idle in transaction' AND application_name = $1)",
            f"herald-outbox pid={server.proc.pid}",
        )
    )


#: The advisory lock the test's trigger makes every delete from the outbox wait on.
HOLD_DELETES = 4242


async def hold_deletes_trigger(db: asyncpg.Connection) -> None:
    """A statement trigger on the outbox: a delete waits while the test holds HOLD_DELETES."""
    await db.execute(
        "CREATE FUNCTION hold_deletes() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({HOLD_DELETES}); RETURN NULL; END $$"
    )
    await db.execute(
        f"CREATE TRIGGER hold_deletes BEFORE DELETE ON {TABLE} FOR EACH STATEMENT EXECUTE FUNCTION hold_deletes()"
    )


async def kill_between_publish_and_commit(
    db: asyncpg.Connection, server: ServerProcess, other: ServerProcess, writers: Writers
) -> None:
    """Kill ``server`` -9 while its consumer waits to delete rows it has just published.

    The consumer deletes a batch's rows only after publishing them, in the batch's
    transaction: with the deletes held, the first batch of ``server`` that reaches its
    delete has published everything and committed nothing.  Killed there, its
    transaction is rolled back once the delete is let go (PostgreSQL then finds the
    client gone), and its rows go to the other consumer.

    When ``other`` reaches a delete first it holds the channels of its batch (all of
    them, often), so ``server`` may claim none: that batch is let through (the lock is
    given back and taken again, which waits for its commit) and the wait goes on.
    """
    assert server.proc is not None and other.proc is not None
    victim, bystander = f"herald-outbox pid={server.proc.pid}", f"herald-outbox pid={other.proc.pid}"
    await db.execute("SELECT pg_advisory_lock($1)", HOLD_DELETES)
    try:
        deadline = time.monotonic() + 60  # a liveness bound: seconds on a busy machine
        while victim not in (waiting := await waiting_at_delete(db)):
            assert time.monotonic() < deadline, "the node to kill never reached a delete"
            writers.check()
            if bystander in waiting:
                await db.execute("SELECT pg_advisory_unlock($1)", HOLD_DELETES)
                await db.execute("SELECT pg_advisory_lock($1)", HOLD_DELETES)
            else:
                await asyncio.sleep(0.005)
        server.kill()
    finally:
        await db.execute("SELECT pg_advisory_unlock($1)", HOLD_DELETES)


async def waiting_at_delete(db: asyncpg.Connection) -> set[str]:
    """The application names of the sessions waiting on an advisory lock: a consumer
    waits there only at its delete (HOLD_DELETES); writers that wait on each other's
    channel locks have names of their own."""
    rows = await db.fetch(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
    )
    return {row["application_name"] for row in rows}


async def drained(db: asyncpg.Connection, timeout: float = 30) -> None:
    """Wait until every committed outbox row has been consumed."""
    deadline = time.monotonic() + timeout
    while await db.fetchval(f"SELECT count(*) FROM {TABLE}"):
        assert time.monotonic() < deadline, "the outbox did not drain"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def node(env: dict[str, str]) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(env=env)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.redis
@pytest.mark.slow
async def test_two_nodes_publish_every_committed_row_once_in_commit_order_despite_kill_9(
    redis_server: RedisServer, postgres: PostgresServer
) -> None:
    db = await asyncpg.connect(postgres.dsn)
    await db.execute(outbox_ddl(TABLE))
    await db.execute("CREATE TABLE app_orders (id serial PRIMARY KEY, txn int NOT NULL)")
    await db.execute("CREATE TABLE commit_order (channel text PRIMARY KEY, n int NOT NULL)")
    await db.execute("CREATE TABLE commits (channel text, n int, txn int, PRIMARY KEY (channel, n))")
    await db.executemany("INSERT INTO commit_order VALUES ($1, 0)", [(c,) for c in CHANNELS])
    await hold_deletes_trigger(db)
    env = {
        "HERALD_BROKER": redis_server.url,
        "HERALD_OUTBOX": postgres.dsn,
        "HERALD_OUTBOX_TABLE": TABLE,
        "HERALD_NAMESPACES": NAMESPACES,
        "HERALD_DEMOS": "false",
    }
    writers = Writers(postgres.dsn)
    started = time.monotonic()
    first = ServerProcess(env=env)
    await asyncio.to_thread(first.start)
    restarts: list[ServerProcess] = []
    try:
        async with node(env) as second:
            # A live subscriber on the node that stays up sees the same order as history.
            watcher = await ProtocolClient.open(second.ws("/connect"))
            reply = await watcher.call("subscribe", channels=[{"channel": CHANNELS[0]}])
            assert "error" not in reply["result"]["channels"][0], reply
            writers.start(WRITERS)

            # 1. Kill a consuming node -9 after it published a batch and before it
            # deleted those rows (its delete waits on a lock the test holds): the other
            # node takes the rows over and publishes them again, and the broker recognises
            # every one by its key (no second publication).
            while writers.committed_rows < ROWS * 0.1:
                writers.check()
                await asyncio.sleep(0.02)
            await kill_between_publish_and_commit(db, first, second, writers)
            await writers.pause()
            await drained(db)
            repeats = 0.0
            deadline = time.monotonic() + 5
            while repeats <= 0 and time.monotonic() < deadline:
                repeats = recognised_repeats(second)
                await asyncio.sleep(0.05)
            assert repeats > 0, "the survivor published the killed node's rows again, or did not take them"
            # 2. Restart it, and kill it again at a random point of a batch (while it
            # publishes: some of the batch's rows may be out, others not).
            victim = ServerProcess(env=env)
            restarts.append(victim)
            await asyncio.to_thread(victim.start)
            writers.resume()
            while writers.committed_rows < ROWS * 0.3:
                writers.check()
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 20
            while not await in_batch(db, victim):
                assert time.monotonic() < deadline, "the node to kill never consumed"
                writers.check()
                await asyncio.sleep(0.002)
            victim.kill()
            restarts.append(ServerProcess(env=env))
            await asyncio.to_thread(restarts[-1].start)

            while writers.committed_rows < ROWS:
                writers.check()
                await asyncio.sleep(0.05)
            await writers.stop()
            await drained(db)
            assert metrics(second)["herald_outbox_rows_failed_total"] == 0
            deadline = time.monotonic() + 5
            while metrics(second)["herald_outbox_pending_rows"] != 0:
                assert time.monotonic() < deadline, "pending rows still reported"
                await asyncio.sleep(0.1)

            # The truth: each channel's committed transactions in commit order.
            expected: dict[str, list[tuple[int, int]]] = {c: [] for c in CHANNELS}
            for channel, _, tag in await db.fetch("SELECT channel, n, txn FROM commits ORDER BY channel, n"):
                expected[channel] += [(tag, i) for c, i in writers.committed[tag] if c == channel]
            assert sum(len(rows) for rows in expected.values()) == writers.committed_rows >= ROWS
            assert writers.rolled_back_rows > 0

            broker = RedisBroker(RedisBrokerConfig.from_url(redis_server.url))
            await broker.start(lambda message: None)
            try:
                for channel in CHANNELS:
                    history = await broker.history(channel)
                    offsets = [p.offset for p in history.publications]
                    assert offsets == list(range(1, len(offsets) + 1))
                    got = [(d["txn"], d["i"]) for d in (orjson.loads(p.data) for p in history.publications)]
                    assert not {tag for tag, _ in got} & writers.rolled_back, (
                        "a rolled-back row was published"
                    )
                    assert len(got) == len(set(got)), f"{channel}: a row was published twice"
                    assert got == expected[channel], f"{channel}: not every row once, in commit order"
            finally:
                await broker.close()

            live: list[tuple[int, int]] = []
            while len(live) < len(expected[CHANNELS[0]]):
                frame = await watcher.push("publication", timeout=10)
                live.append((frame["data"]["txn"], frame["data"]["i"]))
            assert live == expected[CHANNELS[0]]
            await watcher.close()
    finally:
        first.kill()
        for restarted in restarts:
            await asyncio.to_thread(restarted.stop)
        await db.close()
    assert time.monotonic() - started < 90
