"""The transactional outbox against a real PostgreSQL cluster of the test's own (tests/pg.py).

The write helpers (asyncpg, psycopg 3, SQLAlchemy sync and async) insert in the
application's transaction; the table's trigger makes writers of one channel take
turns; the consumer publishes through a real node, wakes on NOTIFY, polls when a
notification is lost, reconnects, skips channels another consumer holds, keeps rows
it can never publish, and measures its lag.  The crash test with two `herald serve`
nodes is tests/integration/test_outbox_crash.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from pydantic import ValidationError

from herald import Herald
from herald.config import NamespaceOptions, Settings
from herald.exceptions import ConfigError
from herald.metrics import Metrics
from herald.node import Node
from herald.outbox import (
    OutboxConsumer,
    check_table_name,
    outbox_ddl,
    write_asyncpg,
    write_psycopg,
    write_psycopg_async,
    write_sqlalchemy,
    write_sqlalchemy_async,
)
from herald.outbox.consumer import idempotency_key

from ..helpers import ProtocolClient, ServerProcess, ThreadServer, async_wait_for
from ..pg import PostgresServer, postgres_server_fixture

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = {"orders": NamespaceOptions(history_size=10_000, history_ttl=0)}
_tables = itertools.count(1)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    yield from postgres_server_fixture()


@pytest.fixture
async def db(postgres: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres.dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def table(db: asyncpg.Connection) -> str:
    """A fresh outbox table (and an application table, ``<table>_orders``) for one test."""
    name = f"outbox_{next(_tables)}"
    await db.execute(outbox_ddl(name))
    await db.execute(f"CREATE TABLE {name}_orders (id serial PRIMARY KEY, item text NOT NULL)")
    return name


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(Settings(namespaces=NAMESPACES))
    await node.start()
    try:
        yield node
    finally:
        await node.close()


async def published(node: Node, channel: str) -> list[Any]:
    history = await node.history(channel)
    return [orjson.loads(p.data) for p in history.publications]


async def outbox_rows(db: asyncpg.Connection, table: str) -> list[tuple[str, Any, str | None]]:
    rows = await db.fetch(f"SELECT channel, data::text, failed FROM {table} ORDER BY id")
    return [(r[0], orjson.loads(r[1]), r[2]) for r in rows]


# ------------------------------------------------------------------ schema


async def test_ddl_is_idempotent_and_the_shipped_sql_file_is_the_default_table(
    db: asyncpg.Connection,
) -> None:
    sql_file = ROOT / "src" / "herald" / "outbox" / "schema.sql"
    assert sql_file.read_text() == outbox_ddl()
    await db.execute(sql_file.read_text())
    await db.execute(outbox_ddl())  # again: nothing fails, nothing doubles
    triggers = await db.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'herald_outbox'::regclass AND NOT tgisinternal"
    )
    assert triggers == 1
    # A schema-qualified table gets its own sequence, function and notify channel.
    await db.execute("CREATE SCHEMA IF NOT EXISTS app")
    await db.execute(outbox_ddl("app.events"))
    async with db.transaction():
        row_id = await write_asyncpg(db, "orders:1", {"a": 1}, table="app.events")
    assert await db.fetchval("SELECT channel FROM app.events WHERE id = $1", row_id) == "orders:1"


@pytest.mark.parametrize(
    "name", ["Herald", "1table", "a-b", "a.b.c", "x" * 41, "", "outbox; DROP TABLE x", "a. b"]
)
def test_bad_table_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid outbox table name"):
        check_table_name(name)
    with pytest.raises(ValidationError, match="outbox_table"):
        Settings(outbox_table=name)


def test_settings_refuse_a_dsn_that_is_not_postgresql_and_the_cli_hides_its_password() -> None:
    with pytest.raises(ValidationError, match="expected a postgresql://"):
        Settings(outbox="mysql://root:pw@db/app")
    assert Settings(outbox="postgres://app@db/app").outbox == "postgres://app@db/app"
    shown = subprocess.run(
        [sys.executable, "-m", "herald", "config", "--outbox", "postgresql://app:s3cret@db/app"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = orjson.loads(shown)
    assert config["outbox"] == "postgresql://app:***@db/app"
    assert "s3cret" not in shown
    refused = subprocess.run(
        [sys.executable, "-m", "herald", "serve", "--outbox", "mysql://root:s3cret@db/app"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "outbox" in refused.stderr and "postgresql://" in refused.stderr
    assert "s3cret" not in refused.stderr


# ------------------------------------------------------------------ write helpers


async def _write_with_asyncpg(dsn: str, table: str, commit: bool) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(f"INSERT INTO {table}_orders (item) VALUES ('asyncpg')")
        row_id = await write_asyncpg(connection, "orders:asyncpg", {"item": "asyncpg"}, table=table)
        await (transaction.commit() if commit else transaction.rollback())
        return row_id
    finally:
        await connection.close()


async def _write_with_psycopg(dsn: str, table: str, commit: bool) -> int:
    import psycopg

    def write() -> int:
        with psycopg.connect(dsn) as connection:
            connection.execute(f"INSERT INTO {table}_orders (item) VALUES ('psycopg')")
            row_id = write_psycopg(connection, "orders:psycopg", {"item": "psycopg"}, table=table)
            connection.commit() if commit else connection.rollback()
            return row_id

    return await asyncio.to_thread(write)


async def _write_with_psycopg_async(dsn: str, table: str, commit: bool) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        await connection.execute(f"INSERT INTO {table}_orders (item) VALUES ('psycopg_async')")
        async with connection.cursor() as cursor:
            row_id = await write_psycopg_async(
                cursor, "orders:psycopg_async", {"item": "psycopg_async"}, table=table
            )
        await (connection.commit() if commit else connection.rollback())
        return row_id


async def _write_with_sqlalchemy(dsn: str, table: str, commit: bool) -> int:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    def write() -> int:
        engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with Session(engine) as session:
                session.execute(text(f"INSERT INTO {table}_orders (item) VALUES ('sqlalchemy')"))
                row_id = write_sqlalchemy(session, "orders:sqlalchemy", {"item": "sqlalchemy"}, table=table)
                session.commit() if commit else session.rollback()
                return row_id
        finally:
            engine.dispose()

    return await asyncio.to_thread(write)


async def _write_with_sqlalchemy_async(dsn: str, table: str, commit: bool) -> int:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with AsyncSession(engine) as session:
            await session.execute(text(f"INSERT INTO {table}_orders (item) VALUES ('sqlalchemy_async')"))
            row_id = await write_sqlalchemy_async(
                session, "orders:sqlalchemy_async", {"item": "sqlalchemy_async"}, table=table
            )
            await (session.commit() if commit else session.rollback())
            return row_id
    finally:
        await engine.dispose()


WRITERS = {
    "asyncpg": _write_with_asyncpg,
    "psycopg": _write_with_psycopg,
    "psycopg_async": _write_with_psycopg_async,
    "sqlalchemy": _write_with_sqlalchemy,
    "sqlalchemy_async": _write_with_sqlalchemy_async,
}


@pytest.mark.parametrize("driver", list(WRITERS))
async def test_write_helper_commits_and_rolls_back_with_the_application_data(
    driver: str, postgres: PostgresServer, db: asyncpg.Connection, table: str
) -> None:
    write = WRITERS[driver]
    rolled_back = await write(postgres.dsn, table, False)
    assert await outbox_rows(db, table) == []
    assert await db.fetchval(f"SELECT count(*) FROM {table}_orders") == 0
    committed = await write(postgres.dsn, table, True)
    assert committed > rolled_back > 0
    assert await outbox_rows(db, table) == [(f"orders:{driver}", {"item": driver}, None)]
    assert await db.fetch(f"SELECT item FROM {table}_orders") == [(driver,)]
    assert await db.fetchval(f"SELECT id FROM {table}") == committed


async def test_write_helper_refuses_a_channel_herald_would_refuse(db: asyncpg.Connection, table: str) -> None:
    for channel in ("", "$internal", "has space", "x" * 256):
        with pytest.raises(ValueError, match="invalid outbox channel"):
            async with db.transaction():
                await write_asyncpg(db, channel, {}, table=table)
    with pytest.raises(TypeError):
        async with db.transaction():
            await write_asyncpg(db, "orders:1", {1, 2}, table=table)  # not JSON
    assert await outbox_rows(db, table) == []


async def test_writers_of_one_channel_take_turns_so_ids_follow_commit_order(
    postgres: PostgresServer, db: asyncpg.Connection, table: str
) -> None:
    first, second, other = [await asyncpg.connect(postgres.dsn) for _ in range(3)]
    try:
        # `second` starts first and writes its own data (taking a transaction id before
        # `first`), then waits for `first`, which holds the channel, to commit.
        second_tx = second.transaction()
        await second_tx.start()
        await second.execute(f"INSERT INTO {table}_orders (item) VALUES ('second')")
        first_tx = first.transaction()
        await first_tx.start()
        first_id = await write_asyncpg(first, "orders:1", {"n": "first"}, table=table)
        blocked = asyncio.create_task(write_asyncpg(second, "orders:1", {"n": "second"}, table=table))
        await async_wait_for_true(
            lambda: db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"),
            what="second writer waiting for the channel",
        )
        # Another channel is not held up.
        async with other.transaction():
            await write_asyncpg(other, "orders:2", {"n": "other"}, table=table)
        assert not blocked.done()
        await first_tx.commit()
        second_id = await asyncio.wait_for(blocked, 5)
        await second_tx.commit()
        assert second_id > first_id
    finally:
        for connection in (first, second, other):
            await connection.close()


async def async_wait_for_true(query: Any, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await query():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ the consumer


async def test_consumer_publishes_committed_rows_once_in_order_and_deletes_them(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node
) -> None:
    expected: dict[str, list[int]] = {"orders:a": [], "orders:b": [], "orders:c": []}
    n = 0
    for size, commit in [(7, True), (5, False), (20, True), (1, True), (9, False), (13, True)]:
        transaction = db.transaction()
        await transaction.start()
        batch: dict[str, list[int]] = {}
        for i in range(size):
            channel = sorted(expected)[i % 3]
            await write_asyncpg(db, channel, {"n": n}, table=table)
            batch.setdefault(channel, []).append(n)
            n += 1
        if commit:
            await transaction.commit()
            for channel, numbers in batch.items():
                expected[channel] += numbers
        else:
            await transaction.rollback()
    total = sum(len(v) for v in expected.values())
    async with OutboxConsumer(node, postgres.dsn, table=table, batch_size=4, max_channels=2) as consumer:
        await async_wait_for(lambda: consumer.rows_consumed == total, 10, what="rows consumed")
        for channel, numbers in expected.items():
            assert [d["n"] for d in await published(node, channel)] == numbers
        assert await outbox_rows(db, table) == []
        assert consumer.rows_failed == 0
    assert node.stats.publications == total


async def test_notify_wakes_the_consumer_without_waiting_for_a_poll(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node
) -> None:
    async with OutboxConsumer(node, postgres.dsn, table=table, poll_interval=60) as consumer:
        await asyncio.wait_for(consumer.listening.wait(), 10)
        await async_wait_for(lambda: consumer.pending_rows == 0 and consumer.rows_consumed == 0, 5)
        for n in range(3):
            async with db.transaction():
                await write_asyncpg(db, "orders:live", {"n": n}, table=table)
            await async_wait_for(lambda n=n: consumer.rows_consumed == n + 1, 5, what="woken by NOTIFY")
        assert [d["n"] for d in await published(node, "orders:live")] == [0, 1, 2]


async def _write_without_notify(db: asyncpg.Connection, table: str, channel: str, data: Any) -> None:
    """A row whose notification is lost: triggers off, so the row takes its id by hand."""
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        await db.execute(
            f"INSERT INTO {table} (id, channel, data) VALUES (nextval('{table}_id_seq'), $1, $2::json)",
            channel,
            orjson.dumps(data).decode(),
        )


async def test_a_lost_notification_is_made_up_by_the_poll(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node
) -> None:
    async with OutboxConsumer(node, postgres.dsn, table=table, poll_interval=60) as deaf:
        await asyncio.wait_for(deaf.listening.wait(), 10)
        await _write_without_notify(db, table, "orders:quiet", {"n": 1})
        async with OutboxConsumer(node, postgres.dsn, table=table, poll_interval=0.2) as polling:
            await async_wait_for(lambda: polling.rows_consumed == 1, 5, what="found by the poll")
        # The consumer that polls once a minute never heard of it.
        assert deaf.rows_consumed == 0
    assert [d["n"] for d in await published(node, "orders:quiet")] == [1]


async def test_rows_that_can_never_be_published_are_kept_and_marked(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node
) -> None:
    async with db.transaction():
        await write_asyncpg(db, "orders:1", {"n": 1}, table=table)
        await write_asyncpg(db, "unknown:1", {"n": 2}, table=table)
        await db.execute(f"INSERT INTO {table} (channel, data) VALUES ('$reserved', '{{}}')")
        await write_asyncpg(db, "orders:1", {"n": 3}, table=table)
    async with OutboxConsumer(node, postgres.dsn, table=table) as consumer:
        await async_wait_for(lambda: consumer.rows_consumed == 2 and consumer.rows_failed == 2, 10)
        await async_wait_for(lambda: consumer.pending_rows == 0, 5, what="failed rows are not pending")
    assert [d["n"] for d in await published(node, "orders:1")] == [1, 3]
    kept = await outbox_rows(db, table)
    assert [(channel, data) for channel, data, _ in kept] == [("unknown:1", {"n": 2}), ("$reserved", {})]
    assert "unknown namespace" in str(kept[0][2])
    assert "channel name" in str(kept[1][2])


async def test_a_channel_held_by_another_consumer_waits_and_its_lag_is_measured(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node
) -> None:
    holder = await asyncpg.connect(postgres.dsn)
    metrics = Metrics(node)
    try:
        hold = holder.transaction()
        await hold.start()
        # What a consumer busy with orders:held takes (see herald.outbox.schema).
        assert await holder.fetchval(
            f"SELECT pg_try_advisory_xact_lock(hashtext('{table}:consume'), hashtext('orders:held'))"
        )
        async with db.transaction():
            for n in range(3):
                await write_asyncpg(db, "orders:held", {"n": n}, table=table)
            await write_asyncpg(db, "orders:free", {"n": 0}, table=table)
        async with OutboxConsumer(node, postgres.dsn, table=table, poll_interval=0.2) as consumer:
            await async_wait_for(lambda: consumer.rows_consumed == 1, 5, what="the free channel")
            await async_wait_for(
                lambda: consumer.pending_rows == 3 and consumer.lag_seconds > 0.2, 5, what="lag measured"
            )
            assert await published(node, "orders:held") == []
            text = metrics.render().decode()
            assert "herald_outbox_pending_rows 3.0" in text
            assert "herald_outbox_rows_consumed_total 1.0" in text
            await hold.rollback()
            await async_wait_for(lambda: consumer.rows_consumed == 4, 5, what="the held channel, released")
            assert [d["n"] for d in await published(node, "orders:held")] == [0, 1, 2]
            await async_wait_for(lambda: consumer.pending_rows == 0 and consumer.lag_seconds == 0, 5)
            text = metrics.render().decode()
            assert "herald_outbox_rows_consumed_total 4.0" in text
            assert "herald_outbox_pending_rows 0.0" in text
            assert "herald_outbox_lag_seconds 0.0" in text
    finally:
        await holder.close()


async def test_rows_published_before_a_crash_are_not_published_again(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node
) -> None:
    async with db.transaction():
        ids = [await write_asyncpg(db, "orders:crash", {"n": n}, table=table) for n in range(5)]
    # A consumer published the first three and died before its transaction committed:
    # the rows are still in the table.
    for n, row_id in enumerate(ids[:3]):
        await node.publish_json(
            "orders:crash", orjson.dumps({"n": n}), idempotency_key=idempotency_key(table, row_id)
        )
    async with OutboxConsumer(node, postgres.dsn, table=table) as consumer:
        await async_wait_for(lambda: consumer.rows_consumed == 5, 10)
    assert [d["n"] for d in await published(node, "orders:crash")] == [0, 1, 2, 3, 4]
    assert await outbox_rows(db, table) == []


async def test_consumer_reconnects_and_catches_up(
    postgres: PostgresServer, db: asyncpg.Connection, table: str, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    async with OutboxConsumer(node, postgres.dsn, table=table, poll_interval=60) as consumer:
        await asyncio.wait_for(consumer.listening.wait(), 10)
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        await async_wait_for(lambda: "retrying" in caplog.text, 5, what="link loss noticed")
        async with db.transaction():
            await write_asyncpg(db, "orders:after", {"n": 1}, table=table)
        await async_wait_for(lambda: consumer.rows_consumed == 1, 10, what="caught up after reconnecting")
        # Listening again: the next row is woken by NOTIFY, not found by the minute's poll.
        async with db.transaction():
            await write_asyncpg(db, "orders:after", {"n": 2}, table=table)
        await async_wait_for(lambda: consumer.rows_consumed == 2, 5, what="woken after reconnecting")
    assert [d["n"] for d in await published(node, "orders:after")] == [1, 2]


async def test_a_missing_table_is_reported_and_waited_for(
    postgres: PostgresServer, db: asyncpg.Connection, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"outbox_{next(_tables)}"
    async with OutboxConsumer(node, postgres.dsn, table=name, poll_interval=0.2) as consumer:
        await async_wait_for(lambda: f"outbox table {name} does not exist" in caplog.text, 5)
        await db.execute(outbox_ddl(name))
        await asyncio.wait_for(consumer.listening.wait(), 10)
        async with db.transaction():
            await write_asyncpg(db, "orders:late", {"n": 1}, table=name)
        await async_wait_for(lambda: consumer.rows_consumed == 1, 5)


async def test_herald_with_outbox_setting_consumes_during_its_lifespan(
    postgres: PostgresServer, db: asyncpg.Connection, table: str
) -> None:
    herald = Herald(Settings(outbox=postgres.dsn, outbox_table=table, namespaces=NAMESPACES))
    async with herald.lifespan():
        async with db.transaction():
            await db.execute(f"INSERT INTO {table}_orders (item) VALUES ('book')")
            await write_asyncpg(db, "orders:life", {"item": "book"}, table=table)
        await async_wait_for_true(
            lambda: db.fetchval(f"SELECT count(*) = 0 FROM {table}"), what="row consumed"
        )
        assert await published(herald.node, "orders:life") == [{"item": "book"}]
    # Stopped with the app: a row written now stays.
    async with db.transaction():
        await write_asyncpg(db, "orders:life", {"item": "after"}, table=table)
    assert len(await outbox_rows(db, table)) == 1


def test_consumer_needs_a_postgresql_dsn() -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        OutboxConsumer(Node(), "redis://localhost")


# ------------------------------------------------------------------ the documented example


def _doc_block(start: str) -> str:
    """The code block of docs/backends.md whose first line is ``start``."""
    text = (ROOT / "docs" / "backends.md").read_text()
    bodies = [part.split("\n", 1)[-1] for part in text.split("```")[1::2]]
    found = [body for body in bodies if body.startswith(start)]
    assert len(found) == 1, f"docs/backends.md has no single block starting {start!r}"
    return found[0]


async def test_the_documented_example_publishes_committed_orders_only(
    postgres: PostgresServer, db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.execute("DROP DATABASE IF EXISTS shop")
    await db.execute("CREATE DATABASE shop")
    dsn = postgres.dsn.rsplit("/", 1)[0] + "/shop"
    shop = await asyncpg.connect(dsn)
    try:
        await shop.execute(_doc_block("-- schema.sql"))
        await shop.execute(outbox_ddl())
    finally:
        await shop.close()
    (tmp_path / "app.py").write_text(_doc_block("# app.py"))
    monkeypatch.setenv("DATABASE_URL", dsn)
    spec = importlib.util.spec_from_file_location("outbox_example_app", tmp_path / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    herald_env = {
        "HERALD_OUTBOX": dsn,
        "HERALD_NAMESPACES": json.dumps({"orders": {"history_size": 100, "history_ttl": 3600}}),
        "HERALD_DEMOS": "false",
    }
    herald = await asyncio.to_thread(ServerProcess(env=herald_env).start)
    app = await asyncio.to_thread(ThreadServer(module.app).start)
    try:
        follower = await ProtocolClient.open(herald.ws("/connect"))
        reply = await follower.call("subscribe", channels=[{"channel": "orders:7"}])
        assert "error" not in reply["result"]["channels"][0], reply
        async with httpx.AsyncClient(base_url=app.http) as http:
            first = await http.post("/orders", json={"customer_id": 7, "item": "book", "quantity": 2})
            assert (first.status_code, first.json()) == (201, {"id": 1})
            push = await follower.push("publication", timeout=10)
            assert push["data"] == {"event": "created", "order": 1, "item": "book", "quantity": 2}
            refused = await http.post("/orders", json={"customer_id": 7, "item": "book", "quantity": 2})
            assert (refused.status_code, refused.json()) == (409, {"detail": "not enough book in stock"})
            third = await http.post("/orders", json={"customer_id": 7, "item": "pen", "quantity": 1})
            assert third.status_code == 201
            push = await follower.push("publication", timeout=10)
        # The refused order (id 2) was rolled back with its notification: the next one is 3.
        assert push["data"]["order"] == third.json()["id"] == 3
        assert push["offset"] == 2
        await follower.close()
    finally:
        await asyncio.to_thread(app.stop)
        await asyncio.to_thread(herald.stop)
