"""The outbox table: its DDL and every SQL statement Herald runs on it.

Pure: text only, no driver.  One table name gives every other name (sequence,
trigger function, index, the NOTIFY channel, the advisory-lock keys), so two
outbox tables in one database never share a lock or a notification.

How commit order per channel is kept (docs/backends.md explains it for users):

* **Writers of one channel take turns.**  The ``BEFORE INSERT`` trigger takes
  ``pg_advisory_xact_lock(hashtext('<table>:write'), hashtext(channel))``, held
  until the writing transaction ends, and only then draws the row's ``id`` from
  the sequence.  So within a channel, a transaction that commits first has the
  smaller ids.  A sequence alone does not give that: a transaction may draw its id
  first and commit last (ids, like transaction ids, are taken in start order, not
  commit order).
* **Consumers of one channel take turns.**  A consumer claims whole channels with
  ``pg_try_advisory_xact_lock(hashtext('<table>:consume'), hashtext(channel))`` (a
  channel another consumer holds is skipped: ``SKIP LOCKED`` at the level of the
  channel), then reads the claimed channels' oldest rows in ``id`` order with a
  fresh snapshot, publishes them and deletes them in the same transaction.  Row-level
  ``SKIP LOCKED`` alone would let a second consumer publish a channel's later rows
  while the first still publishes its earlier ones.
"""

from __future__ import annotations

import re

from ..exceptions import ConfigError
from ..urls import redact_url

#: The table ``herald serve --outbox`` reads unless ``outbox_table`` names another.
DEFAULT_TABLE = "herald_outbox"

# Lower-case SQL identifiers only (optionally schema-qualified), so that every name
# built from the table needs no quoting; 40 characters leave room for the suffixes
# within PostgreSQL's 63.
_TABLE_NAME = re.compile(r"(?:[a-z_][a-z0-9_]{0,39}\.)?[a-z_][a-z0-9_]{0,39}")


def check_table_name(table: str) -> str:
    """Return ``table`` if it can name an outbox table, else raise :class:`ConfigError`."""
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ConfigError(
            f"invalid outbox table name {table!r}: use a lower-case SQL name of at most 40 "
            "letters, digits and _ (not starting with a digit), optionally as schema.table"
        )
    return table


def check_dsn(dsn: str) -> str:
    """Return ``dsn`` if it is a PostgreSQL URL, else raise :class:`ConfigError`."""
    if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"outbox: expected a postgresql://user:password@host:port/database URL, got {redact_url(str(dsn))!r}"
        )
    return dsn


def _names(table: str) -> tuple[str, str, str]:
    """(schema prefix with its dot or "", the bare table name, the table) for ``table``."""
    check_table_name(table)
    schema, dot, bare = table.rpartition(".")
    return (schema + dot, bare, table)


def notify_channel(table: str) -> str:
    """The LISTEN/NOTIFY channel the insert trigger notifies (the table's name)."""
    return check_table_name(table)


def outbox_ddl(table: str = DEFAULT_TABLE) -> str:
    """The SQL that creates the outbox table ``table`` with its sequence, trigger and index.

    Idempotent (``IF NOT EXISTS``, ``CREATE OR REPLACE``): run it from a migration, or
    as is.  ``src/herald/outbox/schema.sql`` is this text for the default table.
    Needs PostgreSQL 11 or newer.
    """
    prefix, bare, table = _names(table)
    seq = f"{prefix}{bare}_id_seq"
    function = f"{prefix}{bare}_before_insert"
    return f"""\
-- Herald's transactional outbox (docs/backends.md).  An application inserts a
-- row (channel, data) in the same transaction as its own data; once committed, a
-- Herald consumer (`herald serve --outbox postgresql://...`) publishes it exactly once,
-- in commit order per channel, and deletes it.

-- CACHE 1 (the default): ids must be drawn in the order the trigger runs.
CREATE SEQUENCE IF NOT EXISTS {seq} CACHE 1;

CREATE TABLE IF NOT EXISTS {table} (
    -- Set by the trigger below, under the channel's write lock: within a channel,
    -- ids grow in commit order.  Herald publishes the row with the idempotency key
    -- 'outbox:{table}:<id>'.
    id         bigint      PRIMARY KEY,
    -- A Herald channel name, e.g. 'orders:42'; its namespace must be configured.
    channel    text        NOT NULL,
    -- The publication's data: any JSON value.
    data       json        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- NULL while pending.  Herald sets it (and keeps the row) when the row can never
    -- be published, e.g. its channel's namespace is unknown; fix and set it to NULL to retry.
    failed     text
);

ALTER SEQUENCE {seq} OWNED BY {table}.id;

CREATE INDEX IF NOT EXISTS {bare}_pending ON {table} (channel, id) WHERE failed IS NULL;

CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $herald$
BEGIN
    -- Writers of one channel take turns, from their first row of it to their commit:
    -- ids drawn here therefore grow in commit order within the channel.
    PERFORM pg_advisory_xact_lock(hashtext('{table}:write'), hashtext(NEW.channel));
    NEW.id := nextval('{seq}');
    -- Delivered at commit (never for a rolled-back transaction), once per transaction.
    PERFORM pg_notify('{table}', '');
    RETURN NEW;
END
$herald$;

DROP TRIGGER IF EXISTS {bare}_before_insert ON {table};
CREATE TRIGGER {bare}_before_insert BEFORE INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
"""


def insert_sql(table: str, placeholders: tuple[str, str]) -> str:
    """``INSERT`` of one row, with the driver's two placeholders (channel, JSON text)."""
    channel, data = placeholders
    return f"INSERT INTO {check_table_name(table)} (channel, data) VALUES ({channel}, CAST({data} AS json)) RETURNING id"


class ConsumerSql:
    """The statements a consumer runs on ``table`` (asyncpg placeholders)."""

    def __init__(self, table: str) -> None:
        table = check_table_name(table)
        self.table = table
        self.exists = "SELECT to_regclass($1) IS NOT NULL"
        # The oldest pending rows' channels, oldest first; claim at most $2 of them.  The
        # CTE is materialized and ordered, so the LIMIT stops the lock attempts as soon as
        # enough channels are claimed (the others stay free for other consumers).
        self.claim_channels = f"""
WITH oldest AS MATERIALIZED (
    SELECT channel, min(id) AS first
    FROM (SELECT channel, id FROM {table} WHERE failed IS NULL ORDER BY id LIMIT $1) AS pending
    GROUP BY channel
    ORDER BY first
)
SELECT channel FROM oldest
WHERE pg_try_advisory_xact_lock(hashtext('{table}:consume'), hashtext(channel))
LIMIT $2"""
        # Run after the claim, so its snapshot sees whatever the previous holder of a
        # channel committed.  The channel lock already excludes other consumers; the row
        # lock (waiting, never skipping: a skipped row would reorder its channel) guards
        # against anyone else touching the rows.
        self.claimed_rows = f"""
SELECT id, channel, data::text FROM {table}
WHERE channel = ANY($1::text[]) AND failed IS NULL
ORDER BY id
LIMIT $2
FOR UPDATE"""
        self.delete = f"DELETE FROM {table} WHERE id = ANY($1::bigint[])"
        self.mark_failed = f"UPDATE {table} SET failed = $2 WHERE id = ANY($1::bigint[])"
        self.backlog = f"""
SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8
FROM {table} WHERE failed IS NULL"""


__all__ = [
    "DEFAULT_TABLE",
    "ConsumerSql",
    "check_dsn",
    "check_table_name",
    "insert_sql",
    "notify_channel",
    "outbox_ddl",
]
