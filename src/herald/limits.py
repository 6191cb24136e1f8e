"""Rate limiting and connection counting.  Plain objects, no I/O.

* :class:`TokenBucket` meters one connection's inbound commands: ``rate`` tokens
  per second refill a bucket of ``burst`` tokens; each command takes one.  A
  command that finds the bucket empty gets an error reply ``RATE_LIMITED`` (116)
  and costs the connection a *strike* from a second, smaller bucket; a connection
  that runs out of strikes (sustained abuse, not a short burst) is closed with
  4504 ``RATE_LIMIT``.
* :class:`ConnectionCounter` counts open connections per key (client IP, user id)
  and refuses one over the limit, in this process: the per-node
  :class:`herald.leases.ConnectionLeases` is one per kind of key; across the cluster,
  :class:`herald.leases.RedisConnectionLeases` counts (docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored; starts full.

    ``rate <= 0`` disables the bucket (every :meth:`take` succeeds).
    """

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def take(self, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if available; never blocks."""
        if self.rate <= 0:
            return True
        self._refill()
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False


class RateVerdict(Enum):
    OK = "ok"
    LIMITED = "limited"  # reply RATE_LIMITED (116), keep the connection
    ABUSE = "abuse"  # close with 4504


class CommandRateLimiter:
    """A connection's inbound command meter: a command bucket plus a strike bucket.

    Strikes refill at a tenth of their capacity per second, so a client that
    briefly overshoots gets error replies while one that keeps flooding for a
    few seconds is disconnected.
    """

    __slots__ = ("_max_strikes", "_strikes", "commands")

    def __init__(
        self,
        rate: float,
        burst: float,
        strikes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.commands = TokenBucket(rate, burst, clock=clock)
        self._max_strikes = strikes
        # Made at the first command over the rate: a bucket that starts full and is only
        # ever taken from is full until then, and most connections never get there.
        self._strikes: TokenBucket | None = None

    @property
    def strikes(self) -> TokenBucket:
        """The strike bucket: a tenth of its capacity per second."""
        strikes = self._strikes
        if strikes is None:
            commands = self.commands
            rate = max(self._max_strikes, 1) / 10.0 if commands.rate > 0 else 0
            strikes = self._strikes = TokenBucket(rate, self._max_strikes, clock=commands._clock)
        return strikes

    def check(self) -> RateVerdict:
        if self.commands.take():
            return RateVerdict.OK
        if self.strikes.take():
            return RateVerdict.LIMITED
        return RateVerdict.ABUSE


class ConnectionCounter:
    """Open connections per key, with a ceiling (``limit <= 0``: unlimited, still counted)."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str, limit: int | None = None) -> bool:
        """Count one more connection for ``key``; False (and nothing counted) when over
        the limit (``limit``, else the counter's own)."""
        count = self._counts.get(key, 0)
        ceiling = self.limit if limit is None else limit
        if ceiling > 0 and count >= ceiling:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """Number of distinct keys with open connections (bounded by open connections)."""
        return len(self._counts)


__all__ = ["CommandRateLimiter", "ConnectionCounter", "RateVerdict", "TokenBucket"]
