"""Transactional outbox on PostgreSQL (docs/backends.md).

An application writes a publication into the outbox table in the same database
transaction as its own data (:mod:`herald.outbox.writers`: asyncpg, psycopg 3,
SQLAlchemy); a consumer (:class:`OutboxConsumer`, run by ``herald serve --outbox``)
publishes each committed row exactly once, in commit order per channel.  The table's
SQL is :func:`outbox_ddl` (``schema.sql`` beside this file for the default table).

Importing this package loads no database driver: the consumer (asyncpg) is loaded
when first named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .schema import DEFAULT_TABLE, check_table_name, outbox_ddl
from .writers import (
    write_asyncpg,
    write_psycopg,
    write_psycopg_async,
    write_sqlalchemy,
    write_sqlalchemy_async,
)

if TYPE_CHECKING:
    from .consumer import OutboxConsumer


def __getattr__(name: str) -> Any:
    # The consumer imports the node (and so the server side): only when asked for.
    if name == "OutboxConsumer":
        from .consumer import OutboxConsumer

        return OutboxConsumer
    raise AttributeError(name)


__all__ = [
    "DEFAULT_TABLE",
    "OutboxConsumer",
    "check_table_name",
    "outbox_ddl",
    "write_asyncpg",
    "write_psycopg",
    "write_psycopg_async",
    "write_sqlalchemy",
    "write_sqlalchemy_async",
]
