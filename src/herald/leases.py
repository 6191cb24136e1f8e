"""Open connections per (kind, key) counted across every node: the per-user and per-IP limits.

A *lease* is one open connection counted under ``(kind, key)``: ``(USER, user id)``
for ``max_connections_per_user``, ``(IP, client address)`` for
``max_connections_per_ip``.  :class:`ConnectionLeases` is the contract and the
per-process implementation (each node counts its own connections: the memory and
NATS brokers, and ``connection_lease_ttl = 0``); :class:`RedisConnectionLeases`
counts them across every node sharing the Redis broker.

Redis layout: one hash per (kind, key), ``PREFIX:conns:KIND:KEY``, with one field per
node, ``NODE -> "COUNT:EXPIRES_MS"``.  Only the scripts below change it, and each
touches that one key (Redis Cluster and sharded Redis need nothing more).  Expiry is
by Redis's clock (``TIME``), never a node's.

* Acquire: drop the fields of other nodes whose expiry passed, sum the others' counts,
  refuse when that plus this node's new count would pass the limit, else write this
  node's new count, expiring ``connection_lease_ttl`` from now.
* Each node rewrites its own *absolute* count of every key it holds every
  ``connection_lease_ttl / 3`` seconds (and at once after a release), so a node killed
  with ``-9`` stops counting at most ``connection_lease_ttl`` seconds after its last
  write, hence after its death, by Redis's clock.  The hash itself expires
  ``connection_lease_ttl`` after its last write: an abandoned key leaves nothing.
* Writes of one key from one node are serialized (a lock per key), so an older count
  never overwrites a newer one; a write that fails marks the key stale and the next
  pass writes it again: a release lost to a Redis blip does not leak.
* Redis unreachable (or erroring): **fail open** to this node's own count.  The
  connection is admitted if this node alone holds fewer than the limit, the error is
  logged (at most every :data:`WARN_EVERY` seconds) and counted (``on_error``:
  ``herald_broker_errors_total{operation="connection_leases"}``), for
  :data:`RETRY_AFTER` seconds acquires do not wait on Redis at all, and the count is
  written to Redis once it answers again (the refresh keeps trying).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from .limits import ConnectionCounter

if TYPE_CHECKING:
    from .brokers.redis import RedisBroker

logger = logging.getLogger("herald.leases")

#: The kind of a per-IP lease (key: the client's address).
IP = "ip"
#: The kind of a per-user lease (key: the user id).
USER = "user"

#: Keys whose count one refresh writes per Redis round trip (then the loop turns).
REFRESH_BATCH = 200
#: Seconds a closing node waits to give its counts back (what it cannot write lapses).
CLOSE_WAIT = 2.0
#: Seconds between two warnings that Redis does not answer for connection limits.
WARN_EVERY = 10.0
#: Seconds after a failed Redis call during which acquires do not ask Redis (a Redis that
#: hangs must not hold every connect for ``command_timeout``); the refresh keeps trying.
RETRY_AFTER = 1.0

# KEYS: the lease hash; ARGV: node, this node's count if admitted, limit, ttl (ms).
# Returns 1 (admitted, this node's count written) or 0 (over the limit, nothing written).
_ACQUIRE = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, want, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local fields = redis.call('hgetall', KEYS[1])
local others = 0
for i = 1, #fields, 2 do
  if fields[i] ~= node then
    local count, expires = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if count == nil or tonumber(expires) <= now then
      redis.call('hdel', KEYS[1], fields[i])
    else
      others = others + tonumber(count)
    end
  end
end
if others + want > limit then return 0 end
redis.call('hset', KEYS[1], node, want .. ':' .. (now + ttl))
if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
return 1
"""

# KEYS: the lease hash; ARGV: node, this node's count (0: remove its field), ttl (ms).
_SET = """
local node, count, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if count <= 0 then
  redis.call('hdel', KEYS[1], node)
  return 0
end
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('hset', KEYS[1], node, count .. ':' .. (now + ttl))
if redis.call('pttl', KEYS[1]) < ttl then redis.call('pexpire', KEYS[1], ttl) end
return 1
"""


class ConnectionLeases:
    """Connections per (kind, key), counted in this process (each node enforces its own
    limit).  The contract every implementation keeps:

    * :meth:`try_acquire` decides without waiting when it can; :meth:`acquire` decides
      for good (awaiting other nodes when :attr:`distributed`);
    * a ``True`` from either holds one lease: :meth:`release` it exactly once when the
      connection ends;
    * ``limit <= 0`` means unlimited: nothing is counted and there is nothing to release.
    """

    #: Whether :meth:`acquire` asks other nodes (an await) beyond this node's own count.
    distributed: ClassVar[bool] = False

    def __init__(self) -> None:
        self._counters: dict[str, ConnectionCounter] = {}  # per kind

    def _counter(self, kind: str) -> ConnectionCounter:
        counter = self._counters.get(kind)
        if counter is None:
            counter = self._counters[kind] = ConnectionCounter(0)
        return counter

    def held(self, kind: str, key: str) -> int:
        """Leases of ``(kind, key)`` this node holds."""
        return self._counter(kind).count(key)

    def __len__(self) -> int:
        """Distinct (kind, key) this node holds leases of."""
        return sum(len(counter) for counter in self._counters.values())

    def try_acquire(self, kind: str, key: str, limit: int) -> bool | None:
        """True: a lease is held; False: over the limit; None: this node's own count
        allows it, the cluster must be asked (:meth:`acquire`; nothing is held yet)."""
        if limit <= 0:
            return True
        return self._counter(kind).acquire(key, limit)

    async def acquire(self, kind: str, key: str, limit: int) -> bool:
        """Take a lease unless ``limit`` leases of ``(kind, key)`` are held (cluster-wide
        when :attr:`distributed`)."""
        return self.try_acquire(kind, key, limit) is True

    def release(self, kind: str, key: str) -> None:
        """Give back one lease of ``(kind, key)``; never waits, never raises."""
        self._counter(kind).release(key)

    async def start(self) -> None:
        """Start whatever keeps the leases alive (nothing here)."""

    async def close(self) -> None:
        """Stop it (the leases of a closed node lapse by themselves)."""


class _Held:
    """This node's leases of one (kind, key), and the order of its writes to Redis."""

    __slots__ = ("count", "flush_queued", "lock", "name", "pending", "stale")

    def __init__(self, name: str) -> None:
        self.name = name  # the Redis key, without the broker's prefix
        self.count = 0  # leases held here (the truth Redis is told)
        self.stale = False  # Redis may hold another count than ``count``
        self.pending = 0  # acquires under way (keep this object)
        self.flush_queued = False
        self.lock = asyncio.Lock()  # one write of this key from this node at a time

    def idle(self) -> bool:
        return not (self.count or self.stale or self.pending or self.flush_queued or self.lock.locked())


class RedisConnectionLeases(ConnectionLeases):
    """Connections counted across every node on the Redis broker(s) (module docstring).

    ``broker_for(name)`` picks the :class:`~herald.brokers.redis.RedisBroker` that keeps
    the lease key ``name`` (one broker; a shard of a sharded broker); its ``client`` may
    be a Redis Cluster client.  ``ttl``: seconds a node's counts outlive its last write.
    ``on_error`` is called for each failed Redis call (a metric).
    """

    distributed = True

    def __init__(
        self,
        broker_for: Callable[[str], RedisBroker],
        ttl: float,
        *,
        on_error: Callable[[], None] | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__()
        if ttl <= 0:
            raise ValueError("connection_lease_ttl must be positive for cluster-wide counting")
        self.broker_for = broker_for
        self.ttl = ttl
        self.on_error = on_error
        #: This node's field in every lease hash.
        self.node = node or secrets.token_hex(6)
        self._held: dict[str, _Held] = {}
        self._scripts: dict[tuple[int, str], Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._warned_at = -WARN_EVERY
        self._failing = False
        self._retry_at = 0.0  # monotonic time before which acquires fail open at once
        self._closed = False
        #: Redis calls that failed (the limits fell back to this node's count meanwhile).
        self.errors = 0

    # ------------------------------------------------------------ the contract

    def held(self, kind: str, key: str) -> int:
        state = self._held.get(_name(kind, key))
        return state.count if state is not None else 0

    def __len__(self) -> int:
        return sum(1 for state in self._held.values() if state.count)

    def try_acquire(self, kind: str, key: str, limit: int) -> bool | None:
        if limit <= 0:
            return True
        return False if self.held(kind, key) >= limit else None

    async def acquire(self, kind: str, key: str, limit: int) -> bool:
        if limit <= 0:
            return True
        name = _name(kind, key)
        state = self._held.get(name)
        if state is None:
            state = self._held[name] = _Held(name)
        elif state.count >= limit:
            return False
        state.pending += 1
        try:
            async with state.lock:
                if state.count >= limit:  # others of this node got in while we waited
                    return False
                if self._failing and time.monotonic() < self._retry_at:
                    state.stale = True  # written by the refresh once Redis answers
                    state.count += 1  # fail open: this node's own count (checked above) allows it
                    return True
                was_stale, state.stale = state.stale, False  # this write tells the truth
                try:
                    admitted = bool(
                        await self._run(name, _ACQUIRE, [self.node, state.count + 1, limit, self._ttl_ms])
                    )
                except asyncio.CancelledError:
                    state.stale = True  # Redis may or may not have applied it
                    raise
                except Exception as exc:
                    self._failed(exc)
                    state.stale = True
                    admitted = True  # fail open: this node's own count (checked above) allows it
                else:
                    self._recovered()
                if admitted:
                    state.count += 1
                elif was_stale:
                    state.stale = True
                return admitted
        finally:
            state.pending -= 1
            self._after_write(state)

    def release(self, kind: str, key: str) -> None:
        state = self._held.get(_name(kind, key))
        if self._closed:
            return  # the node closed: its counts were given back (or lapse within the ttl)
        if state is None or state.count <= 0:
            logger.error("connection lease %s:%s released but not held", kind, key)
            return
        state.count -= 1
        state.stale = True
        if not state.flush_queued:
            state.flush_queued = True
            task = asyncio.get_running_loop().create_task(self._flush(state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name="herald-connection-leases"
            )

    async def close(self) -> None:
        """Stop refreshing and give this node's counts back (best effort: what is not
        written lapses within ``ttl``)."""
        self._closed = True
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        wait = min(self.ttl, CLOSE_WAIT)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait)
        for state in self._held.values():
            state.count, state.stale = 0, True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.refresh(), wait)

    # ------------------------------------------------------------ upkeep

    async def refresh(self) -> None:
        """Write this node's count of every key it holds (or held and did not write),
        :data:`REFRESH_BATCH` keys per round trip, letting the loop turn between."""
        states = [state for state in list(self._held.values()) if state.count or state.stale]
        for start in range(0, len(states), REFRESH_BATCH):
            # Keys being written right now (an acquire, a release) get their expiry from that write.
            batch = [state for state in states[start : start + REFRESH_BATCH] if not state.lock.locked()]
            for state in batch:
                await state.lock.acquire()  # free: returns at once, without a loop turn
            try:
                await self._write_counts(batch)
            finally:
                for state in batch:
                    state.lock.release()
                    self._after_write(state)

    async def _refresh_forever(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # one failed pass must not end the upkeep
                logger.exception("connection lease refresh failed")

    async def _flush(self, state: _Held) -> None:
        """Tell Redis this node's count of ``state`` after a release."""
        try:
            async with state.lock:
                state.flush_queued = False
                if state.stale:
                    await self._write_counts([state])
        finally:
            state.flush_queued = False
            self._after_write(state)

    async def _write_counts(self, states: list[_Held]) -> None:
        """Write each state's count (the caller holds their locks); a failure leaves them stale."""
        by_broker: dict[int, tuple[RedisBroker, list[_Held]]] = {}
        for state in states:
            broker = self.broker_for(state.name)
            by_broker.setdefault(id(broker), (broker, []))[1].append(state)
        for broker, group in by_broker.values():
            for state in group:
                state.stale = False  # a release during the write marks it stale again
            try:
                await self._set_many(broker, group)
            except Exception as exc:
                self._failed(exc)
                for state in group:
                    state.stale = True
            else:
                self._recovered()

    async def _set_many(self, broker: RedisBroker, states: Iterable[_Held]) -> None:
        # Concurrent script calls share the broker's pipelines (one round trip per batch on
        # one Redis; a cluster client routes each key to its slot's master).
        ttl_ms, node, script = self._ttl_ms, self.node, self._script(broker, _SET)
        await asyncio.gather(
            *(
                broker.run_script(script, [self._key(broker, state.name)], [node, state.count, ttl_ms])
                for state in states
            )
        )

    # ------------------------------------------------------------ Redis

    @property
    def _ttl_ms(self) -> int:
        return max(int(self.ttl * 1000), 1)

    def _key(self, broker: RedisBroker, name: str) -> str:
        return f"{broker.config.prefix}:{name}"

    def _script(self, broker: RedisBroker, source: str) -> Any:
        # Scripts are bound to a broker's client, which is replaced after close().
        client = broker.client
        slot = (id(broker), source)
        script = self._scripts.get(slot)
        if script is None or script.registered_client is not client:
            script = self._scripts[slot] = client.register_script(source)
        return script

    async def _run(self, name: str, source: str, args: list[Any]) -> Any:
        broker = self.broker_for(name)
        return await broker.run_script(self._script(broker, source), [self._key(broker, name)], args)

    def _after_write(self, state: _Held) -> None:
        if state.idle() and self._held.get(state.name) is state:
            del self._held[state.name]

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error()
        now = time.monotonic()
        self._retry_at = now + RETRY_AFTER
        if not self._failing or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            logger.warning("connection limits counted on this node only: Redis did not answer (%s)", exc)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("connection limits counted across the cluster again: Redis answers")


def _name(kind: str, key: str) -> str:
    return f"conns:{kind}:{key}"


__all__ = ["IP", "REFRESH_BATCH", "USER", "ConnectionLeases", "RedisConnectionLeases"]
