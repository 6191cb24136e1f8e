"""Write a publication into the outbox, inside the application's own transaction.

One function per driver; each inserts one row ``(channel, data)`` through the
connection (or session) the application is already using, so the row commits or
rolls back with the application's data, and returns the row's id.  None of them
commits: the application's transaction does.  No driver is imported here until its
function is called (SQLAlchemy's ``text`` only), so ``herald.outbox`` loads without any.

``data`` is any JSON value, encoded with orjson.  The channel's syntax is checked
here (a bad name fails at write time, in the application); whether its namespace is
configured is Herald's to know: a row it cannot publish is kept and marked
``failed`` (docs/backends.md).

The insert takes the channel's write lock until the transaction ends (see
:mod:`herald.outbox.schema`): write the outbox row late in a long transaction, and
when one transaction writes several channels, write them in a fixed order (sorted by
name) so that two such transactions cannot deadlock.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..exceptions import CommandError
from ..protocol.channels import validate_channel
from .schema import DEFAULT_TABLE, insert_sql


def _row(channel: str, data: Any) -> tuple[str, str]:
    """The row's (channel, JSON text); ``ValueError`` for a channel Herald would refuse."""
    try:
        validate_channel(channel)
    except CommandError as exc:
        raise ValueError(f"invalid outbox channel {channel!r}: {exc.message}") from None
    return channel, orjson.dumps(data).decode()


async def write_asyncpg(connection: Any, channel: str, data: Any, *, table: str = DEFAULT_TABLE) -> int:
    """Insert through an ``asyncpg.Connection`` (inside ``async with connection.transaction():``)."""
    row = _row(channel, data)
    return int(await connection.fetchval(insert_sql(table, ("$1", "$2")), *row))


def write_psycopg(connection: Any, channel: str, data: Any, *, table: str = DEFAULT_TABLE) -> int:
    """Insert through a psycopg 3 ``Connection`` or ``Cursor`` (inside ``with conn.transaction():``,
    or before ``conn.commit()``)."""
    row = _row(channel, data)
    result = connection.execute(insert_sql(table, ("%s", "%s")), row).fetchone()
    return int(result[0])


async def write_psycopg_async(connection: Any, channel: str, data: Any, *, table: str = DEFAULT_TABLE) -> int:
    """Insert through a psycopg 3 ``AsyncConnection`` or ``AsyncCursor``."""
    row = _row(channel, data)
    cursor = await connection.execute(insert_sql(table, ("%s", "%s")), row)
    result = await cursor.fetchone()
    return int(result[0])


def _sqlalchemy_statement(table: str) -> Any:
    from sqlalchemy import text

    return text(insert_sql(table, (":channel", ":data")))


def write_sqlalchemy(session: Any, channel: str, data: Any, *, table: str = DEFAULT_TABLE) -> int:
    """Insert through a SQLAlchemy ``Session`` or ``Connection`` (in its current transaction)."""
    name, text = _row(channel, data)
    result = session.execute(_sqlalchemy_statement(table), {"channel": name, "data": text})
    return int(result.scalar_one())


async def write_sqlalchemy_async(session: Any, channel: str, data: Any, *, table: str = DEFAULT_TABLE) -> int:
    """Insert through a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``."""
    name, text = _row(channel, data)
    result = await session.execute(_sqlalchemy_statement(table), {"channel": name, "data": text})
    return int(result.scalar_one())


__all__ = [
    "write_asyncpg",
    "write_psycopg",
    "write_psycopg_async",
    "write_sqlalchemy",
    "write_sqlalchemy_async",
]
