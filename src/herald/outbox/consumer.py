"""The outbox consumer: publish committed outbox rows exactly once, in commit order per channel.

::

    async with OutboxConsumer(herald.node, "postgresql://app@db/app"):
        ...  # rows committed to herald_outbox are published meanwhile

``herald serve --outbox postgresql://...`` (or ``Herald(settings)`` with ``outbox``
set) runs one in its lifespan.  Several consumers, on several nodes, may read the
same table.

One batch is one transaction on one connection:

1. claim up to ``max_channels`` channels among those of the oldest pending rows,
   each with a non-waiting advisory lock (a channel another consumer holds is
   skipped);
2. read those channels' oldest rows (at most ``batch_size``) in ``id`` order, which
   is commit order within a channel (:mod:`herald.outbox.schema` says why);
3. publish them, each channel's rows one after the other, channels side by side,
   each with the idempotency key ``outbox:<table>:<id>``;
4. delete the published rows (mark the ones that can never be published) and commit.

A consumer that dies anywhere in there leaves its rows in the table, its locks
released with its connection; the next consumer publishes them again, and the
broker answers each publish already made with the original position instead of
publishing twice (the key).  That needs the takeover to happen within
``idempotency_window`` seconds, which a crash-and-reclaim takes by far.

It wakes on the ``NOTIFY`` the insert trigger sends at commit, and polls every
``poll_interval`` seconds in case a notification was lost (while reconnecting).
It reconnects by itself, with back-off, and catches up on what was committed
while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..exceptions import CommandError, ConfigError
from ..urls import redact_url
from .schema import DEFAULT_TABLE, ConsumerSql, check_dsn, notify_channel
from .stats import OutboxStats, register, unregister

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger("herald.outbox")

#: Reconnection back-off (seconds): first wait, and the longest.
RECONNECT_DELAY = (0.1, 5.0)


def idempotency_key(table: str, row_id: int) -> str:
    """The key a row is published with: the same row always gives the same key."""
    return f"outbox:{table}:{row_id}"


def application_name() -> str:
    """How a consumer's connection is named in PostgreSQL (``pg_stat_activity``)."""
    return f"herald-outbox pid={os.getpid()}"


class OutboxConsumer:
    """Publishes the rows committed to an outbox table through ``node``; an async context manager.

    ``rows_consumed``, ``rows_failed``, ``pending_rows`` and ``lag_seconds`` are plain
    counters (also exported as ``herald_outbox_*`` metrics, docs/operations.md).
    """

    def __init__(
        self,
        node: Node,
        dsn: str,
        *,
        table: str = DEFAULT_TABLE,
        batch_size: int = 500,
        max_channels: int = 32,
        poll_interval: float = 1.0,
    ) -> None:
        try:
            import asyncpg  # noqa: F401 - checked here, used in the task
        except ImportError:
            raise ConfigError("the outbox consumer needs asyncpg: pip install 'herald[outbox]'") from None
        if batch_size < 1 or max_channels < 1 or not poll_interval > 0:
            raise ConfigError("outbox: batch_size and max_channels must be >= 1, poll_interval > 0")
        self.node = node
        self.dsn = check_dsn(dsn)
        self.sql = ConsumerSql(table)
        self.table = self.sql.table
        self.batch_size = batch_size
        self.max_channels = max_channels
        self.poll_interval = poll_interval
        self.stats = OutboxStats()
        #: Set once connected, listening and caught up with the rows committed before;
        #: cleared while reconnecting.
        self.listening = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None

    # ------------------------------------------------------------ counters

    @property
    def rows_consumed(self) -> int:
        return self.stats.rows_consumed

    @property
    def rows_failed(self) -> int:
        return self.stats.rows_failed

    @property
    def pending_rows(self) -> int:
        return self.stats.pending_rows

    @property
    def lag_seconds(self) -> float:
        return self.stats.lag_seconds

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start consuming in the background (connecting, and reconnecting, by itself)."""
        if self._task is not None:
            return
        self._stopping = False
        register(self.node, self.stats)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"herald-outbox-{self.table}")

    async def close(self, timeout: float = 5.0) -> None:
        """Finish the batch in progress (at most ``timeout`` seconds) and stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            # A batch cut short is rolled back: its rows are published again (and
            # recognised by their keys) by whichever consumer runs next.
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        unregister(self.node, self.stats)

    async def __aenter__(self) -> OutboxConsumer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        import asyncpg

        delay = RECONNECT_DELAY[0]
        while not self._stopping:
            connection: Any = None
            try:
                # Named, so pg_stat_activity and pg_locks show which process consumes what.
                connection = await asyncpg.connect(
                    self.dsn, timeout=10, server_settings={"application_name": application_name()}
                )
                if not await connection.fetchval(self.sql.exists, self.table):
                    raise ConfigError(
                        f"outbox table {self.table} does not exist: create it with the SQL of "
                        "herald.outbox.outbox_ddl() (docs/backends.md)"
                    )
                await self._serve(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "outbox %s on %s: %s; retrying in %.1f s",
                    self.table,
                    redact_url(self.dsn),
                    exc if isinstance(exc, ConfigError) else repr(exc),
                    delay,
                )
            else:
                delay = RECONNECT_DELAY[0]
            finally:
                self.listening.clear()
                if connection is not None:
                    connection.terminate()
            if not self._stopping:
                await self._pause(delay)
                delay = min(delay * 2, RECONNECT_DELAY[1])

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if woken (a notification, or close())."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    async def _serve(self, connection: Any) -> None:
        """Consume through ``connection`` until stopped (returns) or the link fails (raises)."""
        await connection.add_listener(notify_channel(self.table), self._on_notify)
        connection.add_termination_listener(self._on_notify)
        logger.info("outbox %s: consuming from %s", self.table, redact_url(self.dsn))
        next_measure = 0.0
        # No wait before the first round: catch up on what was committed meanwhile.
        while not self._stopping:
            if connection.is_closed():
                raise ConnectionError("connection closed")
            backing_off = await self._drain(connection)
            self.listening.set()
            now = time.monotonic()
            if now >= next_measure:
                await self._measure(connection)
                next_measure = now + self.poll_interval
            if self._stopping:
                return
            if backing_off:
                # Not woken by notifications: new rows must not hammer a broker that is down.
                await asyncio.sleep(self.poll_interval)
                continue
            # Rows committed after the drain's last batch have notified by now, or are found
            # by the next poll.
            await self._pause(self.poll_interval)

    def _on_notify(self, *args: Any) -> None:
        self._wake.set()

    async def _drain(self, connection: Any) -> bool:
        """Run batches until none finds rows to take; True when publishing failed (back off)."""
        while not self._stopping:
            taken, failed = await self._batch(connection)
            if failed:
                return True
            if taken == 0:
                return False
        return False

    async def _batch(self, connection: Any) -> tuple[int, bool]:
        """One transaction: claim channels, publish their oldest rows, delete them.

        Returns (rows taken off the queue, whether a publish failed for a passing reason).
        """
        sql = self.sql
        async with connection.transaction():
            claimed = await connection.fetch(sql.claim_channels, self.batch_size, self.max_channels)
            if not claimed:
                return 0, False
            rows = await connection.fetch(sql.claimed_rows, [r[0] for r in claimed], self.batch_size)
            by_channel: dict[str, list[tuple[int, str]]] = {}
            for row_id, channel, data in rows:
                by_channel.setdefault(channel, []).append((row_id, data))
            outcomes = await asyncio.gather(
                *(self._publish_channel(channel, items) for channel, items in by_channel.items())
            )
            published = [row_id for done, _ in outcomes for row_id in done]
            refused: dict[str, list[int]] = {}
            for _, refusals in outcomes:
                for row_id, reason in refusals:
                    refused.setdefault(reason, []).append(row_id)
            if published:
                await connection.execute(sql.delete, published)
            for reason, ids in refused.items():
                await connection.execute(sql.mark_failed, ids, reason)
        # Committed: only now are the rows consumed.
        failed = sum(len(ids) for ids in refused.values())
        if failed:
            logger.error(
                "outbox %s: %d row(s) can never be published, kept with `failed` set: %s",
                self.table,
                failed,
                "; ".join(refused),
            )
        self.stats.rows_consumed += len(published)
        self.stats.rows_failed += failed
        taken = len(published) + failed
        stalled = len(rows) > taken
        if not stalled and self._failing is not None:
            logger.info("outbox %s: publishing again", self.table)
            self._failing = None
        return taken, stalled

    async def _publish_channel(
        self, channel: str, items: Sequence[tuple[int, str]]
    ) -> tuple[list[int], list[tuple[int, str]]]:
        """Publish one channel's rows in order: (published ids, (refused id, why) pairs).

        A row the node refuses (invalid channel, unknown namespace) can never be
        published: it is refused and the channel goes on.  Any other error (the broker
        is down) stops the channel there; the rest stays for a later batch.
        """
        try:
            name, options = self.node.check_channel(channel)
        except CommandError as exc:
            return [], [(row_id, exc.message) for row_id, _ in items]
        published: list[int] = []
        refused: list[tuple[int, str]] = []
        for row_id, data in items:
            try:
                await self.node.publish_json(
                    name, data.encode(), options, idempotency_key=idempotency_key(self.table, row_id)
                )
            except CommandError as exc:
                refused.append((row_id, exc.message))
                continue
            except Exception as exc:
                message = repr(exc)
                level = logging.DEBUG if self._failing == message else logging.WARNING
                self._failing = message
                logger.log(
                    level, "outbox %s: publish to %s failed, will retry: %s", self.table, name, message
                )
                break
            published.append(row_id)
        return published, refused

    async def _measure(self, connection: Any) -> None:
        """Refresh ``pending_rows`` and ``lag_seconds``."""
        count, age = await connection.fetchrow(self.sql.backlog)
        self.stats.pending_rows = int(count)
        self.stats.lag_seconds = max(float(age), 0.0) if count else 0.0


__all__ = ["OutboxConsumer", "application_name", "idempotency_key"]
