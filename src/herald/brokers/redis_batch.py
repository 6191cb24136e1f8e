"""Script calls to one Redis sent as pipelines: one round trip for many callers.

Every publication, position read and presence write is a Lua script (``EVALSHA``).
Sent one by one, each call waits for a pooled connection and a round trip of its
own, and redis-py's per-command overhead dominated the broker's CPU.  A
:class:`ScriptBatcher` collects the calls made while the event loop runs and sends
them as one pipeline (no ``MULTI``: each script is atomic on its own, the batch is
not), then resolves each caller's future with its own reply or error.

Guarantees:

* Order: calls reach Redis in the order they were made, across batches too (one
  batch is in flight at a time; calls made meanwhile go in the next one).  So two
  publications to a channel issued one after the other get increasing offsets.
* Errors per call: a script that fails (a Redis error reply) fails only its caller.
* A connection failure (Redis down, restarted mid-batch, the link cut) fails every
  call of the batch with the connection error (the broker maps it to
  :class:`~herald.exceptions.BrokerUnavailableError`).  A batch is never sent twice:
  the failure may have come after Redis ran its scripts, and sending them again would
  publish twice what the caller is told once (a caller with an idempotency key may
  retry safely).  A connection known to be closed or out of step before a batch (Redis
  restarted while it was idle) is connected again first.
* Bounded: at most ``max_batch`` calls per pipeline.
* One connection of its own: one batch is in flight at a time, so the batcher keeps one
  connection, made as the client's pool makes its connections (same address, options
  and credentials), rather than a pool checkout and release per batch (with redis-py's
  blocking pool: a lock, a condition and a timer each way, about as much CPU as the
  round trip's own client side).  It has no socket timeout of its own, because redis-py
  wraps every send on a connection that has one in ``asyncio.wait_for`` (a task per
  send on Python 3.11): a batch has one deadline, the pool's socket timeout, for its
  send and all its replies.  A batch that fails or is interrupted disconnects it (a
  reply half read must not reach the next batch); the next batch connects it again.
  Closed by :meth:`ScriptBatcher.close`, or when the broker's client was replaced.
* ``NOSCRIPT`` (Redis restarted or its script cache flushed): the scripts are
  loaded and the calls that met it are sent again, in their order (after the calls
  of their batch that did run: only then may two calls of one channel with
  different scripts swap).

Used with one Redis only: on a Redis Cluster the broker sends each call on its own
(redis-py routes it to the slot's master and follows ``MOVED``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

_c_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command

    _c_pack = cast(Callable[[tuple[Any, ...]], bytes], pack_command)
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    _c_pack = None

#: Calls per pipeline at most (bounds one round trip's time in Redis and its memory).
MAX_BATCH = 256


class _Call:
    __slots__ = ("args", "future", "source")

    def __init__(self, source: str, args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.source = source  # the script's Lua (to load it after NOSCRIPT); "" for a command
        self.args = args  # EVALSHA sha numkeys keys... args...
        self.future = future


class ScriptBatcher:
    """Sends the script calls of one Redis client in pipelines (see the module docstring).

    ``client`` returns the current command client (the broker replaces it after a close).
    """

    def __init__(self, client: Callable[[], aioredis.Redis], max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._client = client
        self.max_batch = max_batch
        self._queue: deque[_Call] = deque()
        self._sender: asyncio.Task[None] | None = None
        #: The pool whose options the batches' connection was made with, and the connection.
        self._held: tuple[Any, Any] | None = None
        #: Pipelines sent and calls they carried (tests, metrics).
        self.batches = 0
        self.calls = 0
        self.largest = 0

    async def run(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """Run the registered ``script`` (a redis-py ``Script``) with ``keys`` and ``args``;
        raises what Redis or the connection raised for this call."""
        return await self._queue_call(script.script, ("EVALSHA", script.sha, len(keys), *keys, *args))

    async def execute(self, *args: Any) -> Any:
        """Run one plain command (``PUBLISH``, ...) in the batch; its raw reply."""
        return await self._queue_call("", args)

    def _queue_call(self, source: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(source, args, future))
        if self._sender is None:
            self._sender = loop.create_task(self._send_all(), name="herald-redis-batch")
        return future

    async def _send_all(self) -> None:
        """Send the queued calls, a batch at a time, until none is left."""
        try:
            # Started on the next loop turn: the callers of this one have queued theirs.
            # Calls made while a batch is in flight wait for the next one (one round trip
            # at a time keeps the order and lets batches grow with the load).
            while self._queue:
                batch: list[_Call] = []
                while self._queue and len(batch) < self.max_batch:
                    call = self._queue.popleft()
                    if not call.future.done():  # a caller cancelled before it was sent: skip
                        batch.append(call)
                if batch:
                    await self._send(batch)
        finally:
            self._sender = None
            if self._queue:  # cancelled (closing): nobody will send these
                self.fail_all(ConnectionError("redis batch sender stopped"))

    async def _send(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        self.largest = max(self.largest, len(batch))
        replies = await self._replies(batch, self._pipeline)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if again:
            # The scripts are gone from Redis (restart, SCRIPT FLUSH): load them and resend
            # the calls that met it (they did nothing), in their order.  A failure now
            # fails only them: the others of the batch were done.
            retried = [batch[i] for i in again]
            for i, reply in zip(again, await self._replies(retried, self._load_and_send), strict=True):
                replies[i] = reply
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                _fail(call.future, reply)
            elif not call.future.done():
                call.future.set_result(reply)

    async def _replies(
        self, batch: list[_Call], send: Callable[[list[_Call]], Awaitable[list[Any]]]
    ) -> list[Any]:
        """``send(batch)``'s replies; when it fails, that error as every call's reply."""
        try:
            return await send(batch)
        except asyncio.CancelledError:
            # Only close() cancels the sender: its callers learn the broker is gone.
            for call in batch:
                _fail(call.future, ConnectionError("redis broker closed"))
            raise
        except Exception as exc:
            return [exc] * len(batch)

    async def _load_and_send(self, batch: list[_Call]) -> list[Any]:
        client = self._client()
        for source in dict.fromkeys(call.source for call in batch if call.source):
            await client.script_load(source)
        return await self._pipeline(batch)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        """Send ``batch`` on the kept connection and read every reply (an error reply is
        returned as its exception); never sent twice (see the module docstring)."""
        packed = b"".join(_pack(call.args) for call in batch)
        pool, connection = await self._connection()
        try:
            # One deadline for the batch: the pool's socket timeout (see the module docstring).
            timeout = pool.connection_kwargs.get("socket_timeout")
            return await self._exchange(connection, timeout, packed, len(batch))
        except BaseException:
            # A reply half read (timeout, cancellation) must not reach the next batch.
            await connection.disconnect()
            raise

    async def _connection(self) -> tuple[Any, Any]:
        """The current client's pool and the batches' connection, made like the pool's
        (connected by the first send), disconnected first if Redis closed it."""
        pool = self._client().connection_pool
        held = self._held
        if held is not None and held[0] is not pool:
            await self._drop()  # the client was replaced: follow it
            held = None
        if held is None:
            connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            self._held = (pool, connection)
            return pool, connection
        connection = held[1]
        if connection.is_connected:
            # Closed by Redis (EOF seen) or holding bytes nobody asked for: start afresh
            # rather than send on it.  (hiredis: no system call.  redis-py 8 renamed
            # can_read_destructive, which it now deprecates, to can_read.)
            check = getattr(connection, "can_read", None) or connection.can_read_destructive
            try:
                stale = await check()
            except RedisConnectionError:
                stale = True
            if stale:
                await connection.disconnect()
        return pool, connection

    async def _drop(self) -> None:
        """Close the batches' connection."""
        held, self._held = self._held, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held[1].disconnect()

    async def _exchange(self, connection: Any, timeout: float | None, packed: bytes, count: int) -> list[Any]:
        replies: list[Any] = []
        # One deadline for the whole batch, not one timer per reply.
        async with asyncio.timeout(timeout):
            await connection.send_packed_command(packed, check_health=False)
            for _ in range(count):
                try:
                    replies.append(await connection.read_response(timeout=math.inf))
                except ResponseError as exc:  # the reply was read whole: the stream is in step
                    replies.append(exc)
        return replies

    def fail_all(self, exc: BaseException) -> None:
        """Fail every queued call (the broker is closing)."""
        while self._queue:
            _fail(self._queue.popleft().future, exc)

    async def close(self) -> None:
        """Stop sending; calls not sent yet fail."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        self.fail_all(ConnectionError("redis broker closed"))
        await self._drop()


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol (bytes, str and int arguments).

    hiredis (installed with Herald) packs in C, a quarter of the time of the loop below
    for a publish script's 16 arguments; the loop takes what hiredis refuses.
    """
    if _c_pack is not None:
        with contextlib.suppress(TypeError):
            return _c_pack(args)
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        value = bytes(arg) if isinstance(arg, (bytes, bytearray, memoryview)) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: a cancelled caller must not log "never retrieved"


__all__ = ["MAX_BATCH", "ScriptBatcher"]
